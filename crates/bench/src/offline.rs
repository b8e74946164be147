//! `natter-bench offline`: N receivers are offline while N senders queue 10–100 messages each for them
//! (real Olm ciphertexts, one session per pair, durable in natterd before each "sent"); then every
//! receiver connects at once and drains its queue, acknowledging as a client does (without decrypting).
//! Reports how fast the backlog drains and its server CPU per message.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use natter_proto::DeviceId;
use natter_proto::wire::{DeviceMessage, Frame, Ping, SendMessage, frame, push, request, response};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::adapter::{self, Credentials, Device, Link, Numbers, SmsLog};
use crate::pairs::{content_bytes, open_session, parse_message_id, text_of};
use crate::report::Summary;
use crate::stats::{Proc, quantile};

/// What an offline run needs.
#[derive(Debug)]
pub struct OfflineOptions {
    /// Offline receivers (and as many senders).
    pub receivers: usize,
    /// Fewest messages queued for one receiver.
    pub min_queued: u32,
    /// Most messages queued for one receiver.
    pub max_queued: u32,
    /// Bytes of text per message.
    pub text_bytes: usize,
    /// Registrations and senders at once during setup.
    pub concurrency: usize,
    /// One-time keys each registered device uploads.
    pub one_time_keys: usize,
    /// Upper limit on each phase.
    pub timeout: Duration,
    /// natterd, for CPU time.
    pub server: Option<Proc>,
}

/// How many messages receiver `i` gets: spread evenly over `min..=max`, the same in every run.
fn queued_for(i: usize, min: u32, max: u32) -> u32 {
    let span = u64::from(max - min) + 1;
    min + ((i as u64 * 7919) % span) as u32
}

/// Sender `i` opens a session with its receiver and queues `count` messages, one request at a time.
async fn fill(
    addr: String,
    i: usize,
    from: Arc<Device>,
    to: Arc<Device>,
    count: u32,
    text: String,
) -> Result<()> {
    let mut link = adapter::login(&addr, &from).await?;
    let mut session = open_session(&mut link, &from, &to).await?;
    let epoch = Instant::now();
    for seq in 0..count {
        let id = crate::pairs::message_id(epoch, Instant::now(), i as u32, seq);
        let ct = session.encrypt(&content_bytes(&id, &text))?;
        let answer = link
            .request(request::Body::SendMessage(SendMessage {
                message_id: id.to_vec(),
                recipient: to.phone.as_str().to_owned(),
                messages: vec![DeviceMessage {
                    phone: to.phone.as_str().to_owned(),
                    device_id: DeviceId::PRIMARY.get(),
                    olm_type: ct.olm_type,
                    ciphertext: ct.body,
                }],
                retry_of: Vec::new(),
                retry_attempt: 0,
            }))
            .await
            .with_context(|| format!("sender {i}, message {seq}"))?;
        if !matches!(answer, response::Body::Sent(_)) {
            bail!("sender {i}: unexpected answer to SendMessage");
        }
    }
    Ok(())
}

#[derive(Default)]
struct Drained {
    delivered: u64,
    duplicates: u64,
    foreign: u64,
    elapsed: Duration,
}

/// Receiver `i` logs in and acknowledges envelopes until it holds all `count` of its messages.
async fn drain(
    addr: String,
    i: usize,
    who: Credentials,
    count: u32,
    started: Instant,
) -> Result<Drained> {
    let mut link = who.login(&addr).await?;
    let mut seen = vec![false; count as usize];
    let mut out = Drained::default();
    while out.delivered < u64::from(count) {
        let mut frames = vec![link.recv().await?];
        while let Some(f) = link.buffered()? {
            frames.push(f);
        }
        let mut acks = Vec::new();
        let mut reply = Vec::new();
        for f in frames {
            match f.body {
                Some(frame::Body::Push(p)) => {
                    if let Some(push::Body::Envelope(env)) = p.body {
                        acks.push(env.id);
                        match parse_message_id(&env.message_id) {
                            Some((_, pair, seq)) if pair as usize == i && seq < count => {
                                if std::mem::replace(&mut seen[seq as usize], true) {
                                    out.duplicates += 1;
                                } else {
                                    out.delivered += 1;
                                }
                            }
                            _ => out.foreign += 1,
                        }
                    }
                }
                Some(frame::Body::Ping(p)) => {
                    reply.push(Frame::new(frame::Body::Pong(Ping { nonce: p.nonce })));
                }
                _ => {}
            }
        }
        reply.extend(Link::ack_frames(&acks));
        link.send(&reply).await?;
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// Runs the scenario and returns its summary.
pub async fn run(addr: &str, sms: Arc<SmsLog>, o: OfflineOptions) -> Result<Summary> {
    if o.receivers == 0 || o.min_queued == 0 || o.min_queued > o.max_queued {
        bail!("need --receivers ≥ 1 and 1 ≤ --min-queued ≤ --max-queued");
    }
    let setup = Instant::now();
    let devices = adapter::register_many(
        addr,
        sms,
        Numbers::new()?,
        0,
        2 * o.receivers,
        o.concurrency,
        o.one_time_keys,
    )
    .await?;
    let devices: Vec<Arc<Device>> = devices.into_iter().map(Arc::new).collect();
    let (receivers, senders) = devices.split_at(o.receivers);
    let counts: Vec<u32> = (0..o.receivers)
        .map(|i| queued_for(i, o.min_queued, o.max_queued))
        .collect();
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    tracing::info!(
        receivers = o.receivers,
        total,
        "queueing for offline receivers"
    );
    let text = text_of(o.text_bytes);
    let fill_started = Instant::now();
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut filled = 0;
    while filled < o.receivers {
        while next < o.receivers && set.len() < o.concurrency.max(1) {
            set.spawn(fill(
                addr.to_owned(),
                next,
                senders[next].clone(),
                receivers[next].clone(),
                counts[next],
                text.clone(),
            ));
            next += 1;
        }
        let joined = tokio::time::timeout(o.timeout, set.join_next())
            .await
            .map_err(|_| anyhow!("queueing did not finish within --timeout"))?;
        let Some(joined) = joined else { break };
        joined??;
        filled += 1;
    }
    let fill_s = fill_started.elapsed().as_secs_f64();
    let setup_s = setup.elapsed().as_secs_f64();

    let cpu_before = o.server.as_ref().map(Proc::cpu_seconds).transpose()?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, r) in receivers.iter().enumerate() {
        set.spawn(drain(
            addr.to_owned(),
            i,
            Credentials::from(r.as_ref()),
            counts[i],
            started,
        ));
    }
    let mut delivered = 0;
    let mut duplicates = 0;
    let mut foreign = 0;
    let mut times = Vec::with_capacity(o.receivers);
    let deadline = started + o.timeout;
    while let Some(joined) = tokio::time::timeout_at(deadline, set.join_next())
        .await
        .map_err(|_| anyhow!("the backlog did not drain within --timeout"))?
    {
        let d = joined??;
        delivered += d.delivered;
        duplicates += d.duplicates;
        foreign += d.foreign;
        times.push(d.elapsed.as_micros() as u64);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = match (&o.server, cpu_before) {
        (Some(p), Some(before)) => Some(p.cpu_seconds()? - before),
        _ => None,
    };
    times.sort_unstable();

    let mut s = Summary::new("offline");
    s.text("mode", "olm");
    s.text("receivers_do", "ack-only");
    s.int("receivers", o.receivers as u64);
    s.int("queued", total);
    s.int("delivered", delivered);
    s.int("duplicates", duplicates);
    s.int("foreign", foreign);
    s.float("drain_wall_s", wall, 3);
    s.float("drained_msgs_per_s", delivered as f64 / wall.max(1e-9), 0);
    s.float(
        "p50_receiver_drained_ms",
        quantile(&times, 0.50) as f64 / 1000.0,
        1,
    );
    s.float(
        "p99_receiver_drained_ms",
        quantile(&times, 0.99) as f64 / 1000.0,
        1,
    );
    if let Some(cpu) = cpu {
        s.float("server_cpu_s", cpu, 2);
        s.float("msgs_per_server_cpu_s", delivered as f64 / cpu.max(1e-9), 0);
    }
    s.float("fill_s", fill_s, 1);
    s.float("setup_s", setup_s, 1);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sizes_cover_the_range() {
        let c: Vec<u32> = (0..1000).map(|i| queued_for(i, 10, 100)).collect();
        assert!(c.iter().all(|&n| (10..=100).contains(&n)));
        assert_eq!(*c.iter().min().unwrap(), 10);
        assert_eq!(*c.iter().max().unwrap(), 100);
        assert_eq!(queued_for(5, 7, 7), 7);
    }
}

//! Scenario `pairs`: N pairs of online devices; in each pair A sends SendMessage requests to B (pipelined,
//! at most `window` unanswered per connection, closed loop or at an offered rate), B receives the
//! Envelope pushes and acknowledges them in batches. Measures delivered messages per second and one-way
//! delivery latency.
//!
//! Every message is a real Olm ciphertext of a `Content { Text }`: A claims B's one-time key and opens an
//! outbound session, as a client does. A message's id carries its send time (nanoseconds since the run's
//! epoch, on this process's monotonic clock), its pair and its sequence number, so the receiver measures
//! latency without sharing state with the sender.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use natter_crypto::{OlmCiphertext, OlmSession, verify_device_list};
use natter_proto::content::{self, Content, Text};
use natter_proto::wire::{
    ClaimKeys, DeviceMessage, Frame, GetDevices, Ping, Request, SendMessage, frame, push, request,
    response,
};
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;
use tokio::time::Instant;

use crate::adapter::{self, Device, Link, Numbers, SmsLog};
use crate::report::Summary;
use crate::stats::{Proc, quantile};

/// Options of the `pairs` scenario.
#[derive(Debug, Clone)]
pub struct PairsOptions {
    /// Number of sender/receiver pairs.
    pub pairs: usize,
    /// Messages each sender sends.
    pub messages: u32,
    /// Total offered rate in messages per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Unanswered SendMessage requests allowed per sender connection.
    pub window: usize,
    /// Replay a pool of ciphertexts encrypted up front instead of encrypting each message.
    pub pre_encrypted: bool,
    /// Ciphertexts per pair in the pre-encrypted pool.
    pub pool: usize,
    /// Bytes of text in each message.
    pub text_bytes: usize,
    /// Registrations run at once during setup.
    pub concurrency: usize,
    /// One-time keys each device uploads at registration.
    pub one_time_keys: usize,
    /// Limit for the measured phase.
    pub timeout: Duration,
    /// natterd's pid, for CPU time.
    pub server: Option<Proc>,
}

/// Nanoseconds since `epoch`, pair and sequence number, packed into a 16-byte message id.
pub(crate) fn message_id(epoch: Instant, at: Instant, pair: u32, seq: u32) -> [u8; 16] {
    let ns = at.saturating_duration_since(epoch).as_nanos() as u64;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&ns.to_be_bytes());
    id[8..12].copy_from_slice(&pair.to_be_bytes());
    id[12..].copy_from_slice(&seq.to_be_bytes());
    id
}

pub(crate) fn parse_message_id(id: &[u8]) -> Option<(u64, u32, u32)> {
    let id: &[u8; 16] = id.try_into().ok()?;
    let ns = u64::from_be_bytes(id[..8].try_into().ok()?);
    let pair = u32::from_be_bytes(id[8..12].try_into().ok()?);
    let seq = u32::from_be_bytes(id[12..].try_into().ok()?);
    Some((ns, pair, seq))
}

pub(crate) fn text_of(len: usize) -> String {
    const WORDS: &str =
        "the quick brown fox jumps over the lazy dog and natter carries it end to end ";
    WORDS.chars().cycle().take(len).collect()
}

pub(crate) fn content_bytes(id: &[u8; 16], text: &str) -> Vec<u8> {
    Content {
        message_id: id.to_vec(),
        sent_at_ms: adapter::now_ms(),
        body: Some(content::content::Body::Text(Text {
            body: text.to_owned(),
        })),
        conversation: String::new(),
    }
    .encode_to_vec()
}

/// How a sender gets its ciphertexts.
enum Cipher {
    /// Encrypt each message now.
    Live {
        session: Box<OlmSession>,
        text: String,
    },
    /// Replay these, cyclically.
    Pool(Vec<OlmCiphertext>),
}

struct Sender {
    pair: u32,
    link: Link,
    recipient: PhoneNumber,
    cipher: Cipher,
}

#[derive(Default)]
struct SenderResult {
    ok: u64,
    errors: u64,
    last_error: Option<String>,
    first_send: Option<Instant>,
    ciphertext_bytes: usize,
    timed_out: bool,
}

struct Receiver {
    pair: u32,
    link: Link,
    device: Device,
    peer_curve: [u8; 32],
}

#[derive(Default)]
struct ReceiverResult {
    delivered: u64,
    duplicates: u64,
    foreign: u64,
    decrypted: u64,
    decrypt_failures: u64,
    latencies_ns: Vec<u64>,
    last_delivery: Option<Instant>,
    timed_out: bool,
}

struct Plan {
    epoch: Instant,
    start: Instant,
    deadline: Instant,
    messages: u32,
    window: usize,
    /// Per-pair rate and this pair's phase offset in messages.
    rate: Option<(f64, f64)>,
}

impl Plan {
    fn scheduled(&self, seq: u32) -> Instant {
        match self.rate {
            None => self.start,
            Some((r, phase)) => self.start + Duration::from_secs_f64((f64::from(seq) + phase) / r),
        }
    }
}

async fn run_sender(mut s: Sender, plan: Plan) -> Result<(SenderResult, Link)> {
    let mut res = SenderResult::default();
    let mut sent = 0u32;
    let mut inflight = 0usize;
    let far = plan.deadline + Duration::from_secs(3600);
    tokio::time::sleep_until(plan.start).await;
    // Bounded: every iteration either sends at least one message or takes at least one frame, and the
    // deadline ends it.
    loop {
        if sent == plan.messages && inflight == 0 {
            break;
        }
        let can_send = sent < plan.messages && inflight < plan.window;
        let next = if can_send { plan.scheduled(sent) } else { far };
        tokio::select! {
            biased;
            f = s.link.recv() => {
                let mut frames = vec![f?];
                while let Some(f) = s.link.buffered()? {
                    frames.push(f);
                }
                let mut pongs = Vec::new();
                for f in frames {
                    match f.body {
                        Some(frame::Body::Response(r)) => {
                            inflight = inflight.saturating_sub(1);
                            if let Some(e) = r.error {
                                res.errors += 1;
                                res.last_error = Some(format!("{:?}: {}", e.code(), e.message));
                            } else {
                                res.ok += 1;
                            }
                        }
                        Some(frame::Body::Ping(p)) => {
                            pongs.push(Frame::new(frame::Body::Pong(Ping { nonce: p.nonce })));
                        }
                        _ => {}
                    }
                }
                s.link.send(&pongs).await?;
            }
            _ = tokio::time::sleep_until(next), if can_send => {
                let now = Instant::now();
                let mut batch = Vec::new();
                while sent < plan.messages && inflight < plan.window && plan.scheduled(sent) <= now {
                    // Open loop: latency counts from the scheduled time, so a send the server held
                    // back (window full) is not hidden.
                    let at = if plan.rate.is_some() { plan.scheduled(sent) } else { Instant::now() };
                    let id = message_id(plan.epoch, at, s.pair, sent);
                    let ct = match &mut s.cipher {
                        Cipher::Live { session, text } => session.encrypt(&content_bytes(&id, text))?,
                        Cipher::Pool(pool) => pool
                            .get(sent as usize % pool.len().max(1))
                            .cloned()
                            .ok_or_else(|| anyhow!("empty ciphertext pool"))?,
                    };
                    if res.ciphertext_bytes == 0 {
                        res.ciphertext_bytes = ct.body.len();
                    }
                    let req_id = s.link.next_request_id();
                    batch.push(Frame::new(frame::Body::Request(Request {
                        id: req_id,
                        body: Some(request::Body::SendMessage(SendMessage {
                            message_id: id.to_vec(),
                            recipient: s.recipient.as_str().to_owned(),
                            messages: vec![DeviceMessage {
                                phone: s.recipient.as_str().to_owned(),
                                device_id: DeviceId::PRIMARY.get(),
                                olm_type: ct.olm_type,
                                ciphertext: ct.body,
                            }],
                            retry_of: Vec::new(),
                            retry_attempt: 0,
                        })),
                    })));
                    sent += 1;
                    inflight += 1;
                }
                if res.first_send.is_none() && !batch.is_empty() {
                    res.first_send = Some(Instant::now());
                }
                s.link.send(&batch).await?;
            }
            _ = tokio::time::sleep_until(plan.deadline) => {
                res.timed_out = true;
                break;
            }
        }
    }
    Ok((res, s.link))
}

async fn run_receiver(
    mut r: Receiver,
    plan: Plan,
    decrypt: bool,
    expected: Arc<AtomicU32>,
) -> Result<(ReceiverResult, Link)> {
    let mut res = ReceiverResult {
        latencies_ns: Vec::with_capacity(plan.messages as usize),
        ..ReceiverResult::default()
    };
    let mut seen = vec![false; plan.messages as usize];
    let mut session: Option<OlmSession> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        if res.delivered >= u64::from(expected.load(Ordering::Acquire)) {
            break;
        }
        tokio::select! {
            biased;
            f = r.link.recv() => {
                let mut frames = vec![f?];
                while let Some(f) = r.link.buffered()? {
                    frames.push(f);
                }
                let now = Instant::now();
                let mut acks = Vec::new();
                let mut reply = Vec::new();
                for f in frames {
                    match f.body {
                        Some(frame::Body::Push(p)) => {
                            if let Some(push::Body::Envelope(env)) = p.body {
                                acks.push(env.id);
                                let Some((ns, pair, seq)) = parse_message_id(&env.message_id) else {
                                    res.foreign += 1;
                                    continue;
                                };
                                if pair != r.pair || seq as usize >= seen.len() {
                                    res.foreign += 1;
                                    continue;
                                }
                                if std::mem::replace(&mut seen[seq as usize], true) {
                                    res.duplicates += 1;
                                    continue;
                                }
                                res.delivered += 1;
                                let sent_at = plan.epoch + Duration::from_nanos(ns);
                                res.latencies_ns.push(now.saturating_duration_since(sent_at).as_nanos() as u64);
                                res.last_delivery = Some(now);
                                if decrypt {
                                    let ct = OlmCiphertext { olm_type: env.olm_type, body: env.ciphertext };
                                    let plain = match session.as_mut() {
                                        Some(s) => s.decrypt(&ct).ok(),
                                        None => match r.device.keys.create_inbound_session(&r.peer_curve, &ct) {
                                            Ok((s, plain)) => {
                                                session = Some(s);
                                                Some(plain)
                                            }
                                            Err(_) => None,
                                        },
                                    };
                                    let good = plain
                                        .and_then(|p| Content::decode(p.as_slice()).ok())
                                        .is_some_and(|c| c.message_id == env.message_id);
                                    if good { res.decrypted += 1 } else { res.decrypt_failures += 1 }
                                }
                            }
                        }
                        Some(frame::Body::Ping(p)) => {
                            reply.push(Frame::new(frame::Body::Pong(Ping { nonce: p.nonce })));
                        }
                        _ => {}
                    }
                }
                // One Ack per read, as a client acknowledges what it has processed.
                reply.extend(Link::ack_frames(&acks));
                r.link.send(&reply).await?;
            }
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(plan.deadline) => {
                res.timed_out = true;
                break;
            }
        }
    }
    Ok((res, r.link))
}

/// Waits for the push that says the backlog is delivered (answering pings meanwhile).
pub(crate) async fn wait_queue_empty(link: &mut Link) -> Result<()> {
    let deadline = Instant::now() + adapter::REQUEST_TIMEOUT;
    for _ in 0..10_000 {
        let f = tokio::time::timeout_at(deadline, link.recv())
            .await
            .map_err(|_| anyhow!("no QueueEmpty push after login"))??;
        match f.body {
            Some(frame::Body::Push(p)) => match p.body {
                Some(push::Body::QueueEmpty(_)) => return Ok(()),
                Some(push::Body::Envelope(e)) => link.send(&Link::ack_frames(&[e.id])).await?,
                _ => {}
            },
            Some(frame::Body::Ping(p)) => {
                link.send(&[Frame::new(frame::Body::Pong(Ping { nonce: p.nonce }))])
                    .await?;
            }
            _ => {}
        }
    }
    bail!("no QueueEmpty push among 10,000 frames")
}

/// A's side of session setup with B: fetch and verify B's signed device list, claim B's prekey, open an
/// outbound Olm session.
pub(crate) async fn open_session(link: &mut Link, a: &Device, b: &Device) -> Result<OlmSession> {
    let devices = match link
        .request(request::Body::GetDevices(GetDevices {
            phone: b.phone.as_str().to_owned(),
        }))
        .await
        .context("GetDevices")?
    {
        response::Body::Devices(d) => d,
        _ => bail!("unexpected answer to GetDevices"),
    };
    if devices.account_key != b.account_key {
        bail!("the server returned another account key for {}", b.phone);
    }
    let list = devices
        .device_list
        .ok_or_else(|| anyhow!("no device list for {}", b.phone))?;
    let verified = verify_device_list(&b.account_key, &b.phone, &list, 1)?;
    let entry = verified
        .device(DeviceId::PRIMARY)
        .ok_or_else(|| anyhow!("no primary on {}'s list", b.phone))?;
    let curve: [u8; 32] = entry.identity_curve.as_slice().try_into()?;
    let ed: [u8; 32] = entry.identity_ed.as_slice().try_into()?;
    let claimed = match link
        .request(request::Body::ClaimKeys(ClaimKeys {
            phone: b.phone.as_str().to_owned(),
            device_ids: vec![DeviceId::PRIMARY.get()],
        }))
        .await
        .context("ClaimKeys")?
    {
        response::Body::ClaimedKeys(k) => k,
        _ => bail!("unexpected answer to ClaimKeys"),
    };
    let prekey = claimed
        .keys
        .into_iter()
        .find(|k| k.device_id == DeviceId::PRIMARY.get())
        .and_then(|k| k.prekey)
        .ok_or_else(|| anyhow!("no prekey for {}", b.phone))?;
    Ok(a.keys.create_outbound_session(&curve, &ed, &prekey)?)
}

/// Runs the scenario and returns its summary. `addr` may list several nodes of a cluster (`A,B,...`):
/// accounts register through the first, sender `i` connects to node `i mod n` and its receiver to the
/// next node, so with two or more nodes every message crosses the bus.
pub async fn run(addr: &str, sms: Arc<SmsLog>, o: PairsOptions) -> Result<Summary> {
    let nodes: Vec<&str> = addr.split(',').map(str::trim).collect();
    let addr = nodes[0];
    if o.pairs == 0 || o.messages == 0 || o.window == 0 {
        bail!("--pairs, --messages and --window must be at least 1");
    }
    if o.pairs * 2 + 64 > 19_000 {
        bail!(
            "{} pairs need more sockets than the 20,000 open files allowed",
            o.pairs
        );
    }
    let numbers = Numbers::new()?;
    let setup_started = Instant::now();
    let devices = adapter::register_many(
        addr,
        sms,
        numbers,
        0,
        o.pairs * 2,
        o.concurrency,
        o.one_time_keys.max(1),
    )
    .await?;
    let register_s = setup_started.elapsed().as_secs_f64();
    tracing::info!(accounts = devices.len(), secs = register_s, "registered");

    let mut devices = devices.into_iter();
    let senders_dev: Vec<Device> = devices.by_ref().take(o.pairs).collect();
    let receivers_dev: Vec<Device> = devices.collect();

    let mut senders = Vec::with_capacity(o.pairs);
    let mut receivers = Vec::with_capacity(o.pairs);
    for (i, (a, b)) in senders_dev.iter().zip(receivers_dev).enumerate() {
        let mut blink = adapter::login(nodes[(i + 1) % nodes.len()], &b).await?;
        wait_queue_empty(&mut blink).await?;
        let mut alink = adapter::login(nodes[i % nodes.len()], a).await?;
        wait_queue_empty(&mut alink).await?;
        let mut session = open_session(&mut alink, a, &b).await?;
        let text = text_of(o.text_bytes);
        let cipher = if o.pre_encrypted {
            let n = o.pool.clamp(1, o.messages as usize);
            let mut pool = Vec::with_capacity(n);
            for j in 0..n {
                let id = message_id(setup_started, Instant::now(), i as u32, j as u32);
                pool.push(session.encrypt(&content_bytes(&id, &text))?);
            }
            Cipher::Pool(pool)
        } else {
            Cipher::Live {
                session: Box::new(session),
                text,
            }
        };
        senders.push(Sender {
            pair: i as u32,
            link: alink,
            recipient: b.phone.clone(),
            cipher,
        });
        receivers.push(Receiver {
            pair: i as u32,
            link: blink,
            device: b,
            peer_curve: a.keys.identity_curve(),
        });
    }
    let plaintext_len = content_bytes(&[0; 16], &text_of(o.text_bytes)).len();
    let setup_s = setup_started.elapsed().as_secs_f64();
    tracing::info!(
        pairs = o.pairs,
        secs = setup_s,
        "pairs online, sessions open"
    );

    let epoch = Instant::now();
    let start = epoch + Duration::from_millis(200);
    let deadline = start + o.timeout;
    let per_pair_rate = o.rate.map(|r| r / o.pairs as f64);
    let plan_for = |pair: usize| Plan {
        epoch,
        start,
        deadline,
        messages: o.messages,
        window: o.window,
        rate: per_pair_rate.map(|r| (r, pair as f64 / o.pairs as f64)),
    };
    let server_cpu0 = o.server.as_ref().map(Proc::cpu_seconds).transpose()?;
    let bench_cpu0 = Proc::this().cpu_seconds()?;
    let expected: Vec<Arc<AtomicU32>> = (0..o.pairs)
        .map(|_| Arc::new(AtomicU32::new(o.messages)))
        .collect();
    let mut rx_tasks = Vec::with_capacity(o.pairs);
    for (i, r) in receivers.into_iter().enumerate() {
        let exp = expected[i].clone();
        rx_tasks.push(tokio::spawn(run_receiver(
            r,
            plan_for(i),
            !o.pre_encrypted,
            exp,
        )));
    }
    let mut tx_tasks = Vec::with_capacity(o.pairs);
    for (i, s) in senders.into_iter().enumerate() {
        tx_tasks.push(tokio::spawn(run_sender(s, plan_for(i))));
    }
    let mut sres = Vec::with_capacity(o.pairs);
    let mut links = Vec::with_capacity(o.pairs * 2);
    for (i, t) in tx_tasks.into_iter().enumerate() {
        let (r, link) = t.await?.with_context(|| format!("sender {i}"))?;
        // Failed sends are never delivered: the receiver stops waiting for them.
        expected[i].store(r.ok.min(u64::from(o.messages)) as u32, Ordering::Release);
        links.push(link);
        sres.push(r);
    }
    let mut rres = Vec::with_capacity(o.pairs);
    for (i, t) in rx_tasks.into_iter().enumerate() {
        let (r, link) = t.await?.with_context(|| format!("receiver {i}"))?;
        links.push(link);
        rres.push(r);
    }
    let server_cpu = match (&o.server, server_cpu0) {
        (Some(p), Some(c0)) => Some(p.cpu_seconds()? - c0),
        _ => None,
    };
    let bench_cpu = Proc::this().cpu_seconds()? - bench_cpu0;
    drop(links);

    let sent_ok: u64 = sres.iter().map(|r| r.ok).sum();
    let send_errors: u64 = sres.iter().map(|r| r.errors).sum();
    let last_error = sres.iter().find_map(|r| r.last_error.clone());
    let sample_ct = sres.iter().map(|r| r.ciphertext_bytes).max().unwrap_or(0);
    let delivered: u64 = rres.iter().map(|r| r.delivered).sum();
    let duplicates: u64 = rres.iter().map(|r| r.duplicates).sum();
    let foreign: u64 = rres.iter().map(|r| r.foreign).sum();
    let decrypted: u64 = rres.iter().map(|r| r.decrypted).sum();
    let decrypt_failures: u64 = rres.iter().map(|r| r.decrypt_failures).sum();
    let timed_out = sres.iter().any(|r| r.timed_out) || rres.iter().any(|r| r.timed_out);
    let first = sres.iter().filter_map(|r| r.first_send).min();
    let last = rres.iter().filter_map(|r| r.last_delivery).max();
    let wall = match (first, last) {
        (Some(f), Some(l)) => l.saturating_duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    let mut lat: Vec<u64> = rres.into_iter().flat_map(|r| r.latencies_ns).collect();
    lat.sort_unstable();
    let ms = |ns: u64| (ns as f64 / 1e6 * 1000.0).round() / 1000.0;
    let rate = if wall > 0.0 {
        delivered as f64 / wall
    } else {
        0.0
    };

    let mut s = Summary::new("pairs");
    s.text(
        "mode",
        if o.pre_encrypted {
            "pre-encrypted"
        } else {
            "olm"
        },
    );
    s.text(
        "receivers",
        if o.pre_encrypted {
            "ack-only"
        } else {
            "decrypt-all"
        },
    );
    s.int("pairs", o.pairs as u64);
    s.int("messages_per_pair", u64::from(o.messages));
    s.text(
        "load",
        &match o.rate {
            Some(r) => format!("open-loop@{r}/s"),
            None => "closed-loop".to_owned(),
        },
    );
    s.int("window", o.window as u64);
    s.int("plaintext_bytes", plaintext_len as u64);
    s.int("ciphertext_bytes", sample_ct as u64);
    s.int("sent_ok", sent_ok);
    s.int("send_errors", send_errors);
    s.int("delivered", delivered);
    s.int("duplicates", duplicates);
    if foreign > 0 {
        s.int("foreign", foreign);
    }
    if !o.pre_encrypted {
        s.int("decrypted", decrypted);
        s.int("decrypt_failures", decrypt_failures);
    }
    s.float("wall_s", wall, 3);
    s.float("msgs_per_s", rate, 0);
    s.float("p50_ms", ms(quantile(&lat, 0.50)), 3);
    s.float("p99_ms", ms(quantile(&lat, 0.99)), 3);
    s.float("p999_ms", ms(quantile(&lat, 0.999)), 3);
    s.float("max_ms", ms(lat.last().copied().unwrap_or(0)), 3);
    if let Some(cpu) = server_cpu {
        s.float("server_cpu_s", cpu, 2);
        s.float(
            "msgs_per_server_cpu_s",
            if cpu > 0.0 {
                delivered as f64 / cpu
            } else {
                0.0
            },
            0,
        );
    }
    s.float("bench_cpu_s", bench_cpu, 2);
    s.float("setup_s", setup_s, 1);
    s.text("timed_out", if timed_out { "yes" } else { "no" });
    if let Some(e) = last_error {
        s.text("last_error", &e);
    }
    Ok(s)
}

//! Scenario `group`: natterd's group fan-out. `--members` accounts (up to 1,024, natterd's group limit),
//! each logged in on its own connection; member 0 creates one group with all of them through the wire
//! protocol and sends N group messages (real Megolm ciphertexts encrypted up front and replayed: natterd
//! never decrypts them), closed loop one at a time or at an offered rate. Every other member acknowledges
//! its pushes as clients do. Measures, per message, the time from send until the first and until the
//! last member has the push, envelopes delivered per second and per natterd CPU-second, and the sender's
//! response time (send to "sent").

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use natter_crypto::megolm::OutboundGroupSession;
use natter_proto::DeviceId;
use natter_proto::group::{
    CreateGroup, ENVELOPE_GROUP_CHANGE, ENVELOPE_GROUP_MESSAGE, GroupChange, GroupInfo,
    SendGroupMessage, UpdateGroup, devices_digest,
};
use natter_proto::limits::{KEEPALIVE_INTERVAL, MAX_GROUP_MEMBERS, MAX_INFLIGHT_REQUESTS};
use natter_proto::wire::{Frame, Ping, Request, frame, push, request, response};
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::adapter::{self, Credentials, Link, Numbers, SmsLog};
use crate::pairs::{content_bytes, message_id, parse_message_id, text_of, wait_queue_empty};
use crate::report::Summary;
use crate::stats::{Proc, quantile};

/// Most messages one run sends (the per-message bookkeeping is three words each).
const MAX_MESSAGES: u32 = 1_000_000;
/// Real Megolm ciphertexts encrypted up front and replayed.
const POOL: usize = 64;
/// Files the bench may hold open besides the members' connections.
const FD_HEADROOM: usize = 500;

/// Options of the `group` scenario.
#[derive(Debug)]
pub struct GroupOptions {
    /// Members, the sender included (at most `MAX_GROUP_MEMBERS`).
    pub members: usize,
    /// Group messages the sender sends.
    pub messages: u32,
    /// Offered messages per second (open loop, at most `MAX_INFLIGHT_REQUESTS` unanswered; latency
    /// from the scheduled send time). `None`: closed loop, one request at a time.
    pub rate: Option<f64>,
    /// Closed loop: also wait until every member has a message before sending the next.
    pub await_fanout: bool,
    /// Members named in one CreateGroup / UpdateGroup request.
    pub add_batch: usize,
    /// Bytes of text in each message before Megolm encryption.
    pub text_bytes: usize,
    /// Devices registered earlier (`register --save`) instead of registering here.
    pub accounts: Option<Vec<Credentials>>,
    /// Registrations at once during setup.
    pub register_concurrency: usize,
    /// Logins at once during setup.
    pub connect_concurrency: usize,
    /// One-time keys each registered device uploads.
    pub one_time_keys: usize,
    /// Upper limit on each phase.
    pub timeout: Duration,
    /// natterd, for CPU time.
    pub server: Option<Proc>,
}

/// What the member tasks share with the sender: per message, when the first and the last member got
/// it and how many have; per member, the newest group version it was told about.
struct Tracker {
    epoch: Instant,
    tag: u32,
    group_id: Vec<u8>,
    /// Members that receive each message (every member but the sender).
    recipients: u32,
    first_ns: Vec<AtomicU64>,
    last_ns: Vec<AtomicU64>,
    count: Vec<AtomicU32>,
    delivered: AtomicU64,
    complete: AtomicUsize,
    notify: Notify,
    versions: Vec<AtomicU64>,
}

impl Tracker {
    fn new(tag: u32, group_id: Vec<u8>, recipients: usize, messages: u32) -> Tracker {
        let n = messages as usize;
        Tracker {
            epoch: Instant::now(),
            tag,
            group_id,
            recipients: recipients as u32,
            first_ns: (0..n).map(|_| AtomicU64::new(u64::MAX)).collect(),
            last_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            count: (0..n).map(|_| AtomicU32::new(0)).collect(),
            delivered: AtomicU64::new(0),
            complete: AtomicUsize::new(0),
            notify: Notify::new(),
            versions: (0..recipients).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn ns_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// A member got message `seq` at `ns` (since the epoch).
    fn record(&self, seq: usize, ns: u64) {
        let (Some(first), Some(last), Some(count)) = (
            self.first_ns.get(seq),
            self.last_ns.get(seq),
            self.count.get(seq),
        ) else {
            return;
        };
        first.fetch_min(ns, Ordering::AcqRel);
        last.fetch_max(ns, Ordering::AcqRel);
        self.delivered.fetch_add(1, Ordering::AcqRel);
        if count.fetch_add(1, Ordering::AcqRel) + 1 == self.recipients {
            self.complete.fetch_add(1, Ordering::AcqRel);
            self.notify.notify_waiters();
        }
    }

    fn is_complete(&self, seq: usize) -> bool {
        self.count
            .get(seq)
            .is_some_and(|c| c.load(Ordering::Acquire) >= self.recipients)
    }

    /// Members that know version `v` of the group (or a later one).
    fn members_at(&self, v: u64) -> usize {
        self.versions
            .iter()
            .filter(|x| x.load(Ordering::Acquire) >= v)
            .count()
    }
}

#[derive(Default)]
struct MemberResult {
    delivered: u64,
    duplicates: u64,
    foreign: u64,
    changes: u64,
}

/// One member: acknowledges every envelope (one Ack per socket read), records the group messages of
/// this run and the group versions it is told about, answers pings and sends keep-alives, until stopped.
async fn run_member(
    mut link: Link,
    idx: usize,
    t: Arc<Tracker>,
    messages: u32,
    mut stop: watch::Receiver<bool>,
) -> Result<MemberResult> {
    let mut res = MemberResult::default();
    let mut seen = vec![false; messages as usize];
    let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
    keepalive.tick().await;
    let mut nonce = 0u64;
    // Bounded by the stop signal, which the scenario sends before its deadline (or drops on error).
    loop {
        tokio::select! {
            biased;
            f = link.recv() => {
                let mut frames = vec![f?];
                while let Some(f) = link.buffered()? {
                    frames.push(f);
                }
                let now = t.ns_at(Instant::now());
                let mut acks = Vec::new();
                let mut reply = Vec::new();
                for f in frames {
                    match f.body {
                        Some(frame::Body::Push(p)) => {
                            let Some(push::Body::Envelope(env)) = p.body else { continue };
                            acks.push(env.id);
                            match env.olm_type {
                                ENVELOPE_GROUP_MESSAGE => match parse_message_id(&env.message_id) {
                                    Some((_, tag, seq)) if tag == t.tag && seq < messages => {
                                        let seq = seq as usize;
                                        if std::mem::replace(&mut seen[seq], true) {
                                            res.duplicates += 1;
                                        } else {
                                            res.delivered += 1;
                                            t.record(seq, now);
                                        }
                                    }
                                    _ => res.foreign += 1,
                                },
                                ENVELOPE_GROUP_CHANGE => match GroupChange::decode(env.ciphertext.as_slice()) {
                                    Ok(c) if c.group_id == t.group_id => {
                                        res.changes += 1;
                                        if let Some(v) = t.versions.get(idx) {
                                            v.fetch_max(c.version, Ordering::AcqRel);
                                        }
                                    }
                                    _ => res.foreign += 1,
                                },
                                _ => res.foreign += 1,
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
                link.send(&reply).await?;
            }
            _ = keepalive.tick() => {
                nonce += 1;
                link.send(&[Frame::new(frame::Body::Ping(Ping { nonce }))]).await?;
            }
            _ = stop.changed() => break,
        }
    }
    Ok(res)
}

/// Logs every member in, `concurrency` at a time, and drains what was queued for it before.
async fn login_all(addr: &str, creds: &[Credentials], concurrency: usize) -> Result<Vec<Link>> {
    let mut links: Vec<Option<Link>> = (0..creds.len()).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut done = 0;
    while done < creds.len() {
        while next < creds.len() && set.len() < concurrency.max(1) {
            let c = creds[next].clone();
            let addr = addr.to_owned();
            let i = next;
            next += 1;
            set.spawn(async move {
                let link = async {
                    let mut link = c.login(&addr).await?;
                    wait_queue_empty(&mut link).await?;
                    anyhow::Ok(link)
                }
                .await;
                (i, link)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, link) = joined?;
        links[i] = Some(link.with_context(|| format!("logging in member {i}"))?);
        done += 1;
    }
    links
        .into_iter()
        .map(|l| l.ok_or_else(|| anyhow!("a member did not log in")))
        .collect()
}

/// Creates the group with every member: CreateGroup with the first `batch` others, then UpdateGroup
/// with the rest, `batch` at a time. Returns the group's final state and the requests made.
async fn create_group(
    link: &mut Link,
    group_id: &[u8],
    others: &[String],
    batch: usize,
) -> Result<(GroupInfo, usize)> {
    let mut chunks = others.chunks(batch.clamp(1, MAX_GROUP_MEMBERS));
    let first = chunks.next().unwrap_or(&[]);
    let mut info = match link
        .request(request::Body::CreateGroup(CreateGroup {
            group_id: group_id.to_vec(),
            name: "natter-bench".to_owned(),
            description: String::new(),
            members: first.to_vec(),
        }))
        .await
        .context("CreateGroup")?
    {
        response::Body::Group(g) => g,
        _ => bail!("unexpected answer to CreateGroup"),
    };
    let mut requests = 1;
    for chunk in chunks {
        info = match link
            .request(request::Body::UpdateGroup(UpdateGroup {
                group_id: group_id.to_vec(),
                add: chunk.to_vec(),
                ..UpdateGroup::default()
            }))
            .await
            .context("UpdateGroup")?
        {
            response::Body::Group(g) => g,
            _ => bail!("unexpected answer to UpdateGroup"),
        };
        requests += 1;
    }
    Ok((info, requests))
}

/// How the sender sends.
struct SendPlan {
    start: Instant,
    deadline: Instant,
    messages: u32,
    rate: Option<f64>,
    window: usize,
    await_fanout: bool,
    group_version: u64,
    digest: Vec<u8>,
    session_id: String,
    pool: Vec<Vec<u8>>,
}

impl SendPlan {
    fn scheduled(&self, seq: u32) -> Instant {
        match self.rate {
            None => self.start,
            Some(r) => self.start + Duration::from_secs_f64(f64::from(seq) / r),
        }
    }
}

#[derive(Default)]
struct SenderResult {
    ok: u64,
    errors: u64,
    last_error: Option<String>,
    /// Per message, the time its latency counts from (ns since the epoch): the send, or in open loop
    /// the scheduled send; `u64::MAX` if it was not sent or failed.
    from_ns: Vec<u64>,
    /// Send to "sent" response, ns.
    response_ns: Vec<u64>,
    first_send: Option<Instant>,
    timed_out: bool,
}

/// The sender: closed loop (one request at a time, optionally waiting for the whole fan-out) or open
/// loop (sends at their scheduled times, at most `window` unanswered).
async fn run_sender(link: &mut Link, t: &Tracker, p: &SendPlan) -> Result<SenderResult> {
    let mut res = SenderResult {
        from_ns: vec![u64::MAX; p.messages as usize],
        response_ns: Vec::with_capacity(p.messages as usize),
        ..SenderResult::default()
    };
    let mut inflight: HashMap<u64, (u32, Instant)> = HashMap::new();
    let mut sent = 0u32;
    // Closed loop with --await-fanout: the previous message must have reached everyone (or failed).
    let mut waiting_for: Option<u32> = None;
    let far = p.deadline + Duration::from_secs(3600);
    tokio::time::sleep_until(p.start).await;
    // Bounded: every iteration sends, takes a frame or a wake-up, and the deadline ends it.
    loop {
        if sent == p.messages && inflight.is_empty() {
            break;
        }
        let notified = t.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(seq) = waiting_for
            && (t.is_complete(seq as usize) || res.from_ns[seq as usize] == u64::MAX)
        {
            waiting_for = None;
        }
        let can_send = sent < p.messages && inflight.len() < p.window && waiting_for.is_none();
        let next = if can_send { p.scheduled(sent) } else { far };
        tokio::select! {
            biased;
            f = link.recv() => {
                let mut frames = vec![f?];
                while let Some(f) = link.buffered()? {
                    frames.push(f);
                }
                let now = Instant::now();
                let mut pongs = Vec::new();
                for f in frames {
                    match f.body {
                        Some(frame::Body::Response(r)) => {
                            let Some((seq, at)) = inflight.remove(&r.id) else { continue };
                            res.response_ns.push(now.saturating_duration_since(at).as_nanos() as u64);
                            if let Some(e) = r.error {
                                res.errors += 1;
                                res.last_error = Some(format!("{:?}: {}", e.code(), e.message));
                                res.from_ns[seq as usize] = u64::MAX;
                            } else {
                                res.ok += 1;
                            }
                        }
                        Some(frame::Body::Ping(ping)) => {
                            pongs.push(Frame::new(frame::Body::Pong(Ping { nonce: ping.nonce })));
                        }
                        _ => {}
                    }
                }
                link.send(&pongs).await?;
            }
            _ = tokio::time::sleep_until(next), if can_send => {
                let now = Instant::now();
                let mut batch = Vec::new();
                while sent < p.messages && inflight.len() < p.window && p.scheduled(sent) <= now {
                    // Open loop: latency counts from the scheduled time, so a send held back by a
                    // full window is not hidden.
                    let at = if p.rate.is_some() { p.scheduled(sent) } else { now };
                    let id = message_id(t.epoch, at, t.tag, sent);
                    let ciphertext = p
                        .pool
                        .get(sent as usize % p.pool.len().max(1))
                        .cloned()
                        .ok_or_else(|| anyhow!("empty ciphertext pool"))?;
                    let req_id = link.next_request_id();
                    batch.push(Frame::new(frame::Body::Request(Request {
                        id: req_id,
                        body: Some(request::Body::SendGroupMessage(SendGroupMessage {
                            group_id: t.group_id.clone(),
                            message_id: id.to_vec(),
                            group_version: p.group_version,
                            session_id: p.session_id.clone(),
                            ciphertext,
                            devices_digest: p.digest.clone(),
                        })),
                    })));
                    res.from_ns[sent as usize] = t.ns_at(at);
                    inflight.insert(req_id, (sent, now));
                    if p.await_fanout && p.rate.is_none() {
                        waiting_for = Some(sent);
                    }
                    sent += 1;
                }
                if res.first_send.is_none() && !batch.is_empty() {
                    res.first_send = Some(now);
                }
                link.send(&batch).await?;
            }
            _ = &mut notified, if waiting_for.is_some() => {}
            _ = tokio::time::sleep_until(p.deadline) => {
                res.timed_out = true;
                break;
            }
        }
    }
    Ok(res)
}

/// Real Megolm ciphertexts of `Content { Text }` messages, and the session's id.
fn megolm_pool(n: usize, text_bytes: usize) -> (String, Vec<Vec<u8>>) {
    let mut session = OutboundGroupSession::new();
    let text = text_of(text_bytes);
    let pool = (0..n)
        .map(|i| {
            let mut id = [0u8; 16];
            id[12..].copy_from_slice(&(i as u32).to_be_bytes());
            session.encrypt(&content_bytes(&id, &text))
        })
        .collect();
    (session.session_id(), pool)
}

/// Waits until `done()` holds, checking every 20 ms, at most until `deadline`.
async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| anyhow!("getrandom: {e}"))?;
    Ok(b)
}

/// Runs the scenario and returns its summary.
pub async fn run(addr: &str, sms: Arc<SmsLog>, o: GroupOptions) -> Result<Summary> {
    if o.members < 2 || o.members > MAX_GROUP_MEMBERS {
        bail!("--members must be between 2 and {MAX_GROUP_MEMBERS} (natterd's group limit)");
    }
    if o.messages == 0 || o.messages > MAX_MESSAGES {
        bail!("--messages must be between 1 and {MAX_MESSAGES}");
    }
    if o.members + FD_HEADROOM > crate::idle::fd_limit() {
        bail!(
            "{} members need more sockets than the {} open files allowed",
            o.members,
            crate::idle::fd_limit()
        );
    }
    let setup = Instant::now();
    let creds: Vec<Credentials> = match o.accounts {
        Some(a) if a.len() >= o.members => a.into_iter().take(o.members).collect(),
        Some(a) => bail!(
            "the accounts file holds {} devices, fewer than --members {}",
            a.len(),
            o.members
        ),
        None => adapter::register_many(
            addr,
            sms,
            Numbers::new()?,
            0,
            o.members,
            o.register_concurrency,
            o.one_time_keys,
        )
        .await?
        .iter()
        .map(Credentials::from)
        .collect(),
    };
    let mut links = tokio::time::timeout(o.timeout, login_all(addr, &creds, o.connect_concurrency))
        .await
        .map_err(|_| anyhow!("logging the members in did not finish within --timeout"))??
        .into_iter();
    let mut sender = links
        .next()
        .ok_or_else(|| anyhow!("no sender connection"))?;
    tracing::info!(members = o.members, "members online");

    let group_id = random_bytes::<16>()?.to_vec();
    let tag = u32::from_le_bytes(random_bytes::<4>()?);
    let recipients = o.members - 1;
    let t = Arc::new(Tracker::new(tag, group_id.clone(), recipients, o.messages));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut member_tasks = Vec::with_capacity(recipients);
    for (i, link) in links.enumerate() {
        member_tasks.push(tokio::spawn(run_member(
            link,
            i,
            t.clone(),
            o.messages,
            stop_rx.clone(),
        )));
    }

    // Member 0 creates the group; every other member must have heard of its final version before the
    // measured phase (the announcements carry the whole member list: about 20 KB each at 1,024).
    let others: Vec<String> = creds[1..]
        .iter()
        .map(|c| c.phone.as_str().to_owned())
        .collect();
    let created = Instant::now();
    let (info, group_requests) = tokio::time::timeout(
        o.timeout,
        create_group(&mut sender, &group_id, &others, o.add_batch),
    )
    .await
    .map_err(|_| anyhow!("creating the group did not finish within --timeout"))??;
    let create_s = created.elapsed().as_secs_f64();
    if info.members.len() != o.members {
        bail!(
            "the group has {} members, not {}",
            info.members.len(),
            o.members
        );
    }
    let version = info.version;
    if !wait_until(created + o.timeout, || t.members_at(version) == recipients).await {
        bail!(
            "only {} of {recipients} members heard of the group within --timeout",
            t.members_at(version)
        );
    }
    let announced_s = created.elapsed().as_secs_f64();
    tracing::info!(
        version,
        requests = group_requests,
        create_s,
        announced_s,
        "group created and announced"
    );

    // What natterd checks with every send: the version, and the digest of every member device but
    // the sending one (each account here has its primary only).
    let digest = devices_digest(others.iter().map(|p| (p.as_str(), DeviceId::PRIMARY.get())));
    let (session_id, pool) = megolm_pool(POOL.min(o.messages as usize), o.text_bytes);
    let ciphertext_bytes = pool.first().map_or(0, Vec::len);
    let setup_s = setup.elapsed().as_secs_f64();

    let start = Instant::now() + Duration::from_millis(100);
    let deadline = start + o.timeout;
    let plan = SendPlan {
        start,
        deadline,
        messages: o.messages,
        rate: o.rate,
        window: if o.rate.is_some() {
            MAX_INFLIGHT_REQUESTS
        } else {
            1
        },
        await_fanout: o.await_fanout && o.rate.is_none(),
        group_version: version,
        digest,
        session_id,
        pool,
    };
    let server_cpu0 = o.server.as_ref().map(Proc::cpu_seconds).transpose()?;
    let bench_cpu0 = Proc::this().cpu_seconds()?;
    let sres = run_sender(&mut sender, &t, &plan).await?;
    // Everything the server accepted reaches every member, or the deadline passes.
    let expected = sres.ok * recipients as u64;
    let drained = wait_until(deadline, || t.delivered.load(Ordering::Acquire) >= expected).await;
    let server_cpu = match (&o.server, server_cpu0) {
        (Some(p), Some(c0)) => Some(p.cpu_seconds()? - c0),
        _ => None,
    };
    let bench_cpu = Proc::this().cpu_seconds()? - bench_cpu0;
    let _ = stop_tx.send(true);

    let mut mres = MemberResult::default();
    let mut member_errors = 0u64;
    let mut member_error = None;
    for task in member_tasks {
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(Ok(r))) => {
                mres.delivered += r.delivered;
                mres.duplicates += r.duplicates;
                mres.foreign += r.foreign;
                mres.changes += r.changes;
            }
            Ok(Ok(Err(e))) => {
                member_errors += 1;
                member_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Ok(Err(e)) => {
                member_errors += 1;
                member_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                member_errors += 1;
                member_error.get_or_insert_with(|| "did not stop within 30 s".to_owned());
            }
        }
    }
    drop(sender);

    // Per message that every member got: latency of the first and of the last member.
    let mut last_lat = Vec::with_capacity(o.messages as usize);
    let mut first_lat = Vec::with_capacity(o.messages as usize);
    let mut incomplete = 0u64;
    let mut last_delivery = 0u64;
    for (seq, &from) in sres.from_ns.iter().enumerate() {
        if from == u64::MAX {
            continue;
        }
        let first = t.first_ns[seq].load(Ordering::Acquire);
        let last = t.last_ns[seq].load(Ordering::Acquire);
        if first != u64::MAX {
            first_lat.push(first.saturating_sub(from));
            last_delivery = last_delivery.max(last);
        }
        if t.is_complete(seq) {
            last_lat.push(last.saturating_sub(from));
        } else {
            incomplete += 1;
        }
    }
    first_lat.sort_unstable();
    last_lat.sort_unstable();
    let mut response = sres.response_ns.clone();
    response.sort_unstable();
    let delivered = t.delivered.load(Ordering::Acquire);
    let wall = match sres.first_send {
        Some(f) if last_delivery > 0 => (last_delivery.saturating_sub(t.ns_at(f))) as f64 / 1e9,
        _ => 0.0,
    };
    let ms = |ns: u64| ns as f64 / 1e6;

    let mut s = Summary::new("group");
    s.text("mode", "pre-encrypted");
    s.text("members_do", "ack-only");
    s.int("members", o.members as u64);
    s.int("recipients", recipients as u64);
    s.int("messages", u64::from(o.messages));
    s.text(
        "load",
        &match o.rate {
            Some(r) => format!("open-loop@{r}/s"),
            None if plan.await_fanout => "closed-loop-await-fanout".to_owned(),
            None => "closed-loop".to_owned(),
        },
    );
    s.text(
        "latency_from",
        if o.rate.is_some() {
            "scheduled-send"
        } else {
            "send"
        },
    );
    s.int("ciphertext_bytes", ciphertext_bytes as u64);
    s.int("group_requests", group_requests as u64);
    s.float("create_s", create_s, 3);
    s.float("announced_s", announced_s, 3);
    s.int("sent_ok", sres.ok);
    s.int("send_errors", sres.errors);
    s.int("delivered", delivered);
    s.int("expected", expected);
    s.int("duplicates", mres.duplicates);
    if mres.foreign > 0 {
        s.int("foreign", mres.foreign);
    }
    s.int("incomplete_messages", incomplete);
    s.float("wall_s", wall, 3);
    s.float("envelopes_per_s", delivered as f64 / wall.max(1e-9), 0);
    s.float("fanout_last_p50_ms", ms(quantile(&last_lat, 0.50)), 3);
    s.float("fanout_last_p99_ms", ms(quantile(&last_lat, 0.99)), 3);
    s.float(
        "fanout_last_max_ms",
        ms(last_lat.last().copied().unwrap_or(0)),
        3,
    );
    s.float("fanout_first_p50_ms", ms(quantile(&first_lat, 0.50)), 3);
    s.float("fanout_first_p99_ms", ms(quantile(&first_lat, 0.99)), 3);
    s.float(
        "fanout_first_max_ms",
        ms(first_lat.last().copied().unwrap_or(0)),
        3,
    );
    s.float("send_response_p50_ms", ms(quantile(&response, 0.50)), 3);
    s.float("send_response_p99_ms", ms(quantile(&response, 0.99)), 3);
    s.float(
        "send_response_max_ms",
        ms(response.last().copied().unwrap_or(0)),
        3,
    );
    if let Some(cpu) = server_cpu {
        s.float("server_cpu_s", cpu, 2);
        s.float(
            "envelopes_per_server_cpu_s",
            delivered as f64 / cpu.max(1e-9),
            0,
        );
    }
    s.float("bench_cpu_s", bench_cpu, 2);
    s.float("setup_s", setup_s, 1);
    if member_errors > 0 {
        s.int("member_errors", member_errors);
    }
    s.text(
        "timed_out",
        if sres.timed_out || !drained {
            "yes"
        } else {
            "no"
        },
    );
    if let Some(e) = sres.last_error.or(member_error) {
        s.text("last_error", &e);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_first_last_and_completion() {
        let t = Tracker::new(7, vec![1; 16], 3, 2);
        t.record(0, 50);
        t.record(0, 10);
        assert!(!t.is_complete(0));
        t.record(0, 30);
        assert!(t.is_complete(0));
        assert!(!t.is_complete(1));
        assert_eq!(t.first_ns[0].load(Ordering::Acquire), 10);
        assert_eq!(t.last_ns[0].load(Ordering::Acquire), 50);
        assert_eq!(t.complete.load(Ordering::Acquire), 1);
        assert_eq!(t.delivered.load(Ordering::Acquire), 3);
        // Out of range is ignored, not a panic.
        t.record(5, 1);
        assert_eq!(t.delivered.load(Ordering::Acquire), 3);
    }

    #[test]
    fn members_at_a_version() {
        let t = Tracker::new(7, vec![1; 16], 3, 1);
        t.versions[0].store(2, Ordering::Release);
        t.versions[1].store(1, Ordering::Release);
        assert_eq!(t.members_at(1), 2);
        assert_eq!(t.members_at(2), 1);
    }

    #[test]
    fn open_loop_schedule() {
        let start = Instant::now();
        let plan = SendPlan {
            start,
            deadline: start,
            messages: 10,
            rate: Some(100.0),
            window: 64,
            await_fanout: false,
            group_version: 1,
            digest: Vec::new(),
            session_id: String::new(),
            pool: Vec::new(),
        };
        assert_eq!(plan.scheduled(0), start);
        assert_eq!(plan.scheduled(5), start + Duration::from_millis(50));
    }

    #[test]
    fn megolm_pool_is_real_and_sized() {
        let (id, pool) = megolm_pool(3, 170);
        assert!(!id.is_empty());
        assert_eq!(pool.len(), 3);
        assert!(pool.iter().all(|c| c.len() > 170));
        assert_ne!(pool[0], pool[1]);
    }
}

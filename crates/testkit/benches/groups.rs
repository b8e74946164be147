//! Measurement of a 1,024-member group against a real natterd process on a loopback port (not a test:
//! nothing here asserts a timing). Run with `cargo bench -p natter-testkit --bench groups`.
//!
//! 1,024 real devices (in-memory client stores, so the bench process holds them all) register and join
//! one group. Then:
//! - send cost, with the other members offline so that the bench process does the sender's work only:
//!   the sender's CPU time and bytes written to its socket for the first message (device lists, prekey
//!   claims, 1,023 Olm sessions and key shares, one Megolm encryption) and for later messages (one
//!   Megolm encryption); natterd's CPU for each;
//! - the backlog (key share + 11 messages per member) delivered as the 1,023 members reconnect;
//! - live delivery: time from `send` until every member has decrypted the message;
//! - server fan-out throughput: a burst of messages, envelopes stored and routed per second;
//! - the queue layout: one row per recipient device with the ciphertext (what natterd does) against
//!   rows holding only a 16-byte pointer to one shared body, written through the real SQLite store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use natter_client::Event;
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};
use natter_server::store::sqlite::SqliteStore;
use natter_server::store::{
    AccountRecord, DeviceRecord, NewAccount, NewEnvelope, NewMessage, Store,
};
use natter_testkit::{NatterdProcess, TestClient};

const MEMBERS: u32 = 1024;
const LATER: usize = 10;
const LIVE_ROUNDS: usize = 5;
const BURST: usize = 50;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Bytes this process's client connections have written to their sockets.
fn written() -> u64 {
    natter_client::net::bytes_sent()
}

/// One task per member that resolves when the member has decrypted a group text.
fn waiters(members: &[TestClient], text: &str) -> Vec<tokio::task::JoinHandle<Instant>> {
    members
        .iter()
        .map(|c| {
            let mut events = c.client.subscribe();
            let text = text.to_owned();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(Event::GroupMessage(m)) if m.text == text => return Instant::now(),
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(e) => panic!("events ended: {e}"),
                    }
                }
            })
        })
        .collect()
}

async fn last_arrival(w: Vec<tokio::task::JoinHandle<Instant>>) -> Instant {
    let mut last = None;
    for h in w {
        let t = tokio::time::timeout(Duration::from_secs(600), h)
            .await
            .expect("every member receives it")
            .unwrap();
        last = Some(last.map_or(t, |l: Instant| l.max(t)));
    }
    last.unwrap()
}

struct Cost {
    wall: f64,
    sender_cpu: f64,
    server_cpu: f64,
    bytes: u64,
}

async fn measure<F: std::future::Future<Output = ()>>(server_pid: &str, f: F) -> Cost {
    let (c0, s0, w0) = (cpu_seconds("self"), cpu_seconds(server_pid), written());
    let t = Instant::now();
    f.await;
    Cost {
        wall: t.elapsed().as_secs_f64(),
        sender_cpu: cpu_seconds("self") - c0,
        server_cpu: cpu_seconds(server_pid) - s0,
        bytes: written() - w0,
    }
}

async fn run() {
    let natterd = NatterdProcess::start(&[
        "--max-connections",
        "20000",
        "--codes-per-ip-per-hour",
        "100000",
        "--verifies-per-ip-per-hour",
        "100000",
        "--max-connections-per-ip",
        "20000",
        "--handshakes-per-ip-per-s",
        "100000",
        "--handshake-burst",
        "100000",
    ]);
    let server_pid = natterd.pid().unwrap().to_string();
    let t = Instant::now();
    let members = TestClient::register_many_at(
        &natterd.addr(),
        &natterd.sms_log(),
        "+1555080",
        0..MEMBERS,
        16,
    )
    .await;
    println!(
        "{MEMBERS} devices registered and connected in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (owner, rest) = members.split_first().unwrap();
    let numbers: Vec<PhoneNumber> = rest.iter().map(|c| c.phone.clone()).collect();
    let t = Instant::now();
    let g = owner
        .client
        .create_group("Everyone", &numbers)
        .await
        .unwrap();
    println!(
        "group of {} created in {:.2} s (membership announced to every device)",
        g.members.len(),
        t.elapsed().as_secs_f64()
    );
    let id: GroupId = g.id;
    // Let every member apply the creation before the members go offline.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // ---- send cost, members offline ----
    for c in rest {
        c.client.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = measure(&server_pid, async {
        owner.client.send_group_text(&id, "first").await.unwrap();
    })
    .await;
    let later = measure(&server_pid, async {
        for i in 0..LATER {
            owner
                .client
                .send_group_text(&id, &format!("later {i}"))
                .await
                .unwrap();
        }
    })
    .await;
    println!("send cost (the other 1,023 members offline; natterd in its own process):");
    println!(
        "  first message (device lists, 1,023 prekey claims, Olm sessions and key shares, 1 Megolm \
         encryption): {:.2} s wall, sender CPU {:.2} s, uploaded {:.0} KiB; natterd CPU {:.2} s",
        first.wall,
        first.sender_cpu,
        first.bytes as f64 / 1024.0,
        first.server_cpu
    );
    println!(
        "  later messages (1 Megolm encryption each): {:.1} ms wall, sender CPU {:.1} ms, uploaded {} B; \
         natterd CPU {:.1} ms per message (1,023 envelopes stored)",
        later.wall * 1e3 / LATER as f64,
        later.sender_cpu * 1e3 / LATER as f64,
        later.bytes / LATER as u64,
        later.server_cpu * 1e3 / LATER as f64
    );

    // ---- fan-out throughput, members offline (store and route only) ----
    let s0 = cpu_seconds(&server_pid);
    let t = Instant::now();
    for i in 0..BURST {
        owner
            .client
            .send_group_text(&id, &format!("burst {i}"))
            .await
            .unwrap();
    }
    let stored = t.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds(&server_pid) - s0;
    let envelopes = (BURST * rest.len()) as f64;
    println!(
        "fan-out (members offline): {BURST} messages × 1,023 envelopes accepted in {:.2} s, one after \
         the other ({:.0} envelopes/s; natterd CPU {:.2} s, {:.0} envelopes per CPU-second)",
        stored,
        envelopes / stored,
        server_cpu,
        envelopes / server_cpu
    );

    // ---- backlog on reconnect ----
    let w = waiters(rest, &format!("burst {}", BURST - 1));
    let t = Instant::now();
    for c in rest {
        c.client.connect().await.unwrap();
    }
    let connected = t.elapsed();
    let done = last_arrival(w).await;
    println!(
        "backlog (key share + {} messages each) at all 1,023 reconnecting members {:.2} s after the \
         first reconnect (reconnecting took {:.2} s)",
        LATER + 1 + BURST,
        (done - t).as_secs_f64(),
        connected.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ---- live delivery ----
    let mut accepted = Vec::new();
    let mut everyone = Vec::new();
    for round in 0..LIVE_ROUNDS {
        let text = format!("live {round}");
        let w = waiters(rest, &text);
        let t = Instant::now();
        owner.client.send_group_text(&id, &text).await.unwrap();
        accepted.push(t.elapsed().as_secs_f64());
        everyone.push((last_arrival(w).await - t).as_secs_f64());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    accepted.sort_by(f64::total_cmp);
    everyone.sort_by(f64::total_cmp);
    println!(
        "live (all members online, each sending delivered and read receipts back): accepted by natterd \
         after {:.1} ms, decrypted by all 1,023 members after {:.0} ms (median of {LIVE_ROUNDS}; max \
         {:.0} ms)",
        accepted[LIVE_ROUNDS / 2] * 1e3,
        everyone[LIVE_ROUNDS / 2] * 1e3,
        everyone[LIVE_ROUNDS - 1] * 1e3
    );

    drop(members);
    drop(natterd);

    queue_layout().await;
}

/// One row per recipient device holding the ciphertext, against rows holding a 16-byte pointer (the
/// per-device part of a shared-body design; the body itself would add one row per message).
async fn queue_layout() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("layout.db"))
        .await
        .unwrap();
    let recipients: Vec<PhoneNumber> = (0..1024)
        .map(|i| PhoneNumber::from_e164(&format!("+1555090{i:04}")).unwrap())
        .collect();
    for (i, p) in recipients.iter().enumerate() {
        store
            .create_account(&NewAccount {
                account: AccountRecord {
                    phone: p.clone(),
                    account_key: [1; 32],
                    device_list: vec![1],
                    device_list_version: 1,
                    created_at_ms: i as u64,
                },
                primary: DeviceRecord {
                    phone: p.clone(),
                    device_id: DeviceId::PRIMARY,
                    noise_key: [2; 32],
                    identity_ed: [3; 32],
                    last_seen_ms: 0,
                },
            })
            .await
            .unwrap();
    }
    println!(
        "queue layout for a 1,024-device fan-out (SqliteStore, one enqueue per message, 20 messages):"
    );
    let mut n = 0u8;
    for (what, size) in [
        ("ciphertext per row, 300 B text message", 300usize),
        ("ciphertext per row, 4 KiB message", 4096),
        ("16-byte pointer per row (shared body)", 16),
    ] {
        let before = db_bytes(dir.path());
        let t = Instant::now();
        for _ in 0..20 {
            n += 1;
            store
                .enqueue(NewMessage {
                    sender: recipients[0].clone(),
                    sender_device: DeviceId::PRIMARY,
                    message_id: MessageId::from_bytes([n; 16]),
                    server_ts_ms: 1,
                    expires_at_ms: u64::MAX / 4,
                    envelopes: recipients
                        .iter()
                        .map(|p| NewEnvelope {
                            phone: p.clone(),
                            device_id: DeviceId::PRIMARY,
                            olm_type: 2,
                            ciphertext: vec![7; size],
                        })
                        .collect(),
                    retry: None,
                })
                .await
                .unwrap();
        }
        let per = t.elapsed().as_secs_f64() * 1e3 / 20.0;
        let after = db_bytes(dir.path());
        println!(
            "  {what}: {per:.1} ms per fan-out ({:.0} envelopes/s), database (file + WAL) grew {:.1} MiB",
            1024.0 / (per / 1e3),
            after.saturating_sub(before) as f64 / (1024.0 * 1024.0)
        );
    }
}

/// Size of the database file and its WAL.
fn db_bytes(dir: &std::path::Path) -> u64 {
    ["layout.db", "layout.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum()
}

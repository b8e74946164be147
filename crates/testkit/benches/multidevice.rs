//! Measurements of multi-device against a real natterd on a loopback port (not a test: nothing here
//! asserts a timing). Run with `cargo bench -p natter-testkit --bench multidevice`.
//!
//! (a) Time to link a companion: from the moment its QR code is shown to the moment it is linked
//!     (connected, prekeys uploaded) and to the moment its first message is accepted by the server.
//!     The phone "scans" at once, so no human time is included. Median of 10 links (each companion is
//!     unlinked again, to stay under the limit of four).
//! (b) One send from a sender with 5 devices to a peer with 5 devices, in steady state (sessions
//!     established in both directions, everyone else offline so nothing but the sends runs):
//!     encryptions per send, bytes of the SendMessage request, and milliseconds per send (median of
//!     200). Bytes are given two ways: rebuilt from the ciphertexts the server queued (protobuf frame +
//!     4-byte frame prefix + 2-byte Noise record prefix + 16-byte Noise tag), and counted on the TCP
//!     stream from the sender to the server through a counting proxy (application bytes, without
//!     TCP/IP headers).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use natter_proto::wire::{DeviceMessage, Frame, Request, SendMessage, frame, request};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use natter_testkit::{PendingCompanion, TestClient, TestServer};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LINKS: usize = 10;
const SENDS: usize = 200;
const WAIT: Duration = Duration::from_secs(60);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        link_time().await;
        send_cost().await;
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, p10, p90) in ms.
fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.1), at(0.9))
}

async fn link_time() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, "+15550500001").await;
    // Bob is registered but offline: the first message only has to reach the server.
    let bob = TestClient::register(&server, "+15550500002").await;
    let mut linked = Vec::new();
    let mut first_sent = Vec::new();
    for i in 0..LINKS {
        let mut pending = PendingCompanion::start(&server, &format!("laptop {i}"), WAIT).await;
        let (qr, shown) = pending.next_qr_at().await;
        let (done, companion) = tokio::join!(alice.client.link_device(&qr), pending.finish());
        let done = done.unwrap();
        let companion = companion.unwrap();
        linked.push(shown.elapsed());
        companion
            .client
            .send_text(&bob.phone, "first message")
            .await
            .unwrap();
        first_sent.push(shown.elapsed());
        alice
            .client
            .unlink(DeviceId::new(done.device_id).unwrap())
            .await
            .unwrap();
        companion.client.disconnect().await;
    }
    let (l50, l10, l90) = stats(linked);
    let (s50, s10, s90) = stats(first_sent);
    println!(
        "link: QR shown -> companion linked (connected, prekeys uploaded): median {l50:.1} ms (p10 {l10:.1}, p90 {l90:.1}) over {LINKS} links"
    );
    println!(
        "link: QR shown -> companion's first message accepted by the server: median {s50:.1} ms (p10 {s10:.1}, p90 {s90:.1}) over {LINKS} links"
    );
}

/// A TCP proxy to `target` that counts the bytes the client sends.
async fn counting_proxy(target: String, upstream: Arc<AtomicU64>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            client.set_nodelay(true).unwrap();
            server.set_nodelay(true).unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let counter = upstream.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = sw.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                let _ = cw.shutdown().await;
            });
        }
    });
    addr
}

async fn all_have(devices: &[&TestClient], peer: &PhoneNumber, ids: &[MessageId]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for d in devices {
        for id in ids {
            while d.client.message(peer, id).await.unwrap().is_none() {
                if tokio::time::Instant::now() >= deadline {
                    let me = d.client.whoami().await.unwrap().unwrap();
                    let h = d.client.history(peer).await.unwrap();
                    panic!(
                        "warm-up message {id:?} not delivered to device {} of {}: history {:?}",
                        me.device_id,
                        me.phone,
                        h.iter()
                            .map(|m| (m.id, m.kind, m.from_me, m.sender_device.get()))
                            .collect::<Vec<_>>()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn send_cost() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, "+15550600001").await;
    let bob = TestClient::online(&server, "+15550600002").await;
    let mut alice_companions = Vec::new();
    let mut bob_companions = Vec::new();
    for i in 0..4 {
        alice_companions
            .push(TestClient::link_companion(&server, &alice, &format!("alice {i}")).await);
        bob_companions.push(TestClient::link_companion(&server, &bob, &format!("bob {i}")).await);
    }
    let alice_all: Vec<&TestClient> = std::iter::once(&alice)
        .chain(alice_companions.iter())
        .collect();
    let bob_all: Vec<&TestClient> = std::iter::once(&bob).chain(bob_companions.iter()).collect();

    // Warm-up: every device writes once, so that every pair of devices has a session that has been
    // answered (normal Olm messages from then on, not pre-key messages).
    let mut ids = Vec::new();
    for d in &alice_all {
        ids.push(d.client.send_text(&bob.phone, "warm-up").await.unwrap().id);
    }
    for d in &bob_all {
        ids.push(
            d.client
                .send_text(&alice.phone, "warm-up")
                .await
                .unwrap()
                .id,
        );
    }
    all_have(&alice_all, &bob.phone, &ids).await;
    all_have(&bob_all, &alice.phone, &ids).await;
    for d in alice_all.iter().chain(bob_all.iter()) {
        d.client.wait_outbox_empty(WAIT).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for d in alice_all.iter().chain(bob_all.iter()) {
        d.client.wait_outbox_empty(WAIT).await.unwrap();
    }
    // Everyone but the sender goes offline; the sender reconnects through the counting proxy.
    for d in alice_all[1..].iter().chain(bob_all.iter()) {
        d.client.disconnect().await;
    }
    let upstream = Arc::new(AtomicU64::new(0));
    let proxy = counting_proxy(server.addr(), upstream.clone()).await;
    alice.client.disconnect().await;
    alice.client.set_server(&proxy).await.unwrap();
    alice.client.connect().await.unwrap();
    // One send outside the measurement, then quiet.
    alice
        .client
        .send_text(&bob.phone, "after reconnecting")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = upstream.load(Ordering::Relaxed);
    let mut times = Vec::with_capacity(SENDS);
    let mut last = None;
    let started = Instant::now();
    for i in 0..SENDS {
        let text = format!("steady-state message number {i:03}");
        let t = Instant::now();
        let m = alice.client.send_text(&bob.phone, &text).await.unwrap();
        times.push(t.elapsed());
        last = Some(m);
    }
    let elapsed = started.elapsed();
    let wire = upstream.load(Ordering::Relaxed) - before;
    let last = last.unwrap();

    // What the server queued for the last message: one envelope per device it was encrypted for.
    let store = server.server().state().store.clone();
    let mut messages = Vec::new();
    for (phone, first) in [(&alice.phone, 2u32), (&bob.phone, 1u32)] {
        for id in first..=5 {
            let device = DeviceId::new(id).unwrap();
            for env in store.load_queue(phone, device, 0, 10_000).await.unwrap() {
                if env.message_id == last.id {
                    messages.push(DeviceMessage {
                        phone: phone.as_str().to_owned(),
                        device_id: id,
                        olm_type: env.olm_type,
                        ciphertext: env.ciphertext,
                    });
                }
            }
        }
    }
    let ciphertext: usize = messages.iter().map(|m| m.ciphertext.len()).sum();
    let normal = messages.iter().filter(|m| m.olm_type == 1).count();
    let encryptions = messages.len();
    let request = Frame {
        body: Some(frame::Body::Request(Request {
            id: 1000,
            body: Some(request::Body::SendMessage(SendMessage {
                message_id: last.id.as_bytes().to_vec(),
                recipient: bob.phone.as_str().to_owned(),
                messages,
                retry_of: Vec::new(),
                retry_attempt: 0,
            })),
        })),
    };
    let protobuf = request.encoded_len();
    let on_wire = protobuf
        + natter_proto::frame::LEN_PREFIX
        + natter_proto::noise::RECORD_PREFIX
        + natter_proto::limits::NOISE_TAG_LEN;
    let (t50, t10, t90) = stats(times);
    println!(
        "send 5 -> 5 devices: {encryptions} encryptions per send (4 own companions + 5 peer devices; {normal} normal Olm messages, {} pre-key)",
        encryptions - normal
    );
    println!(
        "send 5 -> 5 devices: SendMessage request {on_wire} bytes on the wire (ciphertexts {ciphertext} B for a {} B text, protobuf frame {protobuf} B, +4 frame prefix +2 record prefix +16 Noise tag); counted on the TCP stream: {:.1} B per send over {SENDS} sends",
        last.text.len(),
        wire as f64 / SENDS as f64
    );
    println!(
        "send 5 -> 5 devices: {t50:.2} ms per send median (p10 {t10:.2}, p90 {t90:.2}) over {SENDS} sends, {:.0} sends/s sequential",
        SENDS as f64 / elapsed.as_secs_f64()
    );
}

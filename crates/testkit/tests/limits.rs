//! Abuse limits, each against a real natterd with the limit set low: connections and handshakes per IP,
//! the slow-handshake timeout, queued bytes per device, the per-account send rate and the window of
//! unacknowledged pushes. Every refusal reaches the client as a typed error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{RawDevice, WAIT};
use natter_client::ClientError;
use natter_client::net::{ConnectOptions, Connection};
use natter_proto::noise::{RecordReader, StaticKeypair, parse_refusal};
use natter_proto::wire::{ErrorCode, push};
use natter_testkit::{TestClient, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn anonymous(server: &TestServer) -> Result<Connection, ClientError> {
    let key = StaticKeypair::generate().unwrap();
    let addr = server.addr();
    Connection::open(ConnectOptions {
        addr: &addr,
        noise_key: &key,
        pinned_server_key: None,
        login: None,
    })
    .await
    .map(|(c, _)| c)
}

fn code_of(e: &ClientError) -> ErrorCode {
    e.server_code()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_capped() {
    let server = TestServer::start_with(|c| c.abuse.max_connections_per_ip = 2).await;
    let first = anonymous(&server).await.unwrap();
    let _second = anonymous(&server).await.unwrap();
    let e = anonymous(&server).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::LimitExceeded, "{e}");
    assert!(e.to_string().contains("too many connections"), "{e}");
    // A closed connection frees its slot.
    drop(first);
    let mut ok = None;
    for _ in 0..100 {
        if let Ok(c) = anonymous(&server).await {
            ok = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok.is_some(), "a slot is free again after a close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_per_ip_are_rate_limited() {
    let server = TestServer::start_with(|c| {
        c.abuse.handshakes_per_ip_per_s = 2;
        c.abuse.handshake_burst = 3;
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(anonymous(&server).await.unwrap());
    }
    let e = anonymous(&server).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited, "{e}");
    let ClientError::Server { retry_after_ms, .. } = e else {
        unreachable!()
    };
    assert!(
        retry_after_ms > 0 && retry_after_ms <= 500,
        "{retry_after_ms}"
    );
    // After the advised wait a handshake is allowed again.
    tokio::time::sleep(Duration::from_millis(retry_after_ms + 20)).await;
    anonymous(&server).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_are_cut_off_with_a_refusal() {
    let server = TestServer::start_with(|c| {
        c.abuse.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    // A slowloris: one byte of the first handshake message, then nothing.
    let mut sock = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    sock.write_all(&[0]).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}"
    );
    let mut reader = RecordReader::new();
    reader.push(&got);
    let refusal = parse_refusal(&reader.next_record().expect("a refusal record")).unwrap();
    assert_eq!(refusal.code, ErrorCode::LimitExceeded as i32);
    assert!(refusal.message.contains("handshake took too long"));

    // A complete handshake within the limit is unaffected.
    anonymous(&server).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_device_queue_refuses_sends_until_it_drains() {
    let server = TestServer::start_with(|c| c.abuse.max_queued_bytes_per_device = 4096).await;
    let alice = TestClient::online(&server, "+15550009101").await;
    let bob = TestClient::register(&server, "+15550009102").await;
    let text = "x".repeat(900);
    let mut sent = 0;
    let refusal = loop {
        match alice.client.send_text(&bob.phone, &text).await {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 20, "the queue limit never applied");
    };
    assert!(sent >= 2, "{sent} sent before the limit");
    assert_eq!(code_of(&refusal), ErrorCode::LimitExceeded, "{refusal}");
    assert!(refusal.to_string().contains("queue"), "{refusal}");

    // Bob comes online and takes his mail; then Alice can send again.
    let mut bob_events = bob.client.subscribe();
    bob.client.connect().await.unwrap();
    for _ in 0..sent {
        natter_testkit::next_message(&mut bob_events, WAIT, |m| !m.from_me).await;
    }
    let mut again = false;
    for _ in 0..50 {
        if alice
            .client
            .send_text(&bob.phone, "after the drain")
            .await
            .is_ok()
        {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again, "sends resume once the queue has drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_per_account_are_rate_limited() {
    let server = TestServer::start_with(|c| {
        c.abuse.sends_per_account_per_s = 2;
        c.abuse.send_burst = 3;
    })
    .await;
    let alice = TestClient::online(&server, "+15550009201").await;
    let bob = TestClient::register(&server, "+15550009202").await;
    for i in 0..3 {
        alice
            .client
            .send_text(&bob.phone, &format!("burst {i}"))
            .await
            .unwrap();
    }
    let e = alice
        .client
        .send_text(&bob.phone, "one too many")
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited, "{e}");
    let ClientError::Server { retry_after_ms, .. } = e else {
        unreachable!()
    };
    assert!(
        retry_after_ms > 0 && retry_after_ms <= 500,
        "{retry_after_ms}"
    );
    tokio::time::sleep(Duration::from_millis(retry_after_ms + 50)).await;
    alice
        .client
        .send_text(&bob.phone, "after the wait")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_pushes_are_capped_per_connection() {
    let server = TestServer::start_with(|c| c.abuse.max_unacked_pushes = 4).await;
    let alice = TestClient::online(&server, "+15550009301").await;
    let mut bob = RawDevice::register(&server, "+15550009302").await;
    for i in 0..10 {
        alice
            .client
            .send_text(&bob.phone, &format!("window {i}"))
            .await
            .unwrap();
    }
    // Bob acknowledges nothing: exactly 4 envelopes arrive, and no more.
    let mut ids = Vec::new();
    collect(&mut bob, &mut ids).await;
    assert_eq!(ids.len(), 4, "pushes beyond the window: {ids:?}");
    // Acknowledging them opens the window for the next 4.
    bob.conn.ack(ids.clone()).unwrap();
    let mut next = Vec::new();
    collect(&mut bob, &mut next).await;
    assert_eq!(next.len(), 4, "{next:?}");
    assert!(next.iter().all(|id| !ids.contains(id)));
    bob.conn.ack(next).unwrap();
    let mut last = Vec::new();
    collect(&mut bob, &mut last).await;
    assert_eq!(last.len(), 2);
}

/// Envelope ids pushed to `bob` within 1.5 s, unacknowledged.
async fn collect(bob: &mut RawDevice, ids: &mut Vec<u64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, bob.pushes.recv()).await {
        if let Some(push::Body::Envelope(e)) = p.body {
            ids.push(e.id);
        }
    }
}

//! Retries never show a message twice: the server stores a `SendMessage` retried under the same id
//! once (`duplicate: true`), and a client shows a message that arrives in two envelopes once. The
//! sender is a device that speaks the wire protocol directly, so the test controls exactly what is sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{RawDevice, WAIT, random_id};
use natter_client::{Event, MessageKind, MessageRecord};
use natter_proto::MessageId;
use natter_testkit::{TestClient, TestServer, eventually};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::broadcast;

const ALICE: &str = "+15550004001";
const BOB: &str = "+15550004002";

/// Every message event up to and including the one with id `last`.
async fn messages_until(
    events: &mut broadcast::Receiver<Event>,
    last: MessageId,
) -> Vec<MessageRecord> {
    tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        loop {
            if let Event::Message(m) = events.recv().await.unwrap() {
                let done = m.id == last;
                seen.push(m);
                if done {
                    return seen;
                }
            }
        }
    })
    .await
    .expect("the last message within the timeout")
}

async fn queued_for(server: &TestServer, phone: &str) -> i64 {
    let mut db = SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(server.data_dir().join("natter.db"))
            .read_only(true),
    )
    .await
    .unwrap();
    let n = sqlx::query_scalar("SELECT count(*) FROM queue WHERE phone = ?1")
        .bind(phone)
        .fetch_one(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_after_a_lost_response_is_delivered_once() {
    let server = TestServer::start().await;
    let bob = TestClient::online(&server, BOB).await;
    let mut bob_ev = bob.client.subscribe();
    let mut alice = RawDevice::register(&server, ALICE).await;

    let id = random_id();
    let ct = alice
        .encrypt_to(&bob.phone, &RawDevice::text(id, "exactly once"))
        .await;
    let first = alice
        .send(RawDevice::send_request(id, &bob.phone, &ct))
        .await
        .unwrap();
    assert!(!first.duplicate);

    // The response is "lost": the sender reconnects and sends the message again under the same id,
    // encrypted anew as a client's outbox does.
    alice.reconnect(&server).await;
    let ct = alice
        .encrypt_to(&bob.phone, &RawDevice::text(id, "exactly once"))
        .await;
    let second = alice
        .send(RawDevice::send_request(id, &bob.phone, &ct))
        .await
        .unwrap();
    assert!(second.duplicate, "the server recognises the retry");
    assert_eq!(
        second.server_ts_ms, first.server_ts_ms,
        "and answers as the first time"
    );

    // A later message comes after anything the retry could have queued.
    let later = random_id();
    let ct = alice
        .encrypt_to(&bob.phone, &RawDevice::text(later, "later"))
        .await;
    alice
        .send(RawDevice::send_request(later, &bob.phone, &ct))
        .await
        .unwrap();

    let seen = messages_until(&mut bob_ev, later).await;
    assert_eq!(
        seen.iter().map(|m| (m.id, m.kind)).collect::<Vec<_>>(),
        vec![(id, MessageKind::Text), (later, MessageKind::Text)]
    );
    assert_eq!(seen[0].text, "exactly once");
    assert_eq!(seen[0].server_ts_ms, first.server_ts_ms);
    let hist = bob.client.history(&alice.phone).await.unwrap();
    assert_eq!(
        hist.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![id, later]
    );
    eventually(WAIT, "Bob's queue drained", || async {
        queued_for(&server, BOB).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_arriving_in_two_envelopes_is_shown_once() {
    let server = TestServer::start().await;
    let bob = TestClient::online(&server, BOB).await;
    let mut bob_ev = bob.client.subscribe();
    let mut alice = RawDevice::register(&server, ALICE).await;

    // Same logical message id, two envelopes (two transport ids, two ciphertexts): both reach Bob.
    let logical = random_id();
    for _ in 0..2 {
        let ct = alice
            .encrypt_to(&bob.phone, &RawDevice::text(logical, "sent twice"))
            .await;
        let sent = alice
            .send(RawDevice::send_request(random_id(), &bob.phone, &ct))
            .await
            .unwrap();
        assert!(!sent.duplicate, "different envelopes for the server");
    }
    let later = random_id();
    let ct = alice
        .encrypt_to(&bob.phone, &RawDevice::text(later, "later"))
        .await;
    alice
        .send(RawDevice::send_request(later, &bob.phone, &ct))
        .await
        .unwrap();

    let seen = messages_until(&mut bob_ev, later).await;
    assert_eq!(
        seen.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![logical, later],
        "the second copy is not shown"
    );
    let hist = bob.client.history(&alice.phone).await.unwrap();
    assert_eq!(
        hist.iter()
            .map(|m| (m.id, m.kind, m.text.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (logical, MessageKind::Text, "sent twice"),
            (later, MessageKind::Text, "later")
        ]
    );
    let unshown = bob.client.take_unshown().await.unwrap();
    assert_eq!(unshown.len(), 2);
    // Both envelopes were acknowledged: nothing stays on the server to come again.
    eventually(WAIT, "Bob's queue drained", || async {
        queued_for(&server, BOB).await == 0
    })
    .await;
}

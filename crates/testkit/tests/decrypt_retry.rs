//! Decryption failures against a real natterd: a receiver that lost its session asks the sender again
//! and ends up showing the text; a sender whose ciphertexts never decrypt ends in exactly one
//! "could not decrypt" entry after `MAX_DECRYPT_RETRIES` retry requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{RawDevice, WAIT, random_id};
use natter_client::{MessageKind, MessageStatus};
use natter_crypto::OlmCiphertext;
use natter_proto::content::content::Body;
use natter_proto::limits::MAX_DECRYPT_RETRIES;
use natter_proto::wire::SendMessage;
use natter_testkit::{TestClient, TestServer, eventually, next_message};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

const ALICE: &str = "+15550003001";
const BOB: &str = "+15550003002";

async fn open_db(path: &Path, read_only: bool) -> SqliteConnection {
    SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(path)
            .read_only(read_only),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_lost_its_session_gets_the_text_through_a_retry() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let mut bob_ev = bob.client.subscribe();

    // One round trip: Alice's session has now received from Bob (his delivered receipt), so her next
    // message is a normal Olm message, not a pre-key one that could open a new session.
    let m1 = alice.client.send_text(&bob.phone, "first").await.unwrap();
    next_message(&mut bob_ev, WAIT, |m| m.id == m1.id).await;
    eventually(WAIT, "m1 delivered", || async {
        alice
            .client
            .message(&bob.phone, &m1.id)
            .await
            .unwrap()
            .unwrap()
            .status
            == MessageStatus::Delivered
    })
    .await;

    // Bob stops and loses every session with Alice.
    bob.client.disconnect().await;
    let bob_db = bob.home().join("natter.db");
    {
        let mut db = open_db(&bob_db, false).await;
        let deleted = sqlx::query("DELETE FROM sessions WHERE phone = ?1")
            .bind(ALICE)
            .execute(&mut db)
            .await
            .unwrap()
            .rows_affected();
        assert!(deleted >= 1, "Bob had a session with Alice");
        db.close().await.unwrap();
    }

    let m2 = alice
        .client
        .send_text(&bob.phone, "after the loss")
        .await
        .unwrap();
    // What waits on the server for Bob is a normal (type 1) Olm message of the old session.
    {
        let mut db = open_db(&server.data_dir().join("natter.db"), true).await;
        let types: Vec<i64> = sqlx::query_scalar(
            "SELECT olm_type FROM queue WHERE phone = ?1 AND sender = ?2 AND message_id = ?3",
        )
        .bind(BOB)
        .bind(ALICE)
        .bind(m2.id.as_bytes().as_slice())
        .fetch_all(&mut db)
        .await
        .unwrap();
        assert_eq!(types, vec![1], "m2 waits for Bob as a normal Olm message");
        db.close().await.unwrap();
    }

    let bob = bob.reopen().await;
    let mut bob_ev = bob.client.subscribe();
    bob.client.connect().await.unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| m.id == m2.id).await;
    assert_eq!(got.kind, MessageKind::Text);
    assert_eq!(got.text, "after the loss");
    assert!(!got.from_me);

    // It really went through the retry protocol: Alice answered a retry request with a resend.
    {
        let mut db = open_db(&alice.home().join("natter.db"), true).await;
        let resends: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE retry_of IS NOT NULL AND only_phone = ?1",
        )
        .bind(BOB)
        .fetch_one(&mut db)
        .await
        .unwrap();
        assert!(resends >= 1, "Alice resent the message");
        db.close().await.unwrap();
    }
    let hist = bob.client.history(&alice.phone).await.unwrap();
    assert_eq!(
        hist.iter()
            .map(|m| (m.kind, m.text.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (MessageKind::Text, "first"),
            (MessageKind::Text, "after the loss")
        ],
        "no undecryptable entry, no duplicate"
    );
    eventually(WAIT, "m2 delivered", || async {
        alice
            .client
            .message(&bob.phone, &m2.id)
            .await
            .unwrap()
            .unwrap()
            .status
            == MessageStatus::Delivered
    })
    .await;
    {
        let mut db = open_db(&bob.home().join("natter.db"), true).await;
        let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM failures")
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert_eq!(failures, 0, "the failure was cleared");
        db.close().await.unwrap();
    }
}

/// A ciphertext nobody can decrypt: the shape of a normal Olm message, random content.
fn garbage() -> OlmCiphertext {
    let mut body = vec![0u8; 120];
    getrandom::fill(&mut body).unwrap();
    OlmCiphertext { olm_type: 1, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_never_decrypts_ends_as_one_undecryptable_entry() {
    let server = TestServer::start().await;
    let bob = TestClient::online(&server, BOB).await;
    let mut bob_ev = bob.client.subscribe();
    let mut alice = RawDevice::register(&server, ALICE).await;

    let original = random_id();
    alice
        .send(RawDevice::send_request(original, &bob.phone, &garbage()))
        .await
        .unwrap();

    // Bob asks again, attempt after attempt; every resend is just as undecryptable.
    for attempt in 1..=MAX_DECRYPT_RETRIES {
        let env = alice.next_envelope().await;
        assert_eq!(env.sender, BOB);
        let content = alice.decrypt(&bob.phone, &env).await;
        let Some(Body::RetryRequest(r)) = content.body else {
            panic!("expected a retry request, got {content:?}");
        };
        assert_eq!(r.message_id, original.as_bytes().to_vec());
        assert_eq!(r.attempt, attempt);
        assert_eq!(env.retry_of, original.as_bytes().to_vec());
        assert_eq!(env.retry_attempt, attempt);
        let bad = garbage();
        let mut resend: SendMessage = RawDevice::send_request(random_id(), &bob.phone, &bad);
        resend.retry_of = original.as_bytes().to_vec();
        resend.retry_attempt = attempt;
        alice.send(resend).await.unwrap();
    }

    let entry = next_message(&mut bob_ev, WAIT, |_| true).await;
    assert_eq!(entry.kind, MessageKind::Undecryptable);
    assert_eq!(entry.id, original);
    assert_eq!(entry.chat, alice.phone);
    assert!(entry.text.is_empty());

    // A good message afterwards: Bob answers it with a delivered receipt and nothing else, so the retry
    // requests stopped at the limit.
    let good = random_id();
    let ct = alice
        .encrypt_to(&bob.phone, &RawDevice::text(good, "this one is fine"))
        .await;
    alice
        .send(RawDevice::send_request(good, &bob.phone, &ct))
        .await
        .unwrap();
    let got = next_message(&mut bob_ev, WAIT, |_| true).await;
    assert_eq!(got.id, good);
    assert_eq!(got.text, "this one is fine");
    let env = alice.next_envelope().await;
    let content = alice.decrypt(&bob.phone, &env).await;
    assert!(
        matches!(content.body, Some(Body::Receipt(_))),
        "expected the receipt, got {content:?}"
    );

    let hist = bob.client.history(&alice.phone).await.unwrap();
    assert_eq!(
        hist.iter().map(|m| (m.kind, m.id)).collect::<Vec<_>>(),
        vec![
            (MessageKind::Undecryptable, original),
            (MessageKind::Text, good)
        ],
        "exactly one undecryptable entry"
    );
    let mut db = open_db(&bob.home().join("natter.db"), true).await;
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM failures")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(failures, 0, "nothing is pending any more");
    db.close().await.unwrap();
}

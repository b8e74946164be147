//! Crash safety: a message load runs through a real natterd process that is killed with SIGKILL at
//! random moments, 20 times, and started again on the same data directory. Every message the server
//! acknowledged to its sender is delivered exactly once, nothing is delivered that was not sent, the
//! store opens after every kill, and its integrity check passes at the end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_client::{Event, MessageStatus};
use natter_testkit::{NatterdProcess, TestClient, eventually};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::broadcast::error::RecvError;

const ALICE: &str = "+15550009001";
const BOB: &str = "+15550009002";
const KILLS: usize = 20;

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_exactly_once() {
    let mut natterd = NatterdProcess::start(&[]);
    let alice = TestClient::register_at(&natterd.addr(), &natterd.sms_log(), ALICE).await;
    let bob = TestClient::register_at(&natterd.addr(), &natterd.sms_log(), BOB).await;
    bob.client.connect().await.unwrap();
    alice.client.connect().await.unwrap();

    // Bob counts every incoming message event by text.
    let received: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let lagged = Arc::new(Mutex::new(false));
    let mut bob_events = bob.client.subscribe();
    let counter = {
        let received = received.clone();
        let lagged = lagged.clone();
        tokio::spawn(async move {
            loop {
                match bob_events.recv().await {
                    Ok(Event::Message(m)) if !m.from_me => {
                        *received.lock().unwrap().entry(m.text).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => *lagged.lock().unwrap() = true,
                    Err(RecvError::Closed) => return,
                }
            }
        })
    };

    // Alice sends without pause; a send that returns Ok was acknowledged by the server.
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let attempted: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (acked, attempted, stop) = (acked.clone(), attempted.clone(), stop.clone());
        let client = alice.client.clone();
        let bob_phone = bob.phone.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let text = format!("crash-safety message {i}");
                attempted.lock().unwrap().insert(text.clone());
                match client.send_text(&bob_phone, &text).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(text);
                    }
                    // Left in the outbox; it goes out after a reconnect (or not at all).
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    };

    for kill in 0..KILLS {
        // Wait for the load to be flowing again (clients reconnected, sends acknowledged), then kill
        // at a random moment within the next 600 ms.
        let before = acked.lock().unwrap().len();
        eventually(
            Duration::from_secs(30),
            "sends acknowledged after a restart",
            || {
                let n = acked.lock().unwrap().len();
                async move { n >= before + 3 }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(random_below(600))).await;
        natterd.kill();
        tokio::time::sleep(Duration::from_millis(random_below(200))).await;
        // Starting again opens the store left by the kill; a damaged store would fail here.
        natterd.restart();
        eprintln!(
            "kill {}: {} acknowledged so far",
            kill + 1,
            acked.lock().unwrap().len()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the sender stops")
        .unwrap();

    // Everything Alice's outbox still holds goes out after its reconnect; then every message she has
    // as sent must reach Bob.
    let alice_client = alice.client.clone();
    let bob_phone = bob.phone.clone();
    eventually(Duration::from_secs(60), "alice's outbox to drain", || {
        let c = alice_client.clone();
        let p = bob_phone.clone();
        async move {
            c.history(&p)
                .await
                .unwrap()
                .iter()
                .all(|m| m.status != MessageStatus::Pending)
        }
    })
    .await;
    let sent_by_alice: BTreeSet<String> = alice
        .client
        .history(&bob.phone)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.from_me && m.status != MessageStatus::Failed)
        .map(|m| m.text)
        .collect();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.is_subset(&sent_by_alice),
        "a send acknowledged to the sender is not marked sent in its store"
    );
    assert!(acked.len() >= KILLS * 3, "too little load: {}", acked.len());
    {
        let received = received.clone();
        let expected = sent_by_alice.clone();
        eventually(Duration::from_secs(60), "bob to receive everything", || {
            let done = expected
                .iter()
                .all(|t| received.lock().unwrap().contains_key(t));
            async move { done }
        })
        .await;
    }
    // Late duplicates would arrive now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = received.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    for (text, n) in &received {
        assert!(
            attempted.contains(text),
            "bob received {text:?}, never sent"
        );
        if !*lagged.lock().unwrap() {
            assert_eq!(*n, 1, "{text:?} delivered {n} times");
        }
    }
    let bob_history: Vec<String> = bob
        .client
        .history(&alice.phone)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| !m.from_me)
        .map(|m| m.text)
        .collect();
    let unique: BTreeSet<&String> = bob_history.iter().collect();
    assert_eq!(unique.len(), bob_history.len(), "a message shows twice");
    for t in &acked {
        assert!(unique.contains(t), "acknowledged {t:?} missing at bob");
    }

    // Bob acknowledged everything: the server's queue for him empties; then the store is checked.
    let db_path = natterd.data_dir().join("natter.db");
    eventually(Duration::from_secs(30), "bob's queue to empty", || {
        let db_path = db_path.clone();
        async move {
            let mut db = SqliteConnection::connect_with(
                &SqliteConnectOptions::new()
                    .filename(&db_path)
                    .read_only(true),
            )
            .await
            .unwrap();
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM queue WHERE phone = ?1")
                .bind(BOB)
                .fetch_one(&mut db)
                .await
                .unwrap();
            db.close().await.unwrap();
            n == 0
        }
    })
    .await;
    alice.client.disconnect().await;
    bob.client.disconnect().await;
    counter.abort();
    natterd.kill();
    let mut db = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&db_path))
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    db.close().await.unwrap();
    eprintln!(
        "{} kills, {} acknowledged, {} delivered",
        KILLS,
        acked.len(),
        received.len()
    );
}

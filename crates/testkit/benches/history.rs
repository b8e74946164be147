//! Measurement of history sync against a real natterd on a loopback port (not a test: nothing here
//! asserts a timing). Run with `cargo bench -p natter-testkit --bench history`.
//!
//! A primary holds 10,000 text messages across three chats (inserted into its store while it is
//! switched off: about 70 bytes of text each, realistic ids, times and statuses). A fresh companion is
//! linked; the clock starts when the link is complete (companion connected, prekeys uploaded) and stops
//! when the companion has imported the last chunk. Reported: that time, the chunks, and the bytes
//! uploaded (the sum of the encrypted blobs' sizes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use natter_client::store::sqlite::SqliteStore;
use natter_client::store::{Changes, ClientStore};
use natter_client::{Event, HistoryOptions, MessageKind, MessageRecord, MessageStatus};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use natter_testkit::{TestClient, TestServer};

const MESSAGES: usize = 10_000;
const WAIT: Duration = Duration::from_secs(120);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let server = TestServer::start().await;
    let alice = TestClient::register(&server, "+15550009001").await;
    let chats: Vec<PhoneNumber> = ["+15550009002", "+15550009003", "+15550009004"]
        .iter()
        .map(|p| PhoneNumber::parse(p).unwrap())
        .collect();
    let home = alice.home().to_path_buf();
    let off = alice.power_off().await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the old client's tasks end
    {
        let store = SqliteStore::open(&home.join("natter.db")).await.unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let messages = (0..MESSAGES)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                id[8..].copy_from_slice(&(now ^ 0x5a5a).to_be_bytes());
                let from_me = i % 2 == 0;
                let ts = now - 3_600_000 - (i as u64) * 60_000;
                MessageRecord {
                    chat: chats[i % 3].clone(),
                    id: MessageId::from_bytes(id),
                    from_me,
                    sender_device: DeviceId::PRIMARY,
                    kind: MessageKind::Text,
                    text: format!(
                        "message {i}: see you at the station at {} o'clock, ok?",
                        i % 24
                    ),
                    sent_at_ms: ts - 40,
                    server_ts_ms: ts,
                    status: if from_me {
                        MessageStatus::Read
                    } else {
                        MessageStatus::Received
                    },
                    shown: true,
                    seq: 0,
                    media: None,
                }
            })
            .collect();
        store
            .save_changes(Changes {
                messages,
                ..Changes::default()
            })
            .await
            .unwrap();
    }
    let alice = off.power_on().await;
    alice.client.connect().await.unwrap();

    let companion = TestClient::link_companion(&server, &alice, "laptop").await;
    let mut events = companion.client.subscribe();
    let started = Instant::now();
    let device = companion.client.whoami().await.unwrap().unwrap().device_id;
    let sent = alice
        .client
        .send_history(device, &HistoryOptions::default())
        .await
        .unwrap();
    let queued = started.elapsed();
    let mut imported = 0u64;
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(Event::HistoryImported {
                    chunk_index,
                    chunk_count,
                    messages,
                    ..
                }) => {
                    imported += u64::from(messages);
                    if chunk_index + 1 == chunk_count {
                        return;
                    }
                }
                Ok(Event::HistoryFailed { reason, .. }) => panic!("chunk refused: {reason}"),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("the sync completes");
    let total = started.elapsed();
    let text_bytes: usize = {
        let mut n = 0;
        for c in &chats {
            n += alice
                .client
                .history(c)
                .await
                .unwrap()
                .iter()
                .map(|m| m.text.len())
                .sum::<usize>();
        }
        n
    };
    println!("history sync of {MESSAGES} messages to a new companion (loopback, 2 worker threads)");
    println!(
        "  chunks: {} (up to {} messages each); messages imported: {imported}",
        sent.chunks,
        HistoryOptions::default().chunk_messages
    );
    println!(
        "  bytes uploaded (sum of blob sizes): {} ({:.1} bytes/message; message text alone: {} bytes)",
        sent.blob_bytes,
        sent.blob_bytes as f64 / MESSAGES as f64,
        text_bytes
    );
    println!("  link complete -> all chunks uploaded and queued: {queued:?}");
    println!("  link complete -> last chunk imported on the companion: {total:?}");
    assert_eq!(imported as usize, MESSAGES);
}

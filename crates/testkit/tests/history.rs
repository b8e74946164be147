//! History sync through a real natterd: a primary with ~2,500 messages across three chats (about 150
//! sent for real between accounts, including a file; the rest inserted into the primary's store while
//! it is switched off) links a companion, which ends up with exactly the primary's recent messages
//! (ids, senders, timestamps, statuses, the file downloads and decrypts); a history blob flipped on the
//! server's disk is refused with nothing of it stored; `request_older_history` fetches older messages of
//! one chat.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natter_client::store::sqlite::SqliteStore;
use natter_client::store::{Changes, ClientStore};
use natter_client::{
    Client, Event, HistoryOptions, MessageKind, MessageRecord, MessageStatus, media::no_progress,
};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use natter_testkit::{TestClient, TestServer, eventually};

const ALICE: &str = "+15550008001";
const BOB: &str = "+15550008002";
const CAROL: &str = "+15550008003";
const DAVE: &str = "+15550008004";
const WAIT: Duration = Duration::from_secs(30);
const DAY: u64 = 86_400_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A comparable view of a message (the media key unsealed, since each device seals it with its own
/// store key).
#[derive(Debug, PartialEq, Eq)]
struct View {
    id: MessageId,
    from_me: bool,
    sender_device: DeviceId,
    kind: MessageKind,
    text: String,
    sent_at_ms: u64,
    server_ts_ms: u64,
    status: MessageStatus,
    media: Option<(String, Vec<u8>, Vec<u8>)>,
}

fn view(client: &Client, m: &MessageRecord) -> View {
    View {
        id: m.id,
        from_me: m.from_me,
        sender_device: m.sender_device,
        kind: m.kind,
        text: m.text.clone(),
        sent_at_ms: m.sent_at_ms,
        server_ts_ms: m.server_ts_ms,
        status: m.status,
        media: m.media.as_ref().map(|r| {
            (
                r.0.blob_id.clone(),
                client.media_key(r).unwrap().to_vec(),
                r.0.ciphertext_sha256.clone(),
            )
        }),
    }
}

/// A chat's messages from `since` on, by id.
async fn chat_views(client: &Client, chat: &PhoneNumber, since: u64) -> BTreeMap<MessageId, View> {
    client
        .history(chat)
        .await
        .unwrap()
        .iter()
        .filter(|m| m.server_ts_ms >= since)
        .map(|m| (m.id, view(client, m)))
        .collect()
}

/// Waits for history events until `done` chunks have arrived (or one failed); returns the events.
async fn history_events(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    stop: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e @ (Event::HistoryImported { .. } | Event::HistoryFailed { .. })) => {
                    seen.push(e);
                    if stop(&seen) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("history events within the timeout");
    seen
}

/// Every chunk of the sync has been imported (chunks from separate batches may finish in any order), or
/// one was refused.
fn all_chunks(seen: &[Event]) -> bool {
    let mut done = std::collections::BTreeSet::new();
    let mut count = None;
    for e in seen {
        match e {
            Event::HistoryImported {
                chunk_index,
                chunk_count,
                ..
            } => {
                done.insert(*chunk_index);
                count = Some(*chunk_count);
            }
            Event::HistoryFailed { .. } => return true,
            _ => {}
        }
    }
    count.is_some_and(|c| done.len() as u32 >= c)
}

/// Inserts `n` synthetic text messages into a switched-off device's store, `age_ms` in the past and
/// one second apart.
async fn seed(home: &Path, chats: &[PhoneNumber], n: usize, age_ms: u64, tag: &str) {
    let store = SqliteStore::open(&home.join("natter.db")).await.unwrap();
    let base = now_ms() - age_ms;
    let mut messages = Vec::with_capacity(n);
    for i in 0..n {
        let chat = chats[i % chats.len()].clone();
        let from_me = i % 3 == 0;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_be_bytes());
        id[8..8 + tag.len().min(8)].copy_from_slice(&tag.as_bytes()[..tag.len().min(8)]);
        let ts = base - (i as u64) * 1_000;
        messages.push(MessageRecord {
            chat,
            id: MessageId::from_bytes(id),
            from_me,
            sender_device: DeviceId::PRIMARY,
            kind: MessageKind::Text,
            text: format!("{tag} message {i}: the quick brown fox jumps over the lazy dog"),
            sent_at_ms: ts - 5,
            server_ts_ms: ts,
            status: if from_me {
                MessageStatus::Read
            } else {
                MessageStatus::Received
            },
            shown: true,
            seq: 0,
            media: None,
        });
    }
    store
        .save_changes(Changes {
            messages,
            ..Changes::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_companion_gets_the_history_and_can_ask_for_older() {
    natter_testkit::init_logging();
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let peers = [
        TestClient::online(&server, BOB).await,
        TestClient::online(&server, CAROL).await,
        TestClient::online(&server, DAVE).await,
    ];
    let chats: Vec<PhoneNumber> = peers.iter().map(|p| p.phone.clone()).collect();

    // ~150 real messages both ways, and a file.
    for round in 0..25 {
        for p in &peers {
            alice
                .client
                .send_text(&p.phone, &format!("hi {round}"))
                .await
                .unwrap();
            p.client
                .send_text(&alice.phone, &format!("hello {round}"))
                .await
                .unwrap();
        }
    }
    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("photo.bin");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &payload).unwrap();
    let file_msg = alice
        .client
        .send_file(&peers[0].phone, &src, None, "the file", no_progress())
        .await
        .unwrap();
    for chat in &chats {
        eventually(WAIT, "alice has every real message", || async {
            alice.client.history(chat).await.unwrap().len() >= 50
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // receipts settle

    // The bulk: 2,350 recent messages and 30 older than 90 days (bob's chat only).
    let home = alice.home().to_path_buf();
    let off = alice.power_off().await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the old client's tasks end
    seed(&home, &chats, 2_350, DAY, "recent").await;
    seed(&home, &chats[..1], 30, 100 * DAY, "old").await;
    let alice = off.power_on().await;
    alice.client.connect().await.unwrap();
    let since = now_ms() - 90 * DAY;

    // Link a companion and sync.
    let companion = TestClient::link_companion(&server, &alice, "laptop").await;
    let device = companion.client.whoami().await.unwrap().unwrap().device_id;
    let mut events = companion.client.subscribe();
    let started = std::time::Instant::now();
    let opts = HistoryOptions {
        chunk_messages: 1_000,
        ..HistoryOptions::default()
    };
    let sent = alice.client.send_history(device, &opts).await.unwrap();
    assert!(sent.delivered);
    assert_eq!(sent.chunks, 3);
    let got = history_events(&mut events, all_chunks).await;
    let imported: u32 = got
        .iter()
        .map(|e| match e {
            Event::HistoryImported { messages, .. } => *messages,
            other => panic!("chunk refused: {other:?}"),
        })
        .sum();
    assert_eq!(imported as usize, sent.messages);
    eprintln!(
        "synced {} messages in {} chunks ({} blob bytes) in {:?}",
        sent.messages,
        sent.chunks,
        sent.blob_bytes,
        started.elapsed()
    );
    let mut total = 0;
    for chat in &chats {
        let a = chat_views(&alice.client, chat, since).await;
        let c = chat_views(&companion.client, chat, 0).await;
        assert!(a.len() > 800, "{chat}: {}", a.len());
        assert_eq!(a.len(), c.len(), "{chat}");
        assert_eq!(a, c, "{chat}");
        total += a.len();
    }
    assert_eq!(total, sent.messages);
    // Nothing of the past is shown as new.
    assert!(companion.client.take_unshown().await.unwrap().is_empty());
    // The file's pointer works on the companion.
    let out = tempfile::tempdir().unwrap();
    let path = companion
        .client
        .download(&peers[0].phone, &file_msg.id, out.path(), no_progress())
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), payload);

    // Older history of bob's chat, on request.
    let mut events = companion.client.subscribe();
    companion
        .client
        .request_older_history(&chats[0])
        .await
        .unwrap();
    let got = history_events(&mut events, all_chunks).await;
    assert!(
        matches!(got.last(), Some(Event::HistoryImported { messages: 30, chat: Some(c), .. }) if *c == chats[0]),
        "{got:?}"
    );
    assert_eq!(
        chat_views(&companion.client, &chats[0], 0).await,
        chat_views(&alice.client, &chats[0], 0).await
    );
    // The primary has nothing older than itself.
    assert!(alice.client.request_older_history(&chats[0]).await.is_err());

    // A tampered blob is refused, and nothing of the chunk is stored.
    let second = TestClient::link_companion(&server, &alice, "tablet").await;
    let device2 = second.client.whoami().await.unwrap().unwrap().device_id;
    let second = second.power_off().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let blobs = server.data_dir().join("blobs");
    let before: Vec<_> = walkdir::WalkDir::new(&blobs)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect();
    let small = HistoryOptions {
        max_messages: 500,
        ..HistoryOptions::default()
    };
    let sent = alice.client.send_history(device2, &small).await.unwrap();
    assert!(sent.delivered);
    assert_eq!(sent.chunks, 1);
    let new: Vec<_> = walkdir::WalkDir::new(&blobs)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && !before.contains(&e.path().to_path_buf()))
        .map(|e| e.path().to_path_buf())
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let mut bytes = std::fs::read(&new[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&new[0], &bytes).unwrap();
    let second = second.power_on().await;
    let mut events = second.client.subscribe();
    second.client.connect().await.unwrap();
    let got = history_events(&mut events, all_chunks).await;
    match got.as_slice() {
        [Event::HistoryFailed { reason, .. }] => {
            assert!(reason.contains("integrity"), "{reason}")
        }
        other => panic!("expected a refusal: {other:?}"),
    }
    for chat in &chats {
        assert!(second.client.history(chat).await.unwrap().is_empty());
    }
}

/// The blob files on the server's disk.
fn blob_files(server: &TestServer) -> Vec<std::path::PathBuf> {
    walkdir::WalkDir::new(server.data_dir().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_chunk_is_imported_after_a_restart() {
    // The companion acknowledges history envelopes before it imports their chunks (an import downloads
    // a blob, which may take long). The job is saved with the envelope, so a companion that stops
    // between the two (here: it cannot download, then restarts) still imports every chunk.
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    for i in 0..30 {
        alice
            .client
            .send_text(&bob.phone, &format!("hi {i}"))
            .await
            .unwrap();
    }
    eventually(WAIT, "alice's messages to be sent", || async {
        alice
            .client
            .history(&bob.phone)
            .await
            .unwrap()
            .iter()
            .all(|m| m.server_ts_ms > 0)
    })
    .await;
    let tablet = TestClient::link_companion(&server, &alice, "tablet").await;
    let device = tablet.client.whoami().await.unwrap().unwrap().device_id;
    let tablet = tablet.power_off().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = blob_files(&server);
    let opts = HistoryOptions {
        chunk_messages: 10,
        ..HistoryOptions::default()
    };
    let sent = alice.client.send_history(device, &opts).await.unwrap();
    assert!(sent.delivered);
    assert_eq!((sent.chunks, sent.messages), (3, 30));
    // Take the chunks' blobs away: every download fails (a transient error: the job stays).
    let hidden = tempfile::tempdir().unwrap();
    let moved: Vec<_> = blob_files(&server)
        .into_iter()
        .filter(|p| !before.contains(p))
        .map(|p| {
            let to = hidden.path().join(p.file_name().unwrap());
            std::fs::rename(&p, &to).unwrap();
            (p, to)
        })
        .collect();
    assert_eq!(moved.len(), 3);

    let tablet = tablet.power_on().await;
    tablet.client.connect().await.unwrap();
    let store = server.server().state().store.clone();
    eventually(
        WAIT,
        "the tablet to acknowledge the history envelopes",
        || async {
            store
                .load_queue(&alice.phone, device, 0, 100)
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await;
    assert_eq!(tablet.client.pending_history_jobs().await.unwrap(), 3);
    assert!(tablet.client.history(&bob.phone).await.unwrap().is_empty());

    // Restart with the blobs back: every chunk is imported, nothing twice.
    let tablet = tablet.power_off().await;
    for (at, hidden_at) in &moved {
        std::fs::rename(hidden_at, at).unwrap();
    }
    let tablet = tablet.power_on().await;
    let mut events = tablet.client.subscribe();
    tablet.client.connect().await.unwrap();
    let got = history_events(&mut events, all_chunks).await;
    assert!(
        got.iter()
            .all(|e| matches!(e, Event::HistoryImported { messages: 10, .. })),
        "{got:?}"
    );
    assert_eq!(tablet.client.pending_history_jobs().await.unwrap(), 0);
    assert_eq!(
        chat_views(&tablet.client, &bob.phone, 0).await,
        chat_views(&alice.client, &bob.phone, 0).await
    );
    // Imported in conversation order, whatever order the chunks came in.
    let times: Vec<u64> = tablet
        .client
        .history(&bob.phone)
        .await
        .unwrap()
        .iter()
        .map(|m| m.server_ts_ms)
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

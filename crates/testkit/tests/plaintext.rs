//! The server never writes a plaintext to disk: after messages with a unique marker went both ways (some
//! delivered, some still queued), no file under the server's data directory (database, -wal, -shm, key)
//! holds the marker, in UTF-8 or base64. The same search finds the marker in a client's home, so the
//! search itself is shown to work.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use base64::Engine;
use common::{WAIT, contains, files_under, random_id};
use natter_client::MessageStatus;
use natter_testkit::{TestClient, TestServer, eventually, next_message};

/// The byte strings whose presence would betray `marker`: its UTF-8 bytes and its base64 forms at each
/// of the three alignments (trimmed of the characters that depend on the neighbouring bytes).
fn needles(marker: &str) -> Vec<Vec<u8>> {
    let mut out = vec![marker.as_bytes().to_vec()];
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for pad in 0..3 {
            let mut bytes = vec![0u8; pad];
            bytes.extend_from_slice(marker.as_bytes());
            let enc = engine.encode(&bytes);
            // The first 4 characters cover the padding bytes, the last 4 the end of the marker.
            out.push(enc.as_bytes()[4..enc.len() - 4].to_vec());
        }
    }
    out
}

/// The files under `dir` holding one of the needles of `marker`.
fn files_with(dir: &Path, marker: &str) -> Vec<String> {
    let needles = needles(marker);
    files_under(dir)
        .into_iter()
        .filter(|(_, bytes)| needles.iter().any(|n| contains(bytes, n)))
        .map(|(p, _)| p.display().to_string())
        .collect()
}

#[test]
fn the_search_finds_the_marker_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let marker = "natter-marker-self-test";
    assert!(files_with(dir.path(), marker).is_empty());
    for (i, pad) in ["", "x", "xy"].iter().enumerate() {
        let text = format!("{pad}{marker}");
        let b64 = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
        std::fs::write(
            dir.path().join(format!("b64-{i}")),
            format!("junk{b64}junk"),
        )
        .unwrap();
        assert_eq!(
            files_with(dir.path(), marker).len(),
            i + 1,
            "base64 with {pad:?}"
        );
    }
    std::fs::write(dir.path().join("raw"), format!("\0\0{marker}\0")).unwrap();
    assert_eq!(files_with(dir.path(), marker).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_reaches_the_servers_disk() {
    let mut server = TestServer::start().await;
    let alice = TestClient::online(&server, "+15550005001").await;
    let bob = TestClient::online(&server, "+15550005002").await;
    let mut alice_ev = alice.client.subscribe();
    let mut bob_ev = bob.client.subscribe();
    let marker = format!("natter-marker-{}", random_id().to_hex());

    // Delivered both ways...
    let a = alice
        .client
        .send_text(&bob.phone, &format!("from Alice: {marker}"))
        .await
        .unwrap();
    next_message(&mut bob_ev, WAIT, |m| m.id == a.id).await;
    let b = bob
        .client
        .send_text(&alice.phone, &format!("{marker} from Bob"))
        .await
        .unwrap();
    next_message(&mut alice_ev, WAIT, |m| m.id == b.id).await;
    for (c, peer, id) in [(&alice, &bob.phone, a.id), (&bob, &alice.phone, b.id)] {
        eventually(WAIT, "delivered", || async {
            c.client.message(peer, &id).await.unwrap().unwrap().status == MessageStatus::Delivered
        })
        .await;
    }
    // ...and queued for an offline recipient when the server stops.
    bob.client.disconnect().await;
    alice
        .client
        .send_text(&bob.phone, &format!("queued {marker} queued"))
        .await
        .unwrap();
    alice.client.disconnect().await;
    server.stop().await;

    let files = files_under(server.data_dir());
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n == "natter.db"),
        "the search covers the database: {names:?}"
    );
    assert!(
        files.iter().map(|(_, b)| b.len()).sum::<usize>() > 4096,
        "the data directory holds data"
    );
    let leaks = files_with(server.data_dir(), &marker);
    assert!(
        leaks.is_empty(),
        "plaintext on the server's disk: {leaks:?}"
    );

    // The same search finds the marker where it is stored in the clear: the clients' homes.
    assert!(!files_with(alice.home(), &marker).is_empty());
    assert!(!files_with(bob.home(), &marker).is_empty());
}

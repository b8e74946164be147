//! End-to-end media transfers through a real natterd and its blob HTTP service: files of 10 MiB and
//! 300 MiB round trip with their digests checked (the large one in bounded memory), an upload and a
//! download cut mid-way resume, a flipped byte in the stored blob is refused with nothing left behind,
//! and the blob on the server's disk holds no plaintext.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use natter_client::{ClientError, MessageKind, MessageRecord, Progress};
use natter_testkit::{TestClient, TestServer, next_message};
use sha2::{Digest, Sha256};

const ALICE: &str = "+15550007001";
const BOB: &str = "+15550007002";
const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;
const MARKER: &[u8] = b"NATTER-PLAINTEXT-MARKER:";

/// The tests measure this process's memory: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Writes `size` bytes (1 MiB blocks of the marker, each stamped with its index) without holding the
/// file in memory; returns its SHA-256.
fn write_file(path: &Path, size: u64) -> Vec<u8> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hash = Sha256::new();
    let mut block: Vec<u8> = MARKER.iter().copied().cycle().take(MIB as usize).collect();
    let mut left = size;
    let mut index = 0u64;
    while left > 0 {
        block[..8].copy_from_slice(&index.to_le_bytes());
        let n = left.min(MIB) as usize;
        f.write_all(&block[..n]).unwrap();
        hash.update(&block[..n]);
        left -= n as u64;
        index += 1;
    }
    f.flush().unwrap();
    hash.finalize().to_vec()
}

fn sha_file(path: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return hash.finalize().to_vec();
        }
        hash.update(&buf[..n]);
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Samples the resident memory until dropped; `peak()` is the highest seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss()));
        let (s, p) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler { stop, peak }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn none() -> Progress {
    Arc::new(|_, _| {})
}

/// A progress callback that records the first `done` it is given and signals once `cut` bytes passed.
fn watcher(cut: u64) -> (Progress, Arc<AtomicU64>, Arc<tokio::sync::Notify>) {
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let notify = Arc::new(tokio::sync::Notify::new());
    let (f, n) = (first.clone(), notify.clone());
    let progress: Progress = Arc::new(move |done, _| {
        let _ = f.compare_exchange(u64::MAX, done, Ordering::Relaxed, Ordering::Relaxed);
        if done >= cut {
            n.notify_one();
        }
    });
    (progress, first, notify)
}

async fn pair() -> (TestServer, TestClient, TestClient) {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    (server, alice, bob)
}

/// Alice sends `path`; returns the media message as Bob stored it.
async fn send_and_receive(alice: &TestClient, bob: &TestClient, path: &Path) -> MessageRecord {
    let mut events = bob.client.subscribe();
    let sent = alice
        .client
        .send_file(&bob.phone, path, None, "look!", none())
        .await
        .unwrap();
    assert_eq!(sent.kind, MessageKind::Media);
    let got = next_message(&mut events, WAIT, |m| m.id == sent.id).await;
    assert_eq!(got.kind, MessageKind::Media);
    got
}

/// The blob's file under the server's `blobs/` directory.
fn blob_file(server: &TestServer, blob_id: &str, size: u64) -> PathBuf {
    let root = server.data_dir().join("blobs");
    let sized: Vec<PathBuf> = walkdir::WalkDir::new(&root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter(|e| e.metadata().map(|m| m.len()).ok() == Some(size))
        .map(|e| e.path().to_path_buf())
        .collect();
    // Blobs may be sharded into directories by id prefix: match the id in the path without separators.
    let named = sized
        .iter()
        .find(|p| p.to_string_lossy().replace('/', "").contains(blob_id));
    match (named, sized.as_slice()) {
        (Some(p), _) => p.clone(),
        (None, [only]) => only.clone(),
        _ => panic!(
            "blob {blob_id} of {size} bytes not found under {}",
            root.display()
        ),
    }
}

fn holds(path: &Path, needle: &[u8]) -> bool {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return false;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_with_digests_and_no_plaintext_on_the_server() {
    let _serial = SERIAL.lock().await;
    let (server, alice, bob) = pair().await;
    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("notes.bin");
    let digest = write_file(&src, 10 * MIB);

    let got = send_and_receive(&alice, &bob, &src).await;
    let media = got.media.clone().unwrap().0;
    assert_eq!((media.name.as_str(), media.size), ("notes.bin", 10 * MIB));
    assert_eq!(media.caption, "look!");
    assert_eq!(media.plaintext_sha256, digest);

    let blob = blob_file(&server, &media.blob_id, media.ciphertext_size);
    assert!(!holds(&blob, MARKER), "plaintext on the server's disk");

    let out = tempfile::tempdir().unwrap();
    let saved = bob
        .client
        .download(&alice.phone, &got.id, out.path(), none())
        .await
        .unwrap();
    assert_eq!(saved, out.path().join("notes.bin"));
    assert_eq!(sha_file(&saved), digest);
    // A second download does not overwrite the first.
    let again = bob
        .client
        .download(&alice.phone, &got.id, out.path(), none())
        .await
        .unwrap();
    assert_eq!(again, out.path().join("notes (1).bin"));
    assert_eq!(sha_file(&again), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mib_file_round_trips_in_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let (_server, alice, bob) = pair().await;
    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("big.bin");
    let t = Instant::now();
    let digest = write_file(&src, 300 * MIB);
    eprintln!("wrote 300 MiB in {:?}", t.elapsed());

    let before = rss();
    let sampler = RssSampler::start();
    let t = Instant::now();
    let got = send_and_receive(&alice, &bob, &src).await;
    eprintln!("uploaded in {:?}", t.elapsed());
    let out = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let saved = bob
        .client
        .download(&alice.phone, &got.id, out.path(), none())
        .await
        .unwrap();
    eprintln!("downloaded in {:?}", t.elapsed());
    let growth = sampler.peak().saturating_sub(before);
    drop(sampler);
    eprintln!("peak RSS growth {} MiB", growth / MIB);
    assert!(growth < 128 * MIB, "memory grew by {} MiB", growth / MIB);
    assert_eq!(std::fs::metadata(&saved).unwrap().len(), 300 * MIB);
    assert_eq!(sha_file(&saved), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_and_download_resume() {
    let _serial = SERIAL.lock().await;
    let (_server, alice, bob) = pair().await;
    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("clip.bin");
    let size = 24 * MIB;
    let digest = write_file(&src, size);

    // Cut the upload after 8 MiB by dropping it.
    let (progress, _, cut) = watcher(8 * MIB);
    tokio::select! {
        r = alice.client.send_file(&bob.phone, &src, None, "", progress) => {
            panic!("the upload finished before the cut: {r:?}")
        }
        _ = cut.notified() => {}
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Sending the same file again continues where the server's copy ends.
    let mut events = bob.client.subscribe();
    let (progress, first, _) = watcher(u64::MAX);
    let sent = alice
        .client
        .send_file(&bob.phone, &src, None, "", progress)
        .await
        .unwrap();
    let resumed_at = first.load(Ordering::Relaxed);
    assert!(
        resumed_at > 0 && resumed_at < size,
        "the upload restarted at {resumed_at}"
    );
    let got = next_message(&mut events, WAIT, |m| m.id == sent.id).await;

    // Cut the download after 8 MiB, then resume it.
    let out = tempfile::tempdir().unwrap();
    let (progress, _, cut) = watcher(8 * MIB);
    tokio::select! {
        r = bob.client.download(&alice.phone, &got.id, out.path(), progress) => {
            panic!("the download finished before the cut: {r:?}")
        }
        _ = cut.notified() => {}
    }
    assert!(out.path().join("clip.bin.part").exists());
    let (progress, first, _) = watcher(u64::MAX);
    let saved = bob
        .client
        .download(&alice.phone, &got.id, out.path(), progress)
        .await
        .unwrap();
    assert!(first.load(Ordering::Relaxed) > 0, "the download restarted");
    assert_eq!(sha_file(&saved), digest);
    assert!(!out.path().join("clip.bin.part").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_blob_is_refused_and_nothing_is_left() {
    let _serial = SERIAL.lock().await;
    let (server, alice, bob) = pair().await;
    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("photo.bin");
    write_file(&src, 3 * MIB + 5);
    let got = send_and_receive(&alice, &bob, &src).await;
    let media = got.media.clone().unwrap().0;
    let blob = blob_file(&server, &media.blob_id, media.ciphertext_size);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();

    let out = tempfile::tempdir().unwrap();
    let result = bob
        .client
        .download(&alice.phone, &got.id, out.path(), none())
        .await;
    assert!(
        matches!(result, Err(ClientError::MediaCorrupt(_))),
        "{result:?}"
    );
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_reuses_the_blob_and_the_forwarded_copy_decrypts() {
    let _serial = SERIAL.lock().await;
    let (server, alice, bob) = pair().await;
    let carol = TestClient::online(&server, "+15550000003").await;
    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("talk.bin");
    let digest = write_file(&src, 2 * MIB);
    let got = send_and_receive(&alice, &bob, &src).await;
    let blobs_before = walkdir::WalkDir::new(server.data_dir().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count();

    let mut events = carol.client.subscribe();
    let forwarded = bob.client.forward(&got.id, &carol.phone).await.unwrap();
    assert_ne!(forwarded.id, got.id);
    let at_carol = next_message(&mut events, WAIT, |m| m.id == forwarded.id).await;
    let (orig, fwd) = (
        got.media.clone().unwrap().0,
        at_carol.media.clone().unwrap().0,
    );
    assert_eq!(fwd.blob_id, orig.blob_id, "the same blob, not a new upload");
    assert_eq!(fwd.plaintext_sha256, digest);
    let blobs_after = walkdir::WalkDir::new(server.data_dir().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count();
    assert_eq!(blobs_after, blobs_before, "forwarding stored nothing new");

    let out = tempfile::tempdir().unwrap();
    let saved = carol
        .client
        .download(&bob.phone, &forwarded.id, out.path(), none())
        .await
        .unwrap();
    assert_eq!(sha_file(&saved), digest);
    // Only media can be forwarded this way: a text Bob holds is refused.
    let mut at_bob = bob.client.subscribe();
    let text = alice.client.send_text(&bob.phone, "plain").await.unwrap();
    next_message(&mut at_bob, WAIT, |m| m.id == text.id).await;
    let refused = bob.client.forward(&text.id, &carol.phone).await;
    assert!(
        matches!(refused, Err(natter_client::ClientError::InvalidInput(_))),
        "{refused:?}"
    );
}

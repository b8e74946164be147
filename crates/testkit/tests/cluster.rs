//! Cluster mode: several natterd nodes over one PostgreSQL store, a NATS bus and (for media) S3. Every
//! test starts its own NATS server on a free port (so stopping it touches nothing shared), uses a fresh
//! PostgreSQL schema (or, to restart PostgreSQL, a private PostgreSQL instance), and an S3 stand-in
//! (moto's server mode). When one of them is not installed the tests print a "skipped:" line, unless
//! NATTER_REQUIRE_CLUSTER=1 (CI), which makes them fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natter_client::{Event, MessageKind, MessageStatus};
use natter_server::store::postgres::testing::{REQUIRE_ENV, TestSchema};
use natter_testkit::{
    NatterdProcess, PendingCompanion, TestClient, TestServer, eventually, next_message,
    refused_as_blocked,
};
use tokio::sync::broadcast::error::RecvError;

const WAIT: Duration = Duration::from_secs(30);

fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Fails under NATTER_REQUIRE_CLUSTER=1, else prints a skip line; `None` means skip.
fn missing<T>(what: &str) -> Option<T> {
    assert!(!required(), "{what} is not available and {REQUIRE_ENV}=1");
    eprintln!("skipped: {what} is not available; set {REQUIRE_ENV}=1 to fail instead");
    None
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not start on port {port}");
}

/// A child process killed when dropped.
struct Service {
    child: Option<Child>,
    name: &'static str,
}

impl Service {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
        let _ = self.name;
    }
}

/// A private NATS server with JetStream, on a free port, that a test may stop and start again.
struct Nats {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    service: Service,
}

impl Nats {
    fn start() -> Option<Nats> {
        let Some(bin) = which("nats-server") else {
            return missing("nats-server");
        };
        let mut n = Nats {
            bin,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            service: Service {
                child: None,
                name: "nats-server",
            },
        };
        n.spawn();
        Some(n)
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.service.child = Some(child);
        wait_for_port(self.port, "nats-server");
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        self.service.stop();
    }
}

/// moto's S3 server on a free port with one bucket.
struct Moto {
    port: u16,
    _service: Service,
}

impl Moto {
    async fn start() -> Option<Moto> {
        let Some(bin) = which("moto_server") else {
            return missing("moto_server (pip install 'moto[server]')");
        };
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let m = Moto {
            port,
            _service: Service {
                child: Some(child),
                name: "moto_server",
            },
        };
        wait_for_port(port, "moto_server");
        // Create the bucket: a path-style PUT (moto does not check signatures).
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(
            format!(
                "PUT /natter HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 200"),
            "bucket not created: {resp}"
        );
        Some(m)
    }

    fn blobs(&self) -> String {
        format!(
            "s3://natter/blobs?endpoint=http://127.0.0.1:{}&skip_signature=true",
            self.port
        )
    }
}

/// A private PostgreSQL instance (initdb in a temporary directory, run as the `postgres` user when the
/// tests run as root), which a test may stop and start again.
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl Postgres {
    fn start() -> Option<Postgres> {
        let Some(bin) = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .max()
        }) else {
            return missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin)");
        };
        let dir = tempfile::Builder::new()
            .prefix("natter-pg")
            .tempdir_in("/tmp")
            .unwrap();
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let pg = Postgres {
            bin,
            dir,
            port: free_port(),
            as_postgres,
        };
        if pg.as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the PostgreSQL directory failed");
        }
        let out = pg
            .cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(pg.data())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.pg_ctl("start");
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn cmd(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        }
    }

    fn pg_ctl(&self, action: &str) {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D").arg(self.data()).args(["-w", "-m", "fast"]);
        c.arg("-l").arg(self.dir.path().join("log"));
        if action == "start" {
            c.args([
                "-o",
                &format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                    self.port,
                    self.dir.path().display()
                ),
            ]);
        }
        let out = c.arg(action).output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut c = self.cmd("pg_ctl");
        let _ = c
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts an in-process node `id` of a cluster.
async fn node(id: &str, store: &str, nats: &str, keys: &Path, blobs: Option<String>) -> TestServer {
    let store = store.parse().unwrap();
    let (id, nats, keys) = (id.to_owned(), nats.to_owned(), keys.to_owned());
    TestServer::start_with(move |c| {
        c.store = store;
        c.bus = Some(nats);
        c.node_id = Some(id);
        c.key_dir = Some(keys);
        c.blobs = blobs;
        c.bus_catchup_interval = Duration::from_secs(2);
    })
    .await
}

/// Registers `phone` through `via` and points the device at `servers` (first one preferred).
async fn device(via: &TestServer, phone: &str, servers: &[&TestServer]) -> TestClient {
    let c = TestClient::register(via, phone).await;
    let list: Vec<String> = servers.iter().map(|s| s.addr()).collect();
    c.client.set_server(&list.join(",")).await.unwrap();
    c.client.connect().await.unwrap();
    c
}

/// Counts every incoming message by text (and notes whether the event stream lagged).
type Tally = Arc<Mutex<BTreeMap<String, usize>>>;

fn count_incoming(client: &TestClient) -> (Tally, tokio::task::JoinHandle<()>) {
    let tally: Tally = Arc::default();
    let mut events = client.client.subscribe();
    let t = tally.clone();
    let task = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(Event::Message(m)) if !m.from_me && m.kind == MessageKind::Text => {
                    *t.lock().unwrap().entry(m.text).or_default() += 1;
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    });
    (tally, task)
}

/// Every message `sender` holds as sent to `to` (after its outbox drained).
/// Well under the 30 seconds a node caches an account's devices and block list: what a change must take
/// to reach the other nodes over the bus.
const BUS_BOUND: Duration = Duration::from_secs(5);

async fn sent_texts(sender: &TestClient, to: &TestClient) -> BTreeSet<String> {
    let (c, p) = (sender.client.clone(), to.phone.clone());
    eventually(Duration::from_secs(90), "the outbox to drain", || {
        let (c, p) = (c.clone(), p.clone());
        async move {
            c.history(&p)
                .await
                .unwrap()
                .iter()
                .all(|m| m.status != MessageStatus::Pending)
        }
    })
    .await;
    sender
        .client
        .history(&to.phone)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.from_me && m.status != MessageStatus::Failed)
        .map(|m| m.text)
        .collect()
}

/// Checks that `receiver` got every message `sender` sent to it exactly once (event counts and its
/// stored history), within `within`.
async fn exactly_once(sender: &TestClient, receiver: &TestClient, tally: &Tally, within: Duration) {
    let sent = sent_texts(sender, receiver).await;
    {
        let (tally, sent) = (tally.clone(), sent.clone());
        eventually(within, "every message to arrive", move || {
            let done = sent.iter().all(|t| tally.lock().unwrap().contains_key(t));
            async move { done }
        })
        .await;
    }
    // Late duplicates would arrive now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (text, n) in tally.lock().unwrap().iter() {
        assert!(sent.contains(text), "{text:?} received, never sent");
        assert_eq!(*n, 1, "{text:?} delivered {n} times");
    }
    let history: Vec<String> = receiver
        .client
        .history(&sender.phone)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| !m.from_me)
        .map(|m| m.text)
        .collect();
    let unique: BTreeSet<&String> = history.iter().collect();
    assert_eq!(unique.len(), history.len(), "a message shows twice");
    assert_eq!(unique.len(), sent.len());
}

/// Sends `prefix 1..` from `from` to `to` until `stop`, counting acknowledged sends.
fn send_load(
    from: &TestClient,
    to: &TestClient,
    prefix: &'static str,
    limit: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<BTreeSet<String>>>, tokio::task::JoinHandle<()>) {
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let a = acked.clone();
    let client = from.client.clone();
    let peer = to.phone.clone();
    let task = tokio::spawn(async move {
        for i in 1..=limit {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let text = format!("{prefix} {i}");
            match client.send_text(&peer, &text).await {
                Ok(_) => {
                    a.lock().unwrap().insert(text);
                }
                // Left in the outbox; it goes out after a reconnect.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    (acked, task)
}

async fn wait_acked(acked: &Arc<Mutex<BTreeSet<String>>>, n: usize, what: &str) {
    let acked = acked.clone();
    eventually(Duration::from_secs(120), what, move || {
        let k = acked.lock().unwrap().len();
        async move { k >= n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_nodes_exchange_messages_presence_and_link() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let Some(nats) = Nats::start() else { return };
    let keys = tempfile::tempdir().unwrap();
    let a = node("a", schema.url(), &nats.url(), keys.path(), None).await;
    let b = node("b", schema.url(), &nats.url(), keys.path(), None).await;
    assert_eq!(
        a.server().public_key(),
        b.server().public_key(),
        "the nodes share the cluster key"
    );
    let alice = device(&a, "+15550007001", &[&a]).await;
    let bob = device(&a, "+15550007002", &[&b]).await;
    assert_eq!(a.server().state().router.online(), 1);
    assert_eq!(b.server().state().router.online(), 1);

    // 1:1 both ways across the nodes.
    let mut bob_ev = bob.client.subscribe();
    let mut alice_ev = alice.client.subscribe();
    let t = Instant::now();
    alice
        .client
        .send_text(&bob.phone, "hello from a")
        .await
        .unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| !m.from_me).await;
    assert_eq!(got.text, "hello from a");
    eprintln!("first cross-node message in {:?}", t.elapsed());
    bob.client
        .send_text(&alice.phone, "hello from b")
        .await
        .unwrap();
    let got = next_message(&mut alice_ev, WAIT, |m| !m.from_me).await;
    assert_eq!(got.text, "hello from b");

    // Blocking on node a reaches node b's cache of Alice's block list (which Bob's message just filled)
    // over the bus, within moments rather than the cache's 30-second lifetime; unblocking too.
    alice.client.block(&bob.phone, true).await.unwrap();
    let t = Instant::now();
    let mut probe = 0;
    while !refused_as_blocked(&bob, &alice, &format!("probe {probe}"), WAIT).await {
        assert!(
            t.elapsed() < BUS_BOUND,
            "node b still delivers after {:?}",
            t.elapsed()
        );
        probe += 1;
    }
    eprintln!("block seen on the other node after {:?}", t.elapsed());
    alice.client.block(&bob.phone, false).await.unwrap();
    let t = Instant::now();
    while refused_as_blocked(&bob, &alice, &format!("probe {probe}"), WAIT).await {
        assert!(
            t.elapsed() < BUS_BOUND,
            "node b still refuses after {:?}",
            t.elapsed()
        );
        probe += 1;
    }

    // Presence travels over the bus: Bob (on b) sees Alice (on a) online, then offline.
    let (bc, ap) = (bob.client.clone(), alice.phone.clone());
    eventually(WAIT, "alice online as seen from b", || {
        let (bc, ap) = (bc.clone(), ap.clone());
        async move {
            matches!(
                bc.presence(&ap).await,
                Ok(natter_client::PresenceInfo::Online)
            )
        }
    })
    .await;

    // A companion linked through node b to Alice's phone on node a.
    let mut pending = PendingCompanion::start(&b, "laptop", Duration::from_secs(60)).await;
    let qr = pending.next_qr().await;
    let (linked, companion) = tokio::join!(alice.client.link_device(&qr), pending.finish());
    linked.expect("the primary on node a links the companion on node b");
    let companion = companion.expect("the companion is linked across nodes");
    let mut laptop_ev = companion.client.subscribe();
    let mut alice_ev = alice.client.subscribe();
    // Bob's node learns of the new device (cache invalidation over the bus): his message reaches both.
    eventually(WAIT, "bob to reach both of alice's devices", || {
        let bob = bob.client.clone();
        let ap = alice.phone.clone();
        async move { bob.send_text(&ap, "to both").await.is_ok() }
    })
    .await;
    next_message(&mut alice_ev, WAIT, |m| m.text == "to both").await;
    next_message(&mut laptop_ev, WAIT, |m| m.text == "to both").await;

    // A group spanning the nodes: Alice (phone on a, laptop on b), Bob and Carol (on b). A message from
    // each side reaches every member device of the other.
    let carol = device(&a, "+15550007003", &[&b]).await;
    let g = bob
        .client
        .create_group("across", &[alice.phone.clone(), carol.phone.clone()])
        .await
        .unwrap();
    bob.client
        .send_group_text(&g.id, "group from b")
        .await
        .unwrap();
    for (who, c) in [("alice", &alice), ("laptop", &companion), ("carol", &carol)] {
        eventually(
            WAIT,
            &format!("{who} to get bob's group message"),
            || async {
                c.client
                    .group_history(&g.id)
                    .await
                    .unwrap_or_default()
                    .iter()
                    .any(|m| m.text == "group from b")
            },
        )
        .await;
    }
    alice
        .client
        .send_group_text(&g.id, "group from a")
        .await
        .unwrap();
    for (who, c) in [("bob", &bob), ("carol", &carol), ("laptop", &companion)] {
        eventually(
            WAIT,
            &format!("{who} to get alice's group message"),
            || async {
                c.client
                    .group_history(&g.id)
                    .await
                    .unwrap_or_default()
                    .iter()
                    .any(|m| m.text == "group from a")
            },
        )
        .await;
    }

    // Alice's devices go offline: Bob sees it across the nodes.
    alice.client.disconnect().await;
    companion.client.disconnect().await;
    eventually(WAIT, "alice offline as seen from b", || {
        let (bc, ap) = (bc.clone(), ap.clone());
        async move {
            matches!(bc.presence(&ap).await, Ok(natter_client::PresenceInfo::LastSeen(t)) if t > 0)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_through_a_downloads_through_b_and_uploads_resume_across_nodes() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let Some(nats) = Nats::start() else { return };
    let Some(moto) = Moto::start().await else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let a = node(
        "a",
        schema.url(),
        &nats.url(),
        keys.path(),
        Some(moto.blobs()),
    )
    .await;
    let b = node(
        "b",
        schema.url(),
        &nats.url(),
        keys.path(),
        Some(moto.blobs()),
    )
    .await;
    let alice = device(&a, "+15550007101", &[&a, &b]).await;
    let bob = device(&a, "+15550007102", &[&b]).await;
    let files = tempfile::tempdir().unwrap();
    let none: natter_client::Progress = Arc::new(|_, _| {});

    // A small file: up through a, down through b.
    let src = files.path().join("photo.jpg");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &bytes).unwrap();
    let mut bob_ev = bob.client.subscribe();
    let sent = alice
        .client
        .send_file(&bob.phone, &src, None, "from a", none.clone())
        .await
        .unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| m.id == sent.id).await;
    let out = tempfile::tempdir().unwrap();
    let saved = bob
        .client
        .download(&alice.phone, &got.id, out.path(), none.clone())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), bytes);
    // Nothing on either node's disk: the blob is in S3.
    for n in [&a, &b] {
        assert!(!n.data_dir().join("blobs").exists());
    }

    // A larger upload cut on node a and resumed on node b.
    let src = files.path().join("clip.bin");
    let size = 12u64 * 1024 * 1024;
    let big: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &big).unwrap();
    let cut = Arc::new(tokio::sync::Notify::new());
    let progress: natter_client::Progress = {
        let cut = cut.clone();
        Arc::new(move |done, _| {
            if done >= 6 * 1024 * 1024 {
                cut.notify_one();
            }
        })
    };
    tokio::select! {
        r = alice.client.send_file(&bob.phone, &src, None, "", progress) => {
            panic!("the upload finished before the cut: {r:?}")
        }
        _ = cut.notified() => {}
    }
    // Let node a store what arrived, then move Alice to node b.
    tokio::time::sleep(Duration::from_secs(1)).await;
    alice.client.disconnect().await;
    alice
        .client
        .set_server(&format!("{},{}", b.addr(), a.addr()))
        .await
        .unwrap();
    alice.client.connect().await.unwrap();
    let first = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let progress: natter_client::Progress = {
        let first = first.clone();
        Arc::new(move |done, _| {
            let _ = first.compare_exchange(u64::MAX, done, Ordering::Relaxed, Ordering::Relaxed);
        })
    };
    let mut bob_ev = bob.client.subscribe();
    let sent = alice
        .client
        .send_file(&bob.phone, &src, None, "", progress)
        .await
        .unwrap();
    let resumed_at = first.load(Ordering::Relaxed);
    assert!(
        resumed_at > 0 && resumed_at < size,
        "the upload on node b restarted at {resumed_at}"
    );
    let got = next_message(&mut bob_ev, WAIT, |m| m.id == sent.id).await;
    let saved = bob
        .client
        .download(&alice.phone, &got.id, out.path(), none)
        .await
        .unwrap();
    assert!(
        std::fs::read(&saved).unwrap() == big,
        "the resumed file differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_node_during_10000_messages_loses_nothing_and_duplicates_nothing() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let Some(nats) = Nats::start() else { return };
    let keys = tempfile::tempdir().unwrap();
    let url = nats.url();
    let keys_arg = keys.path().display().to_string();
    let args = |id: &'static str| -> Vec<String> {
        [
            "--store",
            schema.url(),
            "--bus",
            &url,
            "--node-id",
            id,
            "--key-dir",
            &keys_arg,
            "--bus-catchup-secs",
            "2",
            // The load is one account sending as fast as it can.
            "--sends-per-account-per-s",
            "0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let a_args = args("a");
    let b_args = args("b");
    let mut a = NatterdProcess::start(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let b = NatterdProcess::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
    let both = format!("{},{}", a.addr(), b.addr());
    let b_first = format!("{},{}", b.addr(), a.addr());
    let alice = TestClient::register_at(&a.addr(), &a.sms_log(), "+15550007201").await;
    let bob = TestClient::register_at(&a.addr(), &a.sms_log(), "+15550007202").await;
    alice.client.set_server(&both).await.unwrap();
    bob.client.set_server(&b_first).await.unwrap();
    alice.client.connect().await.unwrap();
    bob.client.connect().await.unwrap();
    let (tally, counter) = count_incoming(&bob);

    const TOTAL: usize = 10_000;
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let (acked, sender) = send_load(&alice, &bob, "cluster kill message", TOTAL, stop.clone());
    wait_acked(&acked, TOTAL / 3, "a third of the load").await;
    // Node a (Alice's) dies without any shutdown; Alice fails over to node b.
    a.kill();
    eprintln!(
        "node a killed after {} acknowledged sends ({:?})",
        acked.lock().unwrap().len(),
        t.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(240), sender)
        .await
        .expect("the load completes")
        .unwrap();
    exactly_once(&alice, &bob, &tally, Duration::from_secs(90)).await;
    let acked = acked.lock().unwrap().clone();
    let sent = sent_texts(&alice, &bob).await;
    assert!(acked.is_subset(&sent));
    assert_eq!(sent.len(), TOTAL, "every message of the run was sent");
    eprintln!(
        "{TOTAL} messages, node killed mid-run, in {:?}",
        t.elapsed()
    );
    counter.abort();
    alice.client.disconnect().await;
    bob.client.disconnect().await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_and_restarted_mid_run() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let a = node("a", schema.url(), &nats.url(), keys.path(), None).await;
    let b = node("b", schema.url(), &nats.url(), keys.path(), None).await;
    let alice = device(&a, "+15550007301", &[&a]).await;
    let bob = device(&a, "+15550007302", &[&b]).await;
    let (tally, counter) = count_incoming(&bob);
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, sender) = send_load(&alice, &bob, "bus outage message", 600, stop);
    wait_acked(&acked, 150, "load before the outage").await;
    nats.stop();
    let during = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Sends keep being accepted (the store is up); only cross-node wake-ups are lost meanwhile.
    assert!(
        acked.lock().unwrap().len() > during,
        "sends stopped while the bus was down"
    );
    nats.spawn();
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .unwrap()
        .unwrap();
    exactly_once(&alice, &bob, &tally, Duration::from_secs(60)).await;
    counter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run() {
    let Some(nats) = Nats::start() else { return };
    let Some(pg) = Postgres::start() else { return };
    let keys = tempfile::tempdir().unwrap();
    let a = node("a", &pg.url(), &nats.url(), keys.path(), None).await;
    let b = node("b", &pg.url(), &nats.url(), keys.path(), None).await;
    let alice = device(&a, "+15550007401", &[&a]).await;
    let bob = device(&a, "+15550007402", &[&b]).await;
    let (tally, counter) = count_incoming(&bob);
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, sender) = send_load(&alice, &bob, "store outage message", 600, stop);
    wait_acked(&acked, 150, "load before the outage").await;
    pg.pg_ctl("stop");
    // While PostgreSQL is down a send fails with a retryable error (it stays in the outbox).
    let err = alice
        .client
        .send_text(&bob.phone, "during the outage")
        .await
        .expect_err("a send cannot be acknowledged without the store");
    assert!(err.is_transient(), "not a retryable error: {err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.pg_ctl("start");
    tokio::time::timeout(Duration::from_secs(180), sender)
        .await
        .unwrap()
        .unwrap();
    exactly_once(&alice, &bob, &tally, Duration::from_secs(90)).await;
    counter.abort();
}

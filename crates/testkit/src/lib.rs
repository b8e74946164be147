//! natter-testkit: real parts for tests. [`TestServer`] runs a real natterd on a loopback port (port 0)
//! with a temporary data directory and a file SMS gateway; [`TestClient`] is a real natter-client device
//! in its own temporary home, registered through that gateway. Nothing here is mocked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use natter_client::{Client, Event, MessageRecord};
use natter_proto::PhoneNumber;
use natter_server::{Server, ServerConfig};
use tempfile::TempDir;

/// Installs a test log subscriber once (`NATTER_TEST_LOG=debug` to see logs).
pub fn init_logging() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("NATTER_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

/// A natterd on 127.0.0.1 with its own temporary data directory.
pub struct TestServer {
    server: Option<Server>,
    dir: TempDir,
    config: ServerConfig,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.config.listen)
            .finish()
    }
}

impl TestServer {
    /// Starts a server with default settings.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `tweak` adjusts its configuration (data dir, listen address and SMS
    /// gateway are set already).
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::new(dir.path().join("data"));
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.sms_gateway = format!("file:{}", dir.path().join("sms.log").display());
        tweak(&mut config);
        let server = Server::start(config.clone()).await.expect("natterd starts");
        config.listen = server.local_addr();
        TestServer {
            server: Some(server),
            dir,
            config,
        }
    }

    /// Starts a server whose durable state lives in `store` (for example a `postgres://` URL from
    /// `natter_server::store::postgres::testing::TestSchema`) instead of its data directory.
    pub async fn start_with_store(store: &str) -> TestServer {
        let store = store.parse().expect("store URL");
        Self::start_with(|c| c.store = store).await
    }

    /// `host:port` to give clients.
    pub fn addr(&self) -> String {
        self.config.listen.to_string()
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// The file the SMS gateway writes to.
    pub fn sms_log(&self) -> PathBuf {
        self.dir.path().join("sms.log")
    }

    /// The last code sent to `phone`, from the SMS log.
    pub fn last_code(&self, phone: &str) -> Option<String> {
        last_code_in(&self.sms_log(), phone)
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    /// Stops the server (clients lose their connections).
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// Stops the server and starts it again on the same address and data directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last = None;
        for _ in 0..50 {
            match Server::start(self.config.clone()).await {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("natterd did not restart: {last:?}");
    }
}

/// A registered device in its own temporary home.
pub struct TestClient {
    /// The client.
    pub client: Client,
    /// Its account.
    pub phone: PhoneNumber,
    home: TempDir,
}

impl std::fmt::Debug for TestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient")
            .field("phone", &self.phone)
            .finish()
    }
}

impl TestClient {
    /// Registers `phone` on `server` (reading the code from the SMS log) and returns the device,
    /// not yet connected.
    pub async fn register(server: &TestServer, phone: &str) -> TestClient {
        Self::register_at(&server.addr(), &server.sms_log(), phone).await
    }

    /// Registers and connects.
    pub async fn online(server: &TestServer, phone: &str) -> TestClient {
        let c = Self::register(server, phone).await;
        c.client.connect().await.expect("connect");
        c
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Simulates the process ending and starting again: stops the client and opens its home anew
    /// (the home's lock is free once every task of the old client has ended).
    pub async fn reopen(self) -> TestClient {
        let TestClient {
            client,
            phone,
            home,
        } = self;
        client.close().await;
        let client = open_when_free(home.path()).await;
        TestClient {
            client,
            phone,
            home,
        }
    }
}

/// Opens a home that a client just closed: its background tasks (a history import, a flush) may hold
/// the home's lock for a moment after it was dropped.
async fn open_when_free(home: &Path) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match Client::open(home).await {
            Ok(c) => return c,
            Err(natter_client::ClientError::HomeLocked(_))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen home: {e}"),
        }
    }
}

/// Waits for the next message event matching `pred`; panics after `timeout`.
pub async fn next_message(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    timeout: Duration,
    pred: impl Fn(&MessageRecord) -> bool,
) -> MessageRecord {
    tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Ok(Event::Message(m)) if pred(&m) => return m,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("message within the timeout")
}

/// Sends `text` from `from` to `to`: true if the server refused it because `to` blocks `from` (at once, or
/// later from the outbox, which marks it failed), false if the server accepted it. Any other refusal
/// panics; so does no answer within `timeout`.
pub async fn refused_as_blocked(
    from: &TestClient,
    to: &TestClient,
    text: &str,
    timeout: Duration,
) -> bool {
    let m = match from.client.send_text(&to.phone, text).await {
        Err(e) => {
            assert_eq!(
                e.server_code(),
                Some(natter_proto::wire::ErrorCode::Blocked),
                "{e}"
            );
            return true;
        }
        Ok(m) => m,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let history = from.client.history(&to.phone).await.unwrap();
        match history.iter().find(|x| x.id == m.id).map(|x| x.status) {
            Some(natter_client::MessageStatus::Failed) => return true,
            Some(natter_client::MessageStatus::Pending) | None => {}
            Some(_) => return false,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server neither accepted nor refused {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `cond` holds, polling; panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A companion in its own temporary home, showing QR codes and waiting to be linked
/// ([`Client::link_as_companion`] runs in a task; every QR code it shows arrives through
/// [`PendingCompanion::next_qr`]).
pub struct PendingCompanion {
    /// The companion's client (not registered until the link completes).
    pub client: Client,
    qrs: tokio::sync::mpsc::UnboundedReceiver<(natter_proto::link::LinkQr, tokio::time::Instant)>,
    task: tokio::task::JoinHandle<natter_client::Result<natter_client::WhoAmI>>,
    home: TempDir,
}

impl std::fmt::Debug for PendingCompanion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCompanion")
            .field("home", &self.home.path())
            .finish()
    }
}

impl PendingCompanion {
    /// Opens a new home on `server` and starts showing QR codes as `name`, for at most `timeout`.
    pub async fn start(server: &TestServer, name: &str, timeout: Duration) -> PendingCompanion {
        let home = tempfile::tempdir().expect("temp home");
        let client = Client::open(home.path()).await.expect("open home");
        client.set_server(&server.addr()).await.expect("server");
        let (tx, qrs) = tokio::sync::mpsc::unbounded_channel();
        let task = {
            let client = client.clone();
            let name = name.to_owned();
            tokio::spawn(async move {
                client
                    .link_as_companion(&name, timeout, |qr| {
                        let _ = tx.send((qr.clone(), tokio::time::Instant::now()));
                    })
                    .await
            })
        };
        PendingCompanion {
            client,
            qrs,
            task,
            home,
        }
    }

    /// The next QR code shown, with the moment it was shown; panics after 20 s.
    pub async fn next_qr_at(&mut self) -> (natter_proto::link::LinkQr, tokio::time::Instant) {
        tokio::time::timeout(Duration::from_secs(20), self.qrs.recv())
            .await
            .expect("a QR code within 20 s")
            .expect("the companion stopped before showing a QR code")
    }

    /// The next QR code shown; panics after 20 s.
    pub async fn next_qr(&mut self) -> natter_proto::link::LinkQr {
        self.next_qr_at().await.0
    }

    /// Waits for the link to complete: the companion is then connected, with its prekeys uploaded.
    pub async fn finish(self) -> natter_client::Result<TestClient> {
        let PendingCompanion {
            client, task, home, ..
        } = self;
        let me = task.await.expect("link task")?;
        Ok(TestClient {
            client,
            phone: me.phone,
            home,
        })
    }

    /// Stops showing QR codes and closes the companion.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
        self.client.disconnect().await;
    }
}

/// A device switched off: its home survives, no process runs.
pub struct PoweredOff {
    /// Its account.
    pub phone: PhoneNumber,
    home: TempDir,
}

impl std::fmt::Debug for PoweredOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoweredOff")
            .field("phone", &self.phone)
            .finish()
    }
}

impl PoweredOff {
    /// Opens the home again (not connected).
    pub async fn power_on(self) -> TestClient {
        let client = open_when_free(self.home.path()).await;
        TestClient {
            client,
            phone: self.phone,
            home: self.home,
        }
    }
}

impl TestClient {
    /// Links a new companion named `name` to `primary` (which must be connected): the companion shows
    /// its QR code, the primary scans it (`link_device`), both run at once. Returns the companion,
    /// connected and with its prekeys uploaded.
    pub async fn link_companion(
        server: &TestServer,
        primary: &TestClient,
        name: &str,
    ) -> TestClient {
        let mut pending = PendingCompanion::start(server, name, Duration::from_secs(60)).await;
        let qr = pending.next_qr().await;
        let (linked, companion) = tokio::join!(primary.client.link_device(&qr), pending.finish());
        let linked = linked.expect("the primary links the companion");
        let companion = companion.expect("the companion is linked");
        let me = companion.client.whoami().await.unwrap().unwrap();
        assert_eq!(me.device_id.get(), linked.device_id);
        assert_eq!(me.phone, primary.phone);
        companion
    }

    /// Switches the device off: disconnects and closes the client, keeping its home.
    pub async fn power_off(self) -> PoweredOff {
        let TestClient {
            client,
            phone,
            home,
        } = self;
        client.close().await;
        PoweredOff { phone, home }
    }
}

/// The `natterd` binary next to the running test (`target/<profile>/natterd`), built with
/// `cargo build -p natter-server --bin natterd` first if it is not there; `NATTERD_BIN` overrides.
pub fn natterd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATTERD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/natterd
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps");
    let bin = profile_dir.join(format!("natterd{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = profile_dir.parent().expect("target directory");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "natter-server",
        "--bin",
        "natterd",
    ])
    .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    // Always asked: cargo returns at once when the binary is up to date, and rebuilds a stale one.
    let status = cmd.status().expect("run cargo build for natterd");
    assert!(status.success(), "building natterd failed");
    assert!(bin.exists(), "natterd not found at {}", bin.display());
    bin
}

/// A real `natterd` process on 127.0.0.1 (its own data directory, file SMS gateway), which a test can
/// kill with SIGKILL and start again on the same port and data directory.
pub struct NatterdProcess {
    child: Option<std::process::Child>,
    bin: PathBuf,
    dir: TempDir,
    addr: SocketAddr,
    extra_args: Vec<String>,
}

impl std::fmt::Debug for NatterdProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatterdProcess")
            .field("addr", &self.addr)
            .finish()
    }
}

impl NatterdProcess {
    /// Starts natterd on a free loopback port with a fresh data directory; `extra_args` are passed to
    /// every start.
    pub fn start(extra_args: &[&str]) -> NatterdProcess {
        init_logging();
        let bin = natterd_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut p = NatterdProcess {
            child: None,
            bin,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
        };
        p.spawn();
        p
    }

    /// Starts natterd with `--store STORE` (e.g. `postgres://...`) followed by `extra_args`.
    pub fn start_with_store(store: &str, extra_args: &[&str]) -> NatterdProcess {
        let mut args = vec!["--store", store];
        args.extend_from_slice(extra_args);
        Self::start(&args)
    }

    /// `host:port` to give clients.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file the SMS gateway writes to.
    pub fn sms_log(&self) -> PathBuf {
        self.dir.path().join("sms.log")
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the process with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same port and data directory (after [`NatterdProcess::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts natterd and waits until it listens; the first start picks the port.
    fn spawn(&mut self) {
        use std::io::BufRead;
        let mut last = String::new();
        for _ in 0..50 {
            let mut child = std::process::Command::new(&self.bin)
                .arg("--data")
                .arg(self.data_dir())
                .arg("--listen")
                .arg(self.addr.to_string())
                .arg("--http-listen")
                .arg("127.0.0.1:0")
                .arg("--sms-gateway")
                .arg(format!("file:{}", self.sms_log().display()))
                .args(&self.extra_args)
                .env("NATTERD_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn natterd");
            let stderr = child.stderr.take().expect("stderr");
            let mut lines = std::io::BufReader::new(stderr).lines();
            let mut listening = None;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("natterd listening on ") {
                    listening = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                    break;
                }
                last = line;
            }
            match listening {
                Some(addr) => {
                    // Keep draining stderr so natterd never blocks on a full pipe.
                    std::thread::spawn(move || for _ in lines {});
                    self.addr = addr;
                    self.child = Some(child);
                    return;
                }
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("natterd did not start: {last}");
    }
}

impl Drop for NatterdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last code sent to `phone` in an SMS log file.
pub fn last_code_in(sms_log: &Path, phone: &str) -> Option<String> {
    let text = std::fs::read_to_string(sms_log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| l.split_once(' '))
        .find(|(p, _)| *p == phone)
        .map(|(_, c)| c.to_owned())
}

impl TestClient {
    /// Registers `phone` on the natterd at `addr` whose SMS gateway writes to `sms_log`, not connected.
    pub async fn register_at(addr: &str, sms_log: &Path, phone: &str) -> TestClient {
        let home = tempfile::tempdir().expect("temp home");
        let client = Client::open(home.path()).await.expect("open home");
        client.set_server(addr).await.expect("server");
        let phone = PhoneNumber::parse(phone).expect("phone");
        client.register(&phone).await.expect("register");
        let code = last_code_in(sms_log, phone.as_str()).expect("code in sms log");
        client.verify(&code).await.expect("verify");
        TestClient {
            client,
            phone,
            home,
        }
    }
}

impl TestClient {
    /// Registers `phone` as a device whose state lives in memory (the fast path for tests that need
    /// hundreds of real devices): same registration, keys and protocol, no database file.
    pub async fn register_ephemeral(server: &TestServer, phone: &str) -> TestClient {
        let home = tempfile::tempdir().expect("temp home");
        let client = Client::open_ephemeral(home.path())
            .await
            .expect("open home");
        client.set_server(&server.addr()).await.expect("server");
        let phone = PhoneNumber::parse(phone).expect("phone");
        client.register(&phone).await.expect("register");
        let code = last_code_in(&server.sms_log(), phone.as_str()).expect("code in sms log");
        client.verify(&code).await.expect("verify");
        TestClient {
            client,
            phone,
            home,
        }
    }

    /// Registers and connects many in-memory devices, `parallel` at a time, numbered
    /// `{prefix}{i:04}` for `i` in `range`. The server must allow that many codes per IP.
    pub async fn register_many(
        server: &TestServer,
        prefix: &str,
        range: std::ops::Range<u32>,
        parallel: usize,
    ) -> Vec<TestClient> {
        Self::register_many_at(&server.addr(), &server.sms_log(), prefix, range, parallel).await
    }

    /// [`TestClient::register_many`] against the natterd at `addr` whose SMS gateway writes to
    /// `sms_log` (e.g. a [`NatterdProcess`]).
    pub async fn register_many_at(
        addr: &str,
        sms_log: &Path,
        prefix: &str,
        range: std::ops::Range<u32>,
        parallel: usize,
    ) -> Vec<TestClient> {
        use std::sync::Arc;
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = Vec::new();
        for i in range {
            let number = format!("{prefix}{i:04}");
            let sem = Arc::clone(&sem);
            let addr = addr.to_owned();
            let sms = sms_log.to_owned();
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await.expect("semaphore");
                let home = tempfile::tempdir().expect("temp home");
                let client = Client::open_ephemeral(home.path()).await.expect("open");
                client.set_server(&addr).await.expect("server");
                let phone = PhoneNumber::parse(&number).expect("phone");
                client.register(&phone).await.expect("register");
                let code = last_code_in(&sms, phone.as_str()).expect("code");
                client.verify(&code).await.expect("verify");
                client.connect().await.expect("connect");
                TestClient {
                    client,
                    phone,
                    home,
                }
            }));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.expect("registration task"));
        }
        out
    }
}

/// A TCP relay on 127.0.0.1 in front of a real server (PostgreSQL in the cluster tests) that a test can
/// cut — every relayed connection dropped, new ones closed at once — and restore, to see how natterd
/// behaves while its database is unreachable and after it comes back.
pub struct TcpRelay {
    addr: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TcpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRelay")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TcpRelay {
    /// Relays a free loopback port to `target` (`host:port`).
    pub async fn start(target: &str) -> TcpRelay {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (up2, cut2, target) = (up.clone(), cut.clone(), target.to_owned());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let mut cut = cut2.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpRelay {
            addr,
            up,
            cut,
            accept,
        }
    }

    /// The relay's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Cuts (`false`) or restores (`true`) the relay.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|g| *g += 1);
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_up(false);
    }
}

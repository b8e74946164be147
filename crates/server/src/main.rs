//! natterd: the Natter server. A thin binary over natter-server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use natter_server::config::StoreUrl;
use natter_server::{Server, ServerConfig};

/// jemalloc instead of glibc's allocator: glibc wastes 350–500 bytes on each of the two 128-byte-aligned
/// allocations Tokio makes per connection, and its malloc and free were a seventh of natterd's CPU under
/// message load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Natter server.
#[derive(Parser, Debug)]
#[command(name = "natterd", version, about = "The Natter server")]
struct Args {
    /// Where durable state lives: sqlite:PATH, or postgres://USER@HOST/DB for a cluster (pool settings
    /// as query parameters: pool_size, acquire_timeout_ms). Default: SQLite in the data directory.
    #[arg(long, env = "NATTER_STORE", global = true)]
    store: Option<StoreUrl>,
    /// `migrate`, or nothing to serve.
    #[command(subcommand)]
    command: Option<Command>,
    /// Data directory (database, server key).
    #[arg(long, env = "NATTERD_DATA", default_value = "./natter-data")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "NATTERD_LISTEN", default_value = "127.0.0.1:5222")]
    listen: SocketAddr,
    /// Where registration codes go: console, file:PATH or http:URL.
    #[arg(long, env = "NATTERD_SMS_GATEWAY", default_value = "console")]
    sms_gateway: String,
    /// Maximum simultaneous connections.
    #[arg(long, default_value_t = 18_000)]
    max_connections: usize,
    /// Registration codes one client IP may request per hour.
    #[arg(long, default_value_t = 20)]
    codes_per_ip_per_hour: u32,
    /// Code verifications one client IP may attempt per hour.
    #[arg(long, default_value_t = 60)]
    verifies_per_ip_per_hour: u32,
    /// Registration codes one number may receive per hour.
    #[arg(long, default_value_t = 5)]
    codes_per_number_per_hour: u32,
    /// Companions of a phone that has not connected for this many days are logged out.
    #[arg(long, default_value_t = 14)]
    companion_logout_days: u64,
    /// Address of the blob (media) HTTP service.
    #[arg(long, env = "NATTERD_HTTP_LISTEN", default_value = "127.0.0.1:5223")]
    http_listen: SocketAddr,
    /// Storage quota per account for media blobs, in MiB.
    #[arg(long, default_value_t = 10 * 1024)]
    media_quota_mib: u64,
    /// Numbers one account may look up in contact discovery per day.
    #[arg(long, default_value_t = natter_proto::limits::DISCOVERY_ACCOUNT_QUOTA)]
    discovery_account_quota: u32,
    /// Numbers one client IP may look up in contact discovery per day.
    #[arg(long, default_value_t = natter_proto::limits::DISCOVERY_IP_QUOTA)]
    discovery_ip_quota: u32,
    /// Abuse limits.
    #[command(flatten)]
    abuse: AbuseArgs,
    /// Cluster mode.
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Cluster mode: several natterd nodes over one store, a NATS bus and shared blobs.
#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// The bus between nodes, e.g. nats://127.0.0.1:4222 (default: a single node, no bus).
    #[arg(long, env = "NATTERD_BUS")]
    bus: Option<String>,
    /// This node's id in the cluster (A-Z a-z 0-9 - _; default: a random one).
    #[arg(long, env = "NATTERD_NODE_ID")]
    node_id: Option<String>,
    /// Directory of the keys all nodes share: server.key (the Noise key clients pin) and blob.key
    /// (default: the data directory).
    #[arg(long, env = "NATTERD_KEY_DIR")]
    key_dir: Option<PathBuf>,
    /// Where media blobs go: s3://BUCKET[/PREFIX][?endpoint=URL&region=R] (credentials from AWS_*
    /// variables); default: DATA/blobs.
    #[arg(long, env = "NATTERD_BLOBS")]
    blobs: Option<String>,
    /// Seconds between re-reads of every connected device's queue (in case a bus message was lost).
    #[arg(long, default_value_t = 60)]
    bus_catchup_secs: u64,
}

impl ClusterArgs {
    fn apply(self, config: &mut ServerConfig) {
        config.bus = self.bus;
        config.node_id = self.node_id;
        config.key_dir = self.key_dir;
        config.blobs = self.blobs;
        config.bus_catchup_interval = std::time::Duration::from_secs(self.bus_catchup_secs.max(1));
    }
}

/// What natterd does instead of serving.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Applies pending schema migrations to the store, prints its schema version and exits (a no-op
    /// when it is up to date; safe while other nodes start).
    Migrate,
}

/// Abuse limits (see natter_server::config::AbuseLimits); a rate of 0 disables that limit.
#[derive(clap::Args, Debug)]
struct AbuseArgs {
    /// Simultaneous connections from one IP address.
    #[arg(long, default_value_t = 1_000)]
    max_connections_per_ip: usize,
    /// New connections (Noise handshakes) one IP address may open per second.
    #[arg(long, default_value_t = 100)]
    handshakes_per_ip_per_s: u32,
    /// New connections one IP address may open at once before the per-second rate applies.
    #[arg(long, default_value_t = 1_000)]
    handshake_burst: u32,
    /// Time allowed for the Noise handshake and the hello, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Ciphertext queued for one device beyond which sends to it are refused, in MiB.
    #[arg(long, default_value_t = 256)]
    max_queued_mib_per_device: u64,
    /// Messages one account may send per second.
    #[arg(long, default_value_t = 200)]
    sends_per_account_per_s: u32,
    /// Messages one account may send at once before the per-second rate applies.
    #[arg(long, default_value_t = 2_000)]
    send_burst: u32,
    /// Envelopes pushed to one connection and not yet acknowledged.
    #[arg(long, default_value_t = 512)]
    max_unacked_pushes: usize,
}

impl AbuseArgs {
    fn apply(&self, limits: &mut natter_server::config::AbuseLimits) {
        limits.max_connections_per_ip = self.max_connections_per_ip.max(1);
        limits.handshakes_per_ip_per_s = self.handshakes_per_ip_per_s;
        limits.handshake_burst = self.handshake_burst;
        limits.handshake_timeout =
            std::time::Duration::from_millis(self.handshake_timeout_ms.max(100));
        limits.max_queued_bytes_per_device =
            self.max_queued_mib_per_device.saturating_mul(1024 * 1024);
        limits.sends_per_account_per_s = self.sends_per_account_per_s;
        limits.send_burst = self.send_burst;
        limits.max_unacked_pushes = self.max_unacked_pushes.max(1);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NATTERD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let store = args.store.clone().unwrap_or_default();
    if let Some(Command::Migrate) = args.command {
        let version = natter_server::store::migrate_store(&store, &args.data)
            .await
            .with_context(|| format!("migrating {store}"))?;
        println!("schema version {version}");
        return Ok(());
    }
    let mut config = ServerConfig::new(&args.data);
    config.store = store;
    config.listen = args.listen;
    config.sms_gateway = args.sms_gateway;
    config.max_connections = args.max_connections;
    config.registration.codes_per_ip_per_hour = args.codes_per_ip_per_hour;
    config.registration.verifies_per_ip_per_hour = args.verifies_per_ip_per_hour;
    config.registration.codes_per_number_per_hour = args.codes_per_number_per_hour;
    config.companion_logout_after =
        std::time::Duration::from_secs(args.companion_logout_days.max(1) * 24 * 3600);
    config.http_listen = Some(args.http_listen);
    config.media_quota_bytes = args.media_quota_mib.saturating_mul(1024 * 1024);
    config.discovery_account_quota = args.discovery_account_quota;
    config.discovery_ip_quota = args.discovery_ip_quota;
    args.abuse.apply(&mut config.abuse);
    args.cluster.apply(&mut config);
    let server = Server::start(config)
        .await
        .with_context(|| format!("starting natterd in {}", args.data.display()))?;
    eprintln!(
        "natterd listening on {} (media on http://{}, server key {})",
        server.local_addr(),
        server.http_addr(),
        hex::encode(server.public_key())
    );
    wait_for_signal().await;
    eprintln!("natterd shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

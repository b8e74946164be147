//! Server configuration: one struct, every field documented with its default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use natter_proto::limits;

/// How natterd runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Directory for the database and the server's Noise key. Default `./natter-data`.
    pub data_dir: PathBuf,
    /// Address to listen on. Default `127.0.0.1:5222`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where registration codes go: `console`, `file:PATH` or `http:URL`. Default `console`.
    pub sms_gateway: String,
    /// Maximum simultaneous connections. Default 18,000 (under the per-process limit of open files).
    pub max_connections: usize,
    /// Registration limits.
    pub registration: RegistrationLimits,
    /// How often expired envelopes are deleted. Default one hour.
    pub expiry_interval: Duration,
    /// How long an unacknowledged envelope is kept. Default 30 days.
    pub envelope_retention: Duration,
    /// How long a companion's link code (QR) stays valid. Default 60 s.
    pub link_ttl: Duration,
    /// Companions of a primary that has not connected for this long are logged out. Default 14 days.
    pub companion_logout_after: Duration,
    /// Address of the blob HTTP service. `None` (the library default) binds a free port on `listen`'s
    /// IP, so that servers started side by side (tests) do not collide; natterd's `--http-listen`
    /// defaults to `127.0.0.1:5223`. Grants carry the address actually bound.
    pub http_listen: Option<SocketAddr>,
    /// Bytes of unexpired blobs one account may have. Default 10 GiB.
    pub media_quota_bytes: u64,
    /// Numbers one account may look up (contact discovery) per day. Default
    /// [`limits::DISCOVERY_ACCOUNT_QUOTA`].
    pub discovery_account_quota: u32,
    /// Numbers one client IP may look up per day. Default [`limits::DISCOVERY_IP_QUOTA`].
    pub discovery_ip_quota: u32,
    /// Limits against abuse of the network edge and the queues.
    pub abuse: AbuseLimits,
    /// The bus between nodes: `None` (default) for a single node, `nats://HOST:PORT` for a cluster.
    pub bus: Option<String>,
    /// This node's id in a cluster (1 to 64 of `A-Z a-z 0-9 - _`). Default: a random one per start.
    pub node_id: Option<String>,
    /// In a cluster, how often every connected device's queue is re-read in case a wake-up was lost on
    /// the bus. Default 60 s.
    pub bus_catchup_interval: Duration,
    /// Directory of the keys every node of a cluster must share: the Noise static key clients pin
    /// (`server.key`) and the blob token key (`blob.key`). Default: the data directory.
    pub key_dir: Option<PathBuf>,
    /// Where media blobs go: `None` (default) for `data_dir/blobs`, or `s3://BUCKET[/PREFIX]` with
    /// optional `?endpoint=URL&region=R` (credentials from the usual `AWS_*` environment variables).
    pub blobs: Option<String>,
    /// Where durable state lives. Default [`StoreUrl::DataDir`] (SQLite in `data_dir`).
    pub store: StoreUrl,
}

/// Where natterd keeps its durable state, as given to `--store` / `NATTER_STORE`: `sqlite:PATH` (or
/// `sqlite://PATH`), `postgres://...` (or `postgresql://...`), or nothing for the SQLite file in the data
/// directory. `Display` and `Debug` never show a password.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreUrl {
    /// `natter.db` in the data directory: the single-node default.
    #[default]
    DataDir,
    /// An SQLite file at this path.
    Sqlite(PathBuf),
    /// PostgreSQL, shared by the nodes of a cluster.
    #[cfg(feature = "postgres")]
    Postgres(crate::store::postgres::PgUrl),
    /// PostgreSQL, which this build cannot open.
    #[cfg(not(feature = "postgres"))]
    Postgres(String),
}

/// A `--store` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid store {0}: expected sqlite:PATH or postgres://USER@HOST/DB")]
pub struct StoreUrlError(String);

impl std::str::FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<Self, StoreUrlError> {
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(StoreUrlError("sqlite: without a path".into()));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            return s
                .parse()
                .map(StoreUrl::Postgres)
                .map_err(|e: crate::store::postgres::PgUrlError| StoreUrlError(e.to_string()));
            #[cfg(not(feature = "postgres"))]
            return Ok(StoreUrl::Postgres(s.to_owned()));
        }
        Err(StoreUrlError(format!(
            "{:?}",
            s.split(':').next().unwrap_or("")
        )))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::DataDir => f.write_str("the data directory"),
            StoreUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(url) => write!(f, "{url}"),
            #[cfg(not(feature = "postgres"))]
            StoreUrl::Postgres(_) => f.write_str("postgres://(unsupported by this build)"),
        }
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

/// Limits against abuse: per client IP, per account, per device and per connection. Each refusal reaches
/// the client as a typed error ([`natter_proto::wire::ErrorCode`]). A rate of 0 disables that limit.
#[derive(Clone, Debug)]
pub struct AbuseLimits {
    /// Simultaneous connections from one IP address. Default 1,000 (carrier NAT puts many phones behind
    /// one address).
    pub max_connections_per_ip: usize,
    /// New connections (each costs a Noise handshake) one IP address may open per second, sustained.
    /// Default 100.
    pub handshakes_per_ip_per_s: u32,
    /// Handshakes one IP address may open at once before the rate applies. Default 1,000.
    pub handshake_burst: u32,
    /// Time allowed for the Noise handshake and the hello (slow-handshake defence). Default 10 s.
    pub handshake_timeout: Duration,
    /// Bytes of ciphertext queued for one device beyond which sends to it are refused. Default 256 MiB.
    pub max_queued_bytes_per_device: u64,
    /// Messages one account may send per second, sustained (over all its devices). Default 200.
    pub sends_per_account_per_s: u32,
    /// Messages one account may send at once before the rate applies. Default 2,000.
    pub send_burst: u32,
    /// Envelopes pushed to one connection and not yet acknowledged; beyond it the server waits for
    /// acknowledgements. Default 512.
    pub max_unacked_pushes: usize,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        Self {
            max_connections_per_ip: 1_000,
            handshakes_per_ip_per_s: 100,
            handshake_burst: 1_000,
            handshake_timeout: limits::HANDSHAKE_TIMEOUT,
            max_queued_bytes_per_device: 256 * 1024 * 1024,
            sends_per_account_per_s: 200,
            send_burst: 2_000,
            max_unacked_pushes: limits::MAX_UNACKED_PUSHES,
        }
    }
}

/// Limits on registration, against abuse of SMS and guessing of codes.
#[derive(Clone, Debug)]
pub struct RegistrationLimits {
    /// How long a code is valid. Default 10 minutes.
    pub code_ttl: Duration,
    /// Wrong guesses per code. Default 5.
    pub max_attempts: u32,
    /// Minimum time between codes to one number. Default 30 s.
    pub resend_cooldown: Duration,
    /// Codes per number per hour. Default 5.
    pub codes_per_number_per_hour: u32,
    /// Code requests per client IP per hour. Default 20.
    pub codes_per_ip_per_hour: u32,
    /// Verification attempts per client IP per hour. Default 60.
    pub verifies_per_ip_per_hour: u32,
}

impl Default for RegistrationLimits {
    fn default() -> Self {
        Self {
            code_ttl: limits::CODE_TTL,
            max_attempts: limits::CODE_MAX_ATTEMPTS,
            resend_cooldown: limits::CODE_RESEND_COOLDOWN,
            codes_per_number_per_hour: 5,
            codes_per_ip_per_hour: 20,
            verifies_per_ip_per_hour: 60,
        }
    }
}

impl ServerConfig {
    /// Defaults, with the given data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 5222)),
            sms_gateway: "console".into(),
            max_connections: 18_000,
            registration: RegistrationLimits::default(),
            expiry_interval: Duration::from_secs(3600),
            envelope_retention: limits::ENVELOPE_RETENTION,
            link_ttl: natter_proto::link::LINK_TTL,
            companion_logout_after: Duration::from_secs(14 * 24 * 3600),
            http_listen: None,
            media_quota_bytes: 10 * 1024 * 1024 * 1024,
            discovery_account_quota: limits::DISCOVERY_ACCOUNT_QUOTA,
            discovery_ip_quota: limits::DISCOVERY_IP_QUOTA,
            abuse: AbuseLimits::default(),
            bus: None,
            node_id: None,
            bus_catchup_interval: Duration::from_secs(60),
            key_dir: None,
            blobs: None,
            store: StoreUrl::DataDir,
        }
    }
}

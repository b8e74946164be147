//! Starting and stopping natterd: opens the store and the server's Noise key in the data directory,
//! binds the listener, runs the accept loop and the expiry task, and shuts all of it down on request.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use natter_proto::noise::StaticKeypair;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServerConfig;
use crate::delivery::Router;
use crate::registration::{Registration, gateway};
use crate::store::Store;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or key file could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which path.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The key file is damaged.
    #[error("{0}: not a server key (expected 32 bytes)")]
    BadKey(String),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The SMS gateway specification is wrong.
    #[error(transparent)]
    Gateway(#[from] gateway::GatewayError),
    /// The media side could not be opened.
    #[error("media: {0}")]
    Media(#[from] crate::media::MediaError),
    /// Key generation failed.
    #[error("key generation: {0}")]
    Crypto(#[from] natter_proto::ProtoError),
    /// The bus to the other nodes could not be opened.
    #[error("bus: {0}")]
    Bus(#[from] crate::bus::BusError),
}

/// Everything the connection drivers and handlers share.
pub struct ServerState {
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Online devices.
    pub router: Router,
    /// Registration codes and their limits.
    pub registration: Registration,
    /// Open companion link sessions.
    pub links: crate::directory::LinkSessions,
    /// Who follows whose device list.
    pub watchers: crate::directory::Watchers,
    /// Device ids per account, for the send path.
    pub device_cache: crate::directory::DeviceCache,
    /// Whom each account blocked, for the send path.
    pub block_cache: crate::directory::BlockCache,
    /// Who is online, and who follows whom (in memory only).
    pub presence: crate::directory::presence::Presence,
    /// Contact-discovery quotas: numbers looked up per account and per IP per day.
    pub discovery: crate::handlers::social::DiscoveryQuotas,
    /// The server's Noise static key, which clients pin.
    pub noise_key: StaticKeypair,
    /// Media blobs: tokens, blob store, grant URLs.
    pub media: Arc<crate::media::Media>,
    /// The configuration it runs with.
    pub config: ServerConfig,
    /// Abuse limits and their counters.
    pub limits: Arc<crate::transport::limits::EdgeLimits>,
    next_conn_id: AtomicU64,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("noise_key", &self.noise_key)
            .field("online", &self.router.online())
            .field("node", &self.router.bus().node_id())
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// The device ids of an account (empty if it does not exist), from the cache when possible.
    pub async fn device_ids(
        &self,
        phone: &natter_proto::PhoneNumber,
    ) -> Result<std::sync::Arc<[natter_proto::DeviceId]>, crate::store::StoreError> {
        let generation = match self.device_cache.get(phone) {
            Ok(ids) => return Ok(ids),
            Err(generation) => generation,
        };
        let ids: std::sync::Arc<[natter_proto::DeviceId]> = self
            .store
            .list_devices(phone)
            .await?
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        self.device_cache.insert(phone, ids.clone(), generation);
        Ok(ids)
    }

    /// Whether `owner` blocked `other`, from the cache when possible.
    pub async fn is_blocked(
        &self,
        owner: &natter_proto::PhoneNumber,
        other: &natter_proto::PhoneNumber,
    ) -> Result<bool, crate::store::StoreError> {
        let blocked = match self.block_cache.get(owner) {
            Ok(blocked) => blocked,
            Err(generation) => {
                let mut blocked = self.store.blocked(owner).await?;
                blocked.sort(); // searched by `binary_search` below, however many were blocked
                let blocked: std::sync::Arc<[natter_proto::PhoneNumber]> = blocked.into();
                self.block_cache.insert(owner, blocked.clone(), generation);
                blocked
            }
        };
        Ok(blocked.binary_search(other).is_ok())
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    state: Arc<ServerState>,
    local_addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
    expiry: JoinHandle<()>,
    http: JoinHandle<()>,
    bus_task: JoinHandle<()>,
}

/// How long shutdown waits for blob transfers in flight before cutting them off.
const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Loads the server's Noise key from the key directory, creating it on first start.
fn load_or_create_key(dir: &Path) -> Result<StaticKeypair, StartError> {
    let path = dir.join("server.key");
    let kp = StaticKeypair::generate()?;
    let bytes = read_or_create_secret(&path, kp.private()).map_err(|source| StartError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let private: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| StartError::BadKey(path.display().to_string()))?;
    Ok(StaticKeypair::from_private(private))
}

/// Reads the secret at `path`, or stores `fresh` there (mode 0600) if there is none. Safe when several
/// nodes sharing a key directory start at once: the file appears whole or not at all (written aside,
/// then hard-linked into place, which fails if another node got there first), and every node ends up
/// with the bytes that won.
pub(crate) fn read_or_create_secret(
    path: &Path,
    fresh: &[u8],
) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => return Ok(zeroize::Zeroizing::new(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = path.with_extension(format!("tmp-{}", hex::encode(nonce)));
    write_private(&tmp, fresh)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(zeroize::Zeroizing::new(std::fs::read(path)?))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Opens the bus the configuration names: none (single node) or NATS.
async fn open_bus(config: &ServerConfig) -> Result<Arc<dyn crate::bus::Bus>, StartError> {
    let Some(url) = &config.bus else {
        return Ok(Arc::new(crate::bus::LocalBus::default()));
    };
    let node_id = match &config.node_id {
        Some(id) => id.clone(),
        None => {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b).map_err(|e| StartError::Io {
                path: "random node id".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            hex::encode(b)
        }
    };
    let bus = crate::bus::NatsBus::connect(url, &node_id).await?;
    tracing::info!(node = %node_id, bus = %url, "joined the cluster bus");
    Ok(Arc::new(bus))
}

impl Server {
    /// Opens the data directory, binds `config.listen` and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server, StartError> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| StartError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let key_dir = config.key_dir.clone().unwrap_or_else(|| dir.clone());
        std::fs::create_dir_all(&key_dir).map_err(|source| StartError::Io {
            path: key_dir.display().to_string(),
            source,
        })?;
        let noise_key = load_or_create_key(&key_dir)?;
        let bus = open_bus(&config).await?;
        let store: Arc<dyn Store> = crate::store::open_store(&config.store, &dir).await?;
        let gateway = gateway::from_spec(&config.sms_gateway)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Io {
                path: config.listen.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Io {
            path: config.listen.to_string(),
            source,
        })?;
        let http_bind = config
            .http_listen
            .unwrap_or_else(|| SocketAddr::new(config.listen.ip(), 0));
        let http_listener =
            TcpListener::bind(http_bind)
                .await
                .map_err(|source| StartError::Io {
                    path: http_bind.to_string(),
                    source,
                })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| StartError::Io {
                path: http_bind.to_string(),
                source,
            })?;
        let media = Arc::new(
            crate::media::Media::open(
                &dir,
                &key_dir,
                config.blobs.as_deref(),
                http_addr,
                store.clone(),
                config.media_quota_bytes,
            )
            .await?,
        );
        let state = Arc::new(ServerState {
            store,
            media: media.clone(),
            router: Router::with_bus(bus.clone()),
            registration: Registration::new(gateway, config.registration.clone()),
            links: crate::directory::LinkSessions::new(bus.clone()),
            watchers: Default::default(),
            device_cache: crate::directory::DeviceCache::new(bus.clone()),
            block_cache: crate::directory::BlockCache::new(bus),
            presence: Default::default(),
            discovery: crate::handlers::social::DiscoveryQuotas::new(&config),
            noise_key,
            limits: Arc::new(crate::transport::limits::EdgeLimits::new(
                config.abuse.clone(),
            )),
            config,
            next_conn_id: AtomicU64::new(1),
        });
        let (shutdown, rx) = watch::channel(false);
        let accept = tokio::spawn(crate::transport::run(state.clone(), listener, rx.clone()));
        let http = tokio::spawn(crate::media::http::serve(http_listener, media, rx.clone()));
        let bus_task = tokio::spawn(crate::bus::inbound::run(state.clone(), rx.clone()));
        let expiry = tokio::spawn(expire_periodically(state.clone(), rx));
        tracing::info!(addr = %local_addr, http = %http_addr, key = %hex::encode(state.noise_key.public()), "natterd listening");
        Ok(Server {
            state,
            local_addr,
            http_addr,
            shutdown,
            accept,
            expiry,
            http,
            bus_task,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the blob HTTP service listens on (what grant URLs name).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The server's Noise public key, which clients pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.state.noise_key.public()
    }

    /// Shared state, for tests and tools.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Stops accepting, closes every connection, waits for the tasks to end, then closes the store.
    /// Everything acknowledged is already durable, so nothing is flushed here.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        let _ = self.expiry.await;
        let _ = self.bus_task.await;
        let mut http = self.http;
        if tokio::time::timeout(HTTP_DRAIN, &mut http).await.is_err() {
            http.abort();
            let _ = http.await;
        }
        self.state.store.close().await;
    }
}

/// Logs out the companions of primaries that have not connected for `companion_logout_after`, as
/// WhatsApp does: the phone remains the root of the account.
pub async fn log_out_stale_companions(
    state: &ServerState,
) -> Result<usize, crate::store::StoreError> {
    let cutoff =
        crate::now_ms().saturating_sub(state.config.companion_logout_after.as_millis() as u64);
    let stale = state.store.stale_companions(cutoff, 10_000).await?;
    // The primary's last-seen time is its last login: a phone connected all along is not absent.
    let mut absent = Vec::with_capacity(stale.len());
    for (phone, device) in stale {
        if !state
            .router
            .is_online(&phone, natter_proto::DeviceId::PRIMARY)
            .await
        {
            absent.push((phone, device));
        }
    }
    let stale = absent;
    let mut accounts = std::collections::BTreeSet::new();
    for (phone, device) in &stale {
        state.store.remove_device(phone, *device).await?;
        state.device_cache.invalidate(phone);
        state.router.kick(
            phone,
            *device,
            "logged out: the phone of this account has not been online for too long",
        );
        accounts.insert(phone.clone());
    }
    for phone in accounts {
        crate::handlers::devices::notify_list_changed(state, &phone);
    }
    if !stale.is_empty() {
        tracing::info!(
            companions = stale.len(),
            "logged out companions of absent primaries"
        );
    }
    Ok(stale.len())
}

async fn expire_periodically(state: Arc<ServerState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(state.config.expiry_interval);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {
                match state.store.expire(crate::now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(envelopes = n, "expired undelivered envelopes"),
                    Err(e) => tracing::warn!(error = %e, "expiry failed"),
                }
                match state.media.expire(crate::now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(blobs = n, "deleted expired media blobs"),
                    Err(e) => tracing::warn!(error = %e, "blob expiry failed"),
                }
                if let Err(e) = log_out_stale_companions(&state).await {
                    tracing::warn!(error = %e, "companion logout failed");
                }
            }
        }
    }
}

//! [`Client`]: one device's state in a home directory, and the commands a UI gives it.
//!
//! The home directory holds `natter.db` (the [`crate::store::sqlite`] store), `local.key` (the key that
//! encrypts secrets at rest, readable by the owner only) and `lock` (one process per home at a time).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_crypto::{AccountKey, DeviceKeys, StoreCipher, device_list};
use natter_proto::device_list::DeviceListContent;
use natter_proto::limits::ONE_TIME_KEYS_TARGET;
use natter_proto::noise::StaticKeypair;
use natter_proto::wire::{CodeSent, Login, RequestCode, UploadKeys, VerifyCode, request, response};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};
use crate::events::Event;
use crate::net::{ConnectOptions, Connection};
use crate::store::sqlite::SqliteStore;
use crate::store::{Changes, ClientStore, IdentityRecord, MessageRecord, PeerRecord};

const SETTING_SERVER: &str = "server";
const SETTING_SERVER_KEY: &str = "server_key";
const LOCAL_KEY_FILE: &str = "local.key";
const LOCK_FILE: &str = "lock";
const DB_FILE: &str = "natter.db";

/// Who this device is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WhoAmI {
    /// The account's number.
    pub phone: PhoneNumber,
    /// This device's id.
    pub device_id: DeviceId,
    /// Whether registration is complete.
    pub registered: bool,
    /// The account key, hex.
    pub account_key: String,
    /// The server this home talks to.
    pub server: Option<String>,
}

/// A device: its store, its keys and its connection. Clones share everything; when the last clone a
/// caller holds is dropped, the background connection stops and the home directory is released.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    /// Present in the caller's handles, absent in the clones background tasks hold, so that those tasks
    /// do not keep the client alive.
    _owner: Option<Arc<Owner>>,
}

/// Stops the background work when the last caller-held [`Client`] goes.
struct Owner {
    inner: std::sync::Weak<Inner>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.abort_background();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("home", &self.inner.home)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) home: PathBuf,
    pub(crate) store: Arc<dyn ClientStore>,
    pub(crate) cipher: StoreCipher,
    _lock: std::fs::File,
    pub(crate) events: broadcast::Sender<Event>,
    /// Serialises every use of Olm state (device account and sessions).
    pub(crate) crypto: tokio::sync::Mutex<()>,
    /// Serialises outbox deliveries so that messages leave in order.
    pub(crate) sending: tokio::sync::Mutex<()>,
    /// Held while history jobs run, so that they run one at a time.
    pub(crate) history_jobs: tokio::sync::Mutex<()>,
    /// Serialises app-state fetches and pushes.
    pub(crate) app_state: tokio::sync::Mutex<()>,
    /// Background work (syncs, history jobs, outbox flushes, follow-ups), aborted on disconnect and
    /// when the last caller-held handle goes, so that nothing runs on or keeps the home locked after.
    tasks: Mutex<tokio::task::JoinSet<()>>,
    pub(crate) conn: watch::Sender<Option<Arc<Connection>>>,
    /// Grows whenever a device list is fetched from the server: cached group targets built before are
    /// stale.
    pub(crate) device_generation: std::sync::atomic::AtomicU64,
    /// Each group's member devices as last verified: (group version, device generation, devices), so
    /// that a group send verifies the members' signed lists only when something changed.
    pub(crate) group_targets: Mutex<crate::groups::TargetCache>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Which of the configured servers to try first (the last one that worked).
    next_server: std::sync::atomic::AtomicUsize,
    /// Primary side of linking: who waits for which companion's acceptance.
    pub(crate) link_waiters: Mutex<
        std::collections::HashMap<
            Vec<u8>,
            tokio::sync::oneshot::Sender<natter_proto::wire::LinkAccepted>,
        >,
    >,
}

impl Inner {
    /// Aborts the connection supervisor and every background task; returns the supervisor's handle, for
    /// a caller that waits until it has stopped.
    fn abort_background(&self) -> Option<JoinHandle<()>> {
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = &supervisor {
            task.abort();
        }
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
        supervisor
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.abort_background();
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl Client {
    /// Opens (creating if needed) a home directory. Fails if another process has it open.
    pub async fn open(home: impl AsRef<Path>) -> Result<Client> {
        let home = home.as_ref().to_path_buf();
        std::fs::create_dir_all(&home).map_err(io_err(&home))?;
        let lock_path = home.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // Wait a little for a short-lived process (a `send` in another terminal) to finish.
        let mut locked = false;
        for _ in 0..50 {
            match lock.try_lock() {
                Ok(()) => {
                    locked = true;
                    break;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
            }
        }
        if !locked {
            return Err(ClientError::HomeLocked(home.display().to_string()));
        }
        let key_path = home.join(LOCAL_KEY_FILE);
        let cipher = match std::fs::read(&key_path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| ClientError::Io {
                    path: key_path.display().to_string(),
                    source: std::io::Error::other("not a key file (expected 32 bytes)"),
                })?;
                StoreCipher::from_key(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let cipher = StoreCipher::generate();
                write_secret_file(&key_path, cipher.key_bytes().as_slice())
                    .map_err(io_err(&key_path))?;
                cipher
            }
            Err(e) => return Err(io_err(&key_path)(e)),
        };
        let store = SqliteStore::open(&home.join(DB_FILE)).await?;
        Ok(Self::with_store(home, Arc::new(store), cipher, lock))
    }

    /// Opens a device whose state lives in memory only (nothing survives the process): for tests and load
    /// generators that need many devices at once. `home` holds only the lock file.
    pub async fn open_ephemeral(home: impl AsRef<Path>) -> Result<Client> {
        let home = home.as_ref().to_path_buf();
        std::fs::create_dir_all(&home).map_err(io_err(&home))?;
        let lock_path = home.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ClientError::HomeLocked(home.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let store = crate::store::memory::MemoryStore::new();
        Ok(Self::with_store(
            home,
            Arc::new(store),
            StoreCipher::generate(),
            lock,
        ))
    }

    fn with_store(
        home: PathBuf,
        store: Arc<dyn ClientStore>,
        cipher: StoreCipher,
        lock: std::fs::File,
    ) -> Client {
        let (events, _) = broadcast::channel(4096);
        let (conn, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            home,
            store,
            cipher,
            _lock: lock,
            events,
            crypto: tokio::sync::Mutex::new(()),
            sending: tokio::sync::Mutex::new(()),
            history_jobs: tokio::sync::Mutex::new(()),
            app_state: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            conn,
            device_generation: std::sync::atomic::AtomicU64::new(0),
            group_targets: Mutex::new(Default::default()),
            supervisor: Mutex::new(None),
            link_waiters: Mutex::new(Default::default()),
            next_server: std::sync::atomic::AtomicUsize::new(0),
        });
        Client {
            _owner: Some(Arc::new(Owner {
                inner: Arc::downgrade(&inner),
            })),
            inner,
        }
    }

    /// A handle for background tasks: it does not keep the client alive.
    pub(crate) fn background(&self) -> Client {
        Client {
            inner: self.inner.clone(),
            _owner: None,
        }
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// Follows what happens. Subscribe before [`Client::connect`] to miss nothing.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub(crate) fn emit(&self, ev: Event) {
        let _ = self.inner.events.send(ev);
    }

    /// Remembers the server address for later commands: `HOST:PORT`, or several separated by commas
    /// (the nodes of a cluster, which share one server key): the client connects to the first that
    /// answers and fails over to the next when a connection cannot be opened or drops.
    pub async fn set_server(&self, addr: &str) -> Result<()> {
        let addr = addr.trim();
        let parts: Vec<&str> = addr.split(',').map(str::trim).collect();
        if addr.len() > 1024
            || parts.len() > 16
            || parts
                .iter()
                .any(|a| a.is_empty() || a.len() > 255 || !a.contains(':'))
        {
            return Err(ClientError::InvalidInput(format!(
                "invalid server address {addr:?}: use HOST:PORT[,HOST:PORT...]"
            )));
        }
        let addr = parts.join(",");
        let addr = addr.as_str();
        let old = self.server().await?;
        let mut changes = Changes::default();
        if old.as_deref() != Some(addr) {
            changes
                .settings
                .push((SETTING_SERVER.into(), Some(addr.as_bytes().to_vec())));
            // A different server has a different key: pin it afresh on first contact.
            changes.settings.push((SETTING_SERVER_KEY.into(), None));
        }
        if !changes.is_empty() {
            self.inner.store.save_changes(changes).await?;
        }
        Ok(())
    }

    /// The remembered server address.
    pub async fn server(&self) -> Result<Option<String>> {
        Ok(self
            .inner
            .store
            .setting(SETTING_SERVER)
            .await?
            .and_then(|v| String::from_utf8(v).ok()))
    }

    /// Forgets the pinned server key (after a deliberate server reinstall).
    pub async fn forget_server_key(&self) -> Result<()> {
        let mut changes = Changes::default();
        changes.settings.push((SETTING_SERVER_KEY.into(), None));
        self.inner.store.save_changes(changes).await?;
        Ok(())
    }

    /// This device's identity.
    pub async fn whoami(&self) -> Result<Option<WhoAmI>> {
        let server = self.server().await?;
        Ok(self.inner.store.identity().await?.map(|i| WhoAmI {
            phone: i.phone,
            device_id: i.device_id,
            registered: i.registered,
            account_key: hex::encode(i.account_key),
            server,
        }))
    }

    pub(crate) async fn registered_identity(&self) -> Result<IdentityRecord> {
        match self.inner.store.identity().await? {
            Some(i) if i.registered => Ok(i),
            _ => Err(ClientError::NotRegistered),
        }
    }

    pub(crate) fn noise_key(&self, identity: &IdentityRecord) -> Result<StaticKeypair> {
        let secret = self
            .inner
            .cipher
            .decrypt(b"noise-key", &identity.noise_secret)?;
        let private: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Crypto(natter_crypto::CryptoError::InvalidKey))?;
        Ok(StaticKeypair::from_private(private))
    }

    pub(crate) fn device_keys(&self, identity: &IdentityRecord) -> Result<DeviceKeys> {
        Ok(DeviceKeys::from_pickle(
            &identity.device_pickle,
            &self.inner.cipher.pickle_key(),
        )?)
    }

    pub(crate) fn pickle_device(&self, device: &DeviceKeys) -> String {
        device.pickle(&self.inner.cipher.pickle_key())
    }

    pub(crate) async fn open_connection(
        &self,
        noise: &StaticKeypair,
        login: Option<Login>,
    ) -> Result<(
        Connection,
        tokio::sync::mpsc::UnboundedReceiver<natter_proto::wire::Push>,
    )> {
        let servers = self.server().await?.ok_or(ClientError::NoServer)?;
        let servers: Vec<&str> = servers.split(',').map(str::trim).collect();
        let pinned = self.pinned_server_key().await?;
        let first = self
            .inner
            .next_server
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut last_error = None;
        let mut opened = None;
        for i in 0..servers.len() {
            let index = (first + i) % servers.len();
            match Connection::open(ConnectOptions {
                addr: servers[index],
                noise_key: noise,
                pinned_server_key: pinned,
                login: login.clone(),
            })
            .await
            {
                Ok(c) => {
                    self.inner
                        .next_server
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    opened = Some(c);
                    break;
                }
                // A node that is down or cut off: the next one may serve.
                Err(
                    e @ (ClientError::Unreachable { .. }
                    | ClientError::Timeout
                    | ClientError::Disconnected),
                ) => {
                    tracing::debug!(server = servers[index], error = %e, "server not reachable; trying the next");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((conn, pushes)) = opened else {
            return Err(last_error.unwrap_or(ClientError::NoServer));
        };
        if pinned.is_none() {
            self.pin_server_key(conn.server_key()).await?;
        }
        Ok((conn, pushes))
    }

    /// The server key pinned on first contact.
    pub(crate) async fn pinned_server_key(&self) -> Result<Option<[u8; 32]>> {
        Ok(self
            .inner
            .store
            .setting(SETTING_SERVER_KEY)
            .await?
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()))
    }

    /// Pins the server's key.
    pub(crate) async fn pin_server_key(&self, key: [u8; 32]) -> Result<()> {
        let changes = Changes {
            settings: vec![(SETTING_SERVER_KEY.into(), Some(key.to_vec()))],
            ..Changes::default()
        };
        self.inner.store.save_changes(changes).await?;
        Ok(())
    }

    /// Starts registering `phone`: creates this device's keys and asks the server to send a code by SMS.
    /// Run [`Client::verify`] with the code next.
    pub async fn register(&self, phone: &PhoneNumber) -> Result<CodeSent> {
        let existing = self.inner.store.identity().await?;
        let identity = match existing {
            // A pending registration of the same number keeps its keys, so a resent code still works.
            Some(i) if !i.registered && i.phone == *phone => i,
            _ => self.new_identity(phone)?,
        };
        let noise = self.noise_key(&identity)?;
        let changes = Changes {
            identity: Some(identity),
            ..Changes::default()
        };
        self.inner.store.save_changes(changes).await?;
        let (conn, _pushes) = self.open_connection(&noise, None).await?;
        match conn
            .request(request::Body::RequestCode(RequestCode {
                phone: phone.as_str().to_owned(),
            }))
            .await?
        {
            response::Body::CodeSent(sent) => Ok(sent),
            _ => Err(unexpected()),
        }
    }

    fn new_identity(&self, phone: &PhoneNumber) -> Result<IdentityRecord> {
        let account = AccountKey::generate();
        let device = DeviceKeys::generate();
        let noise = StaticKeypair::generate()?;
        Ok(IdentityRecord {
            phone: phone.clone(),
            device_id: DeviceId::PRIMARY,
            registered: false,
            account_key: account.public_key(),
            account_secret: Some(
                self.inner
                    .cipher
                    .encrypt(b"account-key", account.to_secret_bytes().as_slice()),
            ),
            device_pickle: self.pickle_device(&device),
            noise_secret: self.inner.cipher.encrypt(b"noise-key", noise.private()),
            device_name: "phone".into(),
        })
    }

    /// Completes registration with the SMS code: the account now exists and this device is its primary.
    pub async fn verify(&self, code: &str) -> Result<()> {
        let identity = match self.inner.store.identity().await? {
            Some(i) if !i.registered => i,
            _ => return Err(ClientError::NoPendingRegistration),
        };
        let code = code.trim();
        if code.len() != natter_proto::limits::CODE_DIGITS
            || !code.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ClientError::InvalidInput(format!(
                "the code has {} digits",
                natter_proto::limits::CODE_DIGITS
            )));
        }
        let secret = identity
            .account_secret
            .as_ref()
            .ok_or(ClientError::NoPendingRegistration)?;
        let secret = self.inner.cipher.decrypt(b"account-key", secret)?;
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
            secret
                .as_slice()
                .try_into()
                .map_err(|_| ClientError::Crypto(natter_crypto::CryptoError::InvalidKey))?,
        );
        let account = AccountKey::from_secret_bytes(&secret)?;
        let mut device = self.device_keys(&identity)?;
        let noise = self.noise_key(&identity)?;
        let mut entry = device_list::new_device_entry(
            &device,
            &identity.phone,
            DeviceId::PRIMARY,
            &identity.account_key,
            noise.public(),
            &identity.device_name,
        );
        device_list::admit_device(&account, &identity.phone, &mut entry)?;
        let content = DeviceListContent {
            phone: identity.phone.as_str().to_owned(),
            version: 1,
            timestamp_ms: crate::now_ms(),
            account_key: identity.account_key.to_vec(),
            devices: vec![entry],
        };
        let signed = device_list::sign_device_list(&account, &content);

        let (conn, _pushes) = self.open_connection(&noise, None).await?;
        match conn
            .request(request::Body::VerifyCode(VerifyCode {
                phone: identity.phone.as_str().to_owned(),
                code: code.to_owned(),
                account_key: identity.account_key.to_vec(),
                device_list: Some(signed.clone()),
            }))
            .await?
        {
            response::Body::Registered(_) => {}
            _ => return Err(unexpected()),
        }
        let mut registered = identity.clone();
        registered.registered = true;
        let changes = Changes {
            identity: Some(registered),
            peers: vec![PeerRecord {
                phone: identity.phone.clone(),
                account_key: identity.account_key,
                device_list: prost::Message::encode_to_vec(&signed),
                device_list_version: 1,
                key_changed_at_ms: None,
            }],
            ..Changes::default()
        };
        self.inner.store.save_changes(changes).await?;
        // The connection is now logged in as the primary: publish prekeys on it.
        let _guard = self.inner.crypto.lock().await;
        self.upload_keys(&conn, &mut device, ONE_TIME_KEYS_TARGET, true)
            .await?;
        Ok(())
    }

    /// Generates and uploads `count` one-time keys (and a fallback key if asked). The private halves are
    /// saved before the upload, so a crash in between loses nothing. Caller holds the crypto lock.
    pub(crate) async fn upload_keys(
        &self,
        conn: &Connection,
        device: &mut DeviceKeys,
        count: usize,
        fallback: bool,
    ) -> Result<()> {
        let mut one_time_keys = device.generate_one_time_keys(count);
        let fallback_key = if fallback {
            Some(device.generate_fallback_key())
        } else {
            device.unpublished_keys().1
        };
        if one_time_keys.is_empty() {
            one_time_keys = device.unpublished_keys().0;
        }
        self.save_device(device).await?;
        conn.request(request::Body::UploadKeys(UploadKeys {
            one_time_keys,
            fallback_key,
        }))
        .await?;
        device.mark_keys_as_published();
        self.save_device(device).await
    }

    pub(crate) async fn save_device(&self, device: &DeviceKeys) -> Result<()> {
        let mut identity = self
            .inner
            .store
            .identity()
            .await?
            .ok_or(ClientError::NotRegistered)?;
        identity.device_pickle = self.pickle_device(device);
        let changes = Changes {
            identity: Some(identity),
            ..Changes::default()
        };
        self.inner.store.save_changes(changes).await?;
        Ok(())
    }

    /// Connects and logs in, then keeps the connection up (reconnecting with backoff) until
    /// [`Client::disconnect`] or the device is removed. Returns once the first login succeeded.
    pub async fn connect(&self) -> Result<()> {
        let (conn, pushes) = self.login().await?;
        let client = self.background();
        let task = tokio::spawn(async move { client.supervise(conn, pushes).await });
        if let Some(old) = self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
        Ok(())
    }

    async fn login(
        &self,
    ) -> Result<(
        Arc<Connection>,
        tokio::sync::mpsc::UnboundedReceiver<natter_proto::wire::Push>,
    )> {
        let identity = self.registered_identity().await?;
        let noise = self.noise_key(&identity)?;
        let login = Login {
            phone: identity.phone.as_str().to_owned(),
            device_id: identity.device_id.get(),
        };
        let (conn, pushes) = match self.open_connection(&noise, Some(login)).await {
            Ok(c) => c,
            Err(ClientError::DeviceRemoved(reason)) => {
                if identity.device_id != DeviceId::PRIMARY {
                    self.forget_everything().await?;
                }
                return Err(ClientError::DeviceRemoved(reason));
            }
            Err(e) => return Err(e),
        };
        let conn = Arc::new(conn);
        self.inner.conn.send_replace(Some(conn.clone()));
        self.emit(Event::Connected);
        self.spawn_app_state_sync(None);
        self.spawn_history_jobs();
        {
            // Read receipts follow the account's privacy settings, which another device may change.
            let client = self.background();
            self.spawn_task(async move {
                if let Err(e) = client.privacy().await {
                    tracing::debug!(error = %e, "privacy settings not refreshed");
                }
            });
        }
        if identity.device_id == DeviceId::PRIMARY {
            // Companions may have left (or been logged out) while the phone was away.
            let client = self.background();
            self.spawn_task(async move {
                if let Err(e) = client.reconcile_own_list().await {
                    tracing::debug!(error = %e, "device list reconciliation failed");
                }
            });
        }
        Ok((conn, pushes))
    }

    async fn supervise(
        self,
        mut conn: Arc<Connection>,
        mut pushes: tokio::sync::mpsc::UnboundedReceiver<natter_proto::wire::Push>,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let flusher = self.spawn_outbox_flush();
            let removed = self.process_pushes(&conn, &mut pushes).await;
            flusher.abort();
            self.inner.conn.send_replace(None);
            drop(conn);
            if let Some(reason) = removed {
                self.device_removed(reason).await;
                return;
            }
            self.emit(Event::Disconnected);
            // The node may be gone: start with the next one (it comes back in turn if it was a blip).
            self.inner
                .next_server
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                match self.login().await {
                    Ok((c, p)) => {
                        conn = c;
                        pushes = p;
                        backoff = Duration::from_millis(200);
                        break;
                    }
                    Err(ClientError::DeviceRemoved(reason)) => {
                        self.device_removed(reason).await;
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "reconnect failed"),
                }
            }
        }
    }

    /// This device no longer belongs to its account: a companion forgets everything it knew.
    async fn device_removed(&self, reason: String) {
        if let Ok(me) = self.registered_identity().await
            && me.device_id != DeviceId::PRIMARY
            && let Err(e) = self.forget_everything().await
        {
            tracing::warn!(error = %e, "could not wipe the removed device");
        }
        self.emit(Event::DeviceRemoved(reason));
    }

    /// Closes the connection and stops reconnecting.
    pub async fn disconnect(&self) {
        self.inner.abort_background();
        self.inner.conn.send_replace(None);
    }

    /// Closes the connection, stops every background task and waits until they have stopped: after
    /// this returns nothing of this client runs any more (an interrupted job, such as a history import,
    /// resumes at the next login), and once every other handle is dropped too the home is free for
    /// [`Client::open`] at once.
    pub async fn close(self) {
        if let Some(supervisor) = self.inner.abort_background() {
            let _ = supervisor.await;
        }
        // A task stopping may have started another: repeat until none is left.
        loop {
            let mut tasks =
                std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
            if tasks.is_empty() {
                break;
            }
            tasks.shutdown().await;
        }
        self.inner.conn.send_replace(None);
    }

    /// Runs `task` in the background as part of this client: [`Client::disconnect`], [`Client::close`]
    /// and dropping the last caller-held handle abort it. Returns its abort handle.
    pub(crate) fn spawn_task(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::AbortHandle {
        let mut set = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {}
        set.spawn(task)
    }

    /// Flushes the outbox in the background (see [`Client::spawn_task`]); returns the abort handle.
    pub(crate) fn spawn_outbox_flush(&self) -> tokio::task::AbortHandle {
        let client = self.background();
        self.spawn_task(async move {
            if let Err(e) = client.flush_outbox().await {
                tracing::debug!(error = %e, "outbox flush stopped");
            }
        })
    }

    /// The current connection, waiting up to `wait` for one.
    pub(crate) async fn connection(&self, wait: Duration) -> Result<Arc<Connection>> {
        let mut rx = self.inner.conn.subscribe();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(c) = rx.borrow_and_update().clone()
                    && c.is_open()
                {
                    return Some(c);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match found {
            Ok(Some(c)) => Ok(c),
            _ => Err(ClientError::Disconnected),
        }
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner
            .conn
            .borrow()
            .as_ref()
            .is_some_and(|c| c.is_open())
    }

    /// A conversation, oldest first.
    pub async fn history(&self, peer: &PhoneNumber) -> Result<Vec<MessageRecord>> {
        Ok(self.inner.store.history(peer).await?)
    }

    /// One message.
    pub async fn message(
        &self,
        chat: &PhoneNumber,
        id: &MessageId,
    ) -> Result<Option<MessageRecord>> {
        Ok(self.inner.store.message(chat, id).await?)
    }
}

pub(crate) fn unexpected() -> ClientError {
    ClientError::Protocol(natter_proto::ProtoError::Unexpected("response kind"))
}

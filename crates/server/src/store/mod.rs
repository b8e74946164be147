//! Durable server state behind one trait, [`Store`], with its backends beside it: [`memory`] (reference
//! implementation, tests), [`sqlite`] (the embedded default: one file, WAL, group commit) and `postgres`
//! (clusters: several nodes on one database; cargo feature `postgres`, on by default). [`open_store`]
//! opens the one a [`StoreUrl`] names; `tests` is the conformance suite every backend runs.
//!
//! The store holds only ciphertext, public keys and routing metadata: message plaintext never reaches it.

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};

pub use crate::config::StoreUrl;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The account does not exist.
    #[error("no such account")]
    NoSuchAccount,
    /// The device does not exist.
    #[error("no such device")]
    NoSuchDevice,
    /// A conditional write lost: the stored device list is already at this version or newer.
    #[error("the stored device list is newer")]
    Conflict,
    /// The blob does not exist (never created, or expired and deleted).
    #[error("no such blob")]
    NoSuchBlob,
    /// An app-state push was based on an old version: the collection is at `current`.
    #[error("the app-state collection is at version {current}")]
    AppStateConflict {
        /// The collection's current version.
        current: u64,
    },
    /// The group does not exist (never created, or every member left).
    #[error("no such group")]
    NoSuchGroup,
    /// A stored row does not decode; the database was altered outside natterd.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, disk full, connection lost). Retryable from the client's side.
    #[error("storage backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database server cannot be reached or is restarting (connection refused or lost, no free
    /// connection in time). Nothing was written; retry later: the store reconnects by itself.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The file name of the SQLite database in the data directory.
pub const SQLITE_FILE: &str = "natter.db";

/// The build has no PostgreSQL backend (cargo feature `postgres` off).
#[cfg(not(feature = "postgres"))]
#[derive(Debug, thiserror::Error)]
#[error("this natterd was built without the postgres feature")]
struct NoPostgres;

/// Opens (creating and migrating as needed) the store `url` names; `data_dir` holds the SQLite file when
/// `url` is [`StoreUrl::DataDir`].
pub async fn open_store(url: &StoreUrl, data_dir: &Path) -> StoreResult<Arc<dyn Store>> {
    Ok(match url {
        StoreUrl::DataDir => {
            Arc::new(sqlite::SqliteStore::open(&data_dir.join(SQLITE_FILE)).await?)
        }
        StoreUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path).await?),
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(url) => Arc::new(postgres::PgStore::open(url).await?),
        #[cfg(not(feature = "postgres"))]
        StoreUrl::Postgres(_) => return Err(StoreError::Backend(Box::new(NoPostgres))),
    })
}

/// Applies the pending schema migrations of the store `url` names and returns its schema version
/// (`natterd migrate`). Running it again is a no-op.
pub async fn migrate_store(url: &StoreUrl, data_dir: &Path) -> StoreResult<i64> {
    match url {
        StoreUrl::DataDir => {
            sqlite::SqliteStore::open(&data_dir.join(SQLITE_FILE))
                .await?
                .schema_version()
                .await
        }
        StoreUrl::Sqlite(path) => {
            sqlite::SqliteStore::open(path)
                .await?
                .schema_version()
                .await
        }
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(url) => postgres::migrate(url).await,
        #[cfg(not(feature = "postgres"))]
        StoreUrl::Postgres(_) => Err(StoreError::Backend(Box::new(NoPostgres))),
    }
}

/// An app-state collection after a version, as [`Store::fetch_app_state`] returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppStateFetch {
    /// The collection's current version (0: never pushed).
    pub version: u64,
    /// The newest snapshot, if it is past the requested version: its version and encoded bytes.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// The patches after the snapshot (or after the requested version), in version order.
    pub patches: Vec<(u64, Vec<u8>)>,
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// A pending registration code. Only a hash of the code is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeRecord {
    /// The number.
    pub phone: PhoneNumber,
    /// SHA-256 of the code (salted with the number).
    pub code_hash: [u8; 32],
    /// When it was sent (ms since epoch).
    pub sent_at_ms: u64,
    /// When it expires (ms since epoch).
    pub expires_at_ms: u64,
    /// Wrong guesses so far.
    pub attempts: u32,
}

/// An account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRecord {
    /// Its number.
    pub phone: PhoneNumber,
    /// Ed25519 account identity key.
    pub account_key: [u8; 32],
    /// Encoded `SignedDeviceList` (as the client uploaded it; the server cannot produce one).
    pub device_list: Vec<u8>,
    /// The device list's version.
    pub device_list_version: u64,
    /// When the account was created (ms since epoch).
    pub created_at_ms: u64,
}

/// A device of an account, as the server needs it for login and routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Its account.
    pub phone: PhoneNumber,
    /// Its id.
    pub device_id: DeviceId,
    /// Noise static public key: the login credential.
    pub noise_key: [u8; 32],
    /// Ed25519 device key, used to check prekey signatures on upload.
    pub identity_ed: [u8; 32],
    /// Last time it connected (ms since epoch).
    pub last_seen_ms: u64,
}

/// A signed one-time or fallback key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreKeyRecord {
    /// vodozemac key id.
    pub key_id: String,
    /// Curve25519 public key.
    pub key: [u8; 32],
    /// Device signature.
    pub signature: Vec<u8>,
}

/// A claimed prekey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedPreKey {
    /// The key.
    pub prekey: PreKeyRecord,
    /// True if the one-time keys had run out and this is the fallback key.
    pub fallback: bool,
    /// One-time keys left for the device after this claim.
    pub remaining: u32,
}

/// An envelope to queue for one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEnvelope {
    /// Recipient account.
    pub phone: PhoneNumber,
    /// Recipient device.
    pub device_id: DeviceId,
    /// Olm message type (0 pre-key, 1 normal).
    pub olm_type: u32,
    /// Ciphertext.
    pub ciphertext: Vec<u8>,
}

/// Marks a resend that answers a decryption-retry request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryInfo {
    /// Transport id of the envelope that failed to decrypt.
    pub of: MessageId,
    /// Which attempt this is (1..).
    pub attempt: u32,
}

/// One message from one device, fanned out to several devices. Stored atomically: all or nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// Sending account.
    pub sender: PhoneNumber,
    /// Sending device.
    pub sender_device: DeviceId,
    /// The sender's id for the message (idempotency key together with sender and device).
    pub message_id: MessageId,
    /// Server time of acceptance (ms since epoch).
    pub server_ts_ms: u64,
    /// When the envelopes expire if nobody acknowledges them (ms since epoch).
    pub expires_at_ms: u64,
    /// One envelope per recipient device.
    pub envelopes: Vec<NewEnvelope>,
    /// Set for a resend.
    pub retry: Option<RetryInfo>,
}

/// What happened to a [`NewMessage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored: one envelope per recipient device, in the order given, with their queue ids.
    Stored(Vec<QueuedEnvelope>),
    /// A message with this (sender, sender device, message id) was accepted before; nothing stored.
    Duplicate {
        /// Server time of the first acceptance.
        server_ts_ms: u64,
    },
}

/// An envelope waiting in a device's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedEnvelope {
    /// Queue id: grows with every envelope the store accepts, across all devices.
    pub seq: u64,
    /// Recipient account.
    pub phone: PhoneNumber,
    /// Recipient device.
    pub device_id: DeviceId,
    /// Sending account.
    pub sender: PhoneNumber,
    /// Sending device.
    pub sender_device: DeviceId,
    /// Sender's message id.
    pub message_id: MessageId,
    /// Server time of acceptance.
    pub server_ts_ms: u64,
    /// Olm message type.
    pub olm_type: u32,
    /// Ciphertext.
    pub ciphertext: Vec<u8>,
    /// Set for a resend.
    pub retry: Option<RetryInfo>,
}

/// A new signed device list with the device records it adds and the devices it drops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceListUpdate {
    /// Encoded `SignedDeviceList`.
    pub device_list: Vec<u8>,
    /// Its version; must be higher than the stored one.
    pub version: u64,
    /// Devices to add.
    pub added: Vec<DeviceRecord>,
    /// Devices to remove, with their keys and queued envelopes.
    pub removed: Vec<DeviceId>,
}

/// A new account replacing whatever had the same number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAccount {
    /// The account.
    pub account: AccountRecord,
    /// Its first device, the primary.
    pub primary: DeviceRecord,
}

/// A media blob's record: the ciphertext itself lives in the blob store (or, while it is uploaded, in a
/// staging file); the server never learns its key or plaintext digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    /// 32 lowercase hex digits (16 random bytes).
    pub id: String,
    /// The account that uploads it.
    pub owner: PhoneNumber,
    /// Declared size in bytes.
    pub size: u64,
    /// Bytes received so far (`size` once complete).
    pub offset: u64,
    /// True once every byte is in the blob store.
    pub complete: bool,
    /// When it was created (ms since epoch).
    pub created_at_ms: u64,
    /// When it is deleted unless re-referenced (ms since epoch).
    pub expires_at_ms: u64,
}

/// A group's settings as stored (its members are in [`GroupState::members`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRecord {
    /// Its id.
    pub id: GroupId,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Grows by one with every change (membership, admins, settings); 1 at creation.
    pub version: u64,
    /// Whether every member, not only admins, may change the name, description and membership.
    pub all_members_may_edit: bool,
    /// When it was created (ms since epoch).
    pub created_at_ms: u64,
}

/// One member of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMemberRecord {
    /// The member account.
    pub phone: PhoneNumber,
    /// Whether it is an admin.
    pub admin: bool,
    /// The group version that added it.
    pub added_at_version: u64,
}

/// A group with its members, ordered by number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    /// Settings and version.
    pub group: GroupRecord,
    /// Members, ordered by number.
    pub members: Vec<GroupMemberRecord>,
}

/// What a group write stored: the announcement's envelopes, to route to online devices.
pub type GroupWritten = Vec<QueuedEnvelope>;

/// Everything natterd keeps durably. Implementations must make every `&self` method safe to call from many
/// tasks at once, and must not return from a write before it is durable: a message is acknowledged to its
/// sender as soon as [`Store::enqueue`] returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- registration codes ----

    /// Stores (or replaces) the pending code for a number.
    async fn save_code(&self, code: &CodeRecord) -> StoreResult<()>;
    /// The pending code for a number.
    async fn get_code(&self, phone: &PhoneNumber) -> StoreResult<Option<CodeRecord>>;
    /// Counts one wrong guess; returns the new count.
    async fn add_code_attempt(&self, phone: &PhoneNumber) -> StoreResult<u32>;
    /// Removes the pending code (used or burnt).
    async fn remove_code(&self, phone: &PhoneNumber) -> StoreResult<()>;

    // ---- accounts and devices ----

    /// Creates an account with its primary device, atomically replacing an existing account with the
    /// same number: its devices, their keys and their queued envelopes are deleted. Returns the ids of the
    /// devices that were removed (empty if the number was new).
    async fn create_account(&self, new: &NewAccount) -> StoreResult<Vec<DeviceId>>;
    /// An account by number.
    async fn get_account(&self, phone: &PhoneNumber) -> StoreResult<Option<AccountRecord>>;
    /// A device.
    async fn get_device(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Option<DeviceRecord>>;
    /// All devices of an account, ordered by id.
    async fn list_devices(&self, phone: &PhoneNumber) -> StoreResult<Vec<DeviceRecord>>;
    /// Replaces the account's device list if `update.version` is higher than the stored version
    /// ([`StoreError::Conflict`] otherwise), adding and removing devices in the same transaction.
    async fn update_devices(
        &self,
        phone: &PhoneNumber,
        update: &DeviceListUpdate,
    ) -> StoreResult<()>;
    /// Removes one device with its keys and queued envelopes (the signed list is left as it is).
    async fn remove_device(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<()>;
    /// Companions of accounts whose primary last connected before `cutoff_ms`, at most `limit`.
    async fn stale_companions(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<(PhoneNumber, DeviceId)>>;
    /// Records that a device connected.
    async fn touch_device(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        now_ms: u64,
    ) -> StoreResult<()>;

    // ---- prekeys ----

    /// Adds one-time keys for a device (a key id already stored is ignored); returns how many unclaimed
    /// one-time keys the device now has.
    async fn add_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        keys: &[PreKeyRecord],
    ) -> StoreResult<u32>;
    /// Replaces the device's fallback key.
    async fn set_fallback_key(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        key: &PreKeyRecord,
    ) -> StoreResult<()>;
    /// Unclaimed one-time keys of a device.
    async fn count_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<u32>;
    /// Claims (removes and returns) one one-time key of the device, oldest first, or its fallback key
    /// (not removed) when none is left. `None` if the device has neither.
    async fn claim_prekey(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Option<ClaimedPreKey>>;

    // ---- delivery ----

    /// Stores a message's envelopes durably, or reports a duplicate of an earlier (sender, device, id).
    async fn enqueue(&self, msg: NewMessage) -> StoreResult<EnqueueOutcome>;
    /// Envelopes queued for a device with `seq > after_seq`, oldest first, at most `limit`.
    async fn load_queue(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<QueuedEnvelope>>;
    /// Bytes of ciphertext queued for a device (0 for an unknown device).
    async fn queued_bytes(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<u64>;
    /// Deletes acknowledged envelopes. Ids that are not (or no longer) in this device's queue are ignored,
    /// so a device can never delete another device's mail.
    async fn ack(&self, phone: &PhoneNumber, device_id: DeviceId, seqs: &[u64]) -> StoreResult<()>;
    /// Deletes envelopes and idempotency records past their expiry; returns how many envelopes went.
    async fn expire(&self, now_ms: u64) -> StoreResult<u64>;

    // ---- media blobs ----

    /// Creates a blob record unless the owner's unexpired blobs (`expires_at_ms > now_ms`) plus this one
    /// would exceed `quota_bytes`; returns false (and stores nothing) in that case. An id already in use
    /// is a [`StoreError::Conflict`].
    async fn create_blob(
        &self,
        blob: &BlobRecord,
        quota_bytes: u64,
        now_ms: u64,
    ) -> StoreResult<bool>;
    /// A blob record.
    async fn get_blob(&self, id: &str) -> StoreResult<Option<BlobRecord>>;
    /// Records how many bytes of an incomplete blob were received ([`StoreError::NoSuchBlob`] if none).
    async fn set_blob_offset(&self, id: &str, offset: u64) -> StoreResult<()>;
    /// Marks a blob complete (its offset becomes its size).
    async fn complete_blob(&self, id: &str) -> StoreResult<()>;
    /// Moves a blob's expiry to `expires_at_ms` if that is later than the stored one.
    async fn extend_blob(&self, id: &str, expires_at_ms: u64) -> StoreResult<()>;
    /// Sum of the sizes of the account's unexpired blobs (`expires_at_ms > now_ms`).
    async fn blob_usage(&self, owner: &PhoneNumber, now_ms: u64) -> StoreResult<u64>;
    /// Deletes up to `limit` blob records with `expires_at_ms <= now_ms` and returns their ids, so the
    /// caller can delete their bytes.
    async fn delete_expired_blobs(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<String>>;

    // ---- app-state sync ----

    /// Appends an (opaque, encoded) patch to an account's collection at `base_version + 1` if the
    /// collection is at `base_version` (a collection never pushed is at 0), else
    /// [`StoreError::AppStateConflict`]. With `snapshot`, also records a snapshot at the new version: it
    /// replaces the previous one, and the patches up to the previous snapshot are deleted. Returns the
    /// new version.
    async fn push_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        base_version: u64,
        patch: &[u8],
        snapshot: Option<&[u8]>,
    ) -> StoreResult<u64>;
    /// The collection after `after_version`: the newest snapshot if it is past `after_version`, then at
    /// most `max_patches` patches after it (or after `after_version`), in version order.
    async fn fetch_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        after_version: u64,
        max_patches: usize,
    ) -> StoreResult<AppStateFetch>;

    // ---- contacts, profiles, privacy, blocking ----

    /// Which of `numbers` have an account (each at most once, in any order). Reads only: nothing about
    /// the other numbers is written anywhere.
    async fn registered_among(&self, numbers: &[PhoneNumber]) -> StoreResult<Vec<PhoneNumber>>;
    /// Adds accounts to `owner`'s contacts (the caller passes registered numbers only).
    async fn add_contacts(&self, owner: &PhoneNumber, contacts: &[PhoneNumber]) -> StoreResult<()>;
    /// Removes numbers from `owner`'s contacts (absent ones are ignored).
    async fn remove_contacts(
        &self,
        owner: &PhoneNumber,
        contacts: &[PhoneNumber],
    ) -> StoreResult<()>;
    /// Whether `other` is in `owner`'s contacts.
    async fn is_contact(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool>;
    /// Replaces `owner`'s encrypted profile.
    async fn set_profile(
        &self,
        owner: &PhoneNumber,
        ciphertext: &[u8],
        now_ms: u64,
    ) -> StoreResult<()>;
    /// `owner`'s encrypted profile and when it was stored, if it set one.
    async fn get_profile(&self, owner: &PhoneNumber) -> StoreResult<Option<(Vec<u8>, u64)>>;
    /// Replaces `owner`'s privacy settings.
    async fn set_privacy(&self, owner: &PhoneNumber, privacy: PrivacyRecord) -> StoreResult<()>;
    /// `owner`'s privacy settings (the defaults if never set).
    async fn get_privacy(&self, owner: &PhoneNumber) -> StoreResult<PrivacyRecord>;
    /// Blocks (`true`) or unblocks `other` for `owner`.
    async fn set_blocked(
        &self,
        owner: &PhoneNumber,
        other: &PhoneNumber,
        blocked: bool,
    ) -> StoreResult<()>;
    /// Whether `owner` blocked `other`.
    async fn is_blocked(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool>;
    /// Everyone `owner` blocked, by number.
    async fn blocked(&self, owner: &PhoneNumber) -> StoreResult<Vec<PhoneNumber>>;

    // ---- groups ----

    /// Creates a group with its members and stores the announcement of its creation (one envelope per
    /// member device, as [`Store::enqueue`] would) in the same transaction. An id already in use is a
    /// [`StoreError::Conflict`]; a missing announcement recipient is [`StoreError::NoSuchDevice`].
    async fn create_group(
        &self,
        state: &GroupState,
        announcement: NewMessage,
    ) -> StoreResult<GroupWritten>;
    /// A group with its members.
    async fn get_group(&self, id: &GroupId) -> StoreResult<Option<GroupState>>;
    /// Replaces a group's settings and members with `state` if the stored version is still
    /// `expected_version` ([`StoreError::Conflict`] otherwise, [`StoreError::NoSuchGroup`] if there is no
    /// such group), and stores the change's announcement in the same transaction. With no members left,
    /// the group is deleted.
    async fn update_group(
        &self,
        expected_version: u64,
        state: &GroupState,
        announcement: NewMessage,
    ) -> StoreResult<GroupWritten>;
    /// Every device of every member of a group, ordered by number then device id (one read for a
    /// fan-out). Empty for an unknown group.
    async fn group_devices(&self, id: &GroupId) -> StoreResult<Vec<(PhoneNumber, DeviceId)>>;
    /// The groups an account is a member of, ordered by id.
    async fn groups_of(&self, phone: &PhoneNumber) -> StoreResult<Vec<GroupId>>;
    /// The members of a group who blocked `sender`, ordered by number (one read per group send: they
    /// get nothing from `sender`).
    async fn group_blockers(
        &self,
        id: &GroupId,
        sender: &PhoneNumber,
    ) -> StoreResult<Vec<PhoneNumber>>;

    // ---- shutdown ----

    /// Finishes the writes already handed over, then closes every database connection; anything asked
    /// afterwards fails. The server calls it last when it shuts down, so that the database is closed
    /// cleanly (SQLite checkpoints and removes its write-ahead log) before the process goes on.
    async fn close(&self);
}

/// An account's privacy settings as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrivacyRecord {
    /// Who sees online and last seen.
    pub last_seen: natter_proto::social::Visibility,
    /// Read receipts neither sent nor shown (kept for the account's devices).
    pub read_receipts_off: bool,
}

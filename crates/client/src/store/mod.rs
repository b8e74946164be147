//! The client's durable state behind one trait, [`ClientStore`]: a narrow set of reads plus one atomic
//! write, [`ClientStore::save_changes`], so that everything one step of the protocol changes (a session
//! ratchet, the message it decrypted, the envelope marked processed) lands together or not at all.
//! Backends: [`memory`] (reference, tests) and [`sqlite`] (default: one file in the client's home).
//! The store keeps bytes as given: secrets arrive already encrypted ([`natter_crypto::StoreCipher`],
//! vodozemac pickles), so a backend never sees a private key in the clear.

pub mod memory;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use async_trait::async_trait;
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use serde::{Deserialize, Serialize};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A stored row does not decode.
    #[error("corrupt local database: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, disk full).
    #[error("local database: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// This device's identity. Written at `register`, completed at `verify`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityRecord {
    /// The account's number.
    pub phone: PhoneNumber,
    /// This device's id (1 on the primary).
    pub device_id: DeviceId,
    /// Whether the server has confirmed the registration.
    pub registered: bool,
    /// The account's Ed25519 public key.
    pub account_key: [u8; 32],
    /// The account's secret key, encrypted with the store cipher (only on the primary).
    pub account_secret: Option<Vec<u8>>,
    /// The device's Olm account, as an encrypted vodozemac pickle.
    pub device_pickle: String,
    /// The device's Noise private key, encrypted with the store cipher.
    pub noise_secret: Vec<u8>,
    /// The device's name on its account's list.
    pub device_name: String,
}

/// An Olm session with one device of a peer (or of our own account).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The peer account.
    pub phone: PhoneNumber,
    /// The peer device.
    pub device_id: DeviceId,
    /// vodozemac's session id.
    pub session_id: String,
    /// Encrypted vodozemac pickle.
    pub pickle: String,
    /// Last time it encrypted or decrypted (ms since epoch); the newest is used for sending.
    pub last_used_ms: u64,
}

/// What we know and trust about another account (or our own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    /// The account.
    pub phone: PhoneNumber,
    /// The account key we trust for it.
    pub account_key: [u8; 32],
    /// The last verified device list (encoded `SignedDeviceList`).
    pub device_list: Vec<u8>,
    /// Its version; a lower one is refused.
    pub device_list_version: u64,
    /// When the account key last changed (re-registration), if it ever did.
    pub key_changed_at_ms: Option<u64>,
}

/// What kind of entry a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// A text message.
    Text,
    /// A message that could not be decrypted even after every retry.
    Undecryptable,
    /// A notice from the client itself (e.g. "the safety number changed").
    Notice,
    /// A photo, video, voice note or file ([`MessageRecord::media`] says which).
    Media,
}

/// A media message's details as stored: the [`natter_proto::content::Media`] content, except that its
/// `key` field holds the media key encrypted with the client's [`natter_crypto::StoreCipher`] (see
/// `Client::media_key`), never the key itself.
#[derive(Clone, Debug, PartialEq)]
pub struct MediaRecord(pub Box<natter_proto::content::Media>);

// `Media` holds no floating-point values, so its equality is an equivalence.
impl Eq for MediaRecord {}

/// An upload in progress, kept so that an interrupted `send_file` of the same file to the same peer
/// resumes where the server's copy ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadRecord {
    /// The conversation.
    pub peer: PhoneNumber,
    /// The file's absolute path.
    pub path: String,
    /// Its size in bytes when the upload started.
    pub size: u64,
    /// Its modification time (ms since epoch) when the upload started.
    pub mtime_ms: u64,
    /// The blob reserved on the server.
    pub blob_id: String,
    /// The media key, encrypted with the store cipher.
    pub sealed_key: Vec<u8>,
    /// The media kind (`natter_proto::content::MediaKind` as i32).
    pub kind: i32,
    /// The caption to send with it.
    pub caption: String,
    /// When the upload started (ms since epoch).
    pub created_ms: u64,
}

/// Delivery state of a message. Only moves forward (except to `Failed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Outgoing, not yet acknowledged by the server.
    Pending,
    /// Outgoing, durably stored by the server.
    Sent,
    /// Outgoing, decrypted by a device of the peer.
    Delivered,
    /// Outgoing, seen by the peer.
    Read,
    /// Incoming.
    Received,
    /// Outgoing, refused for good (e.g. the peer is not on Natter).
    Failed,
}

/// One entry of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRecord {
    /// The conversation: the peer account.
    pub chat: PhoneNumber,
    /// The logical message id.
    pub id: MessageId,
    /// Sent by this account (from this or another of its devices).
    pub from_me: bool,
    /// The device that sent it.
    pub sender_device: DeviceId,
    /// What it is.
    pub kind: MessageKind,
    /// Its text (empty for undecryptable entries).
    pub text: String,
    /// Sender's clock at sending (ms since epoch).
    pub sent_at_ms: u64,
    /// Server's clock at acceptance (ms since epoch; 0 while pending).
    pub server_ts_ms: u64,
    /// Delivery state.
    pub status: MessageStatus,
    /// Whether a `recv` has printed it.
    pub shown: bool,
    /// Insertion order, assigned by the store (ignored on insert).
    pub seq: i64,
    /// For [`MessageKind::Media`]: the media's details.
    pub media: Option<MediaRecord>,
}

impl MessageRecord {
    /// Where the message sits in its conversation: the server's time, or while it has none (pending)
    /// the sender's.
    pub fn conversation_ms(&self) -> u64 {
        if self.server_ts_ms > 0 {
            self.server_ts_ms
        } else {
            self.sent_at_ms
        }
    }
}

/// One conversation of the chat list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatSummary {
    /// The peer account.
    pub chat: PhoneNumber,
    /// Messages held.
    pub messages: u64,
    /// The newest message's conversation time (ms since epoch).
    pub last_ms: u64,
}

/// Whether an outbox entry still has to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxState {
    /// Waiting for the server's acknowledgement.
    Queued,
    /// Acknowledged; kept so that a retry request can be answered.
    Sent,
}

/// A message to send (or sent), as the plaintext `Content` to encrypt per device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRecord {
    /// The envelope (transport) id; a resend gets its own.
    pub transport_id: MessageId,
    /// The logical message id inside the content.
    pub logical_id: MessageId,
    /// The conversation.
    pub peer: PhoneNumber,
    /// Encoded `Content`.
    pub content: Vec<u8>,
    /// For a resend: the only device to send to.
    pub only_device: Option<(PhoneNumber, DeviceId)>,
    /// For a resend: the failed envelope's transport id.
    pub retry_of: Option<MessageId>,
    /// For a resend: its attempt number.
    pub retry_attempt: u32,
    /// When it was queued (ms since epoch).
    pub created_ms: u64,
    /// Queued or sent.
    pub state: OutboxState,
}

/// An envelope we could not decrypt, while we ask its sender to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureRecord {
    /// Sending account.
    pub sender: PhoneNumber,
    /// Sending device.
    pub sender_device: DeviceId,
    /// Transport id of the first envelope that failed.
    pub original_id: MessageId,
    /// Retry requests sent so far.
    pub attempts: u32,
    /// Server time of the failed envelope.
    pub server_ts_ms: u64,
}

/// A status change for one of our messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    /// The conversation.
    pub chat: PhoneNumber,
    /// The message.
    pub id: MessageId,
    /// The new status; applied only if it moves the message forward.
    pub status: MessageStatus,
    /// Server time to record, if known (non-zero).
    pub server_ts_ms: u64,
}

/// Everything one step changes, saved in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Deletes everything the device knows (identity, sessions, peers, messages, outbox, processed
    /// envelopes, failures, uploads, account values; settings stay) before the rest is applied: the
    /// device was unlinked.
    pub wipe: bool,
    /// Replaces the identity.
    pub identity: Option<IdentityRecord>,
    /// Sets (`Some`) or deletes (`None`) small settings: the device's configuration (server address,
    /// pinned server key), which survives a wipe.
    pub settings: Vec<(String, Option<Vec<u8>>)>,
    /// Sets (`Some`) or deletes (`None`) small account-scoped values (app-state keys and collections,
    /// pending background jobs), which a wipe deletes.
    pub values: Vec<(String, Option<Vec<u8>>)>,
    /// Inserts or replaces sessions (by phone, device, session id).
    pub sessions: Vec<SessionRecord>,
    /// Deletes every session with these devices (their keys changed).
    pub sessions_removed: Vec<(PhoneNumber, DeviceId)>,
    /// Inserts or replaces peers.
    pub peers: Vec<PeerRecord>,
    /// Inserts messages; one whose (chat, id) exists is left as it is.
    pub messages: Vec<MessageRecord>,
    /// Moves messages forward.
    pub statuses: Vec<StatusUpdate>,
    /// Marks messages as printed by `recv`.
    pub shown: Vec<(PhoneNumber, MessageId)>,
    /// Inserts or replaces outbox entries (by transport id).
    pub outbox: Vec<OutboxRecord>,
    /// Marks outbox entries sent.
    pub outbox_sent: Vec<MessageId>,
    /// Records envelopes as processed (sender, transport id), so a redelivery is only acknowledged.
    pub processed: Vec<(PhoneNumber, MessageId)>,
    /// Inserts or replaces decryption failures (by sender, original id).
    pub failures: Vec<FailureRecord>,
    /// Removes decryption failures (sender, original id).
    pub failures_cleared: Vec<(PhoneNumber, MessageId)>,
    /// Inserts or replaces uploads in progress (by peer and path).
    pub uploads: Vec<UploadRecord>,
    /// Removes uploads in progress (peer, path).
    pub uploads_done: Vec<(PhoneNumber, String)>,
}

impl Changes {
    /// Whether there is nothing to save.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// Everything a client keeps durably.
#[async_trait]
pub trait ClientStore: Send + Sync + 'static {
    /// Saves all changes atomically.
    async fn save_changes(&self, changes: Changes) -> StoreResult<()>;

    /// This device's identity.
    async fn identity(&self) -> StoreResult<Option<IdentityRecord>>;
    /// A small setting.
    async fn setting(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Sessions with a device, most recently used first.
    async fn sessions(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Vec<SessionRecord>>;
    /// A peer.
    async fn peer(&self, phone: &PhoneNumber) -> StoreResult<Option<PeerRecord>>;
    /// Whether an envelope was processed.
    async fn is_processed(
        &self,
        sender: &PhoneNumber,
        transport_id: &MessageId,
    ) -> StoreResult<bool>;
    /// One message.
    async fn message(
        &self,
        chat: &PhoneNumber,
        id: &MessageId,
    ) -> StoreResult<Option<MessageRecord>>;
    /// An account-scoped value (see [`Changes::values`]).
    async fn value(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Every account-scoped value whose key starts with `prefix`, by key.
    async fn values_with_prefix(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>>;
    /// A conversation, oldest first by conversation time ([`MessageRecord::conversation_ms`]), then by
    /// insertion order: history imported later still shows before the newer messages.
    async fn history(&self, chat: &PhoneNumber) -> StoreResult<Vec<MessageRecord>>;
    /// Every conversation that holds a message, most recent first (then by number).
    async fn chats(&self) -> StoreResult<Vec<ChatSummary>>;
    /// How many incoming text and media messages of a conversation are not yet shown and have a server
    /// time after `after_ms` (unread counts, against the synced read marker).
    async fn unread_after(&self, chat: &PhoneNumber, after_ms: u64) -> StoreResult<u64>;
    /// Messages with `shown == false`, oldest first (the client inserts what this device sent as shown).
    async fn unshown(&self) -> StoreResult<Vec<MessageRecord>>;
    /// Outbox entries still queued, oldest first.
    async fn queued_outbox(&self) -> StoreResult<Vec<OutboxRecord>>;
    /// One outbox entry by transport id.
    async fn outbox_entry(&self, transport_id: &MessageId) -> StoreResult<Option<OutboxRecord>>;
    /// A decryption failure.
    async fn failure(
        &self,
        sender: &PhoneNumber,
        original_id: &MessageId,
    ) -> StoreResult<Option<FailureRecord>>;
    /// Every message with this id, in any conversation, by insertion order.
    async fn messages_with_id(&self, id: &MessageId) -> StoreResult<Vec<MessageRecord>>;
    /// The upload in progress of a file to a peer.
    async fn upload(&self, peer: &PhoneNumber, path: &str) -> StoreResult<Option<UploadRecord>>;
    /// Messages of one conversation (or of all, `None`) with `since_ms <= server_ts_ms < before_ms`,
    /// newest first (by server time, then insertion order), at most `limit` (history sync).
    async fn messages_page(
        &self,
        chat: Option<&PhoneNumber>,
        since_ms: u64,
        before_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<MessageRecord>>;
}

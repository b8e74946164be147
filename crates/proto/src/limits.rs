//! Every limit of the protocol, in one place. Both sides enforce each one and report a violation as a
//! typed error; nothing is allocated for input before the limit that bounds it has been checked.

use std::time::Duration;

/// Largest Noise message (handshake or transport record), fixed by the Noise specification.
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// Authentication tag added to every Noise transport record.
pub const NOISE_TAG_LEN: usize = 16;
/// Largest plaintext that fits in one Noise transport record.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_NOISE_MESSAGE - NOISE_TAG_LEN;
/// Largest encoded [`crate::wire::Frame`]. A frame larger than one record is split across records.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Largest handshake payload either side accepts.
pub const MAX_HANDSHAKE_PAYLOAD: usize = 1024;

/// Devices per account: one primary plus companions.
pub const MAX_DEVICES_PER_ACCOUNT: usize = 5;
/// Companions per account.
pub const MAX_COMPANIONS: usize = MAX_DEVICES_PER_ACCOUNT - 1;
/// Numbers in one discovery request (or one contact removal).
pub const MAX_DISCOVERY_BATCH: usize = 1_000;
/// Numbers an account may look up per day, by default (natterd `--discovery-account-quota`).
pub const DISCOVERY_ACCOUNT_QUOTA: u32 = 20_000;
/// Numbers one IP address may look up per day, by default (natterd `--discovery-ip-quota`).
pub const DISCOVERY_IP_QUOTA: u32 = 100_000;
/// An encrypted profile (name, about, avatar) as stored by the server.
pub const MAX_PROFILE_CIPHERTEXT: usize = 96 * 1024;
/// A profile's display name, in bytes.
pub const MAX_PROFILE_NAME: usize = 64;
/// A profile's avatar JPEG, in bytes (the client scales pictures down to fit).
pub const MAX_AVATAR_BYTES: usize = 64 * 1024;
/// Accounts one connection may follow the presence of.
pub const MAX_PRESENCE_SUBSCRIPTIONS: usize = 1_000;
/// Members of a group.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// A group's name, in bytes.
pub const MAX_GROUP_NAME: usize = 100;
/// A group's description, in bytes.
pub const MAX_GROUP_DESCRIPTION: usize = 2048;
/// Pairwise key shares in one [`crate::group::ShareGroupKeys`] request (about 0.5 KB each, so a batch
/// stays well under [`MAX_FRAME_LEN`]); a sender with more devices to reach sends several batches.
pub const MAX_KEY_SHARES_PER_REQUEST: usize = 512;
/// Largest Megolm ciphertext of one group message: one device's share of a 1:1 message, less room for
/// the group and session ids the server wraps it in.
pub const MAX_GROUP_CIPHERTEXT: usize = MAX_ENVELOPE_CIPHERTEXT - 512;

/// Largest ciphertext for one device in one message.
pub const MAX_ENVELOPE_CIPHERTEXT: usize = 64 * 1024;
/// Device ciphertexts in one 1:1 send: every device of the peer and every other device of the sender.
pub const MAX_DEVICE_MESSAGES_PER_SEND: usize = 2 * MAX_DEVICES_PER_ACCOUNT;
/// Largest text of one message, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Message ids in one receipt.
pub const MAX_RECEIPT_IDS: usize = 256;
/// Envelope ids acknowledged by one [`crate::wire::Ack`].
pub const MAX_ACK_IDS: usize = 1024;
/// Pushes a server sends to one connection before it waits for acknowledgements.
pub const MAX_UNACKED_PUSHES: usize = 512;
/// Requests one connection may have in flight at once.
pub const MAX_INFLIGHT_REQUESTS: usize = 64;
/// Feature names in a hello.
pub const MAX_FEATURES: usize = 32;
/// Length of a feature name.
pub const MAX_FEATURE_LEN: usize = 64;
/// Length of any free-text error message or device name on the wire.
pub const MAX_SHORT_TEXT: usize = 256;

/// One-time keys uploaded in one request.
pub const MAX_ONE_TIME_KEYS_PER_UPLOAD: usize = 100;
/// One-time keys the server holds per device; uploads beyond it are refused.
pub const MAX_ONE_TIME_KEYS_STORED: usize = 200;
/// The server tells a device to upload more one-time keys when it holds fewer than this.
pub const ONE_TIME_KEYS_LOW: usize = 10;
/// How many one-time keys a device keeps uploaded.
pub const ONE_TIME_KEYS_TARGET: usize = 50;

/// Digits in an SMS registration code.
pub const CODE_DIGITS: usize = 6;
/// How long a registration code stays valid.
pub const CODE_TTL: Duration = Duration::from_secs(10 * 60);
/// Wrong guesses allowed per code; the code is burnt after that.
pub const CODE_MAX_ATTEMPTS: u32 = 5;
/// Minimum time between two codes sent to one number.
pub const CODE_RESEND_COOLDOWN: Duration = Duration::from_secs(30);

/// How long the server keeps an envelope a device has not acknowledged.
pub const ENVELOPE_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Time allowed for the Noise handshake and the hello that follows it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no frame in either direction for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Clients send a ping after this long without traffic, well inside [`IDLE_TIMEOUT`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How many times a receiver asks a sender to re-encrypt a message it could not decrypt.
pub const MAX_DECRYPT_RETRIES: u32 = 5;

/// Largest media file (plaintext), 2 GiB.
pub const MAX_MEDIA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Plaintext bytes per encrypted media chunk; each chunk carries its own authentication tag.
pub const MEDIA_CHUNK: usize = 64 * 1024;
/// Authentication tag per media chunk.
pub const MEDIA_CHUNK_TAG: usize = 16;
/// Largest blob the server accepts: the largest file plus one tag per chunk.
pub const MAX_BLOB_BYTES: u64 =
    MAX_MEDIA_BYTES + MAX_MEDIA_BYTES.div_ceil(MEDIA_CHUNK as u64) * MEDIA_CHUNK_TAG as u64;
/// Largest thumbnail carried inside a media message.
pub const MAX_THUMBNAIL_BYTES: usize = 16 * 1024;
/// How long an upload or download grant (token) is valid.
pub const BLOB_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a blob is kept after its upload or its last re-reference.
pub const BLOB_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Mutations in one app-state patch.
pub const MAX_APP_STATE_MUTATIONS: usize = 512;
/// Bytes of one encrypted app-state value.
pub const MAX_APP_STATE_VALUE: usize = 4 * 1024;
/// Records in one app-state snapshot.
pub const MAX_APP_STATE_RECORDS: usize = 50_000;
/// Patches returned by one fetch (a device further behind fetches again).
pub const MAX_APP_STATE_PATCHES_PER_FETCH: usize = 500;
/// Largest decompressed history bundle chunk.
pub const MAX_HISTORY_CHUNK_BYTES: usize = 64 * 1024 * 1024;

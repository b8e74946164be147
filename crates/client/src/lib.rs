//! natter-client: everything a Natter device does, with no user interface. A UI drives it with commands
//! (async methods on [`Client`]) and follows what happens through a stream of [`Event`]s.
//!
//! # Layout
//! - [`Client`] ([`client`]): open a home directory, register, connect, send, read history.
//! - [`net`]: the Noise connection to natterd (requests, pushes, acknowledgements, keep-alive).
//! - [`devices`]: fetching and verifying signed device lists, trust on first use of account keys.
//! - [`link`]: linking companions by QR code, listing and unlinking devices, safety numbers.
//! - [`media`]: sending files (encrypted while uploading, resumable) and downloading them (verified,
//!   resumable).
//! - [`messaging`]: encrypting per device, the persisted outbox, processing envelopes, receipts and
//!   decryption retries.
//! - [`appstate`]: app-state sync (contact names, chat settings, starred messages) across the
//!   account's devices, verified with MACs and an LTHash.
//! - [`store`]: the [`store::ClientStore`] trait and its backends.
//! - [`events`]: the [`Event`]s a UI listens to.
//! - [`groups`]: group chats with sender keys (Megolm): membership, sending, receiving, receipts.
//! - [`history`]: history sync from the primary to a new companion, and requests for older history.
//! - [`contacts`] and [`addressbook`]: address-book import and discovery, encrypted profiles, privacy
//!   settings, blocking, presence and typing.
//!
//! Every state change that matters (a ratchet step, a message, an envelope marked processed) is saved
//! atomically before the server is told it may forget anything.

pub mod addressbook;
pub mod appstate;
pub mod client;
pub mod contacts;
pub mod devices;
pub mod error;
pub mod events;
pub mod groups;
pub mod history;
pub mod link;
pub mod media;
pub mod messaging;
pub mod net;
pub mod store;

pub use client::{Client, WhoAmI};
pub use contacts::{Contact, ImportReport, PresenceInfo, ProfileInfo};
pub use error::{ClientError, Result};
pub use events::Event;
pub use groups::{GroupInfo, GroupMemberInfo, GroupMessageRecord, ReceiptSummary};
pub use history::{HistoryOptions, HistorySent};
pub use link::{DeviceInfo, LinkedDevice};
pub use media::Progress;
pub use store::{MediaRecord, MessageKind, MessageRecord, MessageStatus};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 16 random bytes as a message id.
pub(crate) fn random_message_id() -> Result<natter_proto::MessageId> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| ClientError::Io {
        path: "random".into(),
        source: std::io::Error::other(e),
    })?;
    Ok(natter_proto::MessageId::from_bytes(b))
}

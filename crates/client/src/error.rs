//! The client's error type: every failure a user can meet, each with a message that says what to do.

use natter_proto::wire::{ErrorCode, MismatchedDevices};

use crate::store::StoreError;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The home directory has no registered account.
    #[error("this device is not registered: run `natter register +<number>` first")]
    NotRegistered,
    /// `verify` was run without a pending `register`.
    #[error("no registration is pending: run `natter register +<number>` first")]
    NoPendingRegistration,
    /// No server address is known.
    #[error("no server given: pass --server HOST:PORT (or set NATTER_SERVER)")]
    NoServer,
    /// The server could not be reached.
    #[error("cannot reach the server at {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Server {
        /// Machine-readable reason.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
        /// When retrying makes sense, after how long.
        retry_after_ms: u64,
        /// For a device mismatch: what differs.
        mismatched: Vec<MismatchedDevices>,
    },
    /// The connection dropped before the answer came.
    #[error("the connection to the server was lost")]
    Disconnected,
    /// The server did not answer in time.
    #[error("the server did not answer in time")]
    Timeout,
    /// The server spoke nonsense or failed the Noise handshake, or its key changed.
    #[error(transparent)]
    Protocol(#[from] natter_proto::ProtoError),
    /// A cryptographic check failed.
    #[error("{0}")]
    Crypto(#[from] natter_crypto::CryptoError),
    /// A peer's keys could not be trusted.
    #[error("cannot trust the keys of {peer}: {reason}")]
    Untrusted {
        /// The account.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A device on the peer's list has no prekeys yet (it is being linked); the message stays queued.
    #[error("device {device} of {peer} has no keys yet; the message stays queued and is retried")]
    NoKeys {
        /// The account.
        peer: String,
        /// The device.
        device: u32,
    },
    /// The local database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another process uses this home directory.
    #[error("{0} is in use by another natter process; stop it first")]
    HomeLocked(String),
    /// A file in the home directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Input from the user is invalid.
    #[error("{0}")]
    InvalidInput(String),
    /// A media upload or download over HTTP failed (network, server refusal); trying again resumes it.
    #[error("media transfer failed: {0}")]
    Transfer(String),
    /// A downloaded media file failed its integrity check (altered, truncated or wrong key); the partial
    /// file was deleted and nothing was saved.
    #[error("the downloaded file failed its integrity check ({0}); nothing was saved")]
    MediaCorrupt(String),
    /// The account was registered on another phone, or this device was unlinked.
    #[error("this device was removed: {0}")]
    DeviceRemoved(String),
    /// App-state sync refused a collection (verification failed or a sync key is missing).
    #[error("app-state sync of {collection:?} refused: {reason}")]
    AppState {
        /// The collection.
        collection: String,
        /// Why.
        reason: String,
    },
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether trying again later may succeed without the user changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Disconnected
                | ClientError::Timeout
                | ClientError::Unreachable { .. }
                | ClientError::NoKeys { .. }
                | ClientError::Transfer(_)
        ) || matches!(
            self.server_code(),
            Some(ErrorCode::Unavailable | ErrorCode::Internal)
        )
    }
}

impl From<natter_proto::wire::Error> for ClientError {
    fn from(e: natter_proto::wire::Error) -> Self {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
        if code == ErrorCode::DeviceRemoved {
            return ClientError::DeviceRemoved(e.message);
        }
        ClientError::Server {
            code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
            mismatched: e.mismatched,
        }
    }
}

/// Result of a client operation.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

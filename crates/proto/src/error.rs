//! Errors of decoding and of the Noise channel.

use crate::ids::IdError;

/// What went wrong with bytes from the peer. Every variant is the peer's fault or a closed channel;
/// none is a bug of ours, so callers log at `debug` and drop the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A frame announced a length over [`crate::limits::MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field is over its limit.
    #[error("{what}: {len} exceeds the limit of {max}")]
    LimitExceeded {
        /// Which field.
        what: &'static str,
        /// Actual size or count.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The protobuf bytes did not decode.
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A required field is missing.
    #[error("malformed message: missing {0}")]
    Missing(&'static str),
    /// A field holds a value outside its domain.
    #[error("malformed message: invalid {what}")]
    Invalid {
        /// Which field.
        what: &'static str,
    },
    /// An identifier failed validation.
    #[error(transparent)]
    Id(#[from] IdError),
    /// The Noise layer refused a record: wrong key, tampering, or out-of-order data.
    #[error("secure channel failure")]
    Noise,
    /// The server's static key differs from the one pinned on first contact.
    #[error(
        "the server's identity key changed (pinned {pinned}, offered {offered}): refusing to connect. \
         If the server was really reinstalled, remove the pinned key with `natter forget-server`"
    )]
    ServerKeyChanged {
        /// Hex of the pinned key.
        pinned: String,
        /// Hex of the offered key.
        offered: String,
    },
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {theirs} (this build speaks {ours})")]
    UnsupportedVersion {
        /// The peer's version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// A message arrived in a state where it makes no sense (e.g. a request before the hello).
    #[error("unexpected {0}")]
    Unexpected(&'static str),
}

impl From<snow::Error> for ProtoError {
    fn from(_: snow::Error) -> Self {
        // Coarse on purpose: the detail of a Noise failure helps an attacker more than an operator.
        ProtoError::Noise
    }
}

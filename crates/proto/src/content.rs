//! What travels end-to-end encrypted inside an envelope: the plaintext of an Olm message. The server never
//! sees these bytes in the clear.

/// The decrypted payload of one envelope.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Content {
    /// The logical message id: the envelope's id for a first send, the original message's id in a resend.
    /// Receivers de-duplicate by this authenticated id, not by the envelope's.
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    /// When the sender created it, ms since the Unix epoch (sender's clock).
    #[prost(uint64, tag = "2")]
    pub sent_at_ms: u64,
    /// What it is.
    #[prost(oneof = "content::Body", tags = "3, 4, 5")]
    pub body: Option<content::Body>,
    /// For copies sent to the sender's own other devices: the conversation (peer account) the message
    /// belongs to. Empty in copies for the peer.
    #[prost(string, tag = "6")]
    pub conversation: String,
}

/// Content kinds.
#[allow(clippy::module_inception)]
pub mod content {
    /// What an encrypted message carries.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// A text message.
        #[prost(message, tag = "3")]
        Text(super::Text),
        /// Delivered / read receipts for earlier messages.
        #[prost(message, tag = "4")]
        Receipt(super::Receipt),
        /// "I could not decrypt your message, please encrypt it again."
        #[prost(message, tag = "5")]
        RetryRequest(super::RetryRequest),
    }
}

/// A text message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Text {
    /// UTF-8 text, at most [`crate::limits::MAX_TEXT_BYTES`].
    #[prost(string, tag = "1")]
    pub body: String,
}

/// A receipt for messages of one conversation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Receipt {
    /// Delivered or read.
    #[prost(enumeration = "ReceiptKind", tag = "1")]
    pub kind: i32,
    /// The messages it covers.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub message_ids: Vec<Vec<u8>>,
}

/// Receipt kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReceiptKind {
    /// The message reached a device of the recipient and was decrypted.
    Delivered = 0,
    /// The recipient saw the message.
    Read = 1,
}

/// Asks the sender to encrypt a message again (a fresh session was set up by this very message).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryRequest {
    /// The message that failed to decrypt.
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    /// 1 for the first retry, up to [`crate::limits::MAX_DECRYPT_RETRIES`].
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

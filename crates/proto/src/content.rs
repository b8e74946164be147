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
    #[prost(oneof = "content::Body", tags = "3, 4, 5, 7, 8, 9, 10, 11, 40")]
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
        /// A photo, video, voice note or file: a pointer to an encrypted blob and the key to it.
        #[prost(message, tag = "7")]
        Media(super::Media),
        /// Between an account's own devices: a chunk of history to import (an encrypted blob).
        #[prost(message, tag = "8")]
        HistorySync(super::HistorySync),
        /// Between an account's own devices: "send me older history of this chat".
        #[prost(message, tag = "9")]
        HistoryRequest(super::HistoryRequest),
        /// Between an account's own devices: the app-state sync key(s).
        #[prost(message, tag = "10")]
        AppStateKeyShare(super::AppStateKeyShare),
        /// Between an account's own devices: "my app state failed verification, upload a snapshot".
        #[prost(message, tag = "11")]
        AppStateRecovery(super::AppStateRecovery),
        /// The sender's profile key, so the receiver can read the sender's encrypted profile.
        #[prost(message, tag = "40")]
        ProfileKey(super::ProfileKey),
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

/// What kind of media a [`Media`] message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MediaKind {
    /// Any file.
    File = 0,
    /// A photo.
    Image = 1,
    /// A video.
    Video = 2,
    /// A voice note (Opus in Ogg).
    Voice = 3,
}

/// A media message: where the encrypted file is, the key to decrypt it and what to check it against.
/// The server stores the blob but never sees this message, the key or the plaintext digest.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Media {
    /// Photo, video, voice note or file.
    #[prost(enumeration = "MediaKind", tag = "1")]
    pub kind: i32,
    /// The blob on the server (32 hex digits).
    #[prost(string, tag = "2")]
    pub blob_id: String,
    /// The file's 32-byte media key (expanded with HKDF into encryption keys).
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    /// SHA-256 of the plaintext.
    #[prost(bytes = "vec", tag = "4")]
    pub plaintext_sha256: Vec<u8>,
    /// SHA-256 of the blob (the ciphertext).
    #[prost(bytes = "vec", tag = "5")]
    pub ciphertext_sha256: Vec<u8>,
    /// Plaintext size in bytes.
    #[prost(uint64, tag = "6")]
    pub size: u64,
    /// Ciphertext (blob) size in bytes.
    #[prost(uint64, tag = "7")]
    pub ciphertext_size: u64,
    /// MIME type, detected from the content.
    #[prost(string, tag = "8")]
    pub mime: String,
    /// The file's name (no directories).
    #[prost(string, tag = "9")]
    pub name: String,
    /// A caption, like a text message's body.
    #[prost(string, tag = "10")]
    pub caption: String,
    /// A small preview image (JPEG or PNG), at most [`crate::limits::MAX_THUMBNAIL_BYTES`].
    #[prost(bytes = "vec", tag = "11")]
    pub thumbnail: Vec<u8>,
    /// Duration of a voice note or video in milliseconds, 0 if unknown.
    #[prost(uint32, tag = "12")]
    pub duration_ms: u32,
    /// Width in pixels of a photo or video, 0 if unknown.
    #[prost(uint32, tag = "13")]
    pub width: u32,
    /// Height in pixels, 0 if unknown.
    #[prost(uint32, tag = "14")]
    pub height: u32,
}

/// Ciphertext size of a media file of `size` plaintext bytes: one tag per chunk, and an empty file is one
/// (empty) chunk.
pub fn media_ciphertext_size(size: u64) -> u64 {
    use crate::limits::{MEDIA_CHUNK, MEDIA_CHUNK_TAG};
    let chunks = size.div_ceil(MEDIA_CHUNK as u64).max(1);
    size + chunks * MEDIA_CHUNK_TAG as u64
}

/// Longest MIME type accepted.
pub const MAX_MIME_LEN: usize = 128;
/// Longest file name accepted.
pub const MAX_FILE_NAME_LEN: usize = 255;

impl Media {
    /// Checks every field a receiver relies on: sizes, key and digest lengths, the blob id's form, and
    /// names that cannot escape a download directory.
    pub fn validate(&self) -> Result<(), crate::ProtoError> {
        use crate::ProtoError;
        use crate::limits::{MAX_MEDIA_BYTES, MAX_TEXT_BYTES, MAX_THUMBNAIL_BYTES};
        let invalid = |what| Err(ProtoError::Invalid { what });
        let id_ok = self.blob_id.len() == 32
            && self
                .blob_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !id_ok {
            return invalid("blob id");
        }
        if self.key.len() != 32
            || self.plaintext_sha256.len() != 32
            || self.ciphertext_sha256.len() != 32
        {
            return invalid("media key or digest");
        }
        if self.size > MAX_MEDIA_BYTES {
            return Err(ProtoError::LimitExceeded {
                what: "media bytes",
                len: usize::try_from(self.size).unwrap_or(usize::MAX),
                max: usize::try_from(MAX_MEDIA_BYTES).unwrap_or(usize::MAX),
            });
        }
        if self.ciphertext_size != media_ciphertext_size(self.size) {
            return invalid("media ciphertext size");
        }
        MediaKind::try_from(self.kind).map_err(|_| ProtoError::Invalid { what: "media kind" })?;
        let name_ok = self.name.len() <= MAX_FILE_NAME_LEN
            && !self.name.contains(['/', '\\', '\0'])
            && self.name != "."
            && self.name != "..";
        if !name_ok {
            return invalid("file name");
        }
        if self.mime.len() > MAX_MIME_LEN || self.mime.chars().any(char::is_control) {
            return invalid("mime type");
        }
        for (what, len, max) in [
            ("caption bytes", self.caption.len(), MAX_TEXT_BYTES),
            ("thumbnail bytes", self.thumbnail.len(), MAX_THUMBNAIL_BYTES),
        ] {
            if len > max {
                return Err(ProtoError::LimitExceeded { what, len, max });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn media() -> Media {
        Media {
            kind: MediaKind::Image as i32,
            blob_id: "0123456789abcdef0123456789abcdef".into(),
            key: vec![1; 32],
            plaintext_sha256: vec![2; 32],
            ciphertext_sha256: vec![3; 32],
            size: 100_000,
            ciphertext_size: media_ciphertext_size(100_000),
            mime: "image/png".into(),
            name: "holiday.png".into(),
            caption: "look!".into(),
            thumbnail: vec![0; 100],
            duration_ms: 0,
            width: 640,
            height: 480,
        }
    }

    #[test]
    fn ciphertext_sizes_count_a_tag_per_chunk() {
        assert_eq!(media_ciphertext_size(0), 16);
        assert_eq!(media_ciphertext_size(1), 17);
        assert_eq!(media_ciphertext_size(65_536), 65_552);
        assert_eq!(media_ciphertext_size(65_537), 65_537 + 32);
    }

    #[test]
    fn media_fields_are_validated() {
        assert!(media().validate().is_ok());
        type Mutation = Box<dyn Fn(&mut Media)>;
        let bad: Vec<Mutation> = vec![
            Box::new(|m| m.blob_id = "XYZ".into()),
            Box::new(|m| {
                m.key.pop();
            }),
            Box::new(|m| m.ciphertext_size += 1),
            Box::new(|m| m.name = "../etc/passwd".into()),
            Box::new(|m| m.name = "..".into()),
            Box::new(|m| m.mime = "a\nb".into()),
            Box::new(|m| m.thumbnail = vec![0; crate::limits::MAX_THUMBNAIL_BYTES + 1]),
            Box::new(|m| m.kind = 99),
            Box::new(|m| {
                m.size = crate::limits::MAX_MEDIA_BYTES + 1;
                m.ciphertext_size = media_ciphertext_size(m.size);
            }),
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut m = media();
            f(&mut m);
            assert!(m.validate().is_err(), "case {i} accepted");
        }
    }
}

/// A chunk of history for a companion: the blob holds a zstd-compressed, encrypted [`HistoryBundle`],
/// encrypted exactly like a media file (the `blob` fields carry the pointer, key and digests).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistorySync {
    /// Where the bundle is and how to check it (kind `File`, mime `application/x-natter-history`).
    #[prost(message, optional, tag = "1")]
    pub blob: Option<Media>,
    /// 0 for the newest chunk; chunks go newest first.
    #[prost(uint32, tag = "2")]
    pub chunk_index: u32,
    /// How many chunks this sync has.
    #[prost(uint32, tag = "3")]
    pub chunk_count: u32,
    /// Messages in this chunk.
    #[prost(uint32, tag = "4")]
    pub message_count: u32,
    /// Set when the chunk answers a [`HistoryRequest`] for one chat.
    #[prost(string, tag = "5")]
    pub chat: String,
}

/// The decompressed content of a history blob.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryBundle {
    /// Messages, newest first.
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<HistoryMessage>,
}

/// One message as history carries it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryMessage {
    /// The conversation (peer account).
    #[prost(string, tag = "1")]
    pub chat: String,
    /// The logical message id (16 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    /// Sent by this account.
    #[prost(bool, tag = "3")]
    pub from_me: bool,
    /// The sending device.
    #[prost(uint32, tag = "4")]
    pub sender_device: u32,
    /// "text", "media", "undecryptable" or "notice".
    #[prost(string, tag = "5")]
    pub kind: String,
    /// Text or caption.
    #[prost(string, tag = "6")]
    pub text: String,
    /// Sender's clock, ms.
    #[prost(uint64, tag = "7")]
    pub sent_at_ms: u64,
    /// Server's clock, ms.
    #[prost(uint64, tag = "8")]
    pub server_ts_ms: u64,
    /// "pending", "sent", "delivered", "read", "received" or "failed".
    #[prost(string, tag = "9")]
    pub status: String,
    /// For media: the pointer (never the bytes).
    #[prost(message, optional, tag = "10")]
    pub media: Option<Media>,
}

/// Asks the primary for history of one chat older than what the companion has.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryRequest {
    /// The chat.
    #[prost(string, tag = "1")]
    pub chat: String,
    /// Only messages with a server time before this (ms).
    #[prost(uint64, tag = "2")]
    pub before_ms: u64,
    /// At most this many.
    #[prost(uint32, tag = "3")]
    pub max_messages: u32,
}

/// App-state sync keys, from the primary to its own devices.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStateKeyShare {
    /// The keys, newest last; new mutations use the newest.
    #[prost(message, repeated, tag = "1")]
    pub keys: Vec<AppStateKey>,
}

/// One app-state sync key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStateKey {
    /// Its id (8 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub key_id: Vec<u8>,
    /// The 32-byte key.
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// When the primary created it, ms.
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
}

/// Asks the primary to re-upload a verified snapshot of a collection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStateRecovery {
    /// The collection that failed verification.
    #[prost(string, tag = "1")]
    pub collection: String,
}

/// An account's profile key (see `natter_crypto::profile`), shared with its contacts and its own devices.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProfileKey {
    /// The 32-byte key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Increases with every rotation; an older key never replaces a newer one.
    #[prost(uint64, tag = "2")]
    pub version: u64,
}

/// The kinds a [`HistoryMessage`] may have.
pub const HISTORY_KINDS: &[&str] = &["text", "media", "undecryptable", "notice"];

impl HistoryMessage {
    /// Checks what a companion relies on before it imports the message, and returns its chat, id and
    /// sending device: a valid E.164 chat, a 16-byte id, a valid device id, a known kind, a text within
    /// [`crate::limits::MAX_TEXT_BYTES`], and a valid media pointer exactly when the kind is "media".
    pub fn parse_ids(
        &self,
    ) -> Result<(crate::PhoneNumber, crate::MessageId, crate::DeviceId), crate::ProtoError> {
        let chat = crate::PhoneNumber::from_e164(&self.chat)?;
        let id = crate::MessageId::from_slice(&self.id)?;
        let device = crate::DeviceId::new(self.sender_device)?;
        if !HISTORY_KINDS.contains(&self.kind.as_str()) {
            return Err(crate::ProtoError::Invalid {
                what: "history message kind",
            });
        }
        if self.text.len() > crate::limits::MAX_TEXT_BYTES {
            return Err(crate::ProtoError::LimitExceeded {
                what: "history text bytes",
                len: self.text.len(),
                max: crate::limits::MAX_TEXT_BYTES,
            });
        }
        match (self.kind == "media", &self.media) {
            (true, Some(media)) => media.validate()?,
            (true, None) => return Err(crate::ProtoError::Missing("history media pointer")),
            (false, _) => {}
        }
        Ok((chat, id, device))
    }
}

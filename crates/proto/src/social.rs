//! Wire messages for contacts and presence: address-book discovery, end-to-end encrypted profiles,
//! presence and typing, privacy settings and blocking. They travel inside [`crate::wire::Request`],
//! [`crate::wire::Response`] and [`crate::wire::Push`] like every other message; they live apart only
//! to keep `wire.rs` readable.

/// Asks which of these numbers are registered. The server answers and forgets the rest: nothing about
/// a number that is not a user is stored or logged.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Discover {
    /// E.164 numbers, at most [`crate::limits::MAX_DISCOVERY_BATCH`].
    #[prost(string, repeated, tag = "1")]
    pub numbers: Vec<String>,
    /// Also record the registered ones as the caller's contacts (privacy settings "contacts").
    #[prost(bool, tag = "2")]
    pub remember: bool,
}

/// The registered subset of a [`Discover`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Discovered {
    /// The numbers that have an account.
    #[prost(string, repeated, tag = "1")]
    pub registered: Vec<String>,
    /// How many more numbers the caller may look up today.
    #[prost(uint64, tag = "2")]
    pub remaining_today: u64,
}

/// Removes numbers from the caller's contacts (they left the address book).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForgetContacts {
    /// E.164 numbers, at most [`crate::limits::MAX_DISCOVERY_BATCH`].
    #[prost(string, repeated, tag = "1")]
    pub numbers: Vec<String>,
}

/// Stores the caller's profile, encrypted with its profile key (the server cannot read it).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SetProfile {
    /// At most [`crate::limits::MAX_PROFILE_CIPHERTEXT`] bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub ciphertext: Vec<u8>,
}

/// Asks for an account's encrypted profile.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetProfile {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
}

/// An account's encrypted profile (empty if it never set one).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// The ciphertext, as uploaded.
    #[prost(bytes = "vec", tag = "2")]
    pub ciphertext: Vec<u8>,
    /// When it was uploaded (ms since epoch).
    #[prost(uint64, tag = "3")]
    pub updated_ms: u64,
}

/// What a profile holds, before encryption.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProfileContent {
    /// Display name, at most [`crate::limits::MAX_PROFILE_NAME`] bytes.
    #[prost(string, tag = "1")]
    pub name: String,
    /// "About" line, at most [`crate::limits::MAX_SHORT_TEXT`] bytes.
    #[prost(string, tag = "2")]
    pub about: String,
    /// Avatar, a JPEG of at most [`crate::limits::MAX_AVATAR_BYTES`].
    #[prost(bytes = "vec", tag = "3")]
    pub avatar_jpeg: Vec<u8>,
}

/// Who may see when the account was last online.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Visibility {
    /// Anyone who asks (and is not blocked).
    Everyone = 0,
    /// Only accounts in the owner's contacts.
    Contacts = 1,
    /// Nobody.
    Nobody = 2,
}

/// An account's privacy settings, enforced by the server (presence) and by clients (read receipts).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrivacySettings {
    /// Who sees online and last-seen.
    #[prost(enumeration = "Visibility", tag = "1")]
    pub last_seen: i32,
    /// Read receipts are neither sent nor shown.
    #[prost(bool, tag = "2")]
    pub read_receipts_off: bool,
}

/// Replaces the caller's privacy settings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SetPrivacy {
    /// The new settings.
    #[prost(message, optional, tag = "1")]
    pub settings: Option<PrivacySettings>,
}

/// Asks for the caller's privacy settings and blocked numbers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetPrivacy {}

/// The caller's privacy settings and blocked numbers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Privacy {
    /// The settings.
    #[prost(message, optional, tag = "1")]
    pub settings: Option<PrivacySettings>,
    /// Blocked accounts.
    #[prost(string, repeated, tag = "2")]
    pub blocked: Vec<String>,
}

/// Blocks or unblocks an account: the server then refuses its messages, presence and profile requests
/// to the caller.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Block {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// Block (true) or unblock (false).
    #[prost(bool, tag = "2")]
    pub blocked: bool,
}

/// Whether an account is online, as far as the asker may know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Availability {
    /// The asker may not see it (privacy setting, or a block).
    Hidden = 0,
    /// A device of the account is connected.
    Online = 1,
    /// No device is connected; `last_seen_ms` says since when (0: not since the server started).
    Offline = 2,
}

/// Asks for an account's presence and for pushes when it changes, for as long as the connection lasts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SubscribePresence {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
}

/// An account's presence (answer to [`SubscribePresence`], and the push when it changes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PresenceState {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// Online, offline or hidden.
    #[prost(enumeration = "Availability", tag = "2")]
    pub availability: i32,
    /// For offline: when its last device disconnected (ms since epoch).
    #[prost(uint64, tag = "3")]
    pub last_seen_ms: u64,
}

/// Tells a chat partner that this device is typing (or stopped). Never stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SendTyping {
    /// The partner.
    #[prost(string, tag = "1")]
    pub to: String,
    /// Typing now (true) or stopped (false).
    #[prost(bool, tag = "2")]
    pub typing: bool,
}

/// Pushed to a partner's online devices: someone is typing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Typing {
    /// Who types.
    #[prost(string, tag = "1")]
    pub from: String,
    /// Typing now (true) or stopped (false).
    #[prost(bool, tag = "2")]
    pub typing: bool,
}

//! The client–server protocol, as protobuf messages (hand-derived with `prost`, so no `protoc` is needed).
//!
//! After the Noise handshake every record carries part of a stream of length-prefixed [`Frame`]s. The
//! client's first frame is a [`ClientHello`]; the server answers with a [`ServerHello`]. Then the client
//! sends [`Request`]s and gets one [`Response`] for each (matched by `id`), the server sends [`Push`]es, and
//! the client acknowledges every push that carries user data with an [`Ack`] before the server deletes it.
//! Unknown fields are ignored, so either side may add fields without a version bump.

/// One unit of the protocol.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    /// What the frame carries.
    #[prost(oneof = "frame::Body", tags = "1, 2, 3, 4, 5, 6, 7, 8")]
    pub body: Option<frame::Body>,
}

/// The kinds of [`Frame`].
pub mod frame {
    /// What a frame carries.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// Client's first frame.
        #[prost(message, tag = "1")]
        ClientHello(super::ClientHello),
        /// Server's answer to the hello.
        #[prost(message, tag = "2")]
        ServerHello(super::ServerHello),
        /// A client request.
        #[prost(message, tag = "3")]
        Request(super::Request),
        /// The server's response to a request.
        #[prost(message, tag = "4")]
        Response(super::Response),
        /// Something the server pushes unasked.
        #[prost(message, tag = "5")]
        Push(super::Push),
        /// The client has durably processed these pushes.
        #[prost(message, tag = "6")]
        Ack(super::Ack),
        /// Keep-alive probe (either side).
        #[prost(message, tag = "7")]
        Ping(super::Ping),
        /// Keep-alive answer.
        #[prost(message, tag = "8")]
        Pong(super::Ping),
    }
}

impl Frame {
    /// Wraps a body.
    pub fn new(body: frame::Body) -> Self {
        Self { body: Some(body) }
    }
}

/// The client's first frame: protocol version, required features, and who it logs in as.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientHello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// Features the client cannot work without; the server refuses the connection if it lacks one.
    #[prost(string, repeated, tag = "2")]
    pub required_features: Vec<String>,
    /// Present to log in as a registered device; absent for an anonymous connection (registration,
    /// linking). The device proves itself with its Noise static key, never with a token.
    #[prost(message, optional, tag = "3")]
    pub login: Option<Login>,
}

/// Which device a connection logs in as.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Login {
    /// The account, in E.164 form.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// The device of that account.
    #[prost(uint32, tag = "2")]
    pub device_id: u32,
}

/// The server's answer to [`ClientHello`]. On `error` the server closes the connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerHello {
    /// The server's protocol version.
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// The server's clock, in milliseconds since the Unix epoch.
    #[prost(uint64, tag = "2")]
    pub server_time_ms: u64,
    /// Why the connection is refused, if it is.
    #[prost(message, optional, tag = "3")]
    pub error: Option<Error>,
}

/// Keep-alive probe and answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    /// Echoed back in the pong.
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

/// A client request; the server answers with a [`Response`] of the same `id`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// Chosen by the client, unique among its requests in flight.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The operation.
    #[prost(
        oneof = "request::Body",
        tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 40, 41, 42, 43, 44, 45, 46, 47, 48"
    )]
    pub body: Option<request::Body>,
}

/// Request kinds.
pub mod request {
    /// The operation a request asks for.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// Send a registration code by SMS.
        #[prost(message, tag = "2")]
        RequestCode(super::RequestCode),
        /// Prove the code and create the account with this connection's device as primary.
        #[prost(message, tag = "3")]
        VerifyCode(super::VerifyCode),
        /// Upload one-time keys and a fallback key.
        #[prost(message, tag = "4")]
        UploadKeys(super::UploadKeys),
        /// Claim one prekey per device of an account.
        #[prost(message, tag = "5")]
        ClaimKeys(super::ClaimKeys),
        /// Fetch an account's signed device list.
        #[prost(message, tag = "6")]
        GetDevices(super::GetDevices),
        /// Send one message, encrypted once per device.
        #[prost(message, tag = "7")]
        SendMessage(super::SendMessage),
        /// Companion, anonymous: open a link session and get its one-time reference.
        #[prost(message, tag = "8")]
        CreateLinkRef(super::CreateLinkRef),
        /// Primary: offer the account to the companion behind a reference.
        #[prost(message, tag = "9")]
        LinkOffer(super::LinkOffer),
        /// Companion: accept the offer (with its counter-signature, sealed for the primary).
        #[prost(message, tag = "10")]
        LinkAccept(super::LinkAccept),
        /// Primary: publish a new signed device list (adding a linked companion or removing a device).
        #[prost(message, tag = "11")]
        PublishDeviceList(super::PublishDeviceList),
        /// A companion removes itself from its account.
        #[prost(message, tag = "12")]
        RemoveSelf(super::RemoveSelf),
        /// The account's devices with their connection state.
        #[prost(message, tag = "13")]
        ListOwnDevices(super::ListOwnDevices),
        /// Reserve a blob and get a grant to upload it (or to resume an upload).
        #[prost(message, tag = "14")]
        RequestUpload(super::RequestUpload),
        /// Get a grant to download a blob; also keeps it for another retention period (forwarding).
        #[prost(message, tag = "15")]
        RequestDownload(super::RequestDownload),
        /// Append a patch to one of the account's app-state collections.
        #[prost(message, tag = "16")]
        PushAppState(super::PushAppState),
        /// Fetch an app-state collection from a version on (snapshot and/or patches).
        #[prost(message, tag = "17")]
        FetchAppState(super::FetchAppState),
        /// Which of these numbers have an account.
        #[prost(message, tag = "40")]
        Discover(crate::social::Discover),
        /// Remove numbers from the caller's contacts.
        #[prost(message, tag = "41")]
        ForgetContacts(crate::social::ForgetContacts),
        /// Store the caller's encrypted profile.
        #[prost(message, tag = "42")]
        SetProfile(crate::social::SetProfile),
        /// Fetch an account's encrypted profile.
        #[prost(message, tag = "43")]
        GetProfile(crate::social::GetProfile),
        /// Replace the caller's privacy settings.
        #[prost(message, tag = "44")]
        SetPrivacy(crate::social::SetPrivacy),
        /// The caller's privacy settings and blocked numbers.
        #[prost(message, tag = "45")]
        GetPrivacy(crate::social::GetPrivacy),
        /// Block or unblock an account.
        #[prost(message, tag = "46")]
        Block(crate::social::Block),
        /// An account's presence, and pushes when it changes.
        #[prost(message, tag = "47")]
        SubscribePresence(crate::social::SubscribePresence),
        /// Tell a chat partner about typing.
        #[prost(message, tag = "48")]
        SendTyping(crate::social::SendTyping),
    }
}

/// The server's answer to a [`Request`]: exactly one of `error` or `body`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// The request's id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Set when the request failed.
    #[prost(message, optional, tag = "2")]
    pub error: Option<Error>,
    /// The result of a successful request.
    #[prost(
        oneof = "response::Body",
        tags = "3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43"
    )]
    pub body: Option<response::Body>,
}

/// Response kinds.
pub mod response {
    /// The result of a successful request.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// A code is on its way.
        #[prost(message, tag = "3")]
        CodeSent(super::CodeSent),
        /// The account exists and this device is its primary.
        #[prost(message, tag = "4")]
        Registered(super::Registered),
        /// Keys stored.
        #[prost(message, tag = "5")]
        KeysUploaded(super::KeysUploaded),
        /// One prekey per device.
        #[prost(message, tag = "6")]
        ClaimedKeys(super::ClaimedKeys),
        /// The signed device list.
        #[prost(message, tag = "7")]
        Devices(super::Devices),
        /// The message is durably stored for every device.
        #[prost(message, tag = "8")]
        Sent(super::Sent),
        /// A link session is open.
        #[prost(message, tag = "9")]
        LinkRef(super::LinkRef),
        /// Done, nothing to report (link offer and accept relayed, device removed).
        #[prost(message, tag = "10")]
        Done(super::Done),
        /// The new device list is stored.
        #[prost(message, tag = "11")]
        DeviceListPublished(super::DeviceListPublished),
        /// The account's devices.
        #[prost(message, tag = "12")]
        OwnDevices(super::OwnDevices),
        /// Where and with which token to upload or download a blob.
        #[prost(message, tag = "13")]
        BlobGrant(super::BlobGrant),
        /// The patch (or snapshot) is stored at this version.
        #[prost(message, tag = "14")]
        AppStatePushed(super::AppStatePushed),
        /// A collection from a version on.
        #[prost(message, tag = "15")]
        AppState(super::AppState),
        /// The registered subset of a discovery.
        #[prost(message, tag = "40")]
        Discovered(crate::social::Discovered),
        /// An encrypted profile.
        #[prost(message, tag = "41")]
        Profile(crate::social::Profile),
        /// Privacy settings and blocked numbers.
        #[prost(message, tag = "42")]
        Privacy(crate::social::Privacy),
        /// An account's presence.
        #[prost(message, tag = "43")]
        Presence(crate::social::PresenceState),
    }
}

/// Why a request or connection failed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    /// Machine-readable reason.
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    /// Human-readable explanation, safe to show to the user.
    #[prost(string, tag = "2")]
    pub message: String,
    /// When retrying makes sense, how long to wait first.
    #[prost(uint64, tag = "3")]
    pub retry_after_ms: u64,
    /// For [`ErrorCode::MismatchedDevices`]: how the sender's device set differs from the lists.
    #[prost(message, repeated, tag = "4")]
    pub mismatched: Vec<MismatchedDevices>,
}

/// Machine-readable error reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    /// A bug or an unavailable dependency on the server side.
    Internal = 0,
    /// The request is malformed or violates a limit.
    BadRequest = 1,
    /// The request needs a logged-in device.
    Unauthorized = 2,
    /// The phone number is not a valid number.
    InvalidNumber = 3,
    /// No account has this phone number.
    UnknownAccount = 4,
    /// Too many requests; see `retry_after_ms`.
    RateLimited = 5,
    /// No code was requested for this number, or it was already used.
    NoCodePending = 6,
    /// The code has expired; request a new one.
    CodeExpired = 7,
    /// The code is wrong.
    WrongCode = 8,
    /// Too many wrong guesses; the code is burnt.
    TooManyAttempts = 9,
    /// The device set of a send differs from the current device lists.
    MismatchedDevices = 10,
    /// The peer speaks another protocol version.
    UnsupportedVersion = 11,
    /// The peer needs a feature we lack.
    UnsupportedFeature = 12,
    /// A size or count limit was exceeded.
    LimitExceeded = 13,
    /// The device was removed or the account re-registered elsewhere.
    DeviceRemoved = 14,
    /// The server cannot serve right now; retry later.
    Unavailable = 15,
    /// The SMS gateway could not send the code.
    SmsFailed = 16,
    /// The link reference is unknown or has expired (they live 60 s): show a new QR code.
    LinkExpired = 17,
    /// The account already has the maximum number of devices.
    TooManyDevices = 18,
    /// A device list's version is not newer than the stored one, or it changes devices it may not.
    StaleDeviceList = 19,
    /// Only the primary device may do this.
    NotPrimary = 20,
    /// The account's media quota is used up.
    QuotaExceeded = 21,
    /// The blob does not exist (never uploaded, or expired).
    UnknownBlob = 22,
    /// An app-state patch was based on an old version: fetch, re-apply, push again.
    AppStateConflict = 23,
    /// The other account does not accept this from the caller (it blocked the caller).
    Blocked = 40,
}

/// For one account, the devices a send missed and the devices it addressed that do not exist.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MismatchedDevices {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// Devices on the list that the send did not encrypt to.
    #[prost(uint32, repeated, tag = "2")]
    pub missing: Vec<u32>,
    /// Devices the send encrypted to that are not on the list.
    #[prost(uint32, repeated, tag = "3")]
    pub extra: Vec<u32>,
}

/// Asks for a registration code by SMS.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestCode {
    /// The number, E.164.
    #[prost(string, tag = "1")]
    pub phone: String,
}

/// A code was sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CodeSent {
    /// Seconds until the code expires.
    #[prost(uint32, tag = "1")]
    pub expires_in_s: u32,
    /// Seconds until another code may be requested.
    #[prost(uint32, tag = "2")]
    pub resend_after_s: u32,
}

/// Proves the code and creates the account, with the connection's device as primary. The connection's
/// Noise static key becomes the device's login credential.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VerifyCode {
    /// The number the code was sent to.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// The code.
    #[prost(string, tag = "2")]
    pub code: String,
    /// The new account's Ed25519 identity key (32 bytes).
    #[prost(bytes = "vec", tag = "3")]
    pub account_key: Vec<u8>,
    /// The account's first device list: just the primary, signed by the account key.
    #[prost(message, optional, tag = "4")]
    pub device_list: Option<SignedDeviceList>,
}

/// The account exists.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Registered {
    /// This device's id (1: the primary).
    #[prost(uint32, tag = "1")]
    pub device_id: u32,
    /// Whether an earlier account with this number was replaced.
    #[prost(bool, tag = "2")]
    pub replaced_previous: bool,
}

/// A device list as it travels: the encoded [`crate::device_list::DeviceListContent`] and the account
/// key's signature over it. Kept as bytes so that the signature covers exactly what was signed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignedDeviceList {
    /// Encoded `DeviceListContent`.
    #[prost(bytes = "vec", tag = "1")]
    pub content: Vec<u8>,
    /// Ed25519 signature by the account key over [`crate::device_list::list_signing_input`].
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

/// A one-time or fallback key, signed by the device's Ed25519 identity key so that whoever claims it can
/// check that the server did not slip in a key of its own.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignedPreKey {
    /// vodozemac's key id, as its base64 form.
    #[prost(string, tag = "1")]
    pub key_id: String,
    /// Curve25519 public key (32 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// Device signature over [`crate::device_list::prekey_signing_input`].
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

/// Uploads prekeys for the logged-in device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UploadKeys {
    /// New one-time keys.
    #[prost(message, repeated, tag = "1")]
    pub one_time_keys: Vec<SignedPreKey>,
    /// A new fallback key, replacing the old one.
    #[prost(message, optional, tag = "2")]
    pub fallback_key: Option<SignedPreKey>,
}

/// How many one-time keys the server now holds for the device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeysUploaded {
    /// Count of unclaimed one-time keys.
    #[prost(uint32, tag = "1")]
    pub one_time_key_count: u32,
}

/// Claims one prekey for each listed device of an account (all devices when the list is empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClaimKeys {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// Which devices.
    #[prost(uint32, repeated, tag = "2")]
    pub device_ids: Vec<u32>,
}

/// One claimed prekey per device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClaimedKeys {
    /// The keys.
    #[prost(message, repeated, tag = "1")]
    pub keys: Vec<ClaimedKey>,
}

/// A claimed prekey of one device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClaimedKey {
    /// The device.
    #[prost(uint32, tag = "1")]
    pub device_id: u32,
    /// The key, signed by the device.
    #[prost(message, optional, tag = "2")]
    pub prekey: Option<SignedPreKey>,
    /// Whether it is the device's fallback key (its one-time keys ran out).
    #[prost(bool, tag = "3")]
    pub fallback: bool,
}

/// Fetches an account's signed device list.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetDevices {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
}

/// An account's keys as the server holds them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Devices {
    /// The account's Ed25519 identity key.
    #[prost(bytes = "vec", tag = "1")]
    pub account_key: Vec<u8>,
    /// The device list signed by that key.
    #[prost(message, optional, tag = "2")]
    pub device_list: Option<SignedDeviceList>,
}

/// One message, encrypted separately for each device of the recipient and each other device of the
/// sender. The server refuses it unless the device set matches the current lists exactly.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SendMessage {
    /// Chosen by the sender; a retry with the same id is acknowledged without being delivered twice.
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    /// The peer account.
    #[prost(string, tag = "2")]
    pub recipient: String,
    /// One ciphertext per device.
    #[prost(message, repeated, tag = "3")]
    pub messages: Vec<DeviceMessage>,
    /// For a resend answering a retry request: the transport id of the envelope that failed to decrypt.
    /// A resend goes to the asking device only, so the server checks only that the devices exist.
    #[prost(bytes = "vec", tag = "4")]
    pub retry_of: Vec<u8>,
    /// For a resend: 1 for the first, up to [`crate::limits::MAX_DECRYPT_RETRIES`].
    #[prost(uint32, tag = "5")]
    pub retry_attempt: u32,
}

/// A ciphertext for one device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceMessage {
    /// The device's account: the recipient, or the sender for its own other devices.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// The device.
    #[prost(uint32, tag = "2")]
    pub device_id: u32,
    /// Olm message type: 0 pre-key, 1 normal.
    #[prost(uint32, tag = "3")]
    pub olm_type: u32,
    /// The Olm ciphertext.
    #[prost(bytes = "vec", tag = "4")]
    pub ciphertext: Vec<u8>,
}

/// The message is durably queued for every device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sent {
    /// Server time of acceptance, ms since the Unix epoch.
    #[prost(uint64, tag = "1")]
    pub server_ts_ms: u64,
    /// True when this was a retry of a message already accepted.
    #[prost(bool, tag = "2")]
    pub duplicate: bool,
}

/// Something the server tells the client unasked.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Push {
    /// What it is.
    #[prost(oneof = "push::Body", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 40, 41")]
    pub body: Option<push::Body>,
}

/// Push kinds.
pub mod push {
    /// What the server pushes.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// A message for this device; acknowledge it with [`super::Ack`].
        #[prost(message, tag = "1")]
        Envelope(super::Envelope),
        /// Everything queued when the connection opened has been pushed.
        #[prost(message, tag = "2")]
        QueueEmpty(super::QueueEmpty),
        /// The device's one-time keys are running low.
        #[prost(message, tag = "3")]
        KeysLow(super::KeysLow),
        /// An account's device list changed; refresh it.
        #[prost(message, tag = "4")]
        DeviceListChanged(super::DeviceListChanged),
        /// This device no longer belongs to the account (re-registration or unlink); the server closes
        /// the connection after this push.
        #[prost(message, tag = "5")]
        DeviceRemoved(super::DeviceRemoved),
        /// To a linking companion: a primary scanned the QR code and offers its account.
        #[prost(message, tag = "6")]
        LinkOffered(super::LinkOffered),
        /// To the primary: the companion accepted.
        #[prost(message, tag = "7")]
        LinkAccepted(super::LinkAccepted),
        /// To the companion: the primary published the list with it; it may log in now.
        #[prost(message, tag = "8")]
        LinkDone(super::LinkDone),
        /// Another device of the account changed an app-state collection: fetch it.
        #[prost(message, tag = "9")]
        AppStateChanged(super::AppStateChanged),
        /// A subscribed account's presence changed (no acknowledgement).
        #[prost(message, tag = "40")]
        Presence(crate::social::PresenceState),
        /// A chat partner is typing (no acknowledgement).
        #[prost(message, tag = "41")]
        Typing(crate::social::Typing),
    }
}

/// A message waiting for this device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// The server's id for this envelope, to acknowledge.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The sender's message id.
    #[prost(bytes = "vec", tag = "2")]
    pub message_id: Vec<u8>,
    /// The sending account.
    #[prost(string, tag = "3")]
    pub sender: String,
    /// The sending device.
    #[prost(uint32, tag = "4")]
    pub sender_device: u32,
    /// When the server accepted it, ms since the Unix epoch.
    #[prost(uint64, tag = "5")]
    pub server_ts_ms: u64,
    /// Olm message type: 0 pre-key, 1 normal.
    #[prost(uint32, tag = "6")]
    pub olm_type: u32,
    /// The Olm ciphertext.
    #[prost(bytes = "vec", tag = "7")]
    pub ciphertext: Vec<u8>,
    /// For a resend: the transport id of the envelope it replaces (see [`SendMessage::retry_of`]).
    #[prost(bytes = "vec", tag = "8")]
    pub retry_of: Vec<u8>,
    /// For a resend: which attempt it is.
    #[prost(uint32, tag = "9")]
    pub retry_attempt: u32,
}

/// The backlog is delivered.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueEmpty {}

/// One-time keys are running low.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeysLow {
    /// How many remain on the server.
    #[prost(uint32, tag = "1")]
    pub remaining: u32,
}

/// A device list changed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceListChanged {
    /// Whose.
    #[prost(string, tag = "1")]
    pub phone: String,
}

/// This device was removed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceRemoved {
    /// Why, for the user.
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// The client has durably processed these envelopes; the server may delete them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// [`Envelope::id`]s.
    #[prost(uint64, repeated, tag = "1")]
    pub envelope_ids: Vec<u64>,
}

impl Error {
    /// An error with a code and a message for the user.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code as i32,
            message: message.into(),
            retry_after_ms: 0,
            mismatched: Vec::new(),
        }
    }
}

/// Opens a link session (anonymous connection of a would-be companion). The connection must stay open:
/// the server pushes the primary's offer and the final result on it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateLinkRef {}

/// A link session.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkRef {
    /// One-time reference (16 bytes), shown in the QR code.
    #[prost(bytes = "vec", tag = "1")]
    pub reference: Vec<u8>,
    /// Seconds until it expires.
    #[prost(uint32, tag = "2")]
    pub expires_in_s: u32,
}

/// The primary offers its account to the companion behind `reference`. `sealed` is readable only with the
/// secret in the QR code, which the server never sees.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkOffer {
    /// The reference from the QR code.
    #[prost(bytes = "vec", tag = "1")]
    pub reference: Vec<u8>,
    /// A sealed [`crate::link::OfferPayload`].
    #[prost(bytes = "vec", tag = "2")]
    pub sealed: Vec<u8>,
}

/// The companion accepts, sending its counter-signature sealed for the primary.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkAccept {
    /// The reference.
    #[prost(bytes = "vec", tag = "1")]
    pub reference: Vec<u8>,
    /// A sealed [`crate::link::AcceptPayload`].
    #[prost(bytes = "vec", tag = "2")]
    pub sealed: Vec<u8>,
}

/// Pushed to the companion: the primary's sealed offer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkOffered {
    /// The reference.
    #[prost(bytes = "vec", tag = "1")]
    pub reference: Vec<u8>,
    /// As in [`LinkOffer`].
    #[prost(bytes = "vec", tag = "2")]
    pub sealed: Vec<u8>,
}

/// Pushed to the primary: the companion's sealed acceptance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkAccepted {
    /// The reference.
    #[prost(bytes = "vec", tag = "1")]
    pub reference: Vec<u8>,
    /// As in [`LinkAccept`].
    #[prost(bytes = "vec", tag = "2")]
    pub sealed: Vec<u8>,
}

/// Pushed to the companion: it is on the account's list now.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkDone {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// The companion's device id.
    #[prost(uint32, tag = "2")]
    pub device_id: u32,
}

/// A new signed device list from the primary. Devices it drops are removed (disconnected, their queues
/// deleted); a device it adds must be the companion of `link_reference`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishDeviceList {
    /// The list.
    #[prost(message, optional, tag = "1")]
    pub device_list: Option<SignedDeviceList>,
    /// The link session whose companion the list adds (empty when only removing).
    #[prost(bytes = "vec", tag = "2")]
    pub link_reference: Vec<u8>,
}

/// The list is stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceListPublished {
    /// Its version.
    #[prost(uint64, tag = "1")]
    pub version: u64,
}

/// A companion leaves its account.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveSelf {}

/// Asks for the account's devices and their state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListOwnDevices {}

/// The account's devices as the server sees them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OwnDevices {
    /// One entry per device.
    #[prost(message, repeated, tag = "1")]
    pub devices: Vec<DeviceStatus>,
}

/// One device's state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceStatus {
    /// The device.
    #[prost(uint32, tag = "1")]
    pub device_id: u32,
    /// Last connection, ms since the Unix epoch.
    #[prost(uint64, tag = "2")]
    pub last_seen_ms: u64,
    /// Connected now.
    #[prost(bool, tag = "3")]
    pub online: bool,
}

/// An empty success.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Done {}

/// Reserves a blob of `size` bytes of ciphertext (a new one), or resumes the upload of `blob_id`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestUpload {
    /// Ciphertext size, at most [`crate::limits::MAX_BLOB_BYTES`].
    #[prost(uint64, tag = "1")]
    pub size: u64,
    /// Set to resume an upload this account started earlier.
    #[prost(string, tag = "2")]
    pub blob_id: String,
}

/// Asks for a download grant for a blob (any account that knows the id may download the ciphertext;
/// only those holding the key in the end-to-end message can read it).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestDownload {
    /// The blob.
    #[prost(string, tag = "1")]
    pub blob_id: String,
}

/// Where to transfer a blob over HTTP, and the short-lived token that allows it for this account only.
/// Upload: `PUT {url}?offset=N` with the bytes from N on, `HEAD {url}` for the offset reached so far.
/// Download: `GET {url}` with an optional `Range: bytes=N-`. Every request carries
/// `Authorization: Natter {token}` and `X-Natter-Account: {phone}`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobGrant {
    /// The blob (32 hex digits).
    #[prost(string, tag = "1")]
    pub blob_id: String,
    /// `http://host:port/v1/blobs/{blob_id}`.
    #[prost(string, tag = "2")]
    pub url: String,
    /// The token.
    #[prost(string, tag = "3")]
    pub token: String,
    /// Seconds until the token expires.
    #[prost(uint32, tag = "4")]
    pub expires_in_s: u32,
    /// The blob's size in bytes.
    #[prost(uint64, tag = "5")]
    pub size: u64,
    /// Bytes already uploaded (for a resumed upload) or available (for a download).
    #[prost(uint64, tag = "6")]
    pub offset: u64,
}

/// One mutation of an app-state collection, as the server stores it: opaque to the server.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStateMutation {
    /// 0 set, 1 remove.
    #[prost(uint32, tag = "1")]
    pub op: u32,
    /// HMAC of the index under the sync key (the server cannot read the index).
    #[prost(bytes = "vec", tag = "2")]
    pub index_mac: Vec<u8>,
    /// The encrypted index and value.
    #[prost(bytes = "vec", tag = "3")]
    pub value_blob: Vec<u8>,
    /// MAC over op, key id and value blob.
    #[prost(bytes = "vec", tag = "4")]
    pub value_mac: Vec<u8>,
    /// Which sync key (8 bytes).
    #[prost(bytes = "vec", tag = "5")]
    pub key_id: Vec<u8>,
}

/// A patch: the mutations of one step, the MAC of the collection's state after it (over its LTHash) and a
/// MAC over the patch itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStatePatch {
    /// The version this patch creates (the server assigns it: base version + 1).
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// The mutations.
    #[prost(message, repeated, tag = "2")]
    pub mutations: Vec<AppStateMutation>,
    /// MAC over the collection's LTHash after the patch, the version and the collection name.
    #[prost(bytes = "vec", tag = "3")]
    pub snapshot_mac: Vec<u8>,
    /// MAC over the snapshot MAC, every value MAC, the version and the collection name.
    #[prost(bytes = "vec", tag = "4")]
    pub patch_mac: Vec<u8>,
    /// Which sync key made the MACs.
    #[prost(bytes = "vec", tag = "5")]
    pub key_id: Vec<u8>,
}

/// A full collection at a version: every live value, and the snapshot MAC that covers them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStateSnapshot {
    /// The version.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// Every live value, as set mutations.
    #[prost(message, repeated, tag = "2")]
    pub records: Vec<AppStateMutation>,
    /// MAC over the LTHash of the records, the version and the collection name.
    #[prost(bytes = "vec", tag = "3")]
    pub snapshot_mac: Vec<u8>,
    /// Which sync key made the MAC.
    #[prost(bytes = "vec", tag = "4")]
    pub key_id: Vec<u8>,
}

/// Appends a patch (or, with `snapshot`, records a snapshot at `base_version + 1`) to a collection of the
/// caller's account, if the collection is still at `base_version`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushAppState {
    /// "contacts", "chat_settings" or "message_flags".
    #[prost(string, tag = "1")]
    pub collection: String,
    /// The version the patch builds on.
    #[prost(uint64, tag = "2")]
    pub base_version: u64,
    /// The patch (its `version` must be `base_version + 1`).
    #[prost(message, optional, tag = "3")]
    pub patch: Option<AppStatePatch>,
    /// A snapshot at the patch's version, so that devices catching up can start from it.
    #[prost(message, optional, tag = "4")]
    pub snapshot: Option<AppStateSnapshot>,
}

/// The collection is at this version now.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStatePushed {
    /// The new version.
    #[prost(uint64, tag = "1")]
    pub version: u64,
}

/// Fetches a collection of the caller's account after `after_version`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FetchAppState {
    /// The collection.
    #[prost(string, tag = "1")]
    pub collection: String,
    /// The version the device has verified.
    #[prost(uint64, tag = "2")]
    pub after_version: u64,
}

/// A collection after a version: the newest snapshot past it if there is one, then the patches after
/// that, in version order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppState {
    /// The collection.
    #[prost(string, tag = "1")]
    pub collection: String,
    /// A snapshot to start from, if it saves patches.
    #[prost(message, optional, tag = "2")]
    pub snapshot: Option<AppStateSnapshot>,
    /// The patches after the snapshot (or after `after_version`), in order.
    #[prost(message, repeated, tag = "3")]
    pub patches: Vec<AppStatePatch>,
    /// The collection's current version.
    #[prost(uint64, tag = "4")]
    pub version: u64,
}

/// Pushed to an account's other devices when a collection changed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppStateChanged {
    /// The collection.
    #[prost(string, tag = "1")]
    pub collection: String,
    /// Its new version.
    #[prost(uint64, tag = "2")]
    pub version: u64,
}

/// The app-state collections a device may use.
pub const APP_STATE_COLLECTIONS: &[&str] = &["contacts", "chat_settings", "message_flags"];

impl AppStateMutation {
    /// The structure the server and the devices rely on before any MAC is checked: a known op, 32-byte
    /// MACs, an 8-byte key id and a value within [`crate::limits::MAX_APP_STATE_VALUE`].
    pub fn validate(&self) -> Result<(), crate::ProtoError> {
        if self.op > 1 {
            return Err(crate::ProtoError::Invalid {
                what: "app-state mutation op",
            });
        }
        if self.index_mac.len() != 32 || self.value_mac.len() != 32 || self.key_id.len() != 8 {
            return Err(crate::ProtoError::Invalid {
                what: "app-state mutation MAC or key id",
            });
        }
        check_len(
            "app-state value bytes",
            self.value_blob.len(),
            crate::limits::MAX_APP_STATE_VALUE,
        )
    }
}

impl AppStatePatch {
    /// At most [`crate::limits::MAX_APP_STATE_MUTATIONS`] mutations, each valid.
    pub fn validate(&self) -> Result<(), crate::ProtoError> {
        check_len(
            "app-state patch mutations",
            self.mutations.len(),
            crate::limits::MAX_APP_STATE_MUTATIONS,
        )?;
        self.mutations
            .iter()
            .try_for_each(AppStateMutation::validate)
    }
}

impl AppStateSnapshot {
    /// At most [`crate::limits::MAX_APP_STATE_RECORDS`] records, each a valid mutation.
    pub fn validate(&self) -> Result<(), crate::ProtoError> {
        check_len(
            "app-state snapshot records",
            self.records.len(),
            crate::limits::MAX_APP_STATE_RECORDS,
        )?;
        self.records.iter().try_for_each(AppStateMutation::validate)
    }
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), crate::ProtoError> {
    if len > max {
        return Err(crate::ProtoError::LimitExceeded { what, len, max });
    }
    Ok(())
}

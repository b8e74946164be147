//! What a client tells its UI: new messages, status changes, connection state.

use natter_proto::{GroupId, MessageId, PhoneNumber};

use crate::store::{MessageRecord, MessageStatus};

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Logged in to the server.
    Connected,
    /// The connection ended; the client reconnects by itself unless the device was removed.
    Disconnected,
    /// A new entry in a conversation: an incoming message, a copy of one this account sent from another
    /// device, an undecryptable placeholder, or a notice.
    Message(MessageRecord),
    /// One of our messages moved forward (sent, delivered, read) or failed.
    Status {
        /// The conversation.
        chat: PhoneNumber,
        /// The message.
        id: MessageId,
        /// Its new status.
        status: MessageStatus,
    },
    /// Everything the server had queued when the connection opened has been processed.
    BacklogDone,
    /// This device was removed from its account (re-registration elsewhere or unlink).
    DeviceRemoved(String),
    /// An app-state collection was verified and applied up to a new version (see [`crate::appstate`]).
    AppStateChanged {
        /// The collection.
        collection: String,
        /// Its verified version.
        version: u64,
    },
    /// A fetched app-state collection failed verification (or a key is missing): it was refused and the
    /// last verified state kept; the primary is asked for a fresh snapshot.
    AppStateError {
        /// The collection.
        collection: String,
        /// Why.
        reason: String,
    },
    /// A chunk of history from our primary was verified and imported (see [`crate::history`]).
    HistoryImported {
        /// 0 for the newest chunk.
        chunk_index: u32,
        /// Chunks in this sync.
        chunk_count: u32,
        /// Messages in the chunk.
        messages: u32,
        /// The chat, for an answer to a request for older history.
        chat: Option<PhoneNumber>,
    },
    /// A chunk of history was refused (it failed verification or did not decode); nothing of it was
    /// stored.
    HistoryFailed {
        /// The chunk.
        chunk_index: u32,
        /// Chunks in this sync.
        chunk_count: u32,
        /// The chat, for an answer to a request for older history.
        chat: Option<PhoneNumber>,
        /// Why.
        reason: String,
    },
    /// A followed account came online or went offline (see [`crate::Client::presence`]).
    Presence {
        /// The account.
        phone: PhoneNumber,
        /// What we may see of it.
        presence: crate::contacts::PresenceInfo,
    },
    /// A chat partner started or stopped typing.
    Typing {
        /// Who.
        phone: PhoneNumber,
        /// Typing now.
        typing: bool,
    },
    /// A new entry in a group conversation (a message or a notice of a change).
    GroupMessage(crate::groups::GroupMessageRecord),
    /// A group's membership or settings changed (or we learnt of a new group).
    GroupChanged(crate::groups::GroupInfo),
    /// One of our group messages was sent or failed.
    GroupStatus {
        /// The group.
        group: GroupId,
        /// The message.
        id: MessageId,
        /// Its new status.
        status: MessageStatus,
    },
    /// A member's device decrypted (or the member read) one of our group messages.
    GroupReceipt {
        /// The group.
        group: GroupId,
        /// The message.
        id: MessageId,
        /// The member.
        member: PhoneNumber,
        /// Delivered or read.
        status: MessageStatus,
    },
    /// A group message repeated an earlier one's (session, index) and was refused.
    GroupReplayRefused {
        /// The group.
        group: GroupId,
        /// The claimed sender.
        sender: PhoneNumber,
        /// The repeated Megolm index.
        index: u32,
    },
}

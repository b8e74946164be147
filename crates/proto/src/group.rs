//! Groups on the wire: the requests that create and change a group (membership lives on the server), the
//! group send (one Megolm ciphertext that the server fans out to every member device), the batched
//! pairwise key shares, and what a member device finds in its queue for them.
//!
//! A group message reaches a device as an ordinary [`crate::wire::Envelope`] whose `olm_type` says what
//! its `ciphertext` holds: [`ENVELOPE_GROUP_MESSAGE`] (an encoded [`GroupMessage`]) or
//! [`ENVELOPE_GROUP_CHANGE`] (an encoded [`GroupChange`], written by the server). Key shares are normal
//! Olm envelopes (types 0 and 1) whose content is a [`crate::content::GroupKey`].

/// Envelope type: the ciphertext is an encoded [`GroupMessage`] (Megolm, end-to-end encrypted).
pub const ENVELOPE_GROUP_MESSAGE: u32 = 2;
/// Envelope type: the ciphertext is an encoded [`GroupChange`], written by the server.
pub const ENVELOPE_GROUP_CHANGE: u32 = 3;

/// A member as the server reports it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct GroupMember {
    /// The member account, E.164.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// Whether it is an admin.
    #[prost(bool, tag = "2")]
    pub admin: bool,
}

/// A group's current state.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct GroupInfo {
    /// The group id (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// Its name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Its description.
    #[prost(string, tag = "3")]
    pub description: String,
    /// Grows by one with every change.
    #[prost(uint64, tag = "4")]
    pub version: u64,
    /// Whether every member may change name, description and membership (otherwise only admins).
    #[prost(bool, tag = "5")]
    pub all_members_may_edit: bool,
    /// Every member, ordered by number.
    #[prost(message, repeated, tag = "6")]
    pub members: Vec<GroupMember>,
}

/// Creates a group with the caller as its first admin. Answered with the group's [`GroupInfo`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateGroup {
    /// The id the creator chose (16 random bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// Its name (1 to [`crate::limits::MAX_GROUP_NAME`] bytes).
    #[prost(string, tag = "2")]
    pub name: String,
    /// Its description (at most [`crate::limits::MAX_GROUP_DESCRIPTION`] bytes).
    #[prost(string, tag = "3")]
    pub description: String,
    /// The other members, E.164 (the caller is added anyway).
    #[prost(string, repeated, tag = "4")]
    pub members: Vec<String>,
}

/// Changes a group: membership, admins, settings. Only admins may, unless the group lets every member
/// edit (promoting and demoting stay with admins); anyone may remove themselves (leave). Answered with
/// the new [`GroupInfo`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateGroup {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// Accounts to add.
    #[prost(string, repeated, tag = "2")]
    pub add: Vec<String>,
    /// Members to remove (the caller itself: leave).
    #[prost(string, repeated, tag = "3")]
    pub remove: Vec<String>,
    /// Members to make admins.
    #[prost(string, repeated, tag = "4")]
    pub promote: Vec<String>,
    /// Admins to make ordinary members.
    #[prost(string, repeated, tag = "5")]
    pub demote: Vec<String>,
    /// A new name.
    #[prost(string, optional, tag = "6")]
    pub name: Option<String>,
    /// A new description.
    #[prost(string, optional, tag = "7")]
    pub description: Option<String>,
    /// A new "all members may edit" setting.
    #[prost(bool, optional, tag = "8")]
    pub all_members_may_edit: Option<bool>,
}

/// Asks for a group's state (members only). Answered with [`GroupInfo`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetGroup {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
}

/// Asks for every group the caller's account is a member of. Answered with [`Groups`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListGroups {}

/// The caller's groups.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Groups {
    /// One entry per group.
    #[prost(message, repeated, tag = "1")]
    pub groups: Vec<GroupInfo>,
}

/// Sends one group message: a Megolm ciphertext, fanned out by the server to every device of every
/// member but the sending device. Answered with [`crate::wire::Sent`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct SendGroupMessage {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// The sender's id for the message (idempotency key, as for 1:1).
    #[prost(bytes = "vec", tag = "2")]
    pub message_id: Vec<u8>,
    /// The group version the sender encrypted for; an older one is refused with `GroupChanged`.
    #[prost(uint64, tag = "3")]
    pub group_version: u64,
    /// The Megolm session that encrypted it.
    #[prost(string, tag = "4")]
    pub session_id: String,
    /// The Megolm message.
    #[prost(bytes = "vec", tag = "5")]
    pub ciphertext: Vec<u8>,
}

/// Pairwise Olm messages that carry the sender's group session key to member devices that lack it.
/// Every addressed device must belong to a member. Answered with [`crate::wire::Sent`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShareGroupKeys {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// Idempotency key for this batch.
    #[prost(bytes = "vec", tag = "2")]
    pub message_id: Vec<u8>,
    /// One Olm message per device, at most [`crate::limits::MAX_KEY_SHARES_PER_REQUEST`].
    #[prost(message, repeated, tag = "3")]
    pub shares: Vec<crate::wire::DeviceMessage>,
}

/// What a member device finds in an [`ENVELOPE_GROUP_MESSAGE`] envelope.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupMessage {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// The sender's Megolm session.
    #[prost(string, tag = "2")]
    pub session_id: String,
    /// The Megolm message; its plaintext is a [`crate::content::Content`].
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
}

/// A change of a group, announced by the server to every member device (and to removed members, whose
/// last message about the group it is), in version order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupChange {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// The version this change created.
    #[prost(uint64, tag = "2")]
    pub version: u64,
    /// Who made the change.
    #[prost(string, tag = "3")]
    pub actor: String,
    /// Members added (with their admin flag).
    #[prost(message, repeated, tag = "4")]
    pub added: Vec<GroupMember>,
    /// Members removed (or who left).
    #[prost(string, repeated, tag = "5")]
    pub removed: Vec<String>,
    /// Members who became admins.
    #[prost(string, repeated, tag = "6")]
    pub promoted: Vec<String>,
    /// Admins who became ordinary members.
    #[prost(string, repeated, tag = "7")]
    pub demoted: Vec<String>,
    /// The name after the change.
    #[prost(string, tag = "8")]
    pub name: String,
    /// The description after the change.
    #[prost(string, tag = "9")]
    pub description: String,
    /// The setting after the change.
    #[prost(bool, tag = "10")]
    pub all_members_may_edit: bool,
    /// The whole state after the change, for devices that did not know the group before (the creation,
    /// and members just added); others apply the delta.
    #[prost(message, optional, tag = "11")]
    pub full: Option<GroupInfo>,
}

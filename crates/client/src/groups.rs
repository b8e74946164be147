//! Groups: membership (kept by the server, mirrored here from its announcements), sending with sender
//! keys and receiving.
//!
//! Each device has one outbound Megolm session per group. Before a message it shares the session key,
//! over the pairwise Olm sessions of [`crate::messaging`], with every member device that lacks it (from
//! the current index only), then encrypts the message once; the server fans the one ciphertext out. A
//! member or device that left makes the next message start a new session (rotation). Received messages
//! are checked against replays: (session, index) is remembered with the message id it carried.
//!
//! Group state lives in the account-scoped values of the client store (JSON under the `group…` and
//! `megolm…` prefixes), saved with the envelope that changed it: nothing is acknowledged before it is
//! durable. Sends go through a persisted group outbox, flushed with the 1:1 outbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use natter_crypto::megolm::{InboundSession, OutboundGroupSession};
use natter_crypto::{OlmCiphertext, OlmSession};
use natter_proto::content::{self, Content, GroupKey, GroupKeyRequest, Text};
use natter_proto::group::{
    CreateGroup, GetGroup, GroupChange, GroupMessage, ListGroups, SendGroupMessage, ShareGroupKeys,
    UpdateGroup,
};
use natter_proto::limits::{MAX_GROUP_MEMBERS, MAX_KEY_SHARES_PER_REQUEST, MAX_TEXT_BYTES};
use natter_proto::wire::{
    ClaimKeys, DeviceMessage, Envelope, ErrorCode, SignedPreKey, request, response,
};
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::client::{Client, unexpected};
use crate::error::{ClientError, Result};
use crate::events::Event;
use crate::messaging::{CONNECTION_WAIT, key32};
use crate::store::{Changes, IdentityRecord, MessageKind, MessageStatus, SessionRecord};

const V_GROUP: &str = "group/";
const V_MSG: &str = "group-msg/";
const V_MSG_INDEX: &str = "group-msg-id/";
const V_UNSHOWN: &str = "group-unshown/";
const V_OUTBOX: &str = "group-outbox/";
const V_OUT_SESSION: &str = "megolm-out/";
const V_IN_SESSION: &str = "megolm-in/";
const V_SEEN: &str = "megolm-seen/";
const V_PENDING: &str = "megolm-pending/";
/// Group sends tried again after the group or a device list changed under them.
const MAX_GROUP_SEND_ROUNDS: usize = 4;
/// Prekey claims in flight at once when keys go to many new devices.
const CLAIMS_IN_FLIGHT: usize = 32;

/// Session ids are base64 and may hold `/`, which the value keys use as a separator.
fn key_safe(s: &str) -> String {
    s.replace('/', "_")
}

fn corrupt(e: impl std::fmt::Display) -> ClientError {
    ClientError::Store(crate::store::StoreError::Corrupt(e.to_string()))
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(corrupt)
}

fn from_json<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(corrupt)
}

/// A group member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMemberInfo {
    /// The member account.
    pub phone: PhoneNumber,
    /// Whether it is an admin.
    pub admin: bool,
}

/// A group as this device knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Its id.
    pub id: GroupId,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// The server's version of it.
    pub version: u64,
    /// Whether every member may edit (otherwise only admins).
    pub all_members_may_edit: bool,
    /// Its members, ordered by number.
    pub members: Vec<GroupMemberInfo>,
    /// This account is no longer a member (it left or was removed).
    pub left: bool,
}

impl GroupInfo {
    fn from_wire(g: &natter_proto::group::GroupInfo, me: &PhoneNumber) -> Result<GroupInfo> {
        let id = GroupId::from_slice(&g.group_id)
            .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
        let mut members = Vec::with_capacity(g.members.len());
        for m in g.members.iter().take(MAX_GROUP_MEMBERS) {
            let phone = PhoneNumber::from_e164(&m.phone)
                .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
            members.push(GroupMemberInfo {
                phone,
                admin: m.admin,
            });
        }
        members.sort_by(|a, b| a.phone.cmp(&b.phone));
        let left = !members.iter().any(|m| m.phone == *me);
        Ok(GroupInfo {
            id,
            name: g.name.clone(),
            description: g.description.clone(),
            version: g.version,
            all_members_may_edit: g.all_members_may_edit,
            members,
            left,
        })
    }

    /// Whether `phone` is a member.
    pub fn is_member(&self, phone: &PhoneNumber) -> bool {
        self.members.iter().any(|m| m.phone == *phone)
    }

    /// Whether `phone` is an admin.
    pub fn is_admin(&self, phone: &PhoneNumber) -> bool {
        self.members.iter().any(|m| m.phone == *phone && m.admin)
    }
}

/// One entry of a group conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMessageRecord {
    /// The group.
    pub group: GroupId,
    /// The message id.
    pub id: MessageId,
    /// Who sent it (for a notice: who made the change).
    pub sender: PhoneNumber,
    /// From which device.
    pub sender_device: DeviceId,
    /// Sent by this account.
    pub from_me: bool,
    /// Text, notice or undecryptable.
    pub kind: MessageKind,
    /// Its text.
    pub text: String,
    /// Sender's clock (ms since epoch).
    pub sent_at_ms: u64,
    /// Server's clock (ms since epoch; 0 while pending).
    pub server_ts_ms: u64,
    /// For our own messages: pending, sent or failed; `Received` for the others'.
    pub status: MessageStatus,
    /// Whether a `recv` has printed it.
    pub shown: bool,
    /// For our own messages: how far each member got (delivered or read).
    pub receipts: BTreeMap<PhoneNumber, MessageStatus>,
}

/// Per-member receipts of one of our group messages, summarised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptSummary {
    /// Members other than us.
    pub members: usize,
    /// Members with a device that decrypted it (read included).
    pub delivered: usize,
    /// Members who saw it.
    pub read: usize,
    /// Each member's state: `Sent` (nothing yet), `Delivered` or `Read`.
    pub per_member: Vec<(PhoneNumber, MessageStatus)>,
}

/// A group send waiting for the server (the plaintext content, encrypted at delivery).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OutboxEntry {
    group: GroupId,
    id: MessageId,
    content: Vec<u8>,
    created_ms: u64,
}

impl OutboxEntry {
    fn key(&self) -> String {
        format!("{V_OUTBOX}{:020}/{}", self.created_ms, self.id)
    }
}

/// This device's outbound session for a group and who has its key.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OutboundState {
    session_id: String,
    pickle: String,
    /// Devices that were sent the key.
    shared: BTreeSet<(PhoneNumber, DeviceId)>,
    /// For each member account: the first index its devices were given (key requests for earlier
    /// messages are not answered: they were sent before it joined).
    members_from: BTreeMap<PhoneNumber, u32>,
}

/// Another device's session key for a group.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct InboundState {
    sender: PhoneNumber,
    device: DeviceId,
    pickle: String,
    first_index: u32,
}

/// A group message that arrived before its key; decrypted when the key comes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Pending {
    sender: PhoneNumber,
    device: DeviceId,
    transport_id: MessageId,
    server_ts_ms: u64,
    ciphertext: Vec<u8>,
}

/// A device to encrypt a key share to.
#[derive(Clone, Debug)]
pub(crate) struct ShareTarget {
    phone: PhoneNumber,
    device: DeviceId,
    curve: [u8; 32],
    ed: [u8; 32],
}

/// Cached member devices per group: (group version, device generation, devices).
pub(crate) type TargetCache = HashMap<GroupId, (u64, u64, Arc<Vec<ShareTarget>>)>;

/// What processing a group envelope or key asks for after it is saved.
#[derive(Default)]
pub(crate) struct GroupFollowUps {
    /// Events to emit.
    pub events: Vec<Event>,
    /// Delivered receipts to send: (sender account, message id).
    pub delivered: Vec<(PhoneNumber, MessageId)>,
    /// Key requests to send: (group, sender, device, session, index, failed transport id).
    pub key_requests: Vec<(GroupId, PhoneNumber, DeviceId, String, u32, MessageId)>,
    /// Key requests to answer: (group, requester, device, session, index).
    pub key_answers: Vec<(GroupId, PhoneNumber, DeviceId, String, u32)>,
    /// Groups to fetch from the server (a change was missed).
    pub refresh: Vec<GroupId>,
}

fn msg_key(group: &GroupId, id: &MessageId) -> String {
    format!("{V_MSG}{group}/{id}")
}

fn unshown_key(m: &GroupMessageRecord) -> String {
    format!(
        "{V_UNSHOWN}{:020}/{:020}/{}/{}",
        m.server_ts_ms.max(m.sent_at_ms),
        m.sent_at_ms,
        m.group,
        m.id
    )
}

/// Saves a message with its index entries.
fn put_message(changes: &mut Changes, m: &GroupMessageRecord) -> Result<()> {
    changes
        .values
        .push((msg_key(&m.group, &m.id), Some(to_json(m)?)));
    changes.values.push((
        format!("{V_MSG_INDEX}{}", m.id),
        Some(m.group.to_hex().into_bytes()),
    ));
    if !m.shown {
        changes.values.push((unshown_key(m), Some(Vec::new())));
    }
    Ok(())
}

/// The notice text for a change from `before` (if known) to `after`.
fn describe(before: Option<&GroupInfo>, after: &GroupInfo, actor: &PhoneNumber) -> String {
    let Some(before) = before else {
        return if after.version <= 1 {
            format!("{actor} created the group \"{}\"", after.name)
        } else {
            format!("{actor} added you to the group \"{}\"", after.name)
        };
    };
    let was: BTreeSet<&PhoneNumber> = before.members.iter().map(|m| &m.phone).collect();
    let now: BTreeSet<&PhoneNumber> = after.members.iter().map(|m| &m.phone).collect();
    let mut parts = Vec::new();
    let join = |v: Vec<&&PhoneNumber>| {
        v.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let added: Vec<_> = now.difference(&was).collect();
    if !added.is_empty() {
        parts.push(format!("{actor} added {}", join(added)));
    }
    let removed: Vec<_> = was.difference(&now).collect();
    if removed.len() == 1 && **removed[0] == *actor {
        parts.push(format!("{actor} left"));
    } else if !removed.is_empty() {
        parts.push(format!("{actor} removed {}", join(removed)));
    }
    for m in &after.members {
        let old = before.members.iter().find(|o| o.phone == m.phone);
        if m.admin && old.is_some_and(|o| !o.admin) {
            parts.push(format!("{} is now an admin", m.phone));
        }
        if !m.admin && old.is_some_and(|o| o.admin) {
            parts.push(format!("{} is no longer an admin", m.phone));
        }
    }
    if before.name != after.name {
        parts.push(format!("{actor} renamed the group to \"{}\"", after.name));
    }
    if before.description != after.description {
        parts.push(format!("{actor} changed the description"));
    }
    if before.all_members_may_edit != after.all_members_may_edit {
        parts.push(if after.all_members_may_edit {
            format!("{actor} let every member edit the group")
        } else {
            format!("{actor} let only admins edit the group")
        });
    }
    if parts.is_empty() {
        format!("{actor} changed the group")
    } else {
        parts.join("; ")
    }
}

/// A notice's id: fixed per (group, version), so a change is noted once on every device.
fn notice_id(group: &GroupId, version: u64) -> MessageId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&group.as_bytes()[..8]);
    b[8..].copy_from_slice(&version.to_be_bytes());
    // Flip a bit so it never equals the server's id of the announcement envelope.
    b[0] ^= 0x80;
    MessageId::from_bytes(b)
}

impl Client {
    // ---- reading local state ----

    /// A group as this device knows it.
    pub async fn group(&self, id: &GroupId) -> Result<Option<GroupInfo>> {
        match self.inner.store.value(&format!("{V_GROUP}{id}")).await? {
            Some(b) => Ok(Some(from_json(&b)?)),
            None => Ok(None),
        }
    }

    /// Every group this device knows, current ones first, then by name.
    pub async fn groups(&self) -> Result<Vec<GroupInfo>> {
        let mut out = Vec::new();
        for (_, b) in self.inner.store.values_with_prefix(V_GROUP).await? {
            out.push(from_json::<GroupInfo>(&b)?);
        }
        out.sort_by(|a, b| (a.left, &a.name, a.id).cmp(&(b.left, &b.name, b.id)));
        Ok(out)
    }

    /// Finds a group by id (hex) or by a name that only one known group has.
    pub async fn find_group(&self, key: &str) -> Result<GroupInfo> {
        if let Ok(id) = GroupId::from_hex(key)
            && let Some(g) = self.group(&id).await?
        {
            return Ok(g);
        }
        let groups = self.groups().await?;
        let mut found: Vec<&GroupInfo> = groups.iter().filter(|g| g.name == key).collect();
        if found.is_empty() {
            found = groups
                .iter()
                .filter(|g| g.id.to_hex().starts_with(&key.to_ascii_lowercase()) && key.len() >= 4)
                .collect();
        }
        match found.as_slice() {
            [g] => Ok((*g).clone()),
            [] => Err(ClientError::InvalidInput(format!("no group \"{key}\""))),
            _ => Err(ClientError::InvalidInput(format!(
                "several groups match \"{key}\": use the group id"
            ))),
        }
    }

    /// A group conversation, oldest first.
    pub async fn group_history(&self, id: &GroupId) -> Result<Vec<GroupMessageRecord>> {
        let mut out = Vec::new();
        for (_, b) in self
            .inner
            .store
            .values_with_prefix(&format!("{V_MSG}{id}/"))
            .await?
        {
            out.push(from_json::<GroupMessageRecord>(&b)?);
        }
        out.sort_by_key(|m| (m.server_ts_ms.max(m.sent_at_ms), m.sent_at_ms, m.id));
        Ok(out)
    }

    /// One group message.
    pub async fn group_message(
        &self,
        group: &GroupId,
        id: &MessageId,
    ) -> Result<Option<GroupMessageRecord>> {
        match self.inner.store.value(&msg_key(group, id)).await? {
            Some(b) => Ok(Some(from_json(&b)?)),
            None => Ok(None),
        }
    }

    /// Receipts of one of our group messages, per member.
    pub async fn group_receipts(&self, group: &GroupId, id: &MessageId) -> Result<ReceiptSummary> {
        let me = self.registered_identity().await?;
        let g = self
            .group(group)
            .await?
            .ok_or_else(|| ClientError::InvalidInput("unknown group".into()))?;
        let m = self
            .group_message(group, id)
            .await?
            .ok_or_else(|| ClientError::InvalidInput(format!("no message {id} in this group")))?;
        if !m.from_me {
            return Err(ClientError::InvalidInput(
                "receipts are kept for our own messages only".into(),
            ));
        }
        let per_member: Vec<(PhoneNumber, MessageStatus)> = g
            .members
            .iter()
            .filter(|x| x.phone != me.phone)
            .map(|x| {
                (
                    x.phone.clone(),
                    m.receipts
                        .get(&x.phone)
                        .copied()
                        .unwrap_or(MessageStatus::Sent),
                )
            })
            .collect();
        Ok(ReceiptSummary {
            members: per_member.len(),
            delivered: per_member
                .iter()
                .filter(|(_, s)| *s >= MessageStatus::Delivered)
                .count(),
            read: per_member
                .iter()
                .filter(|(_, s)| *s == MessageStatus::Read)
                .count(),
            per_member,
        })
    }

    /// Group messages not yet shown, oldest first; marks them shown and sends read receipts.
    pub async fn take_unshown_group(&self) -> Result<Vec<GroupMessageRecord>> {
        let keys = self.inner.store.values_with_prefix(V_UNSHOWN).await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut changes = Changes::default();
        let mut out = Vec::new();
        let mut read: BTreeMap<PhoneNumber, Vec<MessageId>> = BTreeMap::new();
        for (key, _) in keys {
            changes.values.push((key.clone(), None));
            let mut parts = key.trim_start_matches(V_UNSHOWN).rsplit('/');
            let (Some(id), Some(group)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(id), Ok(group)) = (MessageId::from_hex(id), GroupId::from_hex(group)) else {
                continue;
            };
            if let Some(mut m) = self.group_message(&group, &id).await? {
                m.shown = true;
                changes
                    .values
                    .push((msg_key(&group, &id), Some(to_json(&m)?)));
                if !m.from_me && m.kind == MessageKind::Text {
                    read.entry(m.sender.clone()).or_default().push(m.id);
                }
                out.push(m);
            }
        }
        if !self.read_receipts_off().await? {
            for (sender, ids) in read {
                self.queue_group_receipts(&mut changes, &sender, &ids, content::ReceiptKind::Read)?;
            }
        }
        self.inner.store.save_changes(changes).await?;
        if self.is_connected() {
            self.spawn_outbox_flush();
        }
        Ok(out)
    }

    pub(crate) fn queue_group_receipts(
        &self,
        changes: &mut Changes,
        sender: &PhoneNumber,
        ids: &[MessageId],
        kind: content::ReceiptKind,
    ) -> Result<()> {
        self.queue_receipts(changes, sender, ids, kind)
    }

    // ---- membership ----

    /// Creates a group with us as its admin and the given members. Returns it once the server has it.
    pub async fn create_group(&self, name: &str, members: &[PhoneNumber]) -> Result<GroupInfo> {
        let me = self.registered_identity().await?;
        let mut others: BTreeSet<&PhoneNumber> = members.iter().collect();
        others.remove(&me.phone);
        if others.len() + 1 > MAX_GROUP_MEMBERS {
            return Err(ClientError::InvalidInput(format!(
                "a group has at most {MAX_GROUP_MEMBERS} members; this one would have {}",
                others.len() + 1
            )));
        }
        let id = GroupId::from_bytes(*crate::random_message_id()?.as_bytes());
        let conn = self.connection(CONNECTION_WAIT).await?;
        let resp = conn
            .request(request::Body::CreateGroup(CreateGroup {
                group_id: id.as_bytes().to_vec(),
                name: name.to_owned(),
                description: String::new(),
                members: others.iter().map(|p| p.as_str().to_owned()).collect(),
            }))
            .await?;
        let response::Body::Group(g) = resp else {
            return Err(unexpected());
        };
        self.save_own_change(&me, None, &g).await
    }

    /// Applies a change we made (the server's answer) and notes it.
    async fn save_own_change(
        &self,
        me: &IdentityRecord,
        before: Option<GroupInfo>,
        g: &natter_proto::group::GroupInfo,
    ) -> Result<GroupInfo> {
        let after = GroupInfo::from_wire(g, &me.phone)?;
        let mut changes = Changes::default();
        let mut events = Vec::new();
        self.note_change(
            me,
            before.as_ref(),
            &after,
            &me.phone,
            me.device_id,
            crate::now_ms(),
            true,
            &mut changes,
            &mut events,
        )?;
        self.inner.store.save_changes(changes).await?;
        for e in events {
            self.emit(e);
        }
        Ok(after)
    }

    /// Stores a group's new state with a notice, and drops our sender key when anyone left.
    #[allow(clippy::too_many_arguments)]
    fn note_change(
        &self,
        me: &IdentityRecord,
        before: Option<&GroupInfo>,
        after: &GroupInfo,
        actor: &PhoneNumber,
        actor_device: DeviceId,
        ts: u64,
        shown: bool,
        changes: &mut Changes,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        changes
            .values
            .push((format!("{V_GROUP}{}", after.id), Some(to_json(after)?)));
        let someone_left = before.is_some_and(|b| {
            b.members
                .iter()
                .any(|m| !after.members.iter().any(|a| a.phone == m.phone))
        });
        if someone_left || after.left {
            changes
                .values
                .push((format!("{V_OUT_SESSION}{}", after.id), None));
        }
        let notice = GroupMessageRecord {
            group: after.id,
            id: notice_id(&after.id, after.version),
            sender: actor.clone(),
            sender_device: actor_device,
            from_me: *actor == me.phone,
            kind: MessageKind::Notice,
            text: describe(before, after, actor),
            sent_at_ms: ts,
            server_ts_ms: ts,
            status: MessageStatus::Received,
            shown,
            receipts: BTreeMap::new(),
        };
        put_message(changes, &notice)?;
        events.push(Event::GroupChanged(after.clone()));
        events.push(Event::GroupMessage(notice));
        Ok(())
    }

    async fn update_group(&self, id: &GroupId, mut req: UpdateGroup) -> Result<GroupInfo> {
        let me = self.registered_identity().await?;
        let before = self.group(id).await?;
        req.group_id = id.as_bytes().to_vec();
        let conn = self.connection(CONNECTION_WAIT).await?;
        let resp = conn.request(request::Body::UpdateGroup(req)).await?;
        let response::Body::Group(g) = resp else {
            return Err(unexpected());
        };
        self.save_own_change(&me, before, &g).await
    }

    fn numbers(list: &[PhoneNumber]) -> Vec<String> {
        list.iter().map(|p| p.as_str().to_owned()).collect()
    }

    /// Adds members (admins only, unless every member may edit).
    pub async fn group_add(&self, id: &GroupId, members: &[PhoneNumber]) -> Result<GroupInfo> {
        self.update_group(
            id,
            UpdateGroup {
                add: Self::numbers(members),
                ..Default::default()
            },
        )
        .await
    }

    /// Removes members (admins only, unless every member may edit). Every member's sender key is
    /// replaced before its next message.
    pub async fn group_remove(&self, id: &GroupId, members: &[PhoneNumber]) -> Result<GroupInfo> {
        self.update_group(
            id,
            UpdateGroup {
                remove: Self::numbers(members),
                ..Default::default()
            },
        )
        .await
    }

    /// Makes members admins (admins only).
    pub async fn group_promote(&self, id: &GroupId, members: &[PhoneNumber]) -> Result<GroupInfo> {
        self.update_group(
            id,
            UpdateGroup {
                promote: Self::numbers(members),
                ..Default::default()
            },
        )
        .await
    }

    /// Makes admins ordinary members (admins only).
    pub async fn group_demote(&self, id: &GroupId, members: &[PhoneNumber]) -> Result<GroupInfo> {
        self.update_group(
            id,
            UpdateGroup {
                demote: Self::numbers(members),
                ..Default::default()
            },
        )
        .await
    }

    /// Leaves a group.
    pub async fn group_leave(&self, id: &GroupId) -> Result<GroupInfo> {
        let me = self.registered_identity().await?;
        self.update_group(
            id,
            UpdateGroup {
                remove: vec![me.phone.as_str().to_owned()],
                ..Default::default()
            },
        )
        .await
    }

    /// Renames a group (and optionally changes its description).
    pub async fn group_rename(
        &self,
        id: &GroupId,
        name: &str,
        description: Option<&str>,
    ) -> Result<GroupInfo> {
        self.update_group(
            id,
            UpdateGroup {
                name: Some(name.to_owned()),
                description: description.map(str::to_owned),
                ..Default::default()
            },
        )
        .await
    }

    /// Lets every member (or only admins) edit name, description and membership.
    pub async fn group_set_all_may_edit(&self, id: &GroupId, all: bool) -> Result<GroupInfo> {
        self.update_group(
            id,
            UpdateGroup {
                all_members_may_edit: Some(all),
                ..Default::default()
            },
        )
        .await
    }

    /// Fetches a group from the server and stores it (a member's view); `None` if we are not a member.
    pub async fn refresh_group(&self, id: &GroupId) -> Result<Option<GroupInfo>> {
        let me = self.registered_identity().await?;
        let conn = self.connection(CONNECTION_WAIT).await?;
        let before = self.group(id).await?;
        match conn
            .request(request::Body::GetGroup(GetGroup {
                group_id: id.as_bytes().to_vec(),
            }))
            .await
        {
            Ok(response::Body::Group(g)) => {
                let after = GroupInfo::from_wire(&g, &me.phone)?;
                if before.as_ref().is_some_and(|b| b.version >= after.version) {
                    return Ok(before);
                }
                let mut changes = Changes::default();
                changes
                    .values
                    .push((format!("{V_GROUP}{id}"), Some(to_json(&after)?)));
                if before.is_some() {
                    // A change was missed: whoever left, our key must not reach them.
                    changes.values.push((format!("{V_OUT_SESSION}{id}"), None));
                }
                self.inner.store.save_changes(changes).await?;
                self.emit(Event::GroupChanged(after.clone()));
                Ok(Some(after))
            }
            Ok(_) => Err(unexpected()),
            Err(ClientError::Server {
                code: ErrorCode::NotGroupMember | ErrorCode::UnknownGroup,
                ..
            }) => {
                if let Some(mut b) = before {
                    b.left = true;
                    let mut changes = Changes::default();
                    changes
                        .values
                        .push((format!("{V_GROUP}{id}"), Some(to_json(&b)?)));
                    changes.values.push((format!("{V_OUT_SESSION}{id}"), None));
                    self.inner.store.save_changes(changes).await?;
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches every group of our account from the server (a new companion learns them so).
    pub async fn refresh_groups(&self) -> Result<Vec<GroupInfo>> {
        let me = self.registered_identity().await?;
        let conn = self.connection(CONNECTION_WAIT).await?;
        let response::Body::Groups(list) = conn
            .request(request::Body::ListGroups(ListGroups {}))
            .await?
        else {
            return Err(unexpected());
        };
        let mut changes = Changes::default();
        for g in &list.groups {
            let info = GroupInfo::from_wire(g, &me.phone)?;
            let known = self.group(&info.id).await?;
            if known.is_none_or(|k| k.version < info.version) {
                changes
                    .values
                    .push((format!("{V_GROUP}{}", info.id), Some(to_json(&info)?)));
            }
        }
        self.inner.store.save_changes(changes).await?;
        self.groups().await
    }

    // ---- sending ----

    /// Sends a text to a group. Returns once the server has accepted it for every member device; if the
    /// server cannot be reached, it stays in the outbox and goes out on the next connection.
    pub async fn send_group_text(&self, group: &GroupId, text: &str) -> Result<GroupMessageRecord> {
        if text.trim().is_empty() {
            return Err(ClientError::InvalidInput("the message is empty".into()));
        }
        if text.len() > MAX_TEXT_BYTES {
            return Err(ClientError::InvalidInput(format!(
                "the message is {} bytes; the limit is {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        let me = self.registered_identity().await?;
        let g = self
            .group(group)
            .await?
            .ok_or_else(|| ClientError::InvalidInput("unknown group".into()))?;
        if g.left {
            return Err(ClientError::InvalidInput(
                "you are no longer a member of this group".into(),
            ));
        }
        let id = crate::random_message_id()?;
        let now = crate::now_ms();
        let content = Content {
            message_id: id.as_bytes().to_vec(),
            sent_at_ms: now,
            body: Some(content::content::Body::Text(Text { body: text.into() })),
            conversation: String::new(),
        };
        let mut record = GroupMessageRecord {
            group: *group,
            id,
            sender: me.phone.clone(),
            sender_device: me.device_id,
            from_me: true,
            kind: MessageKind::Text,
            text: text.into(),
            sent_at_ms: now,
            server_ts_ms: 0,
            status: MessageStatus::Pending,
            shown: true,
            receipts: BTreeMap::new(),
        };
        let entry = OutboxEntry {
            group: *group,
            id,
            content: content.encode_to_vec(),
            created_ms: now,
        };
        let mut changes = Changes::default();
        put_message(&mut changes, &record)?;
        changes.values.push((entry.key(), Some(to_json(&entry)?)));
        self.inner.store.save_changes(changes).await?;
        let _sending = self.inner.sending.lock().await;
        let ts = self.deliver_group(&entry).await?;
        record.status = MessageStatus::Sent;
        record.server_ts_ms = ts;
        Ok(record)
    }

    /// Sends the queued group messages, in order. Caller holds the sending lock.
    pub(crate) async fn flush_group_outbox(&self) -> Result<()> {
        for (_, b) in self.inner.store.values_with_prefix(V_OUTBOX).await? {
            let entry: OutboxEntry = from_json(&b)?;
            match self.deliver_group(&entry).await {
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::info!(error = %e, "group message refused for good"),
            }
        }
        Ok(())
    }

    async fn set_group_status(
        &self,
        entry: &OutboxEntry,
        status: MessageStatus,
        ts: u64,
    ) -> Result<()> {
        let mut changes = Changes::default();
        changes.values.push((entry.key(), None));
        if let Some(mut m) = self.group_message(&entry.group, &entry.id).await? {
            m.status = status;
            if ts > 0 {
                m.server_ts_ms = ts;
            }
            changes
                .values
                .push((msg_key(&entry.group, &entry.id), Some(to_json(&m)?)));
        }
        self.inner.store.save_changes(changes).await?;
        self.emit(Event::GroupStatus {
            group: entry.group,
            id: entry.id,
            status,
        });
        Ok(())
    }

    /// Shares keys where needed, encrypts once, sends; returns the server time.
    async fn deliver_group(&self, entry: &OutboxEntry) -> Result<u64> {
        let me = self.registered_identity().await?;
        let mut last = None;
        let mut refresh_lists = false;
        for _ in 0..MAX_GROUP_SEND_ROUNDS {
            let Some(g) = self.group(&entry.group).await? else {
                return self
                    .fail_group(entry, ClientError::InvalidInput("unknown group".into()))
                    .await;
            };
            if g.left {
                return self
                    .fail_group(
                        entry,
                        ClientError::InvalidInput("no longer a member of the group".into()),
                    )
                    .await;
            }
            let result = self.try_deliver_group(&me, &g, entry, refresh_lists).await;
            match result {
                Ok(ts) => {
                    self.set_group_status(entry, MessageStatus::Sent, ts)
                        .await?;
                    return Ok(ts);
                }
                Err(ClientError::Server {
                    code: ErrorCode::GroupChanged,
                    ..
                }) => {
                    // Membership changed (fetch the group), or if it did not, a member's devices did
                    // (fetch their lists again, and send without the digest next time).
                    let Some(fresh) = self.refresh_group(&entry.group).await? else {
                        return self
                            .fail_group(
                                entry,
                                ClientError::InvalidInput("no longer a member of the group".into()),
                            )
                            .await;
                    };
                    refresh_lists = fresh.version == g.version;
                    last = result.err();
                }
                Err(e) => return self.fail_group(entry, e).await,
            }
        }
        Err(last.unwrap_or(ClientError::Disconnected))
    }

    async fn fail_group(&self, entry: &OutboxEntry, e: ClientError) -> Result<u64> {
        let permanent = match &e {
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::NotGroupMember
                    | ErrorCode::UnknownGroup
                    | ErrorCode::BadRequest
                    | ErrorCode::LimitExceeded
            ),
            ClientError::InvalidInput(_) | ClientError::Crypto(_) => true,
            _ => false,
        };
        if permanent {
            self.set_group_status(entry, MessageStatus::Failed, 0)
                .await?;
        }
        Err(e)
    }

    /// The devices a group message goes to: every device on the verified lists of the members, but ours.
    async fn group_targets(
        &self,
        me: &IdentityRecord,
        g: &GroupInfo,
        refresh: bool,
    ) -> Result<Vec<ShareTarget>> {
        use std::sync::atomic::Ordering;
        let generation = self.inner.device_generation.load(Ordering::Acquire);
        if !refresh
            && let Some((version, r#gen, targets)) = self
                .inner
                .group_targets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&g.id)
            && *version == g.version
            && *r#gen == generation
        {
            return Ok(targets.as_ref().clone());
        }
        let fetches: Vec<_> = g
            .members
            .iter()
            .map(|m| {
                let client = self.background();
                let phone = m.phone.clone();
                async move {
                    let r = client.peer_devices(&phone, refresh).await;
                    (phone, r)
                }
            })
            .collect();
        let lists: Vec<(PhoneNumber, Result<crate::devices::PeerDevices>)> =
            futures::stream::iter(fetches)
                .buffer_unordered(CLAIMS_IN_FLIGHT)
                .collect()
                .await;
        let mut out = Vec::new();
        for (phone, list) in lists {
            let list = match list {
                Ok(l) => l,
                // A member whose list does not verify gets no key (and so cannot read); the others do.
                Err(e) if !e.is_transient() => {
                    tracing::warn!(error = %e, member = %phone, "member's device list refused");
                    continue;
                }
                Err(e) => return Err(e),
            };
            for d in list.list.devices() {
                let Ok(device) = DeviceId::new(d.device_id) else {
                    continue;
                };
                if phone == me.phone && device == me.device_id {
                    continue;
                }
                out.push(ShareTarget {
                    phone: phone.clone(),
                    device,
                    curve: key32(&d.identity_curve)?,
                    ed: key32(&d.identity_ed)?,
                });
            }
        }
        out.sort_by(|a, b| (&a.phone, a.device).cmp(&(&b.phone, b.device)));
        // Fetching lists above bumps the generation; the cache holds what this view was built from.
        let generation = self.inner.device_generation.load(Ordering::Acquire);
        self.inner
            .group_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(g.id, (g.version, generation, Arc::new(out.clone())));
        Ok(out)
    }

    async fn try_deliver_group(
        &self,
        me: &IdentityRecord,
        g: &GroupInfo,
        entry: &OutboxEntry,
        refresh: bool,
    ) -> Result<u64> {
        let targets = self.group_targets(me, g, refresh).await?;
        let pickle_key = self.inner.cipher.pickle_key();
        let out_key = format!("{V_OUT_SESSION}{}", g.id);
        let stored: Option<OutboundState> = match self.inner.store.value(&out_key).await? {
            Some(b) => Some(from_json(&b)?),
            None => None,
        };
        let current: BTreeSet<(PhoneNumber, DeviceId)> = targets
            .iter()
            .map(|t| (t.phone.clone(), t.device))
            .collect();
        let members: BTreeSet<&PhoneNumber> = g.members.iter().map(|m| &m.phone).collect();
        // Rotation: a device or member that had our key and is gone gets nothing from this key on.
        let (mut session, mut state) = match stored {
            Some(s)
                if s.shared.is_subset(&current)
                    && s.members_from.keys().all(|p| members.contains(p)) =>
            {
                (
                    OutboundGroupSession::from_pickle(&s.pickle, &pickle_key)?,
                    s,
                )
            }
            _ => {
                let session = OutboundGroupSession::new();
                let state = OutboundState {
                    session_id: session.session_id(),
                    pickle: String::new(),
                    shared: BTreeSet::new(),
                    members_from: BTreeMap::new(),
                };
                (session, state)
            }
        };
        let need: Vec<&ShareTarget> = targets
            .iter()
            .filter(|t| !state.shared.contains(&(t.phone.clone(), t.device)))
            .collect();
        if !need.is_empty() {
            let index = session.message_index();
            let key = session
                .export_current()
                .ok_or(ClientError::Crypto(natter_crypto::CryptoError::Encrypt))?;
            let share = Content {
                message_id: crate::random_message_id()?.as_bytes().to_vec(),
                sent_at_ms: crate::now_ms(),
                body: Some(content::content::Body::GroupKey(GroupKey {
                    group_id: g.id.as_bytes().to_vec(),
                    session_id: session.session_id(),
                    session_key: key,
                    first_index: index,
                })),
                conversation: String::new(),
            };
            for batch in need.chunks(MAX_KEY_SHARES_PER_REQUEST) {
                let messages = self.encrypt_shares(batch, &share.encode_to_vec()).await?;
                let conn = self.connection(CONNECTION_WAIT).await?;
                let resp = conn
                    .request(request::Body::ShareGroupKeys(ShareGroupKeys {
                        group_id: g.id.as_bytes().to_vec(),
                        message_id: crate::random_message_id()?.as_bytes().to_vec(),
                        shares: messages,
                    }))
                    .await?;
                let response::Body::Sent(_) = resp else {
                    return Err(unexpected());
                };
                for t in batch {
                    state.shared.insert((t.phone.clone(), t.device));
                    state.members_from.entry(t.phone.clone()).or_insert(index);
                }
                state.pickle = session.pickle(&pickle_key);
                self.inner
                    .store
                    .save_changes(Changes {
                        values: vec![(out_key.clone(), Some(to_json(&state)?))],
                        ..Default::default()
                    })
                    .await?;
            }
        }
        state.members_from.entry(me.phone.clone()).or_insert(0);
        let ciphertext = session.encrypt(&entry.content);
        state.pickle = session.pickle(&pickle_key);
        // The ratchet moves on durably before the ciphertext leaves: an index is never used twice.
        self.inner
            .store
            .save_changes(Changes {
                values: vec![(out_key, Some(to_json(&state)?))],
                ..Default::default()
            })
            .await?;
        let conn = self.connection(CONNECTION_WAIT).await?;
        let resp = conn
            .request(request::Body::SendGroupMessage(SendGroupMessage {
                group_id: g.id.as_bytes().to_vec(),
                message_id: entry.id.as_bytes().to_vec(),
                group_version: g.version,
                session_id: state.session_id.clone(),
                ciphertext,
                // Checked on the first try only: a member device that no signed list holds must not
                // block the group for good.
                devices_digest: if refresh {
                    Vec::new()
                } else {
                    natter_proto::group::devices_digest(
                        targets.iter().map(|t| (t.phone.as_str(), t.device.get())),
                    )
                },
            }))
            .await?;
        match resp {
            response::Body::Sent(s) => Ok(s.server_ts_ms),
            _ => Err(unexpected()),
        }
    }

    /// Encrypts one plaintext over Olm to each target (claiming prekeys, many at once, where there is
    /// no session yet); saves every ratchet step before anything is sent.
    async fn encrypt_shares(
        &self,
        targets: &[&ShareTarget],
        plaintext: &[u8],
    ) -> Result<Vec<DeviceMessage>> {
        let store = &self.inner.store;
        let mut need: BTreeMap<PhoneNumber, Vec<u32>> = BTreeMap::new();
        let mut existing = HashMap::new();
        for t in targets {
            match store.sessions(&t.phone, t.device).await?.into_iter().next() {
                Some(s) => {
                    existing.insert((t.phone.clone(), t.device), s);
                }
                None => need
                    .entry(t.phone.clone())
                    .or_default()
                    .push(t.device.get()),
            }
        }
        let mut claimed: HashMap<(PhoneNumber, DeviceId), SignedPreKey> = HashMap::new();
        if !need.is_empty() {
            let conn = self.connection(CONNECTION_WAIT).await?;
            let claims: Vec<_> = need
                .into_iter()
                .map(|(phone, device_ids)| {
                    let conn = Arc::clone(&conn);
                    async move {
                        let r = conn
                            .request(request::Body::ClaimKeys(ClaimKeys {
                                phone: phone.as_str().to_owned(),
                                device_ids,
                            }))
                            .await;
                        (phone, r)
                    }
                })
                .collect();
            let answers: Vec<(PhoneNumber, Result<response::Body>)> = futures::stream::iter(claims)
                .buffer_unordered(CLAIMS_IN_FLIGHT)
                .collect()
                .await;
            for (phone, r) in answers {
                let response::Body::ClaimedKeys(keys) = r? else {
                    return Err(unexpected());
                };
                for k in keys.keys {
                    if let (Ok(d), Some(pk)) = (DeviceId::new(k.device_id), k.prekey) {
                        claimed.insert((phone.clone(), d), pk);
                    }
                }
            }
        }
        let _crypto = self.inner.crypto.lock().await;
        let identity = self.registered_identity().await?;
        let device = self.device_keys(&identity)?;
        let pickle_key = self.inner.cipher.pickle_key();
        let now = crate::now_ms();
        let mut changes = Changes::default();
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            let key = (t.phone.clone(), t.device);
            let mut session = match (existing.get(&key), claimed.get(&key)) {
                (Some(rec), _) => OlmSession::from_pickle(&rec.pickle, &pickle_key)?,
                (None, Some(pk)) => device.create_outbound_session(&t.curve, &t.ed, pk)?,
                // No keys on the server for it (yet): it asks for the key when a message comes.
                (None, None) => continue,
            };
            let OlmCiphertext { olm_type, body } = session.encrypt(plaintext)?;
            changes.sessions.push(SessionRecord {
                phone: t.phone.clone(),
                device_id: t.device,
                session_id: session.session_id(),
                pickle: session.pickle(&pickle_key),
                last_used_ms: now,
            });
            out.push(DeviceMessage {
                phone: t.phone.as_str().to_owned(),
                device_id: t.device.get(),
                olm_type,
                ciphertext: body,
            });
        }
        store.save_changes(changes).await?;
        Ok(out)
    }

    /// Answers a key request: shares our session key again with a current member's device, from the
    /// requested index if the member was already in the group then, otherwise from now.
    pub(crate) async fn answer_key_request(
        &self,
        group: GroupId,
        requester: PhoneNumber,
        device: DeviceId,
        session_id: String,
        index: u32,
    ) -> Result<()> {
        let _sending = self.inner.sending.lock().await;
        let Some(g) = self.group(&group).await? else {
            return Ok(());
        };
        if g.left || !g.is_member(&requester) {
            return Ok(());
        }
        let out_key = format!("{V_OUT_SESSION}{group}");
        let Some(b) = self.inner.store.value(&out_key).await? else {
            return Ok(());
        };
        let mut state: OutboundState = from_json(&b)?;
        if state.session_id != session_id {
            return Ok(()); // rotated since: that key is gone for good
        }
        let pickle_key = self.inner.cipher.pickle_key();
        let mut session = OutboundGroupSession::from_pickle(&state.pickle, &pickle_key)?;
        let from = match state.members_from.get(&requester) {
            Some(first) if index >= *first => index,
            _ => session.message_index(),
        };
        let Some(key) = session.export_from(from) else {
            return Ok(());
        };
        let me = self.registered_identity().await?;
        let Some(target) = self
            .group_targets(&me, &g, false)
            .await?
            .into_iter()
            .find(|t| t.phone == requester && t.device == device)
        else {
            return Ok(());
        };
        let share = Content {
            message_id: crate::random_message_id()?.as_bytes().to_vec(),
            sent_at_ms: crate::now_ms(),
            body: Some(content::content::Body::GroupKey(GroupKey {
                group_id: group.as_bytes().to_vec(),
                session_id: session_id.clone(),
                session_key: key,
                first_index: from,
            })),
            conversation: String::new(),
        };
        let messages = self
            .encrypt_shares(&[&target], &share.encode_to_vec())
            .await?;
        if messages.is_empty() {
            return Ok(());
        }
        let conn = self.connection(CONNECTION_WAIT).await?;
        conn.request(request::Body::ShareGroupKeys(ShareGroupKeys {
            group_id: group.as_bytes().to_vec(),
            message_id: crate::random_message_id()?.as_bytes().to_vec(),
            shares: messages,
        }))
        .await?;
        state.shared.insert((requester.clone(), device));
        state.members_from.entry(requester).or_insert(from);
        self.inner
            .store
            .save_changes(Changes {
                values: vec![(out_key, Some(to_json(&state)?))],
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    // ---- receiving ----

    /// Applies a server announcement of a group change (already authenticated as coming from natterd).
    pub(crate) async fn apply_group_change(
        &self,
        me: &IdentityRecord,
        env: &Envelope,
        sender: &PhoneNumber,
        device: DeviceId,
        changes: &mut Changes,
        out: &mut GroupFollowUps,
    ) -> Result<()> {
        let Ok(change) = GroupChange::decode(env.ciphertext.as_slice()) else {
            tracing::warn!("dropping a malformed group change");
            return Ok(());
        };
        let Ok(id) = GroupId::from_slice(&change.group_id) else {
            return Ok(());
        };
        let before = self.group(&id).await?;
        let after = match (&change.full, &before) {
            (Some(full), _) => {
                let mut info = GroupInfo::from_wire(full, &me.phone)?;
                if let Some(b) = &before
                    && b.version >= info.version
                {
                    return Ok(());
                }
                info.version = change.version;
                info
            }
            (None, Some(b)) if b.version + 1 == change.version => {
                let mut after = b.clone();
                after.version = change.version;
                after.name = change.name.clone();
                after.description = change.description.clone();
                after.all_members_may_edit = change.all_members_may_edit;
                after
                    .members
                    .retain(|m| !change.removed.iter().any(|r| r == m.phone.as_str()));
                for a in &change.added {
                    if let Ok(phone) = PhoneNumber::from_e164(&a.phone)
                        && !after.is_member(&phone)
                        && after.members.len() < MAX_GROUP_MEMBERS
                    {
                        after.members.push(GroupMemberInfo {
                            phone,
                            admin: a.admin,
                        });
                    }
                }
                for m in after.members.iter_mut() {
                    if change.promoted.iter().any(|p| p == m.phone.as_str()) {
                        m.admin = true;
                    }
                    if change.demoted.iter().any(|p| p == m.phone.as_str()) {
                        m.admin = false;
                    }
                }
                after.members.sort_by(|a, b| a.phone.cmp(&b.phone));
                after.left = !after.is_member(&me.phone);
                after
            }
            (None, Some(b)) if b.version >= change.version => return Ok(()),
            _ => {
                // A change we missed (or a group we never heard of): fetch the whole state later.
                out.refresh.push(id);
                if change.removed.iter().any(|r| r == me.phone.as_str())
                    && let Some(mut b) = before
                {
                    b.left = true;
                    b.version = change.version;
                    changes
                        .values
                        .push((format!("{V_GROUP}{id}"), Some(to_json(&b)?)));
                    changes.values.push((format!("{V_OUT_SESSION}{id}"), None));
                }
                return Ok(());
            }
        };
        let actor = PhoneNumber::from_e164(&change.actor).unwrap_or_else(|_| sender.clone());
        let mut events = Vec::new();
        self.note_change(
            me,
            before.as_ref(),
            &after,
            &actor,
            device,
            env.server_ts_ms,
            false,
            changes,
            &mut events,
        )?;
        out.events.extend(events);
        Ok(())
    }

    /// Stores another device's session key (it came over Olm from that device), then decrypts the group
    /// messages that waited for it.
    pub(crate) async fn apply_group_key(
        &self,
        me: &IdentityRecord,
        sender: &PhoneNumber,
        device: DeviceId,
        key: GroupKey,
        changes: &mut Changes,
        out: &mut GroupFollowUps,
    ) -> Result<()> {
        let Ok(id) = GroupId::from_slice(&key.group_id) else {
            return Ok(());
        };
        let Some(g) = self.group(&id).await? else {
            tracing::warn!("dropping a group key for a group we do not know");
            return Ok(());
        };
        if g.left || !g.is_member(sender) {
            tracing::warn!("dropping a group key from a non-member");
            return Ok(());
        }
        let Ok(session) = InboundSession::import(&key.session_key) else {
            tracing::warn!("dropping a malformed group key");
            return Ok(());
        };
        if session.session_id() != key.session_id {
            tracing::warn!("dropping a group key whose session id does not match");
            return Ok(());
        }
        let slot = format!("{V_IN_SESSION}{id}/{}", key_safe(&key.session_id));
        if let Some(b) = self.inner.store.value(&slot).await? {
            let known: InboundState = from_json(&b)?;
            if known.sender != *sender || known.device != device {
                tracing::warn!("dropping a group key that claims another device's session");
                return Ok(());
            }
            if known.first_index <= session.first_known_index() {
                return Ok(()); // we already read as much or more
            }
        }
        let pickle_key = self.inner.cipher.pickle_key();
        let state = InboundState {
            sender: sender.clone(),
            device,
            pickle: session.pickle(&pickle_key),
            first_index: session.first_known_index(),
        };
        // Messages that came before the key.
        let prefix = format!("{V_PENDING}{id}/{}/", key_safe(&key.session_id));
        let mut session = session;
        for (pkey, b) in self.inner.store.values_with_prefix(&prefix).await? {
            let p: Pending = from_json(&b)?;
            changes.values.push((pkey, None));
            if p.sender != *sender || p.device != device {
                continue;
            }
            self.open_group_message(
                me,
                &g,
                &mut session,
                &key.session_id,
                &p.sender,
                p.device,
                p.transport_id,
                p.server_ts_ms,
                &p.ciphertext,
                changes,
                out,
            )
            .await?;
        }
        changes.values.push((
            slot,
            Some(to_json(&InboundState {
                pickle: session.pickle(&pickle_key),
                ..state
            })?),
        ));
        Ok(())
    }

    /// Decrypts a group message envelope, or keeps it and asks the sender for the key.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn apply_group_message(
        &self,
        me: &IdentityRecord,
        env: &Envelope,
        sender: &PhoneNumber,
        device: DeviceId,
        tid: MessageId,
        changes: &mut Changes,
        out: &mut GroupFollowUps,
    ) -> Result<()> {
        let Ok(msg) = GroupMessage::decode(env.ciphertext.as_slice()) else {
            tracing::warn!("dropping a malformed group message");
            return Ok(());
        };
        let Ok(id) = GroupId::from_slice(&msg.group_id) else {
            return Ok(());
        };
        let Some(g) = self.group(&id).await? else {
            tracing::warn!("dropping a message for a group we do not know");
            return Ok(());
        };
        let slot = format!("{V_IN_SESSION}{id}/{}", key_safe(&msg.session_id));
        let pickle_key = self.inner.cipher.pickle_key();
        let known: Option<InboundState> = match self.inner.store.value(&slot).await? {
            Some(b) => Some(from_json(&b)?),
            None => None,
        };
        let usable = known.filter(|k| k.sender == *sender && k.device == device);
        let Some(state) = usable else {
            // No key yet: keep the message and ask its sender device for the key.
            let index = InboundSession::message_index(&msg.ciphertext).unwrap_or(0);
            let pending = Pending {
                sender: sender.clone(),
                device,
                transport_id: tid,
                server_ts_ms: env.server_ts_ms,
                ciphertext: msg.ciphertext,
            };
            changes.values.push((
                format!("{V_PENDING}{id}/{}/{tid}", key_safe(&msg.session_id)),
                Some(to_json(&pending)?),
            ));
            out.key_requests
                .push((id, sender.clone(), device, msg.session_id, index, tid));
            return Ok(());
        };
        let mut session = InboundSession::from_pickle(&state.pickle, &pickle_key)?;
        let opened = self
            .open_group_message(
                me,
                &g,
                &mut session,
                &msg.session_id,
                sender,
                device,
                tid,
                env.server_ts_ms,
                &msg.ciphertext,
                changes,
                out,
            )
            .await?;
        if opened {
            changes.values.push((
                slot,
                Some(to_json(&InboundState {
                    pickle: session.pickle(&pickle_key),
                    ..state
                })?),
            ));
        }
        Ok(())
    }

    /// Decrypts one group message with a session, refuses replays, stores it. False if it did not
    /// decrypt (an earlier index than the key we hold: sent before we joined) or was refused.
    #[allow(clippy::too_many_arguments)]
    async fn open_group_message(
        &self,
        me: &IdentityRecord,
        g: &GroupInfo,
        session: &mut InboundSession,
        session_id: &str,
        sender: &PhoneNumber,
        device: DeviceId,
        tid: MessageId,
        server_ts_ms: u64,
        ciphertext: &[u8],
        changes: &mut Changes,
        out: &mut GroupFollowUps,
    ) -> Result<bool> {
        let Ok((plaintext, index)) = session.decrypt(ciphertext) else {
            tracing::info!("a group message did not decrypt (sent before we had its key)");
            return Ok(false);
        };
        let seen_key = format!("{V_SEEN}{}/{index}", key_safe(session_id));
        if let Some(first) = self.inner.store.value(&seen_key).await? {
            if first != tid.to_hex().into_bytes() {
                tracing::warn!(index, "refused a replayed group message");
                out.events.push(Event::GroupReplayRefused {
                    group: g.id,
                    sender: sender.clone(),
                    index,
                });
            }
            return Ok(false);
        }
        if changes.values.iter().any(|(k, _)| *k == seen_key) {
            return Ok(false);
        }
        changes
            .values
            .push((seen_key, Some(tid.to_hex().into_bytes())));
        let Some(content) = Content::decode(plaintext.as_slice())
            .ok()
            .filter(|c| MessageId::from_slice(&c.message_id).is_ok())
        else {
            return Ok(true);
        };
        let Ok(logical) = MessageId::from_slice(&content.message_id) else {
            return Ok(true);
        };
        let Some(content::content::Body::Text(t)) = content.body else {
            tracing::debug!("a group message of a kind this version does not show");
            return Ok(true);
        };
        if t.body.len() > MAX_TEXT_BYTES || self.group_message(&g.id, &logical).await?.is_some() {
            return Ok(true);
        }
        let from_me = *sender == me.phone;
        let record = GroupMessageRecord {
            group: g.id,
            id: logical,
            sender: sender.clone(),
            sender_device: device,
            from_me,
            kind: MessageKind::Text,
            text: t.body,
            sent_at_ms: content.sent_at_ms,
            server_ts_ms,
            status: if from_me {
                MessageStatus::Sent
            } else {
                MessageStatus::Received
            },
            shown: false,
            receipts: BTreeMap::new(),
        };
        put_message(changes, &record)?;
        if !from_me {
            out.delivered.push((sender.clone(), logical));
        }
        out.events.push(Event::GroupMessage(record));
        Ok(true)
    }

    /// A receipt for a message id that is not a 1:1 message: if it is one of our group messages, the
    /// member's state moves forward. Returns whether it was one.
    pub(crate) async fn apply_group_receipt(
        &self,
        sender: &PhoneNumber,
        id: &MessageId,
        status: MessageStatus,
        changes: &mut Changes,
        events: &mut Vec<Event>,
    ) -> Result<bool> {
        let Some(group) = self
            .inner
            .store
            .value(&format!("{V_MSG_INDEX}{id}"))
            .await?
        else {
            return Ok(false);
        };
        let Ok(group) = GroupId::from_hex(&String::from_utf8_lossy(&group)) else {
            return Ok(false);
        };
        let key = msg_key(&group, id);
        // An earlier receipt of the same batch may have changed it already.
        let pending = changes
            .values
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.clone());
        let bytes = match pending {
            Some(b) => b,
            None => match self.inner.store.value(&key).await? {
                Some(b) => b,
                None => return Ok(false),
            },
        };
        let mut m: GroupMessageRecord = from_json(&bytes)?;
        if !m.from_me {
            return Ok(true);
        }
        let current = m.receipts.get(sender).copied();
        if current.is_none_or(|c| c < status) {
            m.receipts.insert(sender.clone(), status);
            changes.values.push((key, Some(to_json(&m)?)));
            events.push(Event::GroupReceipt {
                group,
                id: *id,
                member: sender.clone(),
                status,
            });
        }
        Ok(true)
    }

    /// Sends what processing envelopes asked for: group fetches, key requests and answers.
    pub(crate) fn spawn_group_follow_ups(&self, f: GroupFollowUps) {
        if f.refresh.is_empty() && f.key_requests.is_empty() && f.key_answers.is_empty() {
            return;
        }
        let client = self.background();
        self.spawn_task(async move {
            for id in f.refresh {
                if let Err(e) = client.refresh_group(&id).await {
                    tracing::warn!(error = %e, "could not fetch a group");
                }
            }
            for (group, sender, device, session_id, index, tid) in f.key_requests {
                if let Err(e) = client
                    .request_group_key(group, sender, device, session_id, index, tid)
                    .await
                {
                    tracing::warn!(error = %e, "could not ask for a group key");
                }
            }
            for (group, requester, device, session_id, index) in f.key_answers {
                if let Err(e) = client
                    .answer_key_request(group, requester, device, session_id, index)
                    .await
                {
                    tracing::warn!(error = %e, "could not answer a group key request");
                }
            }
        });
    }

    /// Asks a sender device, over Olm, to share its group session key with us again.
    async fn request_group_key(
        &self,
        group: GroupId,
        sender: PhoneNumber,
        device: DeviceId,
        session_id: String,
        index: u32,
        tid: MessageId,
    ) -> Result<()> {
        let id = crate::random_message_id()?;
        let now = crate::now_ms();
        let content = Content {
            message_id: id.as_bytes().to_vec(),
            sent_at_ms: now,
            body: Some(content::content::Body::GroupKeyRequest(GroupKeyRequest {
                group_id: group.as_bytes().to_vec(),
                session_id,
                message_index: index,
            })),
            conversation: String::new(),
        };
        let mut entry = crate::messaging::outbox_entry(id, id, sender.clone(), &content, now);
        entry.only_device = Some((sender, device));
        // Sent as a resend request for the group envelope, so it may go to the one device alone.
        entry.retry_of = Some(tid);
        entry.retry_attempt = 1;
        self.inner
            .store
            .save_changes(Changes {
                outbox: vec![entry],
                ..Default::default()
            })
            .await?;
        self.flush_outbox().await
    }

    /// Tries to decrypt a group message (an encoded [`GroupMessage`], as the server stores it) with this
    /// device's keys, without storing anything: what a member removed before it was sent can read of it.
    pub async fn try_decrypt_group_message(
        &self,
        sender: &PhoneNumber,
        device: DeviceId,
        group_message: &[u8],
    ) -> Result<Option<String>> {
        let msg = GroupMessage::decode(group_message)
            .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
        let id = GroupId::from_slice(&msg.group_id)
            .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
        let pickle_key = self.inner.cipher.pickle_key();
        for (_, b) in self
            .inner
            .store
            .values_with_prefix(&format!("{V_IN_SESSION}{id}/"))
            .await?
        {
            let state: InboundState = from_json(&b)?;
            if state.sender != *sender || state.device != device {
                continue;
            }
            let mut session = InboundSession::from_pickle(&state.pickle, &pickle_key)?;
            if let Ok((pt, _)) = session.decrypt(&msg.ciphertext)
                && let Ok(c) = Content::decode(pt.as_slice())
                && let Some(content::content::Body::Text(t)) = c.body
            {
                return Ok(Some(t.body));
            }
        }
        Ok(None)
    }
}

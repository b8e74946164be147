//! [`MemoryStore`]: the reference [`ClientStore`], plain collections behind one mutex. Used by tests;
//! nothing survives the process.
//!
//! Its behaviour is the contract every backend follows (the conformance suite in `store::tests` runs
//! against each of them). Beyond what the trait's docs say:
//! - [`Changes`] is applied in the order of its fields, except that `sessions_removed` comes before
//!   `sessions` (so a session made in the same step as the removal, with the new keys, is kept):
//!   identity, settings, sessions_removed, sessions, peers, messages, statuses, shown, outbox,
//!   outbox_sent, processed, failures, failures_cleared, uploads, uploads_done; each list in order. So a message inserted and
//!   updated by the same `Changes` gets the update, a failure inserted and cleared is gone, an outbox
//!   entry inserted and marked sent is sent; of two entries with the same key the last wins (except
//!   messages: the first insert wins, like any later one).
//! - A status update, a `shown` mark or an `outbox_sent` for something that does not exist is ignored.
//! - Status updates (rule shared with SQLite: `status_advances`): Pending < Sent < Delivered < Read, an
//!   update applies only if it moves the message up this order; `Failed` replaces `Pending` only;
//!   `Received` and `Failed` messages never change, and no update turns a message into `Received`. An
//!   update that applies also sets `server_ts_ms` if it carries a non-zero one; one that does not apply
//!   changes nothing (its time is not recorded either).
//! - `seq` starts at 1 and only grows; a duplicate insert does not consume one (SQLite may skip numbers,
//!   so callers rely on the order only).
//! - Sessions of a device are listed by `last_used_ms` descending, then by session id.
//! - `queued_outbox` is ordered by `created_ms`, then insertion order (a replaced entry keeps its place).
//! - A `u64` the store keeps (times, versions) must be at most `i64::MAX`, the SQL integer range; a
//!   `Changes` holding a larger one is rejected with [`StoreError::Backend`] and nothing is written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use natter_proto::{DeviceId, MessageId, PhoneNumber};

use super::{
    Changes, ChatSummary, ClientStore, FailureRecord, IdentityRecord, MessageKind, MessageRecord,
    MessageStatus, OutboxRecord, OutboxState, PeerRecord, SessionRecord, StoreError, StoreResult,
    UploadRecord,
};

/// A `u64` too large for the store (stored values must fit an SQL integer, i.e. `i64`).
#[derive(Debug, thiserror::Error)]
#[error("{field} = {value} is out of range (at most i64::MAX)")]
pub(super) struct OutOfRange {
    field: &'static str,
    value: u64,
}

/// Checks that a `u64` the store keeps fits an SQL integer, and converts it. Shared by every backend so
/// they reject the same inputs.
pub(super) fn checked_i64(field: &'static str, value: u64) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| StoreError::Backend(Box::new(OutOfRange { field, value })))
}

/// Position of an outgoing status in the forward order, `None` for `Received` and `Failed`.
fn rank(status: MessageStatus) -> Option<u8> {
    match status {
        MessageStatus::Pending => Some(0),
        MessageStatus::Sent => Some(1),
        MessageStatus::Delivered => Some(2),
        MessageStatus::Read => Some(3),
        MessageStatus::Received | MessageStatus::Failed => None,
    }
}

/// Whether a status update from `old` to `new` applies: only forward along
/// Pending < Sent < Delivered < Read, or from `Pending` to `Failed`. Shared by every backend.
pub(super) fn status_advances(old: MessageStatus, new: MessageStatus) -> bool {
    match (old, new) {
        (MessageStatus::Pending, MessageStatus::Failed) => true,
        _ => matches!((rank(old), rank(new)), (Some(o), Some(n)) if n > o),
    }
}

/// Checks every `u64` of `changes` against the SQL integer range, before anything is written.
pub(super) fn check_ranges(changes: &Changes) -> StoreResult<()> {
    for s in &changes.sessions {
        checked_i64("last_used_ms", s.last_used_ms)?;
    }
    for p in &changes.peers {
        checked_i64("device_list_version", p.device_list_version)?;
        if let Some(at) = p.key_changed_at_ms {
            checked_i64("key_changed_at_ms", at)?;
        }
    }
    for m in &changes.messages {
        checked_i64("sent_at_ms", m.sent_at_ms)?;
        checked_i64("server_ts_ms", m.server_ts_ms)?;
    }
    for u in &changes.statuses {
        checked_i64("server_ts_ms", u.server_ts_ms)?;
    }
    for o in &changes.outbox {
        checked_i64("created_ms", o.created_ms)?;
    }
    for f in &changes.failures {
        checked_i64("server_ts_ms", f.server_ts_ms)?;
    }
    for u in &changes.uploads {
        checked_i64("size", u.size)?;
        checked_i64("mtime_ms", u.mtime_ms)?;
        checked_i64("created_ms", u.created_ms)?;
    }
    Ok(())
}

/// The mutex was poisoned: a thread panicked while changing the collections, which may be half updated.
#[derive(Debug, thiserror::Error)]
#[error("memory store poisoned by a panic")]
struct Poisoned;

/// The in-memory store. Cheap to create; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    identity: Option<IdentityRecord>,
    settings: HashMap<String, Vec<u8>>,
    values: BTreeMap<String, Vec<u8>>,
    /// Sessions by (peer, device, session id).
    sessions: BTreeMap<(PhoneNumber, DeviceId, String), SessionRecord>,
    peers: HashMap<PhoneNumber, PeerRecord>,
    /// Messages by seq (insertion order); `seq` is set in each record.
    messages: BTreeMap<i64, MessageRecord>,
    /// (chat, id) -> seq.
    message_index: HashMap<(PhoneNumber, MessageId), i64>,
    /// The last seq handed out.
    last_seq: i64,
    /// Outbox entries by transport id, with their insertion number (kept on replace).
    outbox: HashMap<MessageId, (u64, OutboxRecord)>,
    /// The last outbox insertion number handed out.
    last_outbox: u64,
    processed: HashSet<(PhoneNumber, MessageId)>,
    failures: HashMap<(PhoneNumber, MessageId), FailureRecord>,
    uploads: HashMap<(PhoneNumber, String), UploadRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> StoreResult<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Backend(Box::new(Poisoned)))
    }
}

impl Inner {
    fn message_mut(&mut self, chat: &PhoneNumber, id: &MessageId) -> Option<&mut MessageRecord> {
        let seq = self.message_index.get(&(chat.clone(), *id))?;
        self.messages.get_mut(seq)
    }

    /// Applies validated changes; cannot fail, so the caller's lock makes it atomic.
    fn apply(&mut self, changes: Changes) {
        let Changes {
            wipe,
            identity,
            settings,
            values,
            sessions,
            sessions_removed,
            peers,
            messages,
            statuses,
            shown,
            outbox,
            outbox_sent,
            processed,
            failures,
            failures_cleared,
            uploads,
            uploads_done,
        } = changes;

        if wipe {
            let settings = std::mem::take(&mut self.settings);
            *self = Inner {
                settings,
                ..Inner::default()
            };
        }
        if let Some(identity) = identity {
            self.identity = Some(identity);
        }
        for (key, value) in settings {
            match value {
                Some(value) => {
                    self.settings.insert(key, value);
                }
                None => {
                    self.settings.remove(&key);
                }
            }
        }
        for (key, value) in values {
            match value {
                Some(value) => {
                    self.values.insert(key, value);
                }
                None => {
                    self.values.remove(&key);
                }
            }
        }
        for (phone, device_id) in sessions_removed {
            self.sessions
                .retain(|(p, d, _), _| *p != phone || *d != device_id);
        }
        for s in sessions {
            self.sessions
                .insert((s.phone.clone(), s.device_id, s.session_id.clone()), s);
        }
        for p in peers {
            self.peers.insert(p.phone.clone(), p);
        }
        for mut m in messages {
            let key = (m.chat.clone(), m.id);
            if self.message_index.contains_key(&key) {
                continue;
            }
            self.last_seq += 1;
            m.seq = self.last_seq;
            self.message_index.insert(key, m.seq);
            self.messages.insert(m.seq, m);
        }
        for u in statuses {
            if let Some(m) = self.message_mut(&u.chat, &u.id)
                && status_advances(m.status, u.status)
            {
                m.status = u.status;
                if u.server_ts_ms != 0 {
                    m.server_ts_ms = u.server_ts_ms;
                }
            }
        }
        for (chat, id) in shown {
            if let Some(m) = self.message_mut(&chat, &id) {
                m.shown = true;
            }
        }
        for o in outbox {
            let order = match self.outbox.get(&o.transport_id) {
                Some((order, _)) => *order,
                None => {
                    self.last_outbox += 1;
                    self.last_outbox
                }
            };
            self.outbox.insert(o.transport_id, (order, o));
        }
        for id in outbox_sent {
            if let Some((_, o)) = self.outbox.get_mut(&id) {
                o.state = OutboxState::Sent;
            }
        }
        self.processed.extend(processed);
        for f in failures {
            self.failures.insert((f.sender.clone(), f.original_id), f);
        }
        for key in failures_cleared {
            self.failures.remove(&key);
        }
        for u in uploads {
            self.uploads.insert((u.peer.clone(), u.path.clone()), u);
        }
        for key in uploads_done {
            self.uploads.remove(&key);
        }
    }
}

#[async_trait]
impl ClientStore for MemoryStore {
    async fn save_changes(&self, changes: Changes) -> StoreResult<()> {
        check_ranges(&changes)?;
        self.lock()?.apply(changes);
        Ok(())
    }

    async fn identity(&self) -> StoreResult<Option<IdentityRecord>> {
        Ok(self.lock()?.identity.clone())
    }

    async fn setting(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.lock()?.settings.get(key).cloned())
    }

    async fn sessions(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Vec<SessionRecord>> {
        let inner = self.lock()?;
        // Keyed by session id within a device, so this is already ordered by session id.
        let mut found: Vec<SessionRecord> = inner
            .sessions
            .values()
            .filter(|s| s.phone == *phone && s.device_id == device_id)
            .cloned()
            .collect();
        found.sort_by_key(|s| std::cmp::Reverse(s.last_used_ms));
        Ok(found)
    }

    async fn peer(&self, phone: &PhoneNumber) -> StoreResult<Option<PeerRecord>> {
        Ok(self.lock()?.peers.get(phone).cloned())
    }

    async fn is_processed(
        &self,
        sender: &PhoneNumber,
        transport_id: &MessageId,
    ) -> StoreResult<bool> {
        Ok(self
            .lock()?
            .processed
            .contains(&(sender.clone(), *transport_id)))
    }

    async fn message(
        &self,
        chat: &PhoneNumber,
        id: &MessageId,
    ) -> StoreResult<Option<MessageRecord>> {
        let mut inner = self.lock()?;
        Ok(inner.message_mut(chat, id).map(|m| m.clone()))
    }

    async fn history(&self, chat: &PhoneNumber) -> StoreResult<Vec<MessageRecord>> {
        let mut list: Vec<MessageRecord> = self
            .lock()?
            .messages
            .values()
            .filter(|m| m.chat == *chat)
            .cloned()
            .collect();
        list.sort_by_key(|m| (m.conversation_ms(), m.seq));
        Ok(list)
    }

    async fn value(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.lock()?.values.get(key).cloned())
    }

    async fn values_with_prefix(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(self
            .lock()?
            .values
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn chats(&self) -> StoreResult<Vec<ChatSummary>> {
        let mut by_chat: HashMap<PhoneNumber, ChatSummary> = HashMap::new();
        for m in self.lock()?.messages.values() {
            let e = by_chat
                .entry(m.chat.clone())
                .or_insert_with(|| ChatSummary {
                    chat: m.chat.clone(),
                    messages: 0,
                    last_ms: 0,
                });
            e.messages += 1;
            e.last_ms = e.last_ms.max(m.conversation_ms());
        }
        let mut list: Vec<ChatSummary> = by_chat.into_values().collect();
        list.sort_by(|a, b| b.last_ms.cmp(&a.last_ms).then_with(|| a.chat.cmp(&b.chat)));
        Ok(list)
    }

    async fn unread_after(&self, chat: &PhoneNumber, after_ms: u64) -> StoreResult<u64> {
        Ok(self
            .lock()?
            .messages
            .values()
            .filter(|m| {
                m.chat == *chat
                    && !m.from_me
                    && !m.shown
                    && matches!(m.kind, MessageKind::Text | MessageKind::Media)
                    && m.server_ts_ms > after_ms
            })
            .count() as u64)
    }

    async fn unshown(&self) -> StoreResult<Vec<MessageRecord>> {
        Ok(self
            .lock()?
            .messages
            .values()
            .filter(|m| !m.shown)
            .cloned()
            .collect())
    }

    async fn queued_outbox(&self) -> StoreResult<Vec<OutboxRecord>> {
        let inner = self.lock()?;
        let mut queued: Vec<&(u64, OutboxRecord)> = inner
            .outbox
            .values()
            .filter(|(_, o)| o.state == OutboxState::Queued)
            .collect();
        queued.sort_by_key(|(order, o)| (o.created_ms, *order));
        Ok(queued.into_iter().map(|(_, o)| o.clone()).collect())
    }

    async fn outbox_entry(&self, transport_id: &MessageId) -> StoreResult<Option<OutboxRecord>> {
        Ok(self
            .lock()?
            .outbox
            .get(transport_id)
            .map(|(_, o)| o.clone()))
    }

    async fn failure(
        &self,
        sender: &PhoneNumber,
        original_id: &MessageId,
    ) -> StoreResult<Option<FailureRecord>> {
        Ok(self
            .lock()?
            .failures
            .get(&(sender.clone(), *original_id))
            .cloned())
    }

    async fn messages_with_id(&self, id: &MessageId) -> StoreResult<Vec<MessageRecord>> {
        Ok(self
            .lock()?
            .messages
            .values()
            .filter(|m| m.id == *id)
            .cloned()
            .collect())
    }

    async fn upload(&self, peer: &PhoneNumber, path: &str) -> StoreResult<Option<UploadRecord>> {
        Ok(self
            .lock()?
            .uploads
            .get(&(peer.clone(), path.to_owned()))
            .cloned())
    }

    async fn messages_page(
        &self,
        chat: Option<&PhoneNumber>,
        since_ms: u64,
        before_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<MessageRecord>> {
        let inner = self.lock()?;
        let mut page: Vec<MessageRecord> = inner
            .messages
            .values()
            .filter(|m| chat.is_none_or(|c| m.chat == *c))
            .filter(|m| m.server_ts_ms >= since_ms && m.server_ts_ms < before_ms)
            .cloned()
            .collect();
        page.sort_by_key(|m| std::cmp::Reverse((m.server_ts_ms, m.seq)));
        page.truncate(limit);
        Ok(page)
    }
}

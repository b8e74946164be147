//! [`MemoryStore`]: the reference [`Store`], plain maps behind one mutex. Used by tests and by
//! `natterd --store memory`; nothing survives a restart.
//!
//! Its behaviour is the contract every backend follows (the conformance suite in [`super::tests`] runs
//! against each of them). Beyond what the trait's docs say:
//! - Whatever would store data for a device that does not exist (`touch_device`, `add_one_time_keys`,
//!   `set_fallback_key`, an `enqueue` with a missing recipient) fails with [`StoreError::NoSuchDevice`]
//!   and changes nothing. Whatever only reads or removes finds nothing: `count_one_time_keys` is 0,
//!   `claim_prekey` is `None`, `list_devices` and `load_queue` are empty, `ack` ignores the ids.
//! - `enqueue` reports a duplicate before it checks the recipients.
//! - `add_code_attempt` with no pending code counts nothing and returns 0.
//! - `create_account` files the primary device under the account's number (`new.account.phone`).
//! - `expire(now)` removes what has `expires_at_ms <= now`.
//! - A `u64` the store keeps (times, versions) must be at most `i64::MAX`, the SQL integer range; a larger
//!   one is rejected with [`StoreError::Backend`] before anything is written.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};

use super::{
    AccountRecord, AppStateFetch, BlobRecord, ClaimedPreKey, CodeRecord, DeviceListUpdate,
    DeviceRecord, EnqueueOutcome, GroupState, GroupWritten, NewAccount, NewMessage, PreKeyRecord,
    PrivacyRecord, QueuedEnvelope, Store, StoreError, StoreResult,
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

/// The mutex was poisoned: a thread panicked while changing the maps, which may be half updated.
#[derive(Debug, thiserror::Error)]
#[error("memory store poisoned by a panic")]
struct Poisoned;

/// The in-memory store. Cheap to create; clone an `Arc` of it to share.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    codes: HashMap<PhoneNumber, CodeRecord>,
    accounts: HashMap<PhoneNumber, AccountRecord>,
    /// Devices per account, ordered by id. An entry exists exactly when the account does.
    devices: HashMap<PhoneNumber, BTreeMap<DeviceId, DeviceState>>,
    /// Idempotency records of accepted messages.
    message_ids: HashMap<(PhoneNumber, DeviceId, MessageId), Accepted>,
    /// The last queue id handed out (ids start at 1 and are never reused).
    last_seq: u64,
    /// Media blob records by id.
    blobs: HashMap<String, BlobRecord>,
    /// App-state collections by account and name.
    app_state: HashMap<(PhoneNumber, String), Collection>,
    /// Contacts per account.
    contacts: HashMap<PhoneNumber, std::collections::BTreeSet<PhoneNumber>>,
    /// Encrypted profiles and when they were stored.
    profiles: HashMap<PhoneNumber, (Vec<u8>, u64)>,
    privacy: HashMap<PhoneNumber, PrivacyRecord>,
    /// Blocked accounts per account.
    blocked: HashMap<PhoneNumber, std::collections::BTreeSet<PhoneNumber>>,
    /// Groups by id, members ordered by number.
    groups: BTreeMap<GroupId, GroupState>,
}

#[derive(Debug, Default)]
struct Collection {
    version: u64,
    patches: BTreeMap<u64, Vec<u8>>,
    snapshot: Option<(u64, Vec<u8>)>,
}

#[derive(Debug)]
struct DeviceState {
    record: DeviceRecord,
    /// Unclaimed one-time keys, oldest first.
    one_time: VecDeque<PreKeyRecord>,
    fallback: Option<PreKeyRecord>,
    /// The device's queue by seq.
    queue: BTreeMap<u64, Queued>,
}

#[derive(Debug)]
struct Queued {
    envelope: QueuedEnvelope,
    expires_at_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Accepted {
    server_ts_ms: u64,
    expires_at_ms: u64,
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
    fn device_mut(
        &mut self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<&mut DeviceState> {
        self.devices
            .get_mut(phone)
            .and_then(|devices| devices.get_mut(&device_id))
            .ok_or(StoreError::NoSuchDevice)
    }

    fn device(&self, phone: &PhoneNumber, device_id: DeviceId) -> Option<&DeviceState> {
        self.devices
            .get(phone)
            .and_then(|devices| devices.get(&device_id))
    }

    /// [`Store::enqueue`] under the lock (the caller checked the times).
    fn enqueue(&mut self, msg: NewMessage) -> StoreResult<EnqueueOutcome> {
        let inner = self;
        let key = (msg.sender.clone(), msg.sender_device, msg.message_id);
        if let Some(first) = inner.message_ids.get(&key) {
            return Ok(EnqueueOutcome::Duplicate {
                server_ts_ms: first.server_ts_ms,
            });
        }
        // All or nothing: check every recipient before storing anything.
        if msg
            .envelopes
            .iter()
            .any(|e| inner.device(&e.phone, e.device_id).is_none())
        {
            return Err(StoreError::NoSuchDevice);
        }
        let mut stored = Vec::with_capacity(msg.envelopes.len());
        for env in msg.envelopes {
            inner.last_seq += 1;
            let seq = inner.last_seq;
            let envelope = QueuedEnvelope {
                seq,
                phone: env.phone,
                device_id: env.device_id,
                sender: msg.sender.clone(),
                sender_device: msg.sender_device,
                message_id: msg.message_id,
                server_ts_ms: msg.server_ts_ms,
                olm_type: env.olm_type,
                ciphertext: env.ciphertext,
                retry: msg.retry,
            };
            let device = inner.device_mut(&envelope.phone, envelope.device_id)?;
            device.queue.insert(
                seq,
                Queued {
                    envelope: envelope.clone(),
                    expires_at_ms: msg.expires_at_ms,
                },
            );
            stored.push(envelope);
        }
        inner.message_ids.insert(
            key,
            Accepted {
                server_ts_ms: msg.server_ts_ms,
                expires_at_ms: msg.expires_at_ms,
            },
        );
        Ok(EnqueueOutcome::Stored(stored))
    }

    /// Checks a group's stored numbers and the announcement's times.
    fn check_group(state: &GroupState, announcement: &NewMessage) -> StoreResult<()> {
        checked_i64("group version", state.group.version)?;
        checked_i64("created_at_ms", state.group.created_at_ms)?;
        for m in &state.members {
            checked_i64("added_at_version", m.added_at_version)?;
        }
        checked_i64("server_ts_ms", announcement.server_ts_ms)?;
        checked_i64("expires_at_ms", announcement.expires_at_ms)?;
        Ok(())
    }

    /// Stores a group write's announcement; a duplicate stores nothing.
    fn announce(&mut self, announcement: NewMessage) -> StoreResult<GroupWritten> {
        Ok(match self.enqueue(announcement)? {
            EnqueueOutcome::Stored(queued) => queued,
            EnqueueOutcome::Duplicate { .. } => Vec::new(),
        })
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[async_trait]
impl Store for MemoryStore {
    async fn close(&self) {}

    async fn save_code(&self, code: &CodeRecord) -> StoreResult<()> {
        checked_i64("sent_at_ms", code.sent_at_ms)?;
        checked_i64("expires_at_ms", code.expires_at_ms)?;
        self.lock()?.codes.insert(code.phone.clone(), code.clone());
        Ok(())
    }

    async fn get_code(&self, phone: &PhoneNumber) -> StoreResult<Option<CodeRecord>> {
        Ok(self.lock()?.codes.get(phone).cloned())
    }

    async fn add_code_attempt(&self, phone: &PhoneNumber) -> StoreResult<u32> {
        let mut inner = self.lock()?;
        Ok(match inner.codes.get_mut(phone) {
            Some(code) => {
                code.attempts = code.attempts.saturating_add(1);
                code.attempts
            }
            None => 0,
        })
    }

    async fn remove_code(&self, phone: &PhoneNumber) -> StoreResult<()> {
        self.lock()?.codes.remove(phone);
        Ok(())
    }

    async fn create_account(&self, new: &NewAccount) -> StoreResult<Vec<DeviceId>> {
        checked_i64("device_list_version", new.account.device_list_version)?;
        checked_i64("created_at_ms", new.account.created_at_ms)?;
        checked_i64("last_seen_ms", new.primary.last_seen_ms)?;
        let phone = new.account.phone.clone();
        let primary = DeviceState {
            record: DeviceRecord {
                phone: phone.clone(),
                ..new.primary.clone()
            },
            one_time: VecDeque::new(),
            fallback: None,
            queue: BTreeMap::new(),
        };
        let mut inner = self.lock()?;
        let removed = inner
            .devices
            .insert(
                phone.clone(),
                BTreeMap::from([(primary.record.device_id, primary)]),
            )
            .map(|old| old.into_keys().collect())
            .unwrap_or_default();
        inner.accounts.insert(phone, new.account.clone());
        Ok(removed)
    }

    async fn update_devices(
        &self,
        phone: &PhoneNumber,
        update: &DeviceListUpdate,
    ) -> StoreResult<()> {
        checked_i64("device_list_version", update.version)?;
        for d in &update.added {
            checked_i64("last_seen_ms", d.last_seen_ms)?;
        }
        let mut inner = self.lock()?;
        let account = inner
            .accounts
            .get_mut(phone)
            .ok_or(StoreError::NoSuchAccount)?;
        if account.device_list_version >= update.version {
            return Err(StoreError::Conflict);
        }
        account.device_list = update.device_list.clone();
        account.device_list_version = update.version;
        let devices = inner.devices.entry(phone.clone()).or_default();
        for id in &update.removed {
            devices.remove(id);
        }
        for d in &update.added {
            devices.insert(
                d.device_id,
                DeviceState {
                    record: DeviceRecord {
                        phone: phone.clone(),
                        ..d.clone()
                    },
                    one_time: VecDeque::new(),
                    fallback: None,
                    queue: BTreeMap::new(),
                },
            );
        }
        Ok(())
    }

    async fn stale_companions(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<(PhoneNumber, DeviceId)>> {
        let inner = self.lock()?;
        let mut out = Vec::new();
        for (phone, devices) in &inner.devices {
            let stale = devices
                .get(&DeviceId::PRIMARY)
                .is_some_and(|p| p.record.last_seen_ms < cutoff_ms);
            if stale {
                out.extend(
                    devices
                        .keys()
                        .filter(|d| !d.is_primary())
                        .map(|d| (phone.clone(), *d)),
                );
            }
        }
        out.sort();
        out.truncate(limit);
        Ok(out)
    }

    async fn remove_device(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<()> {
        let mut inner = self.lock()?;
        if let Some(devices) = inner.devices.get_mut(phone) {
            devices.remove(&device_id);
        }
        Ok(())
    }

    async fn get_account(&self, phone: &PhoneNumber) -> StoreResult<Option<AccountRecord>> {
        Ok(self.lock()?.accounts.get(phone).cloned())
    }

    async fn get_device(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Option<DeviceRecord>> {
        Ok(self
            .lock()?
            .device(phone, device_id)
            .map(|d| d.record.clone()))
    }

    async fn list_devices(&self, phone: &PhoneNumber) -> StoreResult<Vec<DeviceRecord>> {
        Ok(self
            .lock()?
            .devices
            .get(phone)
            .map(|devices| devices.values().map(|d| d.record.clone()).collect())
            .unwrap_or_default())
    }

    async fn touch_device(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        now_ms: u64,
    ) -> StoreResult<()> {
        checked_i64("now_ms", now_ms)?;
        self.lock()?
            .device_mut(phone, device_id)?
            .record
            .last_seen_ms = now_ms;
        Ok(())
    }

    async fn add_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        keys: &[PreKeyRecord],
    ) -> StoreResult<u32> {
        let mut inner = self.lock()?;
        let device = inner.device_mut(phone, device_id)?;
        for key in keys {
            if !device.one_time.iter().any(|k| k.key_id == key.key_id) {
                device.one_time.push_back(key.clone());
            }
        }
        Ok(count_u32(device.one_time.len()))
    }

    async fn set_fallback_key(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        key: &PreKeyRecord,
    ) -> StoreResult<()> {
        self.lock()?.device_mut(phone, device_id)?.fallback = Some(key.clone());
        Ok(())
    }

    async fn count_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<u32> {
        let inner = self.lock()?;
        Ok(inner
            .device(phone, device_id)
            .map_or(0, |d| count_u32(d.one_time.len())))
    }

    async fn claim_prekey(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Option<ClaimedPreKey>> {
        let mut inner = self.lock()?;
        let Ok(device) = inner.device_mut(phone, device_id) else {
            return Ok(None);
        };
        if let Some(prekey) = device.one_time.pop_front() {
            return Ok(Some(ClaimedPreKey {
                prekey,
                fallback: false,
                remaining: count_u32(device.one_time.len()),
            }));
        }
        Ok(device.fallback.clone().map(|prekey| ClaimedPreKey {
            prekey,
            fallback: true,
            remaining: 0,
        }))
    }

    async fn enqueue(&self, msg: NewMessage) -> StoreResult<EnqueueOutcome> {
        checked_i64("server_ts_ms", msg.server_ts_ms)?;
        checked_i64("expires_at_ms", msg.expires_at_ms)?;
        self.lock()?.enqueue(msg)
    }

    async fn queued_bytes(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<u64> {
        let inner = self.lock()?;
        Ok(inner.device(phone, device_id).map_or(0, |d| {
            d.queue
                .values()
                .map(|q| q.envelope.ciphertext.len() as u64)
                .sum()
        }))
    }

    async fn load_queue(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<QueuedEnvelope>> {
        let inner = self.lock()?;
        let Some(device) = inner.device(phone, device_id) else {
            return Ok(Vec::new());
        };
        Ok(device
            .queue
            .range((Bound::Excluded(after_seq), Bound::Unbounded))
            .take(limit)
            .map(|(_, q)| q.envelope.clone())
            .collect())
    }

    async fn ack(&self, phone: &PhoneNumber, device_id: DeviceId, seqs: &[u64]) -> StoreResult<()> {
        let mut inner = self.lock()?;
        if let Ok(device) = inner.device_mut(phone, device_id) {
            for seq in seqs {
                device.queue.remove(seq);
            }
        }
        Ok(())
    }

    async fn expire(&self, now_ms: u64) -> StoreResult<u64> {
        let mut inner = self.lock()?;
        let mut removed = 0u64;
        for device in inner.devices.values_mut().flat_map(|d| d.values_mut()) {
            let before = device.queue.len();
            device.queue.retain(|_, q| q.expires_at_ms > now_ms);
            removed += (before - device.queue.len()) as u64;
        }
        inner.message_ids.retain(|_, a| a.expires_at_ms > now_ms);
        Ok(removed)
    }

    async fn create_blob(
        &self,
        blob: &BlobRecord,
        quota_bytes: u64,
        now_ms: u64,
    ) -> StoreResult<bool> {
        checked_i64("size", blob.size)?;
        checked_i64("offset", blob.offset)?;
        checked_i64("created_at_ms", blob.created_at_ms)?;
        checked_i64("expires_at_ms", blob.expires_at_ms)?;
        let mut inner = self.lock()?;
        if inner.blobs.contains_key(&blob.id) {
            return Err(StoreError::Conflict);
        }
        let used: u64 = inner
            .blobs
            .values()
            .filter(|b| b.owner == blob.owner && b.expires_at_ms > now_ms)
            .map(|b| b.size)
            .sum();
        if used.saturating_add(blob.size) > quota_bytes {
            return Ok(false);
        }
        inner.blobs.insert(blob.id.clone(), blob.clone());
        Ok(true)
    }

    async fn get_blob(&self, id: &str) -> StoreResult<Option<BlobRecord>> {
        Ok(self.lock()?.blobs.get(id).cloned())
    }

    async fn set_blob_offset(&self, id: &str, offset: u64) -> StoreResult<()> {
        checked_i64("offset", offset)?;
        let mut inner = self.lock()?;
        let blob = inner.blobs.get_mut(id).ok_or(StoreError::NoSuchBlob)?;
        blob.offset = offset;
        Ok(())
    }

    async fn complete_blob(&self, id: &str) -> StoreResult<()> {
        let mut inner = self.lock()?;
        let blob = inner.blobs.get_mut(id).ok_or(StoreError::NoSuchBlob)?;
        blob.offset = blob.size;
        blob.complete = true;
        Ok(())
    }

    async fn extend_blob(&self, id: &str, expires_at_ms: u64) -> StoreResult<()> {
        checked_i64("expires_at_ms", expires_at_ms)?;
        let mut inner = self.lock()?;
        let blob = inner.blobs.get_mut(id).ok_or(StoreError::NoSuchBlob)?;
        blob.expires_at_ms = blob.expires_at_ms.max(expires_at_ms);
        Ok(())
    }

    async fn blob_usage(&self, owner: &PhoneNumber, now_ms: u64) -> StoreResult<u64> {
        Ok(self
            .lock()?
            .blobs
            .values()
            .filter(|b| &b.owner == owner && b.expires_at_ms > now_ms)
            .map(|b| b.size)
            .sum())
    }

    async fn delete_expired_blobs(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<String>> {
        let mut inner = self.lock()?;
        let mut gone: Vec<String> = inner
            .blobs
            .values()
            .filter(|b| b.expires_at_ms <= now_ms)
            .map(|b| b.id.clone())
            .collect();
        gone.sort();
        gone.truncate(limit);
        for id in &gone {
            inner.blobs.remove(id);
        }
        Ok(gone)
    }

    async fn push_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        base_version: u64,
        patch: &[u8],
        snapshot: Option<&[u8]>,
    ) -> StoreResult<u64> {
        let new_version = base_version.saturating_add(1);
        checked_i64("version", new_version)?;
        let mut inner = self.lock()?;
        let c = inner
            .app_state
            .entry((phone.clone(), collection.to_owned()))
            .or_default();
        if c.version != base_version {
            return Err(StoreError::AppStateConflict { current: c.version });
        }
        c.version = new_version;
        c.patches.insert(new_version, patch.to_vec());
        if let Some(snap) = snapshot {
            if let Some((previous, _)) = c.snapshot.take() {
                c.patches = c.patches.split_off(&previous.saturating_add(1));
            }
            c.snapshot = Some((new_version, snap.to_vec()));
        }
        Ok(new_version)
    }

    async fn fetch_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        after_version: u64,
        max_patches: usize,
    ) -> StoreResult<AppStateFetch> {
        let inner = self.lock()?;
        let Some(c) = inner.app_state.get(&(phone.clone(), collection.to_owned())) else {
            return Ok(AppStateFetch::default());
        };
        let snapshot = c
            .snapshot
            .as_ref()
            .filter(|(v, _)| *v > after_version)
            .cloned();
        let from = snapshot.as_ref().map_or(after_version, |(v, _)| *v);
        let patches = c
            .patches
            .range((Bound::Excluded(from), Bound::Unbounded))
            .take(max_patches)
            .map(|(v, p)| (*v, p.clone()))
            .collect();
        Ok(AppStateFetch {
            version: c.version,
            snapshot,
            patches,
        })
    }

    async fn registered_among(&self, numbers: &[PhoneNumber]) -> StoreResult<Vec<PhoneNumber>> {
        let inner = self.lock()?;
        let mut found: Vec<PhoneNumber> = numbers
            .iter()
            .filter(|n| inner.accounts.contains_key(*n))
            .cloned()
            .collect();
        found.sort();
        found.dedup();
        Ok(found)
    }

    async fn add_contacts(&self, owner: &PhoneNumber, contacts: &[PhoneNumber]) -> StoreResult<()> {
        self.lock()?
            .contacts
            .entry(owner.clone())
            .or_default()
            .extend(contacts.iter().cloned());
        Ok(())
    }

    async fn remove_contacts(
        &self,
        owner: &PhoneNumber,
        contacts: &[PhoneNumber],
    ) -> StoreResult<()> {
        if let Some(set) = self.lock()?.contacts.get_mut(owner) {
            for c in contacts {
                set.remove(c);
            }
        }
        Ok(())
    }

    async fn is_contact(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool> {
        Ok(self
            .lock()?
            .contacts
            .get(owner)
            .is_some_and(|s| s.contains(other)))
    }

    async fn set_profile(
        &self,
        owner: &PhoneNumber,
        ciphertext: &[u8],
        now_ms: u64,
    ) -> StoreResult<()> {
        checked_i64("updated_ms", now_ms)?;
        self.lock()?
            .profiles
            .insert(owner.clone(), (ciphertext.to_vec(), now_ms));
        Ok(())
    }

    async fn get_profile(&self, owner: &PhoneNumber) -> StoreResult<Option<(Vec<u8>, u64)>> {
        Ok(self.lock()?.profiles.get(owner).cloned())
    }

    async fn set_privacy(&self, owner: &PhoneNumber, privacy: PrivacyRecord) -> StoreResult<()> {
        self.lock()?.privacy.insert(owner.clone(), privacy);
        Ok(())
    }

    async fn get_privacy(&self, owner: &PhoneNumber) -> StoreResult<PrivacyRecord> {
        Ok(self.lock()?.privacy.get(owner).copied().unwrap_or_default())
    }

    async fn set_blocked(
        &self,
        owner: &PhoneNumber,
        other: &PhoneNumber,
        blocked: bool,
    ) -> StoreResult<()> {
        let mut inner = self.lock()?;
        let set = inner.blocked.entry(owner.clone()).or_default();
        if blocked {
            set.insert(other.clone());
        } else {
            set.remove(other);
        }
        Ok(())
    }

    async fn is_blocked(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool> {
        Ok(self
            .lock()?
            .blocked
            .get(owner)
            .is_some_and(|s| s.contains(other)))
    }

    async fn blocked(&self, owner: &PhoneNumber) -> StoreResult<Vec<PhoneNumber>> {
        Ok(self
            .lock()?
            .blocked
            .get(owner)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn create_group(
        &self,
        state: &GroupState,
        announcement: NewMessage,
    ) -> StoreResult<GroupWritten> {
        Inner::check_group(state, &announcement)?;
        let mut inner = self.lock()?;
        if inner.groups.contains_key(&state.group.id) {
            return Err(StoreError::Conflict);
        }
        let queued = inner.announce(announcement)?;
        inner.groups.insert(state.group.id, sorted(state));
        Ok(queued)
    }

    async fn get_group(&self, id: &GroupId) -> StoreResult<Option<GroupState>> {
        Ok(self.lock()?.groups.get(id).cloned())
    }

    async fn update_group(
        &self,
        expected_version: u64,
        state: &GroupState,
        announcement: NewMessage,
    ) -> StoreResult<GroupWritten> {
        Inner::check_group(state, &announcement)?;
        let mut inner = self.lock()?;
        match inner.groups.get(&state.group.id) {
            None => return Err(StoreError::NoSuchGroup),
            Some(g) if g.group.version != expected_version => return Err(StoreError::Conflict),
            Some(_) => {}
        }
        let queued = inner.announce(announcement)?;
        if state.members.is_empty() {
            inner.groups.remove(&state.group.id);
        } else {
            inner.groups.insert(state.group.id, sorted(state));
        }
        Ok(queued)
    }

    async fn group_devices(&self, id: &GroupId) -> StoreResult<Vec<(PhoneNumber, DeviceId)>> {
        let inner = self.lock()?;
        let Some(group) = inner.groups.get(id) else {
            return Ok(Vec::new());
        };
        Ok(group
            .members
            .iter()
            .flat_map(|m| {
                inner
                    .devices
                    .get(&m.phone)
                    .into_iter()
                    .flat_map(|d| d.keys().map(|id| (m.phone.clone(), *id)))
            })
            .collect())
    }

    async fn groups_of(&self, phone: &PhoneNumber) -> StoreResult<Vec<GroupId>> {
        Ok(self
            .lock()?
            .groups
            .values()
            .filter(|g| g.members.iter().any(|m| &m.phone == phone))
            .map(|g| g.group.id)
            .collect())
    }

    async fn group_blockers(
        &self,
        id: &GroupId,
        sender: &PhoneNumber,
    ) -> StoreResult<Vec<PhoneNumber>> {
        let inner = self.lock()?;
        let Some(group) = inner.groups.get(id) else {
            return Ok(Vec::new());
        };
        Ok(group
            .members
            .iter()
            .filter(|m| {
                inner
                    .blocked
                    .get(&m.phone)
                    .is_some_and(|b| b.contains(sender))
            })
            .map(|m| m.phone.clone())
            .collect())
    }
}

/// A group state with its members ordered by number.
fn sorted(state: &GroupState) -> GroupState {
    let mut state = state.clone();
    state.members.sort_by(|a, b| a.phone.cmp(&b.phone));
    state
}

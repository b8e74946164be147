//! App-state sync: contact names, chat settings (pinned, muted, archived, read marker) and starred
//! messages, shared by the account's devices through the server without the server reading them.
//!
//! Each collection is a map index → value changed by patches of `set`/`remove` mutations, encrypted and
//! MAC'd with a sync key ([`natter_crypto::appstate`]). The primary creates the keys, shares them with its
//! companions over Olm and rotates them when a device is removed. A device applies the server's patches in
//! order and checks every patch MAC, every value MAC and the snapshot MAC over the state after each patch:
//! a gap, a repeat, a forged or altered value or a reordered patch makes it refuse the whole fetched
//! state, keep its last verified one, emit [`Event::AppStateError`] and ask the primary
//! ([`AppStateRecovery`]) to upload a fresh verified snapshot. Last writer (by server order) wins per
//! index. The local state and the keys are kept as account values (deleted by a wipe), encrypted with the
//! store cipher.

use std::collections::BTreeMap;
use std::time::Duration;

use natter_crypto::appstate::{LtHash, Op, SyncKey};
use natter_proto::content::{self, AppStateKey, AppStateKeyShare, AppStateRecovery, Content};
use natter_proto::wire::{
    AppStateMutation, AppStatePatch, AppStateSnapshot, ErrorCode, FetchAppState, PushAppState,
    request, response,
};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use prost::Message;

use crate::Client;
use crate::client::unexpected;
use crate::error::{ClientError, Result};
use crate::events::Event;
use crate::messaging::{CONNECTION_WAIT, outbox_entry};
use crate::net::Connection;
use crate::store::Changes;

/// Contact names: index = E.164 number, value = name.
pub const CONTACTS: &str = "contacts";
/// Chat settings: index = `pin/`, `mute/`, `archive/` or `read/` + chat number, value = 8-byte big-endian
/// number (0/1 for flags, ms for mute-until and read marker).
pub const CHAT_SETTINGS: &str = "chat_settings";
/// Message flags: index = `star/` + message id (hex), value = the chat's number.
pub const MESSAGE_FLAGS: &str = "message_flags";
/// Every collection.
pub const COLLECTIONS: [&str; 3] = [CONTACTS, CHAT_SETTINGS, MESSAGE_FLAGS];
/// A snapshot is uploaded with every patch whose version is a multiple of this.
pub const SNAPSHOT_EVERY: u64 = 50;
const KEYS_VALUE: &str = "appstate/keys";
const MAX_PUSH_ATTEMPTS: usize = 8;

/// One live record of a collection.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredRecord {
    #[prost(bytes = "vec", tag = "1")]
    index: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
    /// The set mutation that wrote it (for snapshots and the LTHash).
    #[prost(message, optional, tag = "3")]
    mutation: Option<AppStateMutation>,
}

/// A verified collection state.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredState {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(bytes = "vec", tag = "2")]
    lthash: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<StoredRecord>,
}

/// A collection in memory.
#[derive(Clone, Debug, Default)]
struct State {
    version: u64,
    lthash: LtHash,
    records: BTreeMap<Vec<u8>, (Vec<u8>, AppStateMutation)>,
}

impl State {
    /// Applies one verified mutation (last writer wins per index).
    fn apply(&mut self, op: Op, index: Vec<u8>, value: Vec<u8>, m: &AppStateMutation) {
        if let Some((_, old)) = self.records.remove(&index) {
            self.lthash.subtract(&old.value_mac);
        }
        if op == Op::Set {
            self.lthash.add(&m.value_mac);
            self.records.insert(index, (value, m.clone()));
        }
    }
}

/// An index a patch changed and its new value (`None`: removed).
type Change = (Vec<u8>, Option<Vec<u8>>);

/// The settings of one chat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatSettings {
    /// The chat.
    pub chat: String,
    /// Pinned to the top.
    pub pinned: bool,
    /// Muted until this time (ms since epoch; 0 not muted).
    pub muted_until_ms: u64,
    /// Archived.
    pub archived: bool,
    /// Read up to this server time (ms).
    pub read_up_to_ms: u64,
    /// Incoming messages not yet shown and newer than the read marker.
    pub unread: u32,
    /// Messages this device holds in the chat.
    pub messages: u64,
    /// The newest message's time (ms since epoch; 0 without messages).
    pub last_message_ms: u64,
}

/// Why a fetched state was refused.
#[derive(Debug)]
enum Refusal {
    /// Verification failed: tampering or corruption.
    Tampered(String),
    /// A sync key is missing (it has not arrived yet, or this device was removed).
    MissingKey(String),
}

fn be_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl Client {
    fn state_aad(collection: &str) -> Vec<u8> {
        format!("appstate-state/{collection}").into_bytes()
    }

    async fn load_keys(&self) -> Result<Vec<AppStateKey>> {
        let Some(sealed) = self.inner.store.value(KEYS_VALUE).await? else {
            return Ok(Vec::new());
        };
        let plain = self.inner.cipher.decrypt(b"appstate-keys", &sealed)?;
        Ok(AppStateKeyShare::decode(plain.as_slice())
            .map_err(|e| crate::store::StoreError::Corrupt(format!("app-state keys: {e}")))?
            .keys)
    }

    fn keys_value(&self, keys: &[AppStateKey]) -> (String, Option<Vec<u8>>) {
        let plain = zeroize::Zeroizing::new(
            AppStateKeyShare {
                keys: keys.to_vec(),
            }
            .encode_to_vec(),
        );
        (
            KEYS_VALUE.to_owned(),
            Some(self.inner.cipher.encrypt(b"appstate-keys", &plain)),
        )
    }

    async fn save_keys(&self, keys: &[AppStateKey]) -> Result<()> {
        self.inner
            .store
            .save_changes(Changes {
                values: vec![self.keys_value(keys)],
                ..Changes::default()
            })
            .await?;
        Ok(())
    }

    fn sync_key(keys: &[AppStateKey], id: &[u8]) -> std::result::Result<SyncKey, Refusal> {
        keys.iter()
            .rev()
            .find(|k| k.key_id == id)
            .and_then(|k| SyncKey::from_slices(&k.key_id, &k.key).ok())
            .ok_or_else(|| {
                Refusal::MissingKey(format!(
                    "no app-state sync key {} on this device (the primary shares keys after linking; a removed device gets no new keys)",
                    hex_id(id)
                ))
            })
    }

    async fn load_state(&self, collection: &str) -> Result<State> {
        let Some(sealed) = self
            .inner
            .store
            .value(&format!("appstate/state/{collection}"))
            .await?
        else {
            return Ok(State::default());
        };
        let plain = self
            .inner
            .cipher
            .decrypt(&Self::state_aad(collection), &sealed)?;
        let corrupt =
            |e: String| crate::store::StoreError::Corrupt(format!("app-state {collection}: {e}"));
        let stored = StoredState::decode(plain.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let mut state = State {
            version: stored.version,
            lthash: LtHash::from_slice(&stored.lthash).map_err(|e| corrupt(e.to_string()))?,
            records: BTreeMap::new(),
        };
        for r in stored.records {
            let m = r
                .mutation
                .ok_or_else(|| corrupt("record without mutation".into()))?;
            state.records.insert(r.index, (r.value, m));
        }
        Ok(state)
    }

    fn state_value(&self, collection: &str, state: &State) -> (String, Option<Vec<u8>>) {
        let stored = StoredState {
            version: state.version,
            lthash: state.lthash.0.to_vec(),
            records: state
                .records
                .iter()
                .map(|(i, (v, m))| StoredRecord {
                    index: i.clone(),
                    value: v.clone(),
                    mutation: Some(m.clone()),
                })
                .collect(),
        };
        let plain = zeroize::Zeroizing::new(stored.encode_to_vec());
        (
            format!("appstate/state/{collection}"),
            Some(
                self.inner
                    .cipher
                    .encrypt(&Self::state_aad(collection), &plain),
            ),
        )
    }

    /// Verifies a snapshot and builds the state it describes.
    fn verify_snapshot(
        keys: &[AppStateKey],
        collection: &str,
        snap: &AppStateSnapshot,
    ) -> std::result::Result<State, Refusal> {
        let mut state = State {
            version: snap.version,
            ..State::default()
        };
        for m in &snap.records {
            let key = Self::sync_key(keys, &m.key_id)?;
            let d = key
                .decrypt_mutation(m)
                .map_err(|e| Refusal::Tampered(format!("snapshot record: {e}")))?;
            if d.op != Op::Set || state.records.contains_key(&d.index) {
                return Err(Refusal::Tampered(
                    "snapshot record is a remove or repeats an index".into(),
                ));
            }
            state.apply(d.op, d.index, d.value, m);
        }
        let key = Self::sync_key(keys, &snap.key_id)?;
        key.verify_snapshot_mac(&state.lthash, snap.version, collection, &snap.snapshot_mac)
            .map_err(|e| Refusal::Tampered(format!("snapshot at version {}: {e}", snap.version)))?;
        Ok(state)
    }

    /// Verifies one patch against `state` and applies it. Returns the indexes it changed.
    fn apply_patch(
        keys: &[AppStateKey],
        collection: &str,
        state: &mut State,
        patch: &AppStatePatch,
    ) -> std::result::Result<Vec<Change>, Refusal> {
        if patch.version != state.version + 1 {
            return Err(Refusal::Tampered(format!(
                "patch version {} after version {} ({})",
                patch.version,
                state.version,
                if patch.version <= state.version {
                    "a repeat"
                } else {
                    "a gap: a patch is missing"
                }
            )));
        }
        let key = Self::sync_key(keys, &patch.key_id)?;
        let macs: Vec<&[u8]> = patch
            .mutations
            .iter()
            .map(|m| m.value_mac.as_slice())
            .collect();
        key.verify_patch_mac(
            &patch.snapshot_mac,
            &macs,
            patch.version,
            collection,
            &patch.patch_mac,
        )
        .map_err(|e| Refusal::Tampered(format!("patch {}: {e}", patch.version)))?;
        let mut changed = Vec::new();
        for m in &patch.mutations {
            let mkey = Self::sync_key(keys, &m.key_id)?;
            let d = mkey
                .decrypt_mutation(m)
                .map_err(|e| Refusal::Tampered(format!("patch {}: {e}", patch.version)))?;
            changed.push((d.index.clone(), (d.op == Op::Set).then(|| d.value.clone())));
            state.apply(d.op, d.index, d.value, m);
        }
        state.version = patch.version;
        key.verify_snapshot_mac(
            &state.lthash,
            patch.version,
            collection,
            &patch.snapshot_mac,
        )
        .map_err(|e| Refusal::Tampered(format!("state after patch {}: {e}", patch.version)))?;
        Ok(changed)
    }

    async fn app_state_conn(&self) -> Result<std::sync::Arc<Connection>> {
        self.connection(CONNECTION_WAIT).await
    }

    async fn fetch(
        &self,
        conn: &Connection,
        collection: &str,
        after: u64,
    ) -> Result<natter_proto::wire::AppState> {
        match conn
            .request(request::Body::FetchAppState(FetchAppState {
                collection: collection.to_owned(),
                after_version: after,
            }))
            .await?
        {
            response::Body::AppState(s) => Ok(s),
            _ => Err(unexpected()),
        }
    }

    /// Fetches, verifies and applies a collection; caller holds the app-state lock. On a refusal the
    /// local state stays as it was, an [`Event::AppStateError`] is emitted and (for tampering) the primary
    /// is asked for a fresh snapshot.
    async fn sync_locked(&self, conn: &Connection, collection: &str) -> Result<State> {
        let local = self.load_state(collection).await?;
        let keys = self.load_keys().await?;
        let mut state = local.clone();
        let mut changed = Vec::new();
        let mut rounds = 0;
        let result = loop {
            rounds += 1;
            let fetched = self.fetch(conn, collection, state.version).await?;
            let mut step = || -> std::result::Result<bool, Refusal> {
                if let Some(snap) = &fetched.snapshot {
                    if snap.version <= state.version {
                        return Err(Refusal::Tampered(format!(
                            "snapshot at version {} is not newer than the verified version {}",
                            snap.version, state.version
                        )));
                    }
                    let new = Self::verify_snapshot(&keys, collection, snap)?;
                    for (i, (v, _)) in &new.records {
                        changed.push((i.clone(), Some(v.clone())));
                    }
                    for i in state.records.keys() {
                        if !new.records.contains_key(i) {
                            changed.push((i.clone(), None));
                        }
                    }
                    state = new;
                }
                for p in &fetched.patches {
                    changed.extend(Self::apply_patch(&keys, collection, &mut state, p)?);
                }
                if state.version == fetched.version {
                    return Ok(true);
                }
                if fetched.patches.is_empty() && fetched.snapshot.is_none() || rounds > 1000 {
                    return Err(Refusal::Tampered(format!(
                        "the server says version {} but served patches up to {} (a patch is missing)",
                        fetched.version, state.version
                    )));
                }
                Ok(false)
            };
            match step() {
                Ok(true) => break Ok(()),
                Ok(false) => continue,
                Err(r) => break Err(r),
            }
        };
        match result {
            Ok(()) => {
                if state.version != local.version {
                    let mut changes = Changes {
                        values: vec![self.state_value(collection, &state)],
                        ..Changes::default()
                    };
                    if collection == CHAT_SETTINGS {
                        self.read_markers_applied(&changed, &mut changes).await?;
                    }
                    self.inner.store.save_changes(changes).await?;
                    self.emit(Event::AppStateChanged {
                        collection: collection.to_owned(),
                        version: state.version,
                    });
                }
                Ok(state)
            }
            Err(refusal) => {
                let (reason, tampered) = match refusal {
                    Refusal::Tampered(r) => (r, true),
                    Refusal::MissingKey(r) => (r, false),
                };
                tracing::warn!(collection, %reason, "app-state refused");
                self.emit(Event::AppStateError {
                    collection: collection.to_owned(),
                    reason: reason.clone(),
                });
                if tampered {
                    let me = self.registered_identity().await?;
                    if me.device_id == DeviceId::PRIMARY {
                        self.upload_snapshot_locked(conn, collection, &local)
                            .await?;
                    } else {
                        self.ask_recovery(collection).await?;
                    }
                }
                Err(ClientError::AppState {
                    collection: collection.to_owned(),
                    reason,
                })
            }
        }
    }

    /// Another device marked chats read: mark their messages up to the marker shown here too.
    async fn read_markers_applied(&self, changed: &[Change], changes: &mut Changes) -> Result<()> {
        for (index, value) in changed {
            let (Some(chat), Some(v)) = (
                std::str::from_utf8(index)
                    .ok()
                    .and_then(|s| s.strip_prefix("read/")),
                value,
            ) else {
                continue;
            };
            let Ok(chat) = PhoneNumber::from_e164(chat) else {
                continue;
            };
            let up_to = be_u64(v);
            for m in self.inner.store.history(&chat).await? {
                if !m.shown && m.server_ts_ms <= up_to {
                    changes.shown.push((m.chat.clone(), m.id));
                }
            }
        }
        Ok(())
    }

    async fn ask_recovery(&self, collection: &str) -> Result<()> {
        let me = self.registered_identity().await?;
        let content = Content {
            message_id: Vec::new(),
            sent_at_ms: crate::now_ms(),
            body: Some(content::content::Body::AppStateRecovery(AppStateRecovery {
                collection: collection.to_owned(),
            })),
            conversation: String::new(),
        };
        // To every other device of the account (natterd wants a message to cover them all); only the
        // primary acts on it.
        self.queue_own(&me.phone, content).await
    }

    /// Queues content for the account's other devices (natterd requires a message to reach all of them).
    async fn queue_own(&self, me: &PhoneNumber, mut content: Content) -> Result<()> {
        let id = crate::random_message_id()?;
        content.message_id = id.as_bytes().to_vec();
        let entry = outbox_entry(id, id, me.clone(), &content, crate::now_ms());
        self.inner
            .store
            .save_changes(Changes {
                outbox: vec![entry],
                ..Changes::default()
            })
            .await?;
        // A companion that was just linked may not have published its prekeys yet: retry for a while.
        let client = self.background();
        self.spawn_task(async move {
            for attempt in 1..=60u64 {
                if !client.is_connected() {
                    break; // the next connection flushes the outbox
                }
                match client.flush_outbox().await {
                    Ok(()) => break,
                    Err(ClientError::NoKeys { .. }) => {
                        tokio::time::sleep(Duration::from_millis(50 * attempt.min(10))).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox flush stopped");
                        break;
                    }
                }
            }
        });
        Ok(())
    }

    /// Fetches, verifies and applies one collection.
    pub async fn sync_app_state(&self, collection: &str) -> Result<()> {
        let conn = self.app_state_conn().await?;
        let _guard = self.inner.app_state.lock().await;
        self.sync_locked(&conn, collection).await.map(|_| ())
    }

    /// Syncs every collection (or one); errors are reported as events.
    pub(crate) fn spawn_app_state_sync(&self, only: Option<String>) {
        let client = self.background();
        self.spawn_task(async move {
            for c in COLLECTIONS {
                if only.as_deref().is_some_and(|o| o != c) {
                    continue;
                }
                if !client.is_connected() {
                    break; // the next connection syncs again
                }
                if let Err(e) = client.sync_app_state(c).await {
                    tracing::debug!(collection = c, error = %e, "app-state sync failed");
                }
            }
        });
    }

    /// The newest sync key; the primary creates the first one.
    async fn newest_key(&self) -> Result<SyncKey> {
        let mut keys = self.load_keys().await?;
        if keys.is_empty() {
            let me = self.registered_identity().await?;
            if me.device_id != DeviceId::PRIMARY {
                return Err(ClientError::AppState {
                    collection: String::new(),
                    reason: "this device has no app-state sync key yet: the primary shares it after linking".into(),
                });
            }
            keys.push(new_key());
            self.save_keys(&keys).await?;
        }
        let k = keys.last().ok_or_else(unexpected)?;
        SyncKey::from_slices(&k.key_id, &k.key).map_err(|_| unexpected())
    }

    /// Pushes `patch` built from `state` (with a snapshot every [`SNAPSHOT_EVERY`] versions or when
    /// `force_snapshot`); returns the new state or `None` on a conflict.
    async fn push_patch(
        &self,
        conn: &Connection,
        collection: &str,
        base: u64,
        state: &State,
        ops: &[(Op, Vec<u8>, Vec<u8>)],
        force_snapshot: bool,
    ) -> Result<Option<State>> {
        let key = self.newest_key().await?;
        let version = base + 1;
        let mut new = state.clone();
        let mut mutations = Vec::with_capacity(ops.len());
        for (op, index, value) in ops {
            let m = key.encrypt_mutation(*op, index, value);
            new.apply(*op, index.clone(), value.clone(), &m);
            mutations.push(m);
        }
        new.version = version;
        let snapshot_mac = key.snapshot_mac(&new.lthash, version, collection);
        let macs: Vec<&[u8]> = mutations.iter().map(|m| m.value_mac.as_slice()).collect();
        let patch_mac = key.patch_mac(&snapshot_mac, &macs, version, collection);
        let snapshot =
            (force_snapshot || version.is_multiple_of(SNAPSHOT_EVERY)).then(|| AppStateSnapshot {
                version,
                records: new.records.values().map(|(_, m)| m.clone()).collect(),
                snapshot_mac: snapshot_mac.to_vec(),
                key_id: key.id().to_vec(),
            });
        let pushed = conn
            .request(request::Body::PushAppState(PushAppState {
                collection: collection.to_owned(),
                base_version: base,
                patch: Some(AppStatePatch {
                    version,
                    mutations,
                    snapshot_mac: snapshot_mac.to_vec(),
                    patch_mac: patch_mac.to_vec(),
                    key_id: key.id().to_vec(),
                }),
                snapshot,
            }))
            .await;
        match pushed {
            Ok(response::Body::AppStatePushed(_)) => {
                self.inner
                    .store
                    .save_changes(Changes {
                        values: vec![self.state_value(collection, &new)],
                        ..Changes::default()
                    })
                    .await?;
                Ok(Some(new))
            }
            Ok(_) => Err(unexpected()),
            Err(ClientError::Server {
                code: ErrorCode::AppStateConflict,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fetch-and-verify, then push one patch; on a conflict fetch, re-apply and push again.
    async fn mutate(&self, collection: &str, ops: Vec<(Op, Vec<u8>, Vec<u8>)>) -> Result<()> {
        let conn = self.app_state_conn().await?;
        let _guard = self.inner.app_state.lock().await;
        for _ in 0..MAX_PUSH_ATTEMPTS {
            let state = self.sync_locked(&conn, collection).await?;
            if self
                .push_patch(&conn, collection, state.version, &state, &ops, false)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(ClientError::Server {
            code: ErrorCode::AppStateConflict,
            message: format!("{collection} kept changing on the server; try again"),
            retry_after_ms: 0,
            mismatched: Vec::new(),
        })
    }

    /// The primary uploads its last verified state of a collection as a snapshot at a new version.
    async fn upload_snapshot_locked(
        &self,
        conn: &Connection,
        collection: &str,
        state: &State,
    ) -> Result<()> {
        for _ in 0..MAX_PUSH_ATTEMPTS {
            let server = self.fetch(conn, collection, u64::MAX >> 2).await?;
            let base = server.version.max(state.version);
            if let Some(new) = self
                .push_patch(conn, collection, base, state, &[], true)
                .await?
            {
                tracing::info!(
                    collection,
                    version = new.version,
                    "uploaded a verified app-state snapshot"
                );
                return Ok(());
            }
        }
        Err(unexpected())
    }

    /// On the primary: a companion refused a collection; upload a fresh verified snapshot.
    pub(crate) async fn recover_app_state(&self, collection: &str) -> Result<()> {
        if !COLLECTIONS.contains(&collection) {
            return Ok(());
        }
        let conn = self.app_state_conn().await?;
        let _guard = self.inner.app_state.lock().await;
        let state = match self.sync_locked(&conn, collection).await {
            Ok(s) => s,
            Err(ClientError::AppState { .. }) => return Ok(()), // uploaded already
            Err(e) => return Err(e),
        };
        self.upload_snapshot_locked(&conn, collection, &state).await
    }

    /// On a companion: keys from our primary. Stores the ones not known yet, then syncs.
    pub(crate) async fn app_state_keys_received(&self, share: AppStateKeyShare) -> Result<()> {
        let mut keys = self.load_keys().await?;
        for k in share.keys {
            if k.key_id.len() == 8
                && k.key.len() == 32
                && !keys.iter().any(|o| o.key_id == k.key_id)
            {
                keys.push(k);
            }
        }
        keys.sort_by_key(|k| k.created_ms);
        self.save_keys(&keys).await?;
        self.spawn_app_state_sync(None);
        Ok(())
    }

    /// On the primary: sends every key to the account's companions (right after linking one, and after
    /// a removal). Every device on the signed list may hold them; a removed one is no longer on it.
    pub(crate) async fn share_app_state_keys(&self) -> Result<()> {
        let me = self.registered_identity().await?;
        if me.device_id != DeviceId::PRIMARY {
            return Ok(());
        }
        self.newest_key().await?;
        let keys = self.load_keys().await?;
        let content = Content {
            message_id: Vec::new(),
            sent_at_ms: crate::now_ms(),
            body: Some(content::content::Body::AppStateKeyShare(AppStateKeyShare {
                keys,
            })),
            conversation: String::new(),
        };
        self.queue_own(&me.phone, content).await
    }

    /// On the primary, after a device was removed: a new key for new mutations, shared with the devices
    /// that remain (the removed one never sees it).
    pub(crate) async fn rotate_app_state_key(&self) -> Result<()> {
        let me = self.registered_identity().await?;
        if me.device_id != DeviceId::PRIMARY {
            return Ok(());
        }
        let mut keys = self.load_keys().await?;
        keys.push(new_key());
        self.save_keys(&keys).await?;
        self.share_app_state_keys().await
    }

    /// The ids of the sync keys this device has, oldest first.
    pub async fn app_state_key_ids(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .load_keys()
            .await?
            .into_iter()
            .map(|k| k.key_id)
            .collect())
    }

    /// Tries to decrypt a mutation with the keys this device has (tests: a removed device).
    pub async fn decrypt_app_state_mutation(
        &self,
        m: &AppStateMutation,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let keys = self.load_keys().await?;
        let key = Self::sync_key(&keys, &m.key_id).map_err(|r| ClientError::AppState {
            collection: String::new(),
            reason: format!("{r:?}"),
        })?;
        let d = key.decrypt_mutation(m).map_err(|e| ClientError::AppState {
            collection: String::new(),
            reason: e.to_string(),
        })?;
        Ok((d.index, d.value))
    }

    // ---- commands ----

    /// Names a contact (empty name removes it) on every device of the account.
    pub async fn set_contact_name(&self, phone: &PhoneNumber, name: &str) -> Result<()> {
        let op = if name.is_empty() { Op::Remove } else { Op::Set };
        self.mutate(
            CONTACTS,
            vec![(
                op,
                phone.as_str().as_bytes().to_vec(),
                name.as_bytes().to_vec(),
            )],
        )
        .await
    }

    /// Stars or unstars a message (found by id in any conversation).
    pub async fn star(&self, id: &MessageId, on: bool) -> Result<()> {
        let found = self.inner.store.messages_with_id(id).await?;
        let chat = found
            .first()
            .map(|m| m.chat.as_str().to_owned())
            .unwrap_or_default();
        if on && found.is_empty() {
            return Err(ClientError::InvalidInput(format!(
                "no message {id} on this device"
            )));
        }
        let op = if on { Op::Set } else { Op::Remove };
        self.mutate(
            MESSAGE_FLAGS,
            vec![(
                op,
                format!("star/{}", id.to_hex()).into_bytes(),
                chat.into_bytes(),
            )],
        )
        .await
    }

    async fn chat_setting(&self, kind: &str, chat: &PhoneNumber, value: u64) -> Result<()> {
        let op = if value == 0 { Op::Remove } else { Op::Set };
        self.mutate(
            CHAT_SETTINGS,
            vec![(
                op,
                format!("{kind}/{}", chat.as_str()).into_bytes(),
                value.to_be_bytes().to_vec(),
            )],
        )
        .await
    }

    /// Pins or unpins a chat.
    pub async fn pin(&self, chat: &PhoneNumber, on: bool) -> Result<()> {
        self.chat_setting("pin", chat, u64::from(on)).await
    }

    /// Mutes a chat until a time (ms since epoch; 0 unmutes).
    pub async fn mute(&self, chat: &PhoneNumber, until_ms: u64) -> Result<()> {
        self.chat_setting("mute", chat, until_ms).await
    }

    /// Archives or unarchives a chat.
    pub async fn archive(&self, chat: &PhoneNumber, on: bool) -> Result<()> {
        self.chat_setting("archive", chat, u64::from(on)).await
    }

    /// Marks a chat read here (messages shown, read receipts sent) and on the account's other devices.
    pub async fn mark_read(&self, chat: &PhoneNumber) -> Result<()> {
        let history = self.inner.store.history(chat).await?;
        let up_to = history
            .iter()
            .map(|m| m.server_ts_ms)
            .max()
            .unwrap_or(0)
            .max(1);
        let unshown: Vec<_> = history.into_iter().filter(|m| !m.shown).collect();
        if !unshown.is_empty() {
            self.mark_shown(&unshown).await?;
        }
        self.chat_setting("read", chat, up_to).await
    }

    // ---- reads ----

    async fn records(&self, collection: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .load_state(collection)
            .await?
            .records
            .into_iter()
            .filter_map(|(i, (v, _))| String::from_utf8(i).ok().map(|i| (i, v)))
            .collect())
    }

    /// Named contacts plus the chats this device knows: (number, name).
    pub async fn contacts(&self) -> Result<Vec<(String, Option<String>)>> {
        let mut out: BTreeMap<String, Option<String>> = BTreeMap::new();
        for c in self.chats().await? {
            out.insert(c.chat, None);
        }
        for (i, v) in self.records(CONTACTS).await? {
            out.insert(i, Some(String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out.into_iter().collect())
    }

    /// The name of a contact, if one was set.
    pub async fn contact_name(&self, phone: &PhoneNumber) -> Result<Option<String>> {
        Ok(self
            .records(CONTACTS)
            .await?
            .into_iter()
            .find(|(i, _)| i == phone.as_str())
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Every chat: those holding messages and those with synced settings, pinned first, then the most
    /// recent first.
    pub async fn chats(&self) -> Result<Vec<ChatSettings>> {
        let mut out: BTreeMap<String, ChatSettings> = BTreeMap::new();
        for (i, v) in self.records(CHAT_SETTINGS).await? {
            let Some((kind, chat)) = i.split_once('/') else {
                continue;
            };
            let e = out.entry(chat.to_owned()).or_insert_with(|| ChatSettings {
                chat: chat.to_owned(),
                ..ChatSettings::default()
            });
            let v = be_u64(&v);
            match kind {
                "pin" => e.pinned = v != 0,
                "mute" => e.muted_until_ms = v,
                "archive" => e.archived = v != 0,
                "read" => e.read_up_to_ms = v,
                _ => {}
            }
        }
        for c in self.inner.store.chats().await? {
            let e = out
                .entry(c.chat.as_str().to_owned())
                .or_insert_with(|| ChatSettings {
                    chat: c.chat.as_str().to_owned(),
                    ..ChatSettings::default()
                });
            e.messages = c.messages;
            e.last_message_ms = c.last_ms;
        }
        for e in out.values_mut() {
            if e.messages == 0 {
                continue;
            }
            if let Ok(chat) = PhoneNumber::from_e164(&e.chat) {
                let n = self
                    .inner
                    .store
                    .unread_after(&chat, e.read_up_to_ms)
                    .await?;
                e.unread = u32::try_from(n).unwrap_or(u32::MAX);
            }
        }
        let mut list: Vec<ChatSettings> = out.into_values().collect();
        list.sort_by(|a, b| {
            b.pinned
                .cmp(&a.pinned)
                .then_with(|| b.last_message_ms.cmp(&a.last_message_ms))
                .then_with(|| a.chat.cmp(&b.chat))
        });
        Ok(list)
    }

    /// The settings of one chat.
    pub async fn chat_settings(&self, chat: &PhoneNumber) -> Result<ChatSettings> {
        Ok(self
            .chats()
            .await?
            .into_iter()
            .find(|c| c.chat == chat.as_str())
            .unwrap_or_else(|| ChatSettings {
                chat: chat.as_str().to_owned(),
                ..ChatSettings::default()
            }))
    }

    /// Starred message ids.
    pub async fn starred(&self) -> Result<Vec<MessageId>> {
        Ok(self
            .records(MESSAGE_FLAGS)
            .await?
            .into_iter()
            .filter_map(|(i, _)| {
                i.strip_prefix("star/")
                    .and_then(|h| MessageId::from_hex(h).ok())
            })
            .collect())
    }

    /// The verified version of a collection on this device.
    pub async fn app_state_version(&self, collection: &str) -> Result<u64> {
        Ok(self.load_state(collection).await?.version)
    }

    /// Waits until a collection on this device reaches `version` (tests, measurements).
    pub async fn wait_app_state_version(
        &self,
        collection: &str,
        version: u64,
        wait: Duration,
    ) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.app_state_version(collection).await? >= version {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn new_key() -> AppStateKey {
    let k = SyncKey::generate();
    AppStateKey {
        key_id: k.id().to_vec(),
        key: k.key_bytes().to_vec(),
        created_ms: crate::now_ms(),
    }
}

fn hex_id(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

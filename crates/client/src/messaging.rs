//! Messaging: the persisted outbox and its delivery (per-device Olm encryption, device-set refresh and
//! retry), the processing of incoming envelopes (decrypt, de-duplicate, store, acknowledge), receipts,
//! and the decryption-retry protocol: a receiver that cannot decrypt asks the sender, over a fresh
//! session, to encrypt again, up to [`MAX_DECRYPT_RETRIES`] times, and only then shows "could not decrypt".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use natter_crypto::{OlmCiphertext, OlmSession};
use natter_proto::content::{self, Content, Receipt, ReceiptKind, RetryRequest, Text};
use natter_proto::group::{ENVELOPE_GROUP_CHANGE, ENVELOPE_GROUP_MESSAGE};
use natter_proto::limits::{
    MAX_DECRYPT_RETRIES, MAX_RECEIPT_IDS, MAX_TEXT_BYTES, ONE_TIME_KEYS_TARGET,
};
use natter_proto::wire::{
    ClaimKeys, DeviceMessage, Envelope, ErrorCode, Push, SendMessage, SignedPreKey, push, request,
    response,
};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use prost::Message;
use tokio::sync::mpsc;

use crate::client::{Client, unexpected};
use crate::error::{ClientError, Result};
use crate::events::Event;
use crate::net::Connection;
use crate::store::{
    Changes, FailureRecord, IdentityRecord, MessageKind, MessageRecord, MessageStatus,
    OutboxRecord, OutboxState, SessionRecord, StatusUpdate,
};

/// How long a command waits for a connection before giving up.
pub(crate) const CONNECTION_WAIT: Duration = Duration::from_secs(10);
/// Device-set refreshes per send before giving up.
const MAX_DEVICE_REFRESHES: usize = 3;

/// A device to encrypt to.
struct Target {
    phone: PhoneNumber,
    device: DeviceId,
    curve: [u8; 32],
    ed: [u8; 32],
    /// One of our own devices (gets the conversation filled in).
    own: bool,
}

/// What processing one envelope produced, beyond what it saved.
#[derive(Default)]
struct Outcome {
    events: Vec<Event>,
    delivered: Vec<(PhoneNumber, MessageId)>,
    resends: Vec<(PhoneNumber, DeviceId, MessageId, u32)>,
    retry_requests: Vec<(PhoneNumber, DeviceId, MessageId, u32)>,
    /// History jobs were queued (saved with the envelope): run them.
    history: bool,
    /// Group fetches and key requests to send.
    group: crate::groups::GroupFollowUps,
}

/// The conversation a message belongs to: the sender's, or for a copy from one of our own devices the
/// one it names (`None` if that name is not a number).
fn conversation(from_me: bool, sender: &PhoneNumber, named: &str) -> Option<PhoneNumber> {
    if from_me {
        PhoneNumber::from_e164(named).ok()
    } else {
        Some(sender.clone())
    }
}

/// A 32-byte key from the wire or the store.
pub(crate) fn key32(v: &[u8]) -> Result<[u8; 32]> {
    v.try_into()
        .map_err(|_| ClientError::Crypto(natter_crypto::CryptoError::InvalidKey))
}

impl Client {
    /// Sends a text message. Returns once the server has durably accepted it (status `Sent`). If the
    /// server cannot be reached the message stays in the outbox and goes out on the next connection, and
    /// the error says so.
    pub async fn send_text(&self, peer: &PhoneNumber, text: &str) -> Result<MessageRecord> {
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
        let id = crate::random_message_id()?;
        let now = crate::now_ms();
        let content = Content {
            message_id: id.as_bytes().to_vec(),
            sent_at_ms: now,
            body: Some(content::content::Body::Text(Text { body: text.into() })),
            conversation: String::new(),
        };
        let mut record = MessageRecord {
            chat: peer.clone(),
            id,
            from_me: true,
            sender_device: me.device_id,
            kind: MessageKind::Text,
            text: text.into(),
            sent_at_ms: now,
            server_ts_ms: 0,
            status: MessageStatus::Pending,
            shown: true,
            seq: 0,
            media: None,
        };
        let entry = outbox_entry(id, id, peer.clone(), &content, now);
        let mut changes = Changes::default();
        changes.messages.push(record.clone());
        changes.outbox.push(entry.clone());
        self.inner.store.save_changes(changes).await?;
        let _sending = self.inner.sending.lock().await;
        let ts = self.deliver(&entry).await?;
        record.status = MessageStatus::Sent;
        record.server_ts_ms = ts;
        Ok(record)
    }

    /// Sends everything queued in the outbox, in order. Stops at the first transient failure.
    pub async fn flush_outbox(&self) -> Result<()> {
        let _sending = self.inner.sending.lock().await;
        for entry in self.inner.store.queued_outbox().await? {
            match self.deliver(&entry).await {
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::info!(error = %e, "outbox entry refused for good"),
            }
        }
        self.flush_group_outbox().await
    }

    /// Encrypts one outbox entry for every device it goes to and sends it; returns the server's
    /// timestamp. Caller holds the sending lock.
    pub(crate) async fn deliver(&self, entry: &OutboxRecord) -> Result<u64> {
        let me = self.registered_identity().await?;
        let content = Content::decode(entry.content.as_slice())
            .map_err(|e| ClientError::Store(crate::store::StoreError::Corrupt(e.to_string())))?;
        let fresh = matches!(content.body, Some(content::content::Body::RetryRequest(_)));
        let mut last_err = None;
        // Devices still on a signed list that the server says are gone (a companion that removed itself
        // before the primary re-signed): the server would not deliver to them, so they are skipped.
        let mut gone: HashSet<(PhoneNumber, u32)> = HashSet::new();
        // A device the server demanded in the last round that no verified list holds.
        let mut unsigned: Option<(PhoneNumber, u32)> = None;
        for _ in 0..MAX_DEVICE_REFRESHES {
            let targets = match self.targets(entry, &me, &gone).await {
                Ok(t) => t,
                Err(e) => return self.fail_if_permanent(entry, e).await,
            };
            let messages = match self
                .encrypt_for(&me, entry, &targets, &content, fresh)
                .await
            {
                Ok(m) => m,
                Err(ClientError::NoKeys { peer, device }) => {
                    // Either the device is gone (our cached list is stale) or it has not uploaded
                    // keys yet: refresh the list, and if the device is still on it, wait for it.
                    let phone = PhoneNumber::from_e164(&peer)
                        .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
                    let fresh_list = match self.peer_devices(&phone, true).await {
                        Ok(f) => f,
                        Err(e) => return self.fail_if_permanent(entry, e).await,
                    };
                    if fresh_list
                        .list
                        .device_ids()
                        .iter()
                        .any(|d| d.get() == device)
                    {
                        return Err(ClientError::NoKeys { peer, device });
                    }
                    continue;
                }
                Err(e) => return self.fail_if_permanent(entry, e).await,
            };
            let conn = self.connection(CONNECTION_WAIT).await?;
            let req = SendMessage {
                message_id: entry.transport_id.as_bytes().to_vec(),
                recipient: entry.peer.as_str().to_owned(),
                messages,
                retry_of: entry
                    .retry_of
                    .map(|r| r.as_bytes().to_vec())
                    .unwrap_or_default(),
                retry_attempt: entry.retry_attempt,
            };
            match conn.request(request::Body::SendMessage(req)).await {
                Ok(response::Body::Sent(sent)) => {
                    self.mark_sent(entry, sent.server_ts_ms).await?;
                    return Ok(sent.server_ts_ms);
                }
                Ok(_) => return Err(unexpected()),
                Err(ClientError::Server {
                    code: ErrorCode::MismatchedDevices,
                    mismatched,
                    message,
                    retry_after_ms,
                }) => {
                    unsigned = None;
                    for m in &mismatched {
                        if let Ok(phone) = PhoneNumber::from_e164(&m.phone) {
                            // A list that does not verify (or rolls back) fails the message for good.
                            let fresh = match self.peer_devices(&phone, true).await {
                                Ok(f) => f,
                                Err(e) => return self.fail_if_permanent(entry, e).await,
                            };
                            let listed = fresh.list.device_ids();
                            for id in &m.extra {
                                if listed.iter().any(|d| d.get() == *id) {
                                    gone.insert((phone.clone(), *id));
                                }
                            }
                            // A device no signed list holds is never encrypted to.
                            if let Some(id) = m
                                .missing
                                .iter()
                                .find(|id| !listed.iter().any(|d| d.get() == **id))
                            {
                                unsigned = Some((phone.clone(), *id));
                            }
                        }
                    }
                    last_err = Some(ClientError::Server {
                        code: ErrorCode::MismatchedDevices,
                        mismatched,
                        message,
                        retry_after_ms,
                    });
                }
                Err(e) => return self.fail_if_permanent(entry, e).await,
            }
        }
        if let Some((phone, id)) = unsigned {
            // Still demanded after every refresh: the server insists on a device the account never
            // signed, and this message cannot go out through it.
            let e = ClientError::Untrusted {
                peer: phone.to_string(),
                reason: format!(
                    "the server wants device {id} to receive the message, but no signed device list \
                     of the account holds it; nothing was sent"
                ),
            };
            return self.fail_if_permanent(entry, e).await;
        }
        Err(last_err.unwrap_or(ClientError::Disconnected))
    }

    /// A refusal that retrying cannot fix takes the entry out of the queue and marks the message failed.
    async fn fail_if_permanent(&self, entry: &OutboxRecord, e: ClientError) -> Result<u64> {
        let permanent = match &e {
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::UnknownAccount
                    | ErrorCode::InvalidNumber
                    | ErrorCode::BadRequest
                    | ErrorCode::LimitExceeded
            ),
            // A forged prekey or a list that does not verify will not verify on a retry either.
            ClientError::Untrusted { .. } | ClientError::Crypto(_) => true,
            _ => false,
        };
        if permanent {
            let mut changes = Changes::default();
            changes.outbox_sent.push(entry.transport_id);
            changes.statuses.push(StatusUpdate {
                chat: entry.peer.clone(),
                id: entry.logical_id,
                status: MessageStatus::Failed,
                server_ts_ms: 0,
            });
            self.inner.store.save_changes(changes).await?;
            self.emit_status(&entry.peer, &entry.logical_id, MessageStatus::Failed)
                .await;
        }
        Err(e)
    }

    async fn mark_sent(&self, entry: &OutboxRecord, server_ts_ms: u64) -> Result<()> {
        let mut changes = Changes::default();
        changes.outbox_sent.push(entry.transport_id);
        changes.statuses.push(StatusUpdate {
            chat: entry.peer.clone(),
            id: entry.logical_id,
            status: MessageStatus::Sent,
            server_ts_ms,
        });
        self.inner.store.save_changes(changes).await?;
        self.emit_status(&entry.peer, &entry.logical_id, MessageStatus::Sent)
            .await;
        Ok(())
    }

    async fn emit_status(&self, chat: &PhoneNumber, id: &MessageId, status: MessageStatus) {
        if let Ok(Some(m)) = self.inner.store.message(chat, id).await
            && m.from_me
            && m.status == status
        {
            self.emit(Event::Status {
                chat: chat.clone(),
                id: *id,
                status,
            });
        }
    }

    /// The devices an entry goes to: every device of the peer and every other device of ours, or the
    /// one device a resend is for.
    async fn targets(
        &self,
        entry: &OutboxRecord,
        me: &IdentityRecord,
        gone: &HashSet<(PhoneNumber, u32)>,
    ) -> Result<Vec<Target>> {
        let mut out = Vec::new();
        if let Some((phone, device)) = &entry.only_device {
            let mut peer = self.peer_devices(phone, false).await?;
            if peer.list.device(*device).is_none() {
                peer = self.peer_devices(phone, true).await?;
            }
            let d = peer
                .list
                .device(*device)
                .ok_or_else(|| ClientError::Untrusted {
                    peer: phone.to_string(),
                    reason: format!("device {device} is not on the account's signed list"),
                })?;
            out.push(Target {
                phone: phone.clone(),
                device: *device,
                curve: key32(&d.identity_curve)?,
                ed: key32(&d.identity_ed)?,
                own: *phone == me.phone && entry.peer != me.phone,
            });
            return Ok(out);
        }
        let mut accounts = vec![(entry.peer.clone(), entry.peer == me.phone)];
        if entry.peer != me.phone {
            accounts.push((me.phone.clone(), true));
        }
        for (phone, own) in accounts {
            let peer = self.peer_devices(&phone, false).await?;
            for d in peer.list.devices() {
                let device = DeviceId::new(d.device_id)
                    .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
                if (phone == me.phone && device == me.device_id)
                    || gone.contains(&(phone.clone(), d.device_id))
                {
                    continue;
                }
                out.push(Target {
                    phone: phone.clone(),
                    device,
                    curve: key32(&d.identity_curve)?,
                    ed: key32(&d.identity_ed)?,
                    own: own && entry.peer != me.phone,
                });
            }
        }
        Ok(out)
    }

    /// Claims prekeys where a session is missing (or a fresh one is wanted) and encrypts the content once
    /// per target, saving every ratchet step before anything leaves the device.
    async fn encrypt_for(
        &self,
        me: &IdentityRecord,
        entry: &OutboxRecord,
        targets: &[Target],
        content: &Content,
        fresh: bool,
    ) -> Result<Vec<DeviceMessage>> {
        let store = &self.inner.store;
        let mut need: BTreeMap<PhoneNumber, Vec<u32>> = BTreeMap::new();
        for t in targets {
            if fresh || store.sessions(&t.phone, t.device).await?.is_empty() {
                need.entry(t.phone.clone())
                    .or_default()
                    .push(t.device.get());
            }
        }
        let mut claimed: HashMap<(PhoneNumber, DeviceId), SignedPreKey> = HashMap::new();
        if !need.is_empty() {
            let conn = self.connection(CONNECTION_WAIT).await?;
            for (phone, device_ids) in need {
                let resp = conn
                    .request(request::Body::ClaimKeys(ClaimKeys {
                        phone: phone.as_str().to_owned(),
                        device_ids,
                    }))
                    .await?;
                let response::Body::ClaimedKeys(keys) = resp else {
                    return Err(unexpected());
                };
                for k in keys.keys {
                    if let (Ok(d), Some(pk)) = (DeviceId::new(k.device_id), k.prekey) {
                        claimed.insert((phone.clone(), d), pk);
                    }
                }
            }
        }
        let for_peer = content.encode_to_vec();
        let for_own = Content {
            conversation: entry.peer.as_str().to_owned(),
            ..content.clone()
        }
        .encode_to_vec();
        let _crypto = self.inner.crypto.lock().await;
        let identity = self.registered_identity().await?;
        let device = self.device_keys(&identity)?;
        let pickle_key = self.inner.cipher.pickle_key();
        let now = crate::now_ms();
        let mut changes = Changes::default();
        let mut messages = Vec::with_capacity(targets.len());
        for t in targets {
            let mut session = match claimed.get(&(t.phone.clone(), t.device)) {
                Some(pk) => device.create_outbound_session(&t.curve, &t.ed, pk)?,
                None => {
                    let latest = store.sessions(&t.phone, t.device).await?;
                    let rec = latest.first().ok_or_else(|| ClientError::NoKeys {
                        peer: t.phone.to_string(),
                        device: t.device.get(),
                    })?;
                    OlmSession::from_pickle(&rec.pickle, &pickle_key)?
                }
            };
            let plaintext = if t.own { &for_own } else { &for_peer };
            let ct = session.encrypt(plaintext)?;
            changes.sessions.push(SessionRecord {
                phone: t.phone.clone(),
                device_id: t.device,
                session_id: session.session_id(),
                pickle: session.pickle(&pickle_key),
                last_used_ms: now,
            });
            messages.push(DeviceMessage {
                phone: t.phone.as_str().to_owned(),
                device_id: t.device.get(),
                olm_type: ct.olm_type,
                ciphertext: ct.body,
            });
        }
        let _ = me;
        store.save_changes(changes).await?;
        Ok(messages)
    }

    /// Handles the pushes of one connection until it ends. Returns the reason if the device was removed.
    pub(crate) async fn process_pushes(
        &self,
        conn: &Arc<Connection>,
        pushes: &mut mpsc::UnboundedReceiver<Push>,
    ) -> Option<String> {
        while let Some(first) = pushes.recv().await {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match pushes.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let mut envelopes = Vec::new();
            for p in batch {
                match p.body {
                    Some(push::Body::Envelope(e)) => envelopes.push(e),
                    Some(other) => {
                        if !envelopes.is_empty()
                            && !self
                                .process_envelopes(conn, std::mem::take(&mut envelopes))
                                .await
                        {
                            return None;
                        }
                        match other {
                            push::Body::QueueEmpty(_) => self.emit(Event::BacklogDone),
                            push::Body::KeysLow(k) => {
                                if let Err(e) = self.replenish_keys(conn, k.remaining).await {
                                    tracing::warn!(error = %e, "could not upload one-time keys");
                                }
                            }
                            push::Body::DeviceListChanged(c) => {
                                if let Ok(phone) = PhoneNumber::from_e164(&c.phone) {
                                    self.device_list_changed(phone);
                                }
                            }
                            push::Body::DeviceRemoved(r) => return Some(r.reason),
                            push::Body::LinkAccepted(a) => self.link_accepted(a),
                            push::Body::AppStateChanged(c) => {
                                self.spawn_app_state_sync(Some(c.collection));
                            }
                            push::Body::Presence(p) => {
                                if let Ok(phone) = PhoneNumber::from_e164(&p.phone) {
                                    self.emit(Event::Presence {
                                        phone,
                                        presence: crate::contacts::PresenceInfo::from_wire(&p),
                                    });
                                }
                            }
                            push::Body::Typing(t) => {
                                if let Ok(phone) = PhoneNumber::from_e164(&t.from) {
                                    self.emit(Event::Typing {
                                        phone,
                                        typing: t.typing,
                                    });
                                }
                            }
                            push::Body::Envelope(_)
                            | push::Body::LinkOffered(_)
                            | push::Body::LinkDone(_) => {}
                        }
                    }
                    None => tracing::debug!("empty push"),
                }
            }
            if !envelopes.is_empty() && !self.process_envelopes(conn, envelopes).await {
                return None;
            }
        }
        None
    }

    /// Refreshes a changed device list in the background; on the primary, a change to our own list may
    /// mean a companion removed itself, and the signed list must follow.
    fn device_list_changed(&self, phone: PhoneNumber) {
        let client = self.background();
        self.spawn_task(async move {
            if let Err(e) = client.peer_devices(&phone, true).await {
                tracing::warn!(error = %e, "device list refresh failed");
            }
            let own = client
                .registered_identity()
                .await
                .is_ok_and(|me| me.phone == phone);
            if own && let Err(e) = client.reconcile_own_list().await {
                tracing::warn!(error = %e, "could not republish the device list");
            }
        });
    }

    async fn replenish_keys(&self, conn: &Connection, remaining: u32) -> Result<()> {
        let _crypto = self.inner.crypto.lock().await;
        let identity = self.registered_identity().await?;
        let mut device = self.device_keys(&identity)?;
        let count = ONE_TIME_KEYS_TARGET.saturating_sub(remaining as usize);
        self.upload_keys(conn, &mut device, count, remaining == 0)
            .await
    }

    /// Processes envelopes in order; acknowledges each once its effects are saved. Returns false if it
    /// had to stop (the rest stay on the server and come again on the next connection).
    async fn process_envelopes(&self, conn: &Connection, envelopes: Vec<Envelope>) -> bool {
        let me = match self.registered_identity().await {
            Ok(me) => me,
            Err(_) => return false,
        };
        let mut acks = Vec::new();
        let mut outcome = Outcome::default();
        let mut complete = true;
        for env in envelopes {
            match self.process_envelope(&me, &env).await {
                Ok(o) => {
                    acks.push(env.id);
                    outcome.events.extend(o.events);
                    outcome.delivered.extend(o.delivered);
                    outcome.resends.extend(o.resends);
                    outcome.retry_requests.extend(o.retry_requests);
                    outcome.history |= o.history;
                    let g = o.group;
                    outcome.group.refresh.extend(g.refresh);
                    outcome.group.key_requests.extend(g.key_requests);
                    outcome.group.key_answers.extend(g.key_answers);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not process an envelope; it stays on the server");
                    complete = false;
                    break;
                }
            }
        }
        if conn.ack(acks).is_err() {
            complete = false;
        }
        for ev in std::mem::take(&mut outcome.events) {
            self.emit(ev);
        }
        if outcome.history {
            self.spawn_history_jobs();
        }
        self.spawn_group_follow_ups(std::mem::take(&mut outcome.group));
        if let Err(e) = self.queue_follow_ups(&me, outcome).await {
            tracing::warn!(error = %e, "could not queue receipts");
        }
        self.spawn_outbox_flush();
        complete
    }

    /// Queues delivered receipts, resends and retry requests in the outbox.
    async fn queue_follow_ups(&self, me: &IdentityRecord, outcome: Outcome) -> Result<()> {
        let mut changes = Changes::default();
        let mut by_chat: BTreeMap<PhoneNumber, Vec<MessageId>> = BTreeMap::new();
        for (chat, id) in outcome.delivered {
            by_chat.entry(chat).or_default().push(id);
        }
        for (chat, ids) in by_chat {
            self.queue_receipts(&mut changes, &chat, &ids, ReceiptKind::Delivered)?;
        }
        let now = crate::now_ms();
        for (requester, device, original, attempt) in outcome.resends {
            let Some(sent) = self.inner.store.outbox_entry(&original).await? else {
                tracing::info!("retry request for a message we no longer have");
                continue;
            };
            if attempt > MAX_DECRYPT_RETRIES || (sent.peer != requester && requester != me.phone) {
                continue;
            }
            let transport = crate::random_message_id()?;
            changes.outbox.push(OutboxRecord {
                transport_id: transport,
                logical_id: sent.logical_id,
                peer: sent.peer.clone(),
                content: sent.content.clone(),
                only_device: Some((requester, device)),
                retry_of: Some(original),
                retry_attempt: attempt,
                created_ms: now,
                state: OutboxState::Queued,
            });
        }
        for (sender, device, original, attempt) in outcome.retry_requests {
            let id = crate::random_message_id()?;
            let content = Content {
                message_id: id.as_bytes().to_vec(),
                sent_at_ms: now,
                body: Some(content::content::Body::RetryRequest(RetryRequest {
                    message_id: original.as_bytes().to_vec(),
                    attempt,
                })),
                conversation: String::new(),
            };
            let mut entry = outbox_entry(id, id, sender.clone(), &content, now);
            entry.only_device = Some((sender, device));
            entry.retry_of = Some(original);
            entry.retry_attempt = attempt;
            changes.outbox.push(entry);
        }
        if !changes.is_empty() {
            self.inner.store.save_changes(changes).await?;
        }
        Ok(())
    }

    pub(crate) fn queue_receipts(
        &self,
        changes: &mut Changes,
        chat: &PhoneNumber,
        ids: &[MessageId],
        kind: ReceiptKind,
    ) -> Result<()> {
        let now = crate::now_ms();
        for chunk in ids.chunks(MAX_RECEIPT_IDS) {
            let id = crate::random_message_id()?;
            let content = Content {
                message_id: id.as_bytes().to_vec(),
                sent_at_ms: now,
                body: Some(content::content::Body::Receipt(Receipt {
                    kind: kind as i32,
                    message_ids: chunk.iter().map(|m| m.as_bytes().to_vec()).collect(),
                })),
                conversation: String::new(),
            };
            changes
                .outbox
                .push(outbox_entry(id, id, chat.clone(), &content, now));
        }
        Ok(())
    }

    /// Decrypts and applies one envelope, saving everything it changes in one transaction.
    async fn process_envelope(&self, me: &IdentityRecord, env: &Envelope) -> Result<Outcome> {
        let mut out = Outcome::default();
        let (Ok(sender), Ok(device), Ok(tid)) = (
            PhoneNumber::from_e164(&env.sender),
            DeviceId::new(env.sender_device),
            MessageId::from_slice(&env.message_id),
        ) else {
            tracing::warn!("dropping a malformed envelope from the server");
            return Ok(out);
        };
        let store = &self.inner.store;
        if store.is_processed(&sender, &tid).await? {
            return Ok(out);
        }
        if env.olm_type == ENVELOPE_GROUP_MESSAGE || env.olm_type == ENVELOPE_GROUP_CHANGE {
            tracing::debug!(kind = env.olm_type, "group envelope");
            let mut changes = Changes::default();
            changes.processed.push((sender.clone(), tid));
            let _crypto = self.inner.crypto.lock().await;
            if env.olm_type == ENVELOPE_GROUP_CHANGE {
                self.apply_group_change(me, env, &sender, device, &mut changes, &mut out.group)
                    .await?;
            } else {
                self.apply_group_message(
                    me,
                    env,
                    &sender,
                    device,
                    tid,
                    &mut changes,
                    &mut out.group,
                )
                .await?;
            }
            store.save_changes(changes).await?;
            out.events.append(&mut out.group.events);
            out.delivered.append(&mut out.group.delivered);
            return Ok(out);
        }
        let original = if env.retry_of.is_empty() {
            tid
        } else {
            MessageId::from_slice(&env.retry_of).unwrap_or(tid)
        };
        let msg = OlmCiphertext {
            olm_type: env.olm_type,
            body: env.ciphertext.clone(),
        };
        // The sender device's identity key comes from its account's signed list, never from the server
        // alone.
        let mut curve = None;
        let mut from_cache = false;
        for refresh in [false, true] {
            match self.peer_devices(&sender, refresh).await {
                Ok(peer) => {
                    if let Some(d) = peer.list.device(device) {
                        curve = Some(key32(&d.identity_curve)?);
                        from_cache = !refresh;
                        break;
                    }
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "sender's device list is not trustworthy");
                    break;
                }
            }
        }

        let _crypto = self.inner.crypto.lock().await;
        let mut changes = Changes::default();
        changes.processed.push((sender.clone(), tid));
        let mut decrypted = match curve {
            Some(curve) => {
                self.decrypt(&sender, device, &curve, &msg, &mut changes)
                    .await?
            }
            None => None,
        };
        if decrypted.is_none() && from_cache {
            // The cached list may be stale: the number may have been registered again on a new phone,
            // which reuses the device id with new keys. Refresh it once (a changed account key leaves a
            // notice in the conversation) and try again if the device's key changed.
            match self.peer_devices(&sender, true).await {
                Ok(peer) => {
                    if let Some(d) = peer.list.device(device) {
                        let fresh = key32(&d.identity_curve)?;
                        if Some(fresh) != curve {
                            decrypted = self
                                .decrypt(&sender, device, &fresh, &msg, &mut changes)
                                .await?;
                        }
                    }
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::warn!(error = %e, "sender's device list is not trustworthy"),
            }
        }
        let content = decrypted.and_then(|pt| {
            Content::decode(pt.as_slice())
                .ok()
                .filter(|c| MessageId::from_slice(&c.message_id).is_ok())
        });
        match content {
            Some(content) => {
                if !env.retry_of.is_empty() {
                    changes.failures_cleared.push((sender.clone(), original));
                }
                self.apply_content(me, &sender, device, env, content, &mut changes, &mut out)
                    .await?;
            }
            None => {
                let attempt = env.retry_attempt;
                if attempt >= MAX_DECRYPT_RETRIES {
                    let record = MessageRecord {
                        chat: sender.clone(),
                        id: original,
                        from_me: false,
                        sender_device: device,
                        kind: MessageKind::Undecryptable,
                        text: String::new(),
                        sent_at_ms: env.server_ts_ms,
                        server_ts_ms: env.server_ts_ms,
                        status: MessageStatus::Received,
                        shown: false,
                        seq: 0,
                        media: None,
                    };
                    if store.message(&sender, &original).await?.is_none() {
                        out.events.push(Event::Message(record.clone()));
                        changes.messages.push(record);
                    }
                    changes.failures_cleared.push((sender.clone(), original));
                } else {
                    tracing::info!(
                        attempt = attempt + 1,
                        device = device.get(),
                        olm_type = env.olm_type,
                        known_device = curve.is_some(),
                        own_account = sender == me.phone,
                        "could not decrypt a message; asking the sender again"
                    );
                    changes.failures.push(FailureRecord {
                        sender: sender.clone(),
                        sender_device: device,
                        original_id: original,
                        attempts: attempt + 1,
                        server_ts_ms: env.server_ts_ms,
                    });
                    out.retry_requests
                        .push((sender.clone(), device, original, attempt + 1));
                }
            }
        }
        store.save_changes(changes).await?;
        Ok(out)
    }

    /// Tries the sessions with the device, newest first, then (for a pre-key message) a new inbound
    /// session. Session and account changes go into `changes`. Caller holds the crypto lock.
    async fn decrypt(
        &self,
        sender: &PhoneNumber,
        device: DeviceId,
        curve: &[u8; 32],
        msg: &OlmCiphertext,
        changes: &mut Changes,
    ) -> Result<Option<Vec<u8>>> {
        let pickle_key = self.inner.cipher.pickle_key();
        let now = crate::now_ms();
        for rec in self.inner.store.sessions(sender, device).await? {
            let Ok(mut session) = OlmSession::from_pickle(&rec.pickle, &pickle_key) else {
                continue;
            };
            if msg.is_pre_key() && !session.matches_prekey(msg) {
                continue;
            }
            if let Ok(pt) = session.decrypt(msg) {
                changes.sessions.push(SessionRecord {
                    pickle: session.pickle(&pickle_key),
                    last_used_ms: now,
                    ..rec
                });
                return Ok(Some(pt));
            }
        }
        if !msg.is_pre_key() {
            return Ok(None);
        }
        let mut identity = self.registered_identity().await?;
        let mut account = self.device_keys(&identity)?;
        match account.create_inbound_session(curve, msg) {
            Ok((session, pt)) => {
                changes.sessions.push(SessionRecord {
                    phone: sender.clone(),
                    device_id: device,
                    session_id: session.session_id(),
                    pickle: session.pickle(&pickle_key),
                    last_used_ms: now,
                });
                // The one-time key is used up: the account changes with the session, atomically.
                identity.device_pickle = self.pickle_device(&account);
                changes.identity = Some(identity);
                Ok(Some(pt))
            }
            Err(_) => Ok(None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply_content(
        &self,
        me: &IdentityRecord,
        sender: &PhoneNumber,
        device: DeviceId,
        env: &Envelope,
        content: Content,
        changes: &mut Changes,
        out: &mut Outcome,
    ) -> Result<()> {
        let from_me = *sender == me.phone;
        let logical = MessageId::from_slice(&content.message_id)
            .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
        match content.body {
            Some(content::content::Body::Text(t)) => {
                let Some(chat) = conversation(from_me, sender, &content.conversation) else {
                    return Ok(());
                };
                if t.body.len() > MAX_TEXT_BYTES {
                    tracing::warn!("dropping an over-long text message");
                    return Ok(());
                }
                if self.inner.store.message(&chat, &logical).await?.is_some() {
                    return Ok(());
                }
                let record = MessageRecord {
                    chat: chat.clone(),
                    id: logical,
                    from_me,
                    sender_device: device,
                    kind: MessageKind::Text,
                    text: t.body,
                    sent_at_ms: content.sent_at_ms,
                    server_ts_ms: env.server_ts_ms,
                    status: if from_me {
                        MessageStatus::Sent
                    } else {
                        MessageStatus::Received
                    },
                    shown: false,
                    seq: 0,
                    media: None,
                };
                if !from_me {
                    out.delivered.push((chat, logical));
                }
                out.events.push(Event::Message(record.clone()));
                changes.messages.push(record);
            }
            Some(content::content::Body::Receipt(r)) => {
                if from_me {
                    return Ok(());
                }
                // With read receipts off, none are shown either (as in WhatsApp).
                let status = match ReceiptKind::try_from(r.kind) {
                    Ok(ReceiptKind::Read) if !self.read_receipts_off().await? => {
                        MessageStatus::Read
                    }
                    _ => MessageStatus::Delivered,
                };
                for raw in r.message_ids.iter().take(MAX_RECEIPT_IDS) {
                    let Ok(id) = MessageId::from_slice(raw) else {
                        continue;
                    };
                    let one_to_one = self.inner.store.message(sender, &id).await?;
                    if one_to_one.is_none() {
                        self.apply_group_receipt(sender, &id, status, changes, &mut out.events)
                            .await?;
                        continue;
                    }
                    if let Some(m) = one_to_one
                        && m.from_me
                        && m.status < status
                        && m.status != MessageStatus::Failed
                    {
                        changes.statuses.push(StatusUpdate {
                            chat: sender.clone(),
                            id,
                            status,
                            server_ts_ms: 0,
                        });
                        out.events.push(Event::Status {
                            chat: sender.clone(),
                            id,
                            status,
                        });
                    }
                }
            }
            Some(content::content::Body::RetryRequest(r)) => {
                if let Ok(original) = MessageId::from_slice(&r.message_id) {
                    out.resends
                        .push((sender.clone(), device, original, r.attempt));
                }
            }
            Some(content::content::Body::Media(m)) => {
                let Some(chat) = conversation(from_me, sender, &content.conversation) else {
                    return Ok(());
                };
                if let Err(e) = m.validate() {
                    tracing::warn!(error = %e, "dropping an invalid media message");
                    return Ok(());
                }
                if self.inner.store.message(&chat, &logical).await?.is_some() {
                    return Ok(());
                }
                let record = MessageRecord {
                    chat: chat.clone(),
                    id: logical,
                    from_me,
                    sender_device: device,
                    kind: MessageKind::Media,
                    text: m.caption.clone(),
                    sent_at_ms: content.sent_at_ms,
                    server_ts_ms: env.server_ts_ms,
                    status: if from_me {
                        MessageStatus::Sent
                    } else {
                        MessageStatus::Received
                    },
                    shown: false,
                    seq: 0,
                    media: Some(self.seal_media(m)),
                };
                if !from_me {
                    out.delivered.push((chat, logical));
                }
                out.events.push(Event::Message(record.clone()));
                changes.messages.push(record);
            }
            Some(content::content::Body::HistorySync(h)) => {
                // Only our own account's other devices send us history.
                if from_me && device != me.device_id {
                    let job = crate::history::HistoryJob::Import(Box::new(h));
                    changes.values.push(job.value(env));
                    out.history = true;
                } else {
                    tracing::warn!("dropping history from another account");
                }
            }
            Some(content::content::Body::HistoryRequest(r)) => {
                if from_me && device != me.device_id && me.device_id == DeviceId::PRIMARY {
                    let job = crate::history::HistoryJob::Answer(device, r);
                    changes.values.push(job.value(env));
                    out.history = true;
                } else {
                    tracing::warn!("dropping a history request not from one of our companions");
                }
            }
            Some(content::content::Body::AppStateKeyShare(k)) => {
                // Only our primary hands out sync keys.
                if from_me && device == DeviceId::PRIMARY && me.device_id != DeviceId::PRIMARY {
                    self.app_state_keys_received(k).await?;
                } else {
                    tracing::warn!("dropping app-state keys not from our primary");
                }
            }
            Some(content::content::Body::AppStateRecovery(r)) => {
                if from_me && device != me.device_id && me.device_id == DeviceId::PRIMARY {
                    let client = self.background();
                    self.spawn_task(async move {
                        if let Err(e) = client.recover_app_state(&r.collection).await {
                            tracing::warn!(error = %e, "app-state recovery failed");
                        }
                    });
                }
            }
            Some(content::content::Body::ProfileKey(k)) => {
                let current = self.profile_key_version(me, sender).await?;
                self.profile_key_received(me, sender, device, &k, changes, current);
            }
            Some(content::content::Body::GroupKey(k)) => {
                self.apply_group_key(me, sender, device, k, changes, &mut out.group)
                    .await?;
                out.events.append(&mut out.group.events);
                out.delivered.append(&mut out.group.delivered);
            }
            Some(content::content::Body::GroupKeyRequest(r)) => {
                if let Ok(group) = natter_proto::GroupId::from_slice(&r.group_id) {
                    out.group.key_answers.push((
                        group,
                        sender.clone(),
                        device,
                        r.session_id,
                        r.message_index,
                    ));
                }
            }
            None => tracing::debug!("content without a body"),
        }
        Ok(())
    }

    /// Messages not yet shown by an earlier call, oldest first; marks them shown and sends read receipts
    /// for the incoming ones.
    pub async fn take_unshown(&self) -> Result<Vec<MessageRecord>> {
        let unshown = self.inner.store.unshown().await?;
        if unshown.is_empty() {
            return Ok(unshown);
        }
        self.mark_shown(&unshown).await?;
        Ok(unshown)
    }

    /// Marks messages as shown to the user and sends read receipts for the incoming text ones.
    pub async fn mark_shown(&self, messages: &[MessageRecord]) -> Result<()> {
        let mut changes = Changes::default();
        let mut read: BTreeMap<PhoneNumber, Vec<MessageId>> = BTreeMap::new();
        for m in messages {
            changes.shown.push((m.chat.clone(), m.id));
            if !m.from_me && matches!(m.kind, MessageKind::Text | MessageKind::Media) {
                read.entry(m.chat.clone()).or_default().push(m.id);
            }
        }
        if !self.read_receipts_off().await? {
            for (chat, ids) in read {
                self.queue_receipts(&mut changes, &chat, &ids, ReceiptKind::Read)?;
            }
        }
        self.inner.store.save_changes(changes).await?;
        if self.is_connected() {
            self.spawn_outbox_flush();
        }
        Ok(())
    }

    /// Waits until the outbox is empty or `wait` passes; true if it emptied.
    pub async fn wait_outbox_empty(&self, wait: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.inner.store.queued_outbox().await?.is_empty() {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            if let Err(e) = self.flush_outbox().await {
                tracing::debug!(error = %e, "outbox flush failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub(crate) fn outbox_entry(
    transport_id: MessageId,
    logical_id: MessageId,
    peer: PhoneNumber,
    content: &Content,
    now: u64,
) -> OutboxRecord {
    OutboxRecord {
        transport_id,
        logical_id,
        peer,
        content: content.encode_to_vec(),
        only_device: None,
        retry_of: None,
        retry_attempt: 0,
        created_ms: now,
        state: OutboxState::Queued,
    }
}

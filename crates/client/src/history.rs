//! History sync between an account's own devices.
//!
//! After linking a companion, the primary ([`Client::send_history`]) reads the most recent messages of
//! its store (by default the last 90 days, at most 100,000), newest first, and cuts them into chunks
//! (at most [`HistoryOptions::chunk_messages`] messages, and far below
//! [`MAX_HISTORY_CHUNK_BYTES`] encoded). Each chunk is a [`HistoryBundle`], compressed with zstd
//! (level 3) and encrypted and uploaded exactly like a media file (fresh key, chunked authenticated
//! encryption, both digests); a [`HistorySync`] content carrying the pointer, key and digests then goes
//! through the outbox to the new companion only, chunk 0 (newest) first. Media messages travel as
//! pointers: their keys are unsealed from the primary's store and sealed again by the companion.
//!
//! The companion accepts history only from its own account's other devices. For each chunk it downloads
//! the blob (verifying every chunk tag, both digests and the size), decompresses it with a hard output
//! limit of [`MAX_HISTORY_CHUNK_BYTES`], decodes and checks every message, and only then saves the whole
//! chunk in one transaction (messages it already has are left alone; imported messages are marked shown,
//! so `recv` does not print the past as new). Each chunk ends in an [`Event::HistoryImported`] or, if
//! anything fails, an [`Event::HistoryFailed`] with nothing of that chunk stored.
//!
//! A companion asks for older history of one chat with [`Client::request_older_history`]; the primary
//! answers with chunks whose `chat` field names the chat.
//!
//! A message to one's own account may go to any of its devices (the server checks only that they
//! exist), so history and requests go to the one device concerned.

use std::io::Read;
use std::time::Duration;

use natter_proto::content::{
    self, Content, HistoryBundle, HistoryMessage, HistoryRequest, HistorySync,
};
use natter_proto::limits::MAX_HISTORY_CHUNK_BYTES;
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use prost::Message;

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::events::Event;
use crate::messaging::outbox_entry;
use crate::store::{Changes, MessageKind, MessageRecord, MessageStatus, OutboxRecord, OutboxState};

/// MIME type of a history blob.
pub const HISTORY_MIME: &str = "application/x-natter-history";
/// Largest answer to one request for older history.
pub const MAX_OLDER_MESSAGES: u32 = 10_000;
/// Messages a companion asks for with `--older`.
pub const OLDER_BATCH: u32 = 1_000;
/// zstd compression level of history bundles.
const ZSTD_LEVEL: i32 = 3;
/// A chunk is closed once its encoded size passes this (well below the decompression limit).
const CHUNK_SOFT_BYTES: usize = MAX_HISTORY_CHUNK_BYTES / 4;

/// What history a primary sends to a new companion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Only messages newer than this many days (server time).
    pub max_age_days: u32,
    /// At most this many messages (the newest).
    pub max_messages: usize,
    /// Messages per chunk.
    pub chunk_messages: usize,
    /// How long to wait for the companion's keys and the delivery of every chunk.
    pub deliver_wait: Duration,
}

impl Default for HistoryOptions {
    fn default() -> Self {
        HistoryOptions {
            max_age_days: 90,
            max_messages: 100_000,
            chunk_messages: 2_000,
            deliver_wait: Duration::from_secs(60),
        }
    }
}

/// What [`Client::send_history`] sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistorySent {
    /// Chunks queued.
    pub chunks: u32,
    /// Messages in them.
    pub messages: usize,
    /// Bytes uploaded (the sum of the blobs' sizes).
    pub blob_bytes: u64,
    /// Whether every chunk was delivered to the server within [`HistoryOptions::deliver_wait`] (the rest
    /// stay in the outbox).
    pub delivered: bool,
}

/// History work found while processing an envelope. It is saved (as an account value under
/// [`JOB_PREFIX`]) in the same transaction that marks the envelope processed, so acknowledging the
/// envelope loses nothing; jobs then run one at a time, in the order their envelopes reached the
/// server, and each is removed in the transaction that completes it (or when it fails for good).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum HistoryJob {
    /// Import a chunk sent by one of our devices.
    Import(Box<HistorySync>),
    /// Answer a companion's request for older history.
    Answer(DeviceId, HistoryRequest),
}

/// Key prefix of pending history jobs among the account values.
const JOB_PREFIX: &str = "job/history/";

impl HistoryJob {
    /// The account value that records this job, found in envelope `env` (unique per envelope, ordered
    /// by the server's time).
    pub(crate) fn value(&self, env: &natter_proto::wire::Envelope) -> (String, Option<Vec<u8>>) {
        let key = format!("{JOB_PREFIX}{:016x}/{:016x}", env.server_ts_ms, env.id);
        let mut bytes = Vec::new();
        match self {
            HistoryJob::Import(sync) => {
                bytes.extend_from_slice(&[1, 0]);
                bytes.extend_from_slice(&0u32.to_be_bytes());
                sync.encode(&mut bytes).unwrap_or_default();
            }
            HistoryJob::Answer(device, req) => {
                bytes.extend_from_slice(&[2, 0]);
                bytes.extend_from_slice(&device.get().to_be_bytes());
                req.encode(&mut bytes).unwrap_or_default();
            }
        }
        (key, Some(bytes))
    }

    /// Decodes a job saved by [`HistoryJob::value`], with the number of times it failed transiently.
    fn decode(bytes: &[u8]) -> Option<(HistoryJob, u8)> {
        let (&[kind, attempts], rest) = bytes.split_first_chunk::<2>()?;
        let (device, body) = rest.split_at_checked(4)?;
        let device = u32::from_be_bytes(device.try_into().ok()?);
        let job = match kind {
            1 => HistoryJob::Import(Box::new(HistorySync::decode(body).ok()?)),
            2 => HistoryJob::Answer(
                DeviceId::new(device).ok()?,
                HistoryRequest::decode(body).ok()?,
            ),
            _ => return None,
        };
        Some((job, attempts))
    }
}

/// How many transient failures a history job survives before it is given up (with an event).
const JOB_ATTEMPTS: u8 = 8;

/// Whether a job that failed with this error may succeed later (network, server busy), so it stays
/// queued, or failed for good (verification, bad input), so it is dropped with an event.
fn transient(e: &ClientError) -> bool {
    e.is_transient() || matches!(e, ClientError::NoServer | ClientError::Store(_))
}

fn kind_name(k: MessageKind) -> &'static str {
    match k {
        MessageKind::Text => "text",
        MessageKind::Undecryptable => "undecryptable",
        MessageKind::Notice => "notice",
        MessageKind::Media => "media",
    }
}

fn kind_from(s: &str) -> Option<MessageKind> {
    Some(match s {
        "text" => MessageKind::Text,
        "undecryptable" => MessageKind::Undecryptable,
        "notice" => MessageKind::Notice,
        "media" => MessageKind::Media,
        _ => return None,
    })
}

fn status_name(s: MessageStatus) -> &'static str {
    match s {
        MessageStatus::Pending => "pending",
        MessageStatus::Sent => "sent",
        MessageStatus::Delivered => "delivered",
        MessageStatus::Read => "read",
        MessageStatus::Received => "received",
        MessageStatus::Failed => "failed",
    }
}

fn status_from(s: &str) -> Option<MessageStatus> {
    Some(match s {
        "pending" => MessageStatus::Pending,
        "sent" => MessageStatus::Sent,
        "delivered" => MessageStatus::Delivered,
        "read" => MessageStatus::Read,
        "received" => MessageStatus::Received,
        "failed" => MessageStatus::Failed,
        _ => return None,
    })
}

fn refused(what: impl std::fmt::Display) -> ClientError {
    ClientError::InvalidInput(format!("history chunk refused: {what}"))
}

/// Compresses an encoded bundle.
fn compress(encoded: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(encoded, ZSTD_LEVEL).map_err(|e| ClientError::Io {
        path: "zstd".into(),
        source: e,
    })
}

/// Decompresses a bundle, refusing one that expands past [`MAX_HISTORY_CHUNK_BYTES`].
fn decompress(compressed: &[u8]) -> Result<Vec<u8>> {
    let decoder = zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| refused(format!("not zstd: {e}")))?;
    let mut out = Vec::new();
    decoder
        .take(MAX_HISTORY_CHUNK_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| refused(format!("does not decompress: {e}")))?;
    if out.len() > MAX_HISTORY_CHUNK_BYTES {
        return Err(refused(format!(
            "expands to more than {MAX_HISTORY_CHUNK_BYTES} bytes"
        )));
    }
    Ok(out)
}

/// Cuts messages (newest first) into chunks of at most `per_chunk` messages and about
/// [`CHUNK_SOFT_BYTES`] encoded.
fn cut(messages: Vec<HistoryMessage>, per_chunk: usize) -> Vec<Vec<HistoryMessage>> {
    let per_chunk = per_chunk.max(1);
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0usize;
    for m in messages {
        let len = m.encoded_len() + 8;
        if !current.is_empty() && (current.len() >= per_chunk || bytes + len > CHUNK_SOFT_BYTES) {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += len;
        current.push(m);
    }
    if !current.is_empty() || chunks.is_empty() {
        chunks.push(current);
    }
    chunks
}

impl Client {
    /// Primary side, after [`Client::link_device`]: sends recent history to the companion `device`
    /// (see the module documentation), then waits up to [`HistoryOptions::deliver_wait`] for every chunk
    /// to leave the outbox (the companion may still be uploading its keys).
    pub async fn send_history(
        &self,
        device: DeviceId,
        opts: &HistoryOptions,
    ) -> Result<HistorySent> {
        let me = self.registered_identity().await?;
        if me.device_id != DeviceId::PRIMARY || device == DeviceId::PRIMARY {
            return Err(ClientError::InvalidInput(
                "history is sent by the primary to a companion".into(),
            ));
        }
        let since = crate::now_ms().saturating_sub(u64::from(opts.max_age_days) * 86_400_000);
        let records = self
            .inner
            .store
            .messages_page(None, since.max(1), u64::MAX, opts.max_messages)
            .await?;
        let (mut sent, ids) = self
            .queue_history(&me.phone, device, records, opts.chunk_messages, None)
            .await?;
        sent.delivered = self.wait_sent(&ids, opts.deliver_wait).await?;
        Ok(sent)
    }

    /// Waits until these outbox entries are sent (flushing the outbox meanwhile) or `wait` passes;
    /// true if they all went out. Other entries stuck in the outbox do not hold it up.
    async fn wait_sent(&self, ids: &[MessageId], wait: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut pending = false;
            for id in ids {
                if self
                    .inner
                    .store
                    .outbox_entry(id)
                    .await?
                    .is_some_and(|e| e.state == OutboxState::Queued)
                {
                    pending = true;
                    break;
                }
            }
            if !pending {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            if let Err(e) = self.flush_outbox().await {
                tracing::debug!(error = %e, "outbox flush failed");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Builds, uploads and queues the chunks of `records` (newest first) for one of our devices.
    async fn queue_history(
        &self,
        me: &PhoneNumber,
        device: DeviceId,
        records: Vec<MessageRecord>,
        per_chunk: usize,
        chat: Option<&PhoneNumber>,
    ) -> Result<(HistorySent, Vec<MessageId>)> {
        let mut messages = Vec::with_capacity(records.len());
        for r in records {
            messages.push(self.to_history(r)?);
        }
        let total = messages.len();
        let chunks = cut(messages, per_chunk);
        let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        let mut sent = HistorySent {
            chunks: count,
            messages: total,
            ..HistorySent::default()
        };
        let now = crate::now_ms();
        let mut entries: Vec<OutboxRecord> = Vec::with_capacity(chunks.len());
        for (index, chunk) in chunks.into_iter().enumerate() {
            let message_count = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            let encoded = HistoryBundle { messages: chunk }.encode_to_vec();
            let compressed = tokio::task::spawn_blocking(move || compress(&encoded))
                .await
                .map_err(|e| ClientError::Transfer(format!("compression task failed: {e}")))??;
            let blob = self
                .upload_bytes(compressed, HISTORY_MIME, &format!("history-{index}.zst"))
                .await?;
            sent.blob_bytes += blob.ciphertext_size;
            let id = crate::random_message_id()?;
            let content = Content {
                message_id: id.as_bytes().to_vec(),
                sent_at_ms: now,
                body: Some(content::content::Body::HistorySync(HistorySync {
                    blob: Some(blob),
                    chunk_index: u32::try_from(index).unwrap_or(u32::MAX),
                    chunk_count: count,
                    message_count,
                    chat: chat.map(|c| c.as_str().to_owned()).unwrap_or_default(),
                })),
                conversation: String::new(),
            };
            entries.push(own_device_entry(id, me, device, &content, now));
        }
        let ids = entries.iter().map(|e| e.transport_id).collect();
        // Queued together, in order: the outbox sends them oldest entry first.
        self.inner
            .store
            .save_changes(Changes {
                outbox: entries,
                ..Changes::default()
            })
            .await?;
        self.spawn_outbox_flush();
        Ok((sent, ids))
    }

    /// A stored message as history carries it (a media key unsealed).
    fn to_history(&self, r: MessageRecord) -> Result<HistoryMessage> {
        let media = match &r.media {
            Some(m) => {
                let key = self.media_key(m)?;
                let mut media = (*m.0).clone();
                media.key = key.to_vec();
                Some(media)
            }
            None => None,
        };
        Ok(HistoryMessage {
            chat: r.chat.as_str().to_owned(),
            id: r.id.as_bytes().to_vec(),
            from_me: r.from_me,
            sender_device: r.sender_device.get(),
            kind: kind_name(r.kind).to_owned(),
            text: r.text,
            sent_at_ms: r.sent_at_ms,
            server_ts_ms: r.server_ts_ms,
            status: status_name(r.status).to_owned(),
            media,
        })
    }

    /// A history message as stored (a media key sealed again); any malformed field refuses the chunk.
    fn record_from_history(&self, m: HistoryMessage) -> Result<MessageRecord> {
        let (chat, id, sender_device) = m.parse_ids().map_err(|e| refused(e.to_string()))?;
        let kind = kind_from(&m.kind).ok_or_else(|| refused(format!("kind {:?}", m.kind)))?;
        let status =
            status_from(&m.status).ok_or_else(|| refused(format!("status {:?}", m.status)))?;
        // `parse_ids` checked that exactly a media message carries a valid pointer.
        let media = match (kind, m.media) {
            (MessageKind::Media, Some(media)) => Some(self.seal_media(media)),
            (_, _) => None,
        };
        Ok(MessageRecord {
            chat,
            id,
            from_me: m.from_me,
            sender_device,
            kind,
            text: m.text,
            sent_at_ms: m.sent_at_ms,
            server_ts_ms: m.server_ts_ms,
            status,
            shown: true,
            seq: 0,
            media,
        })
    }

    /// How many history jobs (chunks to import, requests to answer) wait on this device: a UI shows
    /// "importing history…" while there are some.
    pub async fn pending_history_jobs(&self) -> Result<usize> {
        Ok(self.inner.store.values_with_prefix(JOB_PREFIX).await?.len())
    }

    /// Runs the pending history jobs in the background, one at a time and in order (after envelopes
    /// that queued some were acknowledged, and after every login).
    pub(crate) fn spawn_history_jobs(&self) {
        let client = self.background();
        self.spawn_task(async move {
            if let Err(e) = client.run_history_jobs().await {
                tracing::debug!(error = %e, "history jobs stopped; they resume at the next login");
            }
        });
    }

    /// Runs every pending history job; a transient failure stops the run and keeps the job.
    async fn run_history_jobs(&self) -> Result<()> {
        let _one_at_a_time = self.inner.history_jobs.lock().await;
        for (key, mut bytes) in self.inner.store.values_with_prefix(JOB_PREFIX).await? {
            let done = (key.clone(), None);
            let Some((job, attempts)) = HistoryJob::decode(&bytes) else {
                tracing::warn!(key, "dropping an unreadable history job");
                self.save_job(done).await?;
                continue;
            };
            let last_try = attempts + 1 >= JOB_ATTEMPTS;
            let result = match job {
                HistoryJob::Import(sync) => self.import_chunk(*sync, done.clone(), last_try).await,
                HistoryJob::Answer(device, req) => {
                    match self.answer_history_request(device, req).await {
                        Err(e) if !transient(&e) || last_try => {
                            tracing::warn!(error = %e, "could not answer a history request");
                            self.save_job(done).await
                        }
                        Ok(()) => self.save_job(done).await,
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = result {
                // Transient: count the attempt, keep the job (and the order) for the next run.
                if let Some(count) = bytes.get_mut(1) {
                    *count = attempts + 1;
                }
                self.save_job((key, Some(bytes))).await?;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Saves a job's removal (`None`) or its new value.
    async fn save_job(&self, done: (String, Option<Vec<u8>>)) -> Result<()> {
        self.inner
            .store
            .save_changes(Changes {
                values: vec![done],
                ..Changes::default()
            })
            .await?;
        Ok(())
    }

    /// Imports one chunk; emits [`Event::HistoryImported`] or [`Event::HistoryFailed`]. The job's
    /// removal (`done`) is saved with the chunk, or alone when the chunk is refused for good; a
    /// transient failure returns the error and keeps the job.
    async fn import_chunk(
        &self,
        sync: HistorySync,
        done: (String, Option<Vec<u8>>),
        last_try: bool,
    ) -> Result<()> {
        let chat = PhoneNumber::from_e164(&sync.chat).ok();
        let (chunk_index, chunk_count) = (sync.chunk_index, sync.chunk_count);
        match self.try_import_chunk(sync, done.clone()).await {
            Ok(messages) => self.emit(Event::HistoryImported {
                chunk_index,
                chunk_count,
                messages,
                chat,
            }),
            Err(e) if transient(&e) && !last_try => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, chunk_index, "history chunk refused; nothing of it was stored");
                self.save_job(done).await?;
                self.emit(Event::HistoryFailed {
                    chunk_index,
                    chunk_count,
                    chat,
                    reason: e.to_string(),
                });
            }
        }
        Ok(())
    }

    async fn try_import_chunk(
        &self,
        sync: HistorySync,
        done: (String, Option<Vec<u8>>),
    ) -> Result<u32> {
        let blob = sync.blob.ok_or_else(|| refused("no blob"))?;
        if blob.key.len() != 32 {
            return Err(refused("bad key"));
        }
        let compressed = self
            .download_to_memory(&blob, MAX_HISTORY_CHUNK_BYTES)
            .await?;
        let encoded = tokio::task::spawn_blocking(move || decompress(&compressed))
            .await
            .map_err(|e| ClientError::Transfer(format!("decompression task failed: {e}")))??;
        let bundle = HistoryBundle::decode(encoded.as_slice())
            .map_err(|e| refused(format!("does not decode: {e}")))?;
        if bundle.messages.len() != sync.message_count as usize {
            return Err(refused(format!(
                "{} messages announced, {} found",
                sync.message_count,
                bundle.messages.len()
            )));
        }
        let mut records = Vec::with_capacity(bundle.messages.len());
        for m in bundle.messages {
            records.push(self.record_from_history(m)?);
        }
        let count = u32::try_from(records.len()).unwrap_or(u32::MAX);
        // One transaction; messages already here are left as they are.
        self.inner
            .store
            .save_changes(Changes {
                messages: records,
                values: vec![done],
                ..Changes::default()
            })
            .await?;
        Ok(count)
    }

    /// Primary side: answers a companion's request for older history of one chat.
    async fn answer_history_request(&self, device: DeviceId, req: HistoryRequest) -> Result<()> {
        let me = self.registered_identity().await?;
        let chat = PhoneNumber::from_e164(&req.chat)
            .map_err(|e| ClientError::InvalidInput(format!("history request: {e}")))?;
        let limit = req.max_messages.clamp(1, MAX_OLDER_MESSAGES) as usize;
        let records = self
            .inner
            .store
            .messages_page(Some(&chat), 1, req.before_ms, limit)
            .await?;
        let per_chunk = HistoryOptions::default().chunk_messages;
        self.queue_history(&me.phone, device, records, per_chunk, Some(&chat))
            .await?;
        Ok(())
    }

    /// Companion side: asks the primary for up to [`OLDER_BATCH`] messages of `chat` older than the
    /// oldest this device holds. The answer arrives as [`Event::HistoryImported`] (or
    /// [`Event::HistoryFailed`]) events whose `chat` is set; subscribe before calling.
    pub async fn request_older_history(&self, chat: &PhoneNumber) -> Result<()> {
        let me = self.registered_identity().await?;
        if me.device_id == DeviceId::PRIMARY {
            return Err(ClientError::InvalidInput(
                "this is the primary device: there is nothing older than what it holds itself"
                    .into(),
            ));
        }
        let before_ms = self
            .inner
            .store
            .history(chat)
            .await?
            .iter()
            .map(|m| m.server_ts_ms)
            .filter(|t| *t > 0)
            .min()
            .unwrap_or(u64::MAX);
        let id = crate::random_message_id()?;
        let now = crate::now_ms();
        let content = Content {
            message_id: id.as_bytes().to_vec(),
            sent_at_ms: now,
            body: Some(content::content::Body::HistoryRequest(HistoryRequest {
                chat: chat.as_str().to_owned(),
                before_ms,
                max_messages: OLDER_BATCH,
            })),
            conversation: String::new(),
        };
        let entry = own_device_entry(id, &me.phone, DeviceId::PRIMARY, &content, now);
        self.inner
            .store
            .save_changes(Changes {
                outbox: vec![entry.clone()],
                ..Changes::default()
            })
            .await?;
        let _sending = self.inner.sending.lock().await;
        self.deliver(&entry).await?;
        Ok(())
    }
}

/// An outbox entry for one of our own devices only.
fn own_device_entry(
    id: MessageId,
    me: &PhoneNumber,
    device: DeviceId,
    content: &Content,
    now: u64,
) -> OutboxRecord {
    let mut entry = outbox_entry(id, id, me.clone(), content, now);
    entry.only_device = Some((me.clone(), device));
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(n: usize, text_len: usize) -> HistoryMessage {
        HistoryMessage {
            chat: "+14155550100".into(),
            id: vec![n as u8; 16],
            text: "x".repeat(text_len),
            ..HistoryMessage::default()
        }
    }

    #[test]
    fn chunks_by_count_and_size() {
        let msgs: Vec<_> = (0..5).map(|n| hm(n, 10)).collect();
        let c = cut(msgs, 2);
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(c[0][0].id, vec![0u8; 16]);
        assert_eq!(cut(Vec::new(), 2).len(), 1);
        let big: Vec<_> = (0..3).map(|n| hm(n, CHUNK_SOFT_BYTES / 2)).collect();
        assert_eq!(cut(big, 100).len(), 3);
    }

    #[test]
    fn decompression_is_bounded() {
        let data = vec![7u8; 1000];
        assert_eq!(decompress(&compress(&data).unwrap()).unwrap(), data);
        let bomb = compress(&vec![0u8; MAX_HISTORY_CHUNK_BYTES + 1]).unwrap();
        assert!(bomb.len() < 1024 * 1024);
        assert!(decompress(&bomb).is_err());
        assert!(decompress(b"not zstd at all").is_err());
    }

    #[test]
    fn names_round_trip() {
        for k in [
            MessageKind::Text,
            MessageKind::Undecryptable,
            MessageKind::Notice,
            MessageKind::Media,
        ] {
            assert_eq!(kind_from(kind_name(k)), Some(k));
        }
        for s in [
            MessageStatus::Pending,
            MessageStatus::Sent,
            MessageStatus::Delivered,
            MessageStatus::Read,
            MessageStatus::Received,
            MessageStatus::Failed,
        ] {
            assert_eq!(status_from(status_name(s)), Some(s));
        }
        assert_eq!(kind_from("bogus"), None);
    }
}

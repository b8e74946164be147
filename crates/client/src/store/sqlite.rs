//! [`SqliteStore`]: the default [`ClientStore`], one SQLite file in WAL mode in the client's home.
//!
//! A client is one process, so this is a small pool ([`POOL_SIZE`] connections) shared by reads and
//! writes. [`ClientStore::save_changes`] runs everything in one `BEGIN IMMEDIATE` transaction (writers of
//! this process take turns on a mutex first) and commits with `synchronous=FULL`, so once it returns the
//! changes are on disk, and a failure anywhere leaves nothing behind. Semantics follow
//! [`super::memory`], the reference.
//!
//! The schema lives in `migrations/NNN_*.sql`; see `migrations/NOTES.md` for the pitfalls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use natter_sqlite::{MigrateError, Migration};
use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::memory::{checked_i64, status_advances};
use super::{
    Changes, ChatSummary, ClientStore, FailureRecord, IdentityRecord, MediaRecord, MessageKind,
    MessageRecord, MessageStatus, OutboxRecord, OutboxState, PeerRecord, SessionRecord,
    StatusUpdate, StoreError, StoreResult, UploadRecord,
};

/// Connections in the pool (reads and the one write at a time).
pub const POOL_SIZE: u32 = 3;
/// How long a connection waits for a lock held by another connection or process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The migrations, in order: (version, SQL). Each runs once, in its own transaction.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/001_initial.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/002_media.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/003_account_values.sql"),
    },
];

/// The SQLite store. Cloning is cheap and shares the pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    path: PathBuf,
    pool: SqlitePool,
    /// Serializes this process's write transactions (others would wait in SQLite's busy handler).
    write: Arc<tokio::sync::Mutex<()>>,
}

/// Maps an sqlx error: decoding failures mean a bad row, everything else is the backend's.
fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        e => StoreError::Backend(Box::new(e)),
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

// ---- encoding ----

fn dev(d: DeviceId) -> i64 {
    i64::from(d.get())
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

fn kind_str(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Text => "text",
        MessageKind::Undecryptable => "undecryptable",
        MessageKind::Notice => "notice",
        MessageKind::Media => "media",
    }
}

fn status_str(status: MessageStatus) -> &'static str {
    match status {
        MessageStatus::Pending => "pending",
        MessageStatus::Sent => "sent",
        MessageStatus::Delivered => "delivered",
        MessageStatus::Read => "read",
        MessageStatus::Received => "received",
        MessageStatus::Failed => "failed",
    }
}

fn state_str(state: OutboxState) -> &'static str {
    match state {
        OutboxState::Queued => "queued",
        OutboxState::Sent => "sent",
    }
}

// ---- row decoding ----

fn corrupt(what: &str, value: impl std::fmt::Debug) -> StoreError {
    StoreError::Corrupt(format!("invalid {what}: {value:?}"))
}

fn dec_phone(s: &str) -> StoreResult<PhoneNumber> {
    PhoneNumber::from_e164(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn dec_device(v: i64) -> StoreResult<DeviceId> {
    u32::try_from(v)
        .ok()
        .and_then(|v| DeviceId::new(v).ok())
        .ok_or_else(|| corrupt("device id", v))
}

fn dec_key(what: &str, bytes: Vec<u8>) -> StoreResult<[u8; 32]> {
    let len = bytes.len();
    <[u8; 32]>::try_from(bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what}: {len} bytes, expected 32")))
}

fn dec_id(bytes: &[u8]) -> StoreResult<MessageId> {
    MessageId::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn dec_u64(what: &str, v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what}: negative value {v}")))
}

fn dec_u32(what: &str, v: i64) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what}: {v} out of range")))
}

fn dec_bool(what: &str, v: i64) -> StoreResult<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(corrupt(what, v)),
    }
}

fn dec_kind(s: &str) -> StoreResult<MessageKind> {
    Ok(match s {
        "text" => MessageKind::Text,
        "undecryptable" => MessageKind::Undecryptable,
        "notice" => MessageKind::Notice,
        "media" => MessageKind::Media,
        _ => return Err(corrupt("message kind", s)),
    })
}

fn dec_status(s: &str) -> StoreResult<MessageStatus> {
    Ok(match s {
        "pending" => MessageStatus::Pending,
        "sent" => MessageStatus::Sent,
        "delivered" => MessageStatus::Delivered,
        "read" => MessageStatus::Read,
        "received" => MessageStatus::Received,
        "failed" => MessageStatus::Failed,
        _ => return Err(corrupt("message status", s)),
    })
}

fn dec_state(s: &str) -> StoreResult<OutboxState> {
    Ok(match s {
        "queued" => OutboxState::Queued,
        "sent" => OutboxState::Sent,
        _ => return Err(corrupt("outbox state", s)),
    })
}

type IdentityRow = (
    String,
    i64,
    i64,
    Vec<u8>,
    Option<Vec<u8>>,
    String,
    Vec<u8>,
    String,
);
type SessionRow = (String, i64, String, String, i64);
type PeerRow = (String, Vec<u8>, Vec<u8>, i64, Option<i64>);
type MessageRow = (
    i64,
    String,
    Vec<u8>,
    i64,
    i64,
    String,
    String,
    i64,
    i64,
    String,
    i64,
    Option<Vec<u8>>,
);
type UploadRow = (String, String, i64, i64, String, Vec<u8>, i64, String, i64);
type OutboxRow = (
    Vec<u8>,
    Vec<u8>,
    String,
    Vec<u8>,
    Option<String>,
    Option<i64>,
    Option<Vec<u8>>,
    i64,
    i64,
    String,
);
type FailureRow = (String, i64, Vec<u8>, i64, i64);

/// The columns of a [`MessageRow`], as a literal for `concat!`.
macro_rules! message_columns {
    () => {
        "seq, chat, id, from_me, sender_device, kind, text, sent_at_ms, server_ts_ms, status, shown, \
         media"
    };
}

/// The columns of an [`OutboxRow`], as a literal for `concat!`.
macro_rules! outbox_columns {
    () => {
        "transport_id, logical_id, peer, content, only_phone, only_device, retry_of, \
         retry_attempt, created_ms, state"
    };
}

fn identity_from_row(row: IdentityRow) -> StoreResult<IdentityRecord> {
    let (phone, device_id, registered, key, secret, pickle, noise, name) = row;
    Ok(IdentityRecord {
        phone: dec_phone(&phone)?,
        device_id: dec_device(device_id)?,
        registered: dec_bool("registered", registered)?,
        account_key: dec_key("account_key", key)?,
        account_secret: secret,
        device_pickle: pickle,
        noise_secret: noise,
        device_name: name,
    })
}

fn session_from_row(row: SessionRow) -> StoreResult<SessionRecord> {
    let (phone, device_id, session_id, pickle, last_used) = row;
    Ok(SessionRecord {
        phone: dec_phone(&phone)?,
        device_id: dec_device(device_id)?,
        session_id,
        pickle,
        last_used_ms: dec_u64("last_used_ms", last_used)?,
    })
}

fn peer_from_row(row: PeerRow) -> StoreResult<PeerRecord> {
    let (phone, key, list, version, changed) = row;
    Ok(PeerRecord {
        phone: dec_phone(&phone)?,
        account_key: dec_key("account_key", key)?,
        device_list: list,
        device_list_version: dec_u64("device_list_version", version)?,
        key_changed_at_ms: changed
            .map(|v| dec_u64("key_changed_at_ms", v))
            .transpose()?,
    })
}

fn message_from_row(row: MessageRow) -> StoreResult<MessageRecord> {
    let (
        seq,
        chat,
        id,
        from_me,
        sender_device,
        kind,
        text,
        sent_at,
        server_ts,
        status,
        shown,
        media,
    ) = row;
    let media = media
        .map(|bytes| {
            <natter_proto::content::Media as prost::Message>::decode(bytes.as_slice())
                .map(|m| MediaRecord(Box::new(m)))
                .map_err(|e| corrupt("media", e))
        })
        .transpose()?;
    Ok(MessageRecord {
        chat: dec_phone(&chat)?,
        id: dec_id(&id)?,
        from_me: dec_bool("from_me", from_me)?,
        sender_device: dec_device(sender_device)?,
        kind: dec_kind(&kind)?,
        text,
        sent_at_ms: dec_u64("sent_at_ms", sent_at)?,
        server_ts_ms: dec_u64("server_ts_ms", server_ts)?,
        status: dec_status(&status)?,
        shown: dec_bool("shown", shown)?,
        seq,
        media,
    })
}

fn upload_from_row(row: UploadRow) -> StoreResult<UploadRecord> {
    let (peer, path, size, mtime, blob_id, sealed_key, kind, caption, created) = row;
    Ok(UploadRecord {
        peer: dec_phone(&peer)?,
        path,
        size: dec_u64("size", size)?,
        mtime_ms: dec_u64("mtime_ms", mtime)?,
        blob_id,
        sealed_key,
        kind: i32::try_from(kind).map_err(|_| corrupt("media kind", kind))?,
        caption,
        created_ms: dec_u64("created_ms", created)?,
    })
}

fn outbox_from_row(row: OutboxRow) -> StoreResult<OutboxRecord> {
    let (
        transport_id,
        logical_id,
        peer,
        content,
        only_phone,
        only_device,
        retry_of,
        attempt,
        created,
        state,
    ) = row;
    let only_device = match (only_phone, only_device) {
        (Some(phone), Some(device)) => Some((dec_phone(&phone)?, dec_device(device)?)),
        (None, None) => None,
        (phone, device) => return Err(corrupt("outbox only_device", (phone, device))),
    };
    Ok(OutboxRecord {
        transport_id: dec_id(&transport_id)?,
        logical_id: dec_id(&logical_id)?,
        peer: dec_phone(&peer)?,
        content,
        only_device,
        retry_of: retry_of.as_deref().map(dec_id).transpose()?,
        retry_attempt: dec_u32("retry_attempt", attempt)?,
        created_ms: dec_u64("created_ms", created)?,
        state: dec_state(&state)?,
    })
}

fn failure_from_row(row: FailureRow) -> StoreResult<FailureRecord> {
    let (sender, sender_device, original_id, attempts, server_ts) = row;
    Ok(FailureRecord {
        sender: dec_phone(&sender)?,
        sender_device: dec_device(sender_device)?,
        original_id: dec_id(&original_id)?,
        attempts: dec_u32("attempts", attempts)?,
        server_ts_ms: dec_u64("server_ts_ms", server_ts)?,
    })
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file if missing (its directory must exist; on Unix a
    /// new file is made readable by its owner only, since messages are stored in the clear), and applies
    /// pending migrations. A database written by a newer client is refused. Must be called inside a
    /// Tokio runtime.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        create_private(path).await?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);

        let mut conn = SqliteConnection::connect_with(&options).await.map_err(db)?;
        let migrated = migrate(&mut conn).await;
        let closed = conn.close().await.map_err(db);
        migrated?;
        closed?;

        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .min_connections(0)
            .connect_with(options)
            .await
            .map_err(db)?;
        Ok(SqliteStore {
            path: path.to_owned(),
            pool,
            write: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every connection of the pool (of every clone), waiting for those in use to be returned.
    /// Later calls on the store fail with [`StoreError::Backend`]. Dropping the last clone also closes the
    /// pool, in the background.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates a missing database file with owner-only permissions (SQLite gives its `-wal` and `-shm`
/// files the permissions of the database file).
async fn create_private(path: &Path) -> StoreResult<()> {
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    match options.open(path).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

// ---- migrations ----

async fn migrate(conn: &mut SqliteConnection) -> StoreResult<()> {
    natter_sqlite::migrate(conn, MIGRATIONS)
        .await
        .map_err(|e| match e {
            MigrateError::Sqlx(e) => db(e),
            too_new => StoreError::Backend(Box::new(too_new)),
        })
}

// ---- writing ----

/// Writes every part of `changes` inside the caller's transaction, in the order of its fields except that
/// `sessions_removed` comes before `sessions` (as in [`super::memory`]). On error the caller rolls back,
/// so nothing of it remains.
async fn write_changes(conn: &mut SqliteConnection, changes: &Changes) -> StoreResult<()> {
    if changes.wipe {
        for sql in [
            "DELETE FROM identity",
            "DELETE FROM sessions",
            "DELETE FROM peers",
            "DELETE FROM messages",
            "DELETE FROM outbox",
            "DELETE FROM processed",
            "DELETE FROM failures",
            "DELETE FROM uploads",
            "DELETE FROM account_values",
        ] {
            sqlx::query(sql).execute(&mut *conn).await.map_err(db)?;
        }
    }
    if let Some(identity) = &changes.identity {
        write_identity(conn, identity).await?;
    }
    for (key, value) in &changes.settings {
        let query = match value {
            Some(value) => sqlx::query(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key.as_str())
            .bind(value.as_slice()),
            None => sqlx::query("DELETE FROM settings WHERE key = ?1").bind(key.as_str()),
        };
        query.execute(&mut *conn).await.map_err(db)?;
    }
    for (key, value) in &changes.values {
        let query = match value {
            Some(value) => sqlx::query(
                "INSERT INTO account_values (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key.as_str())
            .bind(value.as_slice()),
            None => sqlx::query("DELETE FROM account_values WHERE key = ?1").bind(key.as_str()),
        };
        query.execute(&mut *conn).await.map_err(db)?;
    }
    for (phone, device_id) in &changes.sessions_removed {
        sqlx::query("DELETE FROM sessions WHERE phone = ?1 AND device_id = ?2")
            .bind(phone.as_str())
            .bind(dev(*device_id))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    for s in &changes.sessions {
        sqlx::query(
            "INSERT INTO sessions (phone, device_id, session_id, pickle, last_used_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (phone, device_id, session_id) DO UPDATE SET \
             pickle = excluded.pickle, last_used_ms = excluded.last_used_ms",
        )
        .bind(s.phone.as_str())
        .bind(dev(s.device_id))
        .bind(s.session_id.as_str())
        .bind(s.pickle.as_str())
        .bind(checked_i64("last_used_ms", s.last_used_ms)?)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    for p in &changes.peers {
        sqlx::query(
            "INSERT INTO peers (phone, account_key, device_list, device_list_version, \
             key_changed_at_ms) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (phone) DO UPDATE SET \
             account_key = excluded.account_key, device_list = excluded.device_list, \
             device_list_version = excluded.device_list_version, \
             key_changed_at_ms = excluded.key_changed_at_ms",
        )
        .bind(p.phone.as_str())
        .bind(p.account_key.as_slice())
        .bind(p.device_list.as_slice())
        .bind(checked_i64("device_list_version", p.device_list_version)?)
        .bind(
            p.key_changed_at_ms
                .map(|v| checked_i64("key_changed_at_ms", v))
                .transpose()?,
        )
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    for m in &changes.messages {
        sqlx::query(
            "INSERT INTO messages (chat, id, from_me, sender_device, kind, text, sent_at_ms, \
             server_ts_ms, status, shown, media) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
             ON CONFLICT (chat, id) DO NOTHING",
        )
        .bind(m.chat.as_str())
        .bind(m.id.as_bytes().as_slice())
        .bind(flag(m.from_me))
        .bind(dev(m.sender_device))
        .bind(kind_str(m.kind))
        .bind(m.text.as_str())
        .bind(checked_i64("sent_at_ms", m.sent_at_ms)?)
        .bind(checked_i64("server_ts_ms", m.server_ts_ms)?)
        .bind(status_str(m.status))
        .bind(flag(m.shown))
        .bind(
            m.media
                .as_ref()
                .map(|r| prost::Message::encode_to_vec(&r.0)),
        )
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    for u in &changes.statuses {
        update_status(conn, u).await?;
    }
    for (chat, id) in &changes.shown {
        sqlx::query("UPDATE messages SET shown = 1 WHERE chat = ?1 AND id = ?2")
            .bind(chat.as_str())
            .bind(id.as_bytes().as_slice())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    for o in &changes.outbox {
        write_outbox(conn, o).await?;
    }
    for id in &changes.outbox_sent {
        sqlx::query("UPDATE outbox SET state = ?2 WHERE transport_id = ?1")
            .bind(id.as_bytes().as_slice())
            .bind(state_str(OutboxState::Sent))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    for (sender, id) in &changes.processed {
        sqlx::query(
            "INSERT INTO processed (sender, transport_id) VALUES (?1, ?2) \
             ON CONFLICT (sender, transport_id) DO NOTHING",
        )
        .bind(sender.as_str())
        .bind(id.as_bytes().as_slice())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    for f in &changes.failures {
        sqlx::query(
            "INSERT INTO failures (sender, sender_device, original_id, attempts, server_ts_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (sender, original_id) DO UPDATE SET \
             sender_device = excluded.sender_device, attempts = excluded.attempts, \
             server_ts_ms = excluded.server_ts_ms",
        )
        .bind(f.sender.as_str())
        .bind(dev(f.sender_device))
        .bind(f.original_id.as_bytes().as_slice())
        .bind(i64::from(f.attempts))
        .bind(checked_i64("server_ts_ms", f.server_ts_ms)?)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    for (sender, id) in &changes.failures_cleared {
        sqlx::query("DELETE FROM failures WHERE sender = ?1 AND original_id = ?2")
            .bind(sender.as_str())
            .bind(id.as_bytes().as_slice())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    for u in &changes.uploads {
        sqlx::query(
            "INSERT INTO uploads (peer, path, size, mtime_ms, blob_id, sealed_key, kind, caption, \
             created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (peer, path) DO \
             UPDATE SET size = excluded.size, mtime_ms = excluded.mtime_ms, \
             blob_id = excluded.blob_id, sealed_key = excluded.sealed_key, kind = excluded.kind, \
             caption = excluded.caption, created_ms = excluded.created_ms",
        )
        .bind(u.peer.as_str())
        .bind(u.path.as_str())
        .bind(checked_i64("size", u.size)?)
        .bind(checked_i64("mtime_ms", u.mtime_ms)?)
        .bind(u.blob_id.as_str())
        .bind(u.sealed_key.as_slice())
        .bind(i64::from(u.kind))
        .bind(u.caption.as_str())
        .bind(checked_i64("created_ms", u.created_ms)?)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    for (peer, path) in &changes.uploads_done {
        sqlx::query("DELETE FROM uploads WHERE peer = ?1 AND path = ?2")
            .bind(peer.as_str())
            .bind(path.as_str())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

async fn write_identity(conn: &mut SqliteConnection, identity: &IdentityRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO identity (id, phone, device_id, registered, account_key, account_secret, \
         device_pickle, noise_secret, device_name) VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (id) DO UPDATE SET phone = excluded.phone, device_id = excluded.device_id, \
         registered = excluded.registered, account_key = excluded.account_key, \
         account_secret = excluded.account_secret, device_pickle = excluded.device_pickle, \
         noise_secret = excluded.noise_secret, device_name = excluded.device_name",
    )
    .bind(identity.phone.as_str())
    .bind(dev(identity.device_id))
    .bind(flag(identity.registered))
    .bind(identity.account_key.as_slice())
    .bind(identity.account_secret.as_deref())
    .bind(identity.device_pickle.as_str())
    .bind(identity.noise_secret.as_slice())
    .bind(identity.device_name.as_str())
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Applies one status update if it moves the message forward ([`status_advances`], shared with the
/// reference).
async fn update_status(conn: &mut SqliteConnection, u: &StatusUpdate) -> StoreResult<()> {
    let ts = checked_i64("server_ts_ms", u.server_ts_ms)?;
    let current: Option<String> =
        sqlx::query_scalar("SELECT status FROM messages WHERE chat = ?1 AND id = ?2")
            .bind(u.chat.as_str())
            .bind(u.id.as_bytes().as_slice())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    let Some(current) = current else {
        return Ok(());
    };
    if !status_advances(dec_status(&current)?, u.status) {
        return Ok(());
    }
    sqlx::query(
        "UPDATE messages SET status = ?3, \
         server_ts_ms = CASE WHEN ?4 <> 0 THEN ?4 ELSE server_ts_ms END \
         WHERE chat = ?1 AND id = ?2",
    )
    .bind(u.chat.as_str())
    .bind(u.id.as_bytes().as_slice())
    .bind(status_str(u.status))
    .bind(ts)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

async fn write_outbox(conn: &mut SqliteConnection, o: &OutboxRecord) -> StoreResult<()> {
    let (only_phone, only_device) = match &o.only_device {
        Some((phone, device)) => (Some(phone.as_str()), Some(dev(*device))),
        None => (None, None),
    };
    // An upsert, not INSERT OR REPLACE: the row keeps its rowid, the tie-break of "oldest first".
    sqlx::query(
        "INSERT INTO outbox (transport_id, logical_id, peer, content, only_phone, only_device, \
         retry_of, retry_attempt, created_ms, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
         ON CONFLICT (transport_id) DO UPDATE SET logical_id = excluded.logical_id, \
         peer = excluded.peer, content = excluded.content, only_phone = excluded.only_phone, \
         only_device = excluded.only_device, retry_of = excluded.retry_of, \
         retry_attempt = excluded.retry_attempt, created_ms = excluded.created_ms, \
         state = excluded.state",
    )
    .bind(o.transport_id.as_bytes().as_slice())
    .bind(o.logical_id.as_bytes().as_slice())
    .bind(o.peer.as_str())
    .bind(o.content.as_slice())
    .bind(only_phone)
    .bind(only_device)
    .bind(o.retry_of.as_ref().map(|id| id.as_bytes().as_slice()))
    .bind(i64::from(o.retry_attempt))
    .bind(checked_i64("created_ms", o.created_ms)?)
    .bind(state_str(o.state))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

#[async_trait]
impl ClientStore for SqliteStore {
    async fn save_changes(&self, changes: Changes) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let _turn = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        match write_changes(&mut tx, &changes).await {
            Ok(()) => tx.commit().await.map_err(db),
            Err(e) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a failed client store write");
                }
                Err(e)
            }
        }
    }

    async fn identity(&self) -> StoreResult<Option<IdentityRecord>> {
        let row: Option<IdentityRow> = sqlx::query_as(
            "SELECT phone, device_id, registered, account_key, account_secret, device_pickle, \
             noise_secret, device_name FROM identity WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(identity_from_row).transpose()
    }

    async fn setting(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = ?1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
    }

    async fn sessions(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Vec<SessionRecord>> {
        let rows: Vec<SessionRow> = sqlx::query_as(
            "SELECT phone, device_id, session_id, pickle, last_used_ms FROM sessions \
             WHERE phone = ?1 AND device_id = ?2 ORDER BY last_used_ms DESC, session_id",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(session_from_row).collect()
    }

    async fn peer(&self, phone: &PhoneNumber) -> StoreResult<Option<PeerRecord>> {
        let row: Option<PeerRow> = sqlx::query_as(
            "SELECT phone, account_key, device_list, device_list_version, key_changed_at_ms \
             FROM peers WHERE phone = ?1",
        )
        .bind(phone.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(peer_from_row).transpose()
    }

    async fn is_processed(
        &self,
        sender: &PhoneNumber,
        transport_id: &MessageId,
    ) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM processed WHERE sender = ?1 AND transport_id = ?2")
                .bind(sender.as_str())
                .bind(transport_id.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(found.is_some())
    }

    async fn message(
        &self,
        chat: &PhoneNumber,
        id: &MessageId,
    ) -> StoreResult<Option<MessageRecord>> {
        let row: Option<MessageRow> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE chat = ?1 AND id = ?2"
        ))
        .bind(chat.as_str())
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(message_from_row).transpose()
    }

    async fn history(&self, chat: &PhoneNumber) -> StoreResult<Vec<MessageRecord>> {
        let rows: Vec<MessageRow> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE chat = ?1 \
             ORDER BY CASE WHEN server_ts_ms > 0 THEN server_ts_ms ELSE sent_at_ms END, seq"
        ))
        .bind(chat.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(message_from_row).collect()
    }

    async fn value(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT value FROM account_values WHERE key = ?1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
    }

    async fn values_with_prefix(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        sqlx::query_as(
            "SELECT key, value FROM account_values \
             WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    async fn chats(&self) -> StoreResult<Vec<ChatSummary>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT chat, COUNT(*), \
                    MAX(CASE WHEN server_ts_ms > 0 THEN server_ts_ms ELSE sent_at_ms END) AS last \
             FROM messages GROUP BY chat ORDER BY last DESC, chat",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(chat, messages, last)| {
                Ok(ChatSummary {
                    chat: dec_phone(&chat)?,
                    messages: dec_u64("message count", messages)?,
                    last_ms: dec_u64("message time", last)?,
                })
            })
            .collect()
    }

    async fn unread_after(&self, chat: &PhoneNumber, after_ms: u64) -> StoreResult<u64> {
        let after = i64::try_from(after_ms).unwrap_or(i64::MAX);
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE chat = ?1 AND from_me = 0 AND shown = 0 \
             AND kind IN ('text', 'media') AND server_ts_ms > ?2",
        )
        .bind(chat.as_str())
        .bind(after)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        dec_u64("message count", n)
    }

    async fn unshown(&self) -> StoreResult<Vec<MessageRecord>> {
        let rows: Vec<MessageRow> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE shown = 0 ORDER BY seq"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(message_from_row).collect()
    }

    async fn queued_outbox(&self) -> StoreResult<Vec<OutboxRecord>> {
        let rows: Vec<OutboxRow> = sqlx::query_as(concat!(
            "SELECT ",
            outbox_columns!(),
            " FROM outbox WHERE state = 'queued' ORDER BY created_ms, rowid"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(outbox_from_row).collect()
    }

    async fn outbox_entry(&self, transport_id: &MessageId) -> StoreResult<Option<OutboxRecord>> {
        let row: Option<OutboxRow> = sqlx::query_as(concat!(
            "SELECT ",
            outbox_columns!(),
            " FROM outbox WHERE transport_id = ?1"
        ))
        .bind(transport_id.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(outbox_from_row).transpose()
    }

    async fn failure(
        &self,
        sender: &PhoneNumber,
        original_id: &MessageId,
    ) -> StoreResult<Option<FailureRecord>> {
        let row: Option<FailureRow> = sqlx::query_as(
            "SELECT sender, sender_device, original_id, attempts, server_ts_ms FROM failures \
             WHERE sender = ?1 AND original_id = ?2",
        )
        .bind(sender.as_str())
        .bind(original_id.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(failure_from_row).transpose()
    }

    async fn messages_with_id(&self, id: &MessageId) -> StoreResult<Vec<MessageRecord>> {
        let rows: Vec<MessageRow> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE id = ?1 ORDER BY seq"
        ))
        .bind(id.as_bytes().as_slice())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(message_from_row).collect()
    }

    async fn upload(&self, peer: &PhoneNumber, path: &str) -> StoreResult<Option<UploadRecord>> {
        let row: Option<UploadRow> = sqlx::query_as(
            "SELECT peer, path, size, mtime_ms, blob_id, sealed_key, kind, caption, created_ms \
             FROM uploads WHERE peer = ?1 AND path = ?2",
        )
        .bind(peer.as_str())
        .bind(path)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(upload_from_row).transpose()
    }

    async fn messages_page(
        &self,
        chat: Option<&PhoneNumber>,
        since_ms: u64,
        before_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<MessageRecord>> {
        let rows: Vec<MessageRow> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE (?1 IS NULL OR chat = ?1) AND server_ts_ms >= ?2 \
             AND server_ts_ms < ?3 ORDER BY server_ts_ms DESC, seq DESC LIMIT ?4"
        ))
        .bind(chat.map(|c| c.as_str().to_owned()))
        .bind(i64::try_from(since_ms).unwrap_or(i64::MAX))
        .bind(i64::try_from(before_ms).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(message_from_row).collect()
    }
}

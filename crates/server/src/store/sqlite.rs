//! [`SqliteStore`]: the embedded default [`Store`], one SQLite file in WAL mode.
//!
//! Reads go to a small pool of read-only connections. Every write goes to one background writer task
//! that owns the only writing connection: it takes every write command waiting (up to [`MAX_BATCH`]),
//! runs them in one transaction, each inside its own savepoint so a failing command is rolled back alone,
//! commits once (one fsync for the whole batch: group commit, with `synchronous=FULL` so a commit is
//! durable) and only then answers each caller. Semantics follow [`super::memory`], the reference.
//!
//! The schema lives in `migrations/sqlite/NNN_*.sql`; see `migrations/NOTES.md` for the pitfalls.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};
use natter_sqlite::{MigrateError, Migration};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Executor};
use tokio::sync::{mpsc, oneshot};

use super::memory::checked_i64;
use super::{
    AccountRecord, AppStateFetch, BlobRecord, ClaimedPreKey, CodeRecord, DeviceListUpdate,
    DeviceRecord, EnqueueOutcome, GroupMemberRecord, GroupRecord, GroupState, GroupWritten,
    NewAccount, NewEnvelope, NewMessage, PreKeyRecord, PrivacyRecord, QueuedEnvelope, RetryInfo,
    Store, StoreError, StoreResult,
};

/// Most write commands the writer runs in one transaction.
pub const MAX_BATCH: usize = 512;
/// Read connections in the pool.
const READERS: u32 = 4;
/// Most consecutive enqueues of a batch written together by [`enqueue_run`].
const MAX_RUN: usize = 512;
/// Write commands that may wait for the writer before callers wait to send.
const QUEUE_DEPTH: usize = 4096;
/// How long a connection waits for a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The migrations, in order: (version, SQL). Each runs once, in its own transaction.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/sqlite/001_initial.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/sqlite/002_blobs.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/sqlite/003_app_state.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../../migrations/sqlite/004_social.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../../migrations/sqlite/005_groups.sql"),
    },
];

/// The SQLite store. Cloning is cheap and shares the pool and the writer; the writer task stops when the
/// last clone is dropped.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    path: PathBuf,
    pool: SqlitePool,
    writer: mpsc::Sender<Job>,
    commits: Arc<AtomicU64>,
}

/// Failures of the write path itself (not of one command).
#[derive(Debug, thiserror::Error)]
enum WriterError {
    #[error("the store's writer task has stopped")]
    Gone,
    #[error("could not begin a write transaction: {0}")]
    Begin(String),
    #[error("write transaction aborted by another command of its batch: {0}")]
    Aborted(String),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("internal error: the writer answered with the wrong kind of result")]
    Mismatch,
}

fn writer_error(e: WriterError) -> StoreError {
    StoreError::Backend(Box::new(e))
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

/// Like [`db`], but a foreign-key violation (a row for a device that does not exist) is `NoSuchDevice`.
fn db_device(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NoSuchDevice,
        _ => db(e),
    }
}

// ---- row decoding ----

fn dec_phone(s: &str) -> StoreResult<PhoneNumber> {
    PhoneNumber::from_e164(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn dec_device(v: i64) -> StoreResult<DeviceId> {
    u32::try_from(v)
        .ok()
        .and_then(|v| DeviceId::new(v).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("invalid device id {v}")))
}

fn dec_key(what: &str, bytes: Vec<u8>) -> StoreResult<[u8; 32]> {
    let len = bytes.len();
    <[u8; 32]>::try_from(bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what}: {len} bytes, expected 32")))
}

fn dec_message_id(bytes: &[u8]) -> StoreResult<MessageId> {
    MessageId::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn dec_u64(what: &str, v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what}: negative value {v}")))
}

fn dec_u32(what: &str, v: i64) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what}: {v} out of range")))
}

fn dev(d: DeviceId) -> i64 {
    i64::from(d.get())
}

/// A count as the API reports it (saturating).
fn count_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

type CodeRow = (String, Vec<u8>, i64, i64, i64);
type AccountRow = (String, Vec<u8>, Vec<u8>, i64, i64);
type DeviceRow = (String, i64, Vec<u8>, Vec<u8>, i64);
type KeyRow = (String, Vec<u8>, Vec<u8>);
type QueueRow = (
    i64,
    String,
    i64,
    Vec<u8>,
    i64,
    i64,
    Vec<u8>,
    Option<Vec<u8>>,
    i64,
);

fn code_from_row((phone, hash, sent, expires, attempts): CodeRow) -> StoreResult<CodeRecord> {
    Ok(CodeRecord {
        phone: dec_phone(&phone)?,
        code_hash: dec_key("code_hash", hash)?,
        sent_at_ms: dec_u64("sent_at_ms", sent)?,
        expires_at_ms: dec_u64("expires_at_ms", expires)?,
        attempts: dec_u32("attempts", attempts)?,
    })
}

fn account_from_row(
    (phone, key, list, version, created): AccountRow,
) -> StoreResult<AccountRecord> {
    Ok(AccountRecord {
        phone: dec_phone(&phone)?,
        account_key: dec_key("account_key", key)?,
        device_list: list,
        device_list_version: dec_u64("device_list_version", version)?,
        created_at_ms: dec_u64("created_at_ms", created)?,
    })
}

fn device_from_row((phone, id, noise, ed, seen): DeviceRow) -> StoreResult<DeviceRecord> {
    Ok(DeviceRecord {
        phone: dec_phone(&phone)?,
        device_id: dec_device(id)?,
        noise_key: dec_key("noise_key", noise)?,
        identity_ed: dec_key("identity_ed", ed)?,
        last_seen_ms: dec_u64("last_seen_ms", seen)?,
    })
}

fn prekey_from_row((key_id, key, signature): KeyRow) -> StoreResult<PreKeyRecord> {
    Ok(PreKeyRecord {
        key_id,
        key: dec_key("prekey", key)?,
        signature,
    })
}

impl SqliteStore {
    /// Opens (creating it if missing) the database at `path`, applies pending migrations and starts the
    /// writer task. Must be called inside a Tokio runtime.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        let base = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // Savepoint and statement journals in memory: on disk, every page a command touches inside
            // its savepoint was first copied to a temporary file with a write system call.
            .pragma("temp_store", "MEMORY");

        let mut writer = SqliteConnection::connect_with(&base.clone().create_if_missing(true))
            .await
            .map_err(db)?;
        migrate(&mut writer).await?;

        let pool = SqlitePoolOptions::new()
            .max_connections(READERS)
            .min_connections(0)
            .connect_with(base.pragma("query_only", "ON"))
            .await
            .map_err(db)?;

        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let commits = Arc::new(AtomicU64::new(0));
        tokio::spawn(writer_task(writer, rx, Arc::clone(&commits)));
        Ok(SqliteStore {
            path: path.to_owned(),
            pool,
            writer: tx,
            commits,
        })
    }

    /// The schema version of the database (the highest migration applied).
    pub async fn schema_version(&self) -> StoreResult<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(v.unwrap_or(0))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write transactions committed since [`SqliteStore::open`] (one per group-commit batch).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Sends a write command to the writer task and waits until it is committed (or failed).
    /// A write whose only result is success.
    async fn write_unit(&self, op: Op) -> StoreResult<()> {
        match self.write(op).await? {
            Done::Unit => Ok(()),
            _ => mismatch(),
        }
    }

    async fn write(&self, op: Op) -> StoreResult<Done> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Job { op, reply })
            .await
            .map_err(|_| writer_error(WriterError::Gone))?;
        answer.await.map_err(|_| writer_error(WriterError::Gone))?
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

async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    conn.execute(sqlx::query(sql)).await.map(|_| ())
}

// ---- the writer ----

/// A write command and where its result goes.
struct Job {
    op: Op,
    reply: oneshot::Sender<StoreResult<Done>>,
}

/// The write commands, one per writing method of [`Store`].
enum Op {
    SaveCode(CodeRecord),
    AddCodeAttempt(PhoneNumber),
    RemoveCode(PhoneNumber),
    CreateAccount(NewAccount),
    UpdateDevices(PhoneNumber, DeviceListUpdate),
    RemoveDevice(PhoneNumber, DeviceId),
    TouchDevice(PhoneNumber, DeviceId, u64),
    AddOneTimeKeys(PhoneNumber, DeviceId, Vec<PreKeyRecord>),
    SetFallbackKey(PhoneNumber, DeviceId, PreKeyRecord),
    ClaimPrekey(PhoneNumber, DeviceId),
    Enqueue(NewMessage),
    Ack(PhoneNumber, DeviceId, Vec<u64>),
    Expire(u64),
    CreateBlob(BlobRecord, u64, u64),
    SetBlobOffset(String, u64),
    CompleteBlob(String),
    ExtendBlob(String, u64),
    DeleteExpiredBlobs(u64, usize),
    PushAppState(PhoneNumber, String, u64, Vec<u8>, Option<Vec<u8>>),
    Contacts(PhoneNumber, Vec<PhoneNumber>, bool),
    SetProfile(PhoneNumber, Vec<u8>, u64),
    SetPrivacy(PhoneNumber, PrivacyRecord),
    SetBlocked(PhoneNumber, PhoneNumber, bool),
    /// A group write: `None` creates, `Some(v)` updates a group still at version `v`.
    WriteGroup(Option<u64>, GroupState, NewMessage),
    /// Stop after the commands received so far and close the connection (answered once it is closed).
    Close,
}

/// A write command's result.
enum Done {
    Unit,
    Count(u32),
    Removed(Vec<DeviceId>),
    Claimed(Option<ClaimedPreKey>),
    Enqueued(EnqueueOutcome),
    Expired(u64),
    Created(bool),
    Ids(Vec<String>),
    Version(u64),
    Group(GroupWritten),
}

/// The writer task: group commit until every sender is gone.
async fn writer_task(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Job>,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closing = Vec::new();
    while closing.is_empty() && rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let jobs: VecDeque<Job> = batch
            .drain(..)
            .filter_map(|job| match job.op {
                Op::Close => {
                    closing.push(job.reply);
                    None
                }
                _ => Some(job),
            })
            .collect();
        if !jobs.is_empty() {
            run_batch(&mut conn, jobs, &commits).await;
        }
    }
    // Whatever is sent from now on is refused (the receiver is gone).
    drop(rx);
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the SQLite writer connection");
    }
    for reply in closing {
        let _ = reply.send(Ok(Done::Unit));
    }
}

/// Runs a batch of commands in one transaction (more if a failure aborts the transaction), each in its
/// own savepoint, then commits and answers every caller.
async fn run_batch(conn: &mut SqliteConnection, jobs: VecDeque<Job>, commits: &AtomicU64) {
    let mut pending = jobs;
    while !pending.is_empty() {
        if let Err(e) = exec(conn, "BEGIN IMMEDIATE").await {
            let reason = e.to_string();
            tracing::error!(error = %reason, "SQLite writer cannot begin a transaction");
            // In case a transaction was left open (a failed ROLLBACK), so the next batch starts clean.
            let _ = exec(conn, "ROLLBACK").await;
            for job in pending.drain(..) {
                let _ = job
                    .reply
                    .send(Err(writer_error(WriterError::Begin(reason.clone()))));
            }
            return;
        }
        let mut done: Vec<(oneshot::Sender<StoreResult<Done>>, StoreResult<Done>)> =
            Vec::with_capacity(pending.len());
        let mut aborted = None;
        // Commands that must run one by one (a run of enqueues that could not go together).
        let mut one_by_one = 0usize;
        while let Some(job) = pending.pop_front() {
            if one_by_one > 0 {
                one_by_one -= 1;
            } else if let Op::Enqueue(_) = &job.op
                && another_enqueue(&pending)
            {
                // The run takes the enqueues up to the first command that is neither an enqueue nor an
                // acknowledgement. Acknowledgements it passes wait until after the run: they only
                // delete envelopes committed earlier, so the order of the two does not matter.
                let mut run = vec![job];
                let mut passed = Vec::new();
                while run.len() < MAX_RUN
                    && let Some(next) = pending.pop_front()
                {
                    match next.op {
                        Op::Enqueue(_) => run.push(next),
                        Op::Ack(..) => passed.push(next),
                        _ => {
                            pending.push_front(next);
                            break;
                        }
                    }
                }
                for job in passed.into_iter().rev() {
                    pending.push_front(job);
                }
                match enqueue_run(conn, &run).await {
                    Ok(Some(outcomes)) => {
                        for (job, outcome) in run.into_iter().zip(outcomes) {
                            done.push((job.reply, Ok(Done::Enqueued(outcome))));
                        }
                        continue;
                    }
                    // Something in the run needs its own answer (a duplicate, a removed device):
                    // the commands go one by one, each in its own savepoint.
                    Ok(None) => {
                        one_by_one = run.len();
                        for job in run.into_iter().rev() {
                            pending.push_front(job);
                        }
                    }
                    Err(reason) => {
                        for job in run {
                            let _ = job
                                .reply
                                .send(Err(writer_error(WriterError::Aborted(reason.clone()))));
                        }
                        aborted = Some(reason);
                        break;
                    }
                }
                continue;
            }
            let result = run_in_savepoint(conn, &job.op).await;
            match result {
                Ok(result) => done.push((job.reply, result)),
                Err((result, reason)) => {
                    // The transaction is gone (SQLite rolls back on some errors, e.g. disk full): this
                    // command keeps its own error, the earlier ones of the transaction were undone.
                    let _ = job.reply.send(
                        result
                            .and_then(|_| Err(writer_error(WriterError::Aborted(reason.clone())))),
                    );
                    aborted = Some(reason);
                    break;
                }
            }
        }
        if let Some(reason) = aborted {
            tracing::error!(error = %reason, "SQLite write transaction aborted");
            let _ = exec(conn, "ROLLBACK").await;
            for (reply, _) in done {
                let _ = reply.send(Err(writer_error(WriterError::Aborted(reason.clone()))));
            }
            continue; // the commands not run yet get a fresh transaction
        }
        match exec(conn, "COMMIT").await {
            Ok(()) => {
                commits.fetch_add(1, Ordering::Relaxed);
                for (reply, result) in done {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(error = %reason, "SQLite commit failed");
                let _ = exec(conn, "ROLLBACK").await;
                for (reply, _) in done {
                    let _ = reply.send(Err(writer_error(WriterError::Commit(reason.clone()))));
                }
            }
        }
    }
}

/// Runs one command inside a savepoint: released on success, rolled back on failure. `Err` carries the
/// command's result and the reason when the savepoint itself failed (the transaction is unusable).
async fn run_in_savepoint(
    conn: &mut SqliteConnection,
    op: &Op,
) -> Result<StoreResult<Done>, (StoreResult<Done>, String)> {
    if let Err(e) = exec(conn, "SAVEPOINT cmd").await {
        let reason = e.to_string();
        return Err((
            Err(writer_error(WriterError::Aborted(reason.clone()))),
            reason,
        ));
    }
    let result = op.run(conn).await;
    let closed = match &result {
        Ok(_) => exec(conn, "RELEASE cmd").await,
        Err(_) => match exec(conn, "ROLLBACK TO cmd").await {
            Ok(()) => exec(conn, "RELEASE cmd").await,
            Err(e) => Err(e),
        },
    };
    match closed {
        Ok(()) => Ok(result),
        Err(e) => Err((result, e.to_string())),
    }
}

impl Op {
    async fn run(&self, conn: &mut SqliteConnection) -> StoreResult<Done> {
        match self {
            Op::SaveCode(code) => save_code(conn, code).await.map(|()| Done::Unit),
            // The writer task takes it out of the batch: it never runs as a command.
            Op::Close => Ok(Done::Unit),
            Op::AddCodeAttempt(phone) => add_code_attempt(conn, phone).await.map(Done::Count),
            Op::RemoveCode(phone) => {
                sqlx::query("DELETE FROM codes WHERE phone = ?1")
                    .bind(phone.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(db)?;
                Ok(Done::Unit)
            }
            Op::CreateAccount(new) => create_account(conn, new).await.map(Done::Removed),
            Op::UpdateDevices(phone, update) => update_devices(conn, phone, update)
                .await
                .map(|()| Done::Unit),
            Op::RemoveDevice(phone, device) => remove_devices(conn, phone, &[*device])
                .await
                .map(|()| Done::Unit),
            Op::TouchDevice(phone, device_id, now_ms) => {
                let now = checked_i64("now_ms", *now_ms)?;
                let res = sqlx::query(
                    "UPDATE devices SET last_seen_ms = ?3 WHERE phone = ?1 AND device_id = ?2",
                )
                .bind(phone.as_str())
                .bind(dev(*device_id))
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                if res.rows_affected() == 0 {
                    return Err(StoreError::NoSuchDevice);
                }
                Ok(Done::Unit)
            }
            Op::AddOneTimeKeys(phone, device_id, keys) => {
                add_one_time_keys(conn, phone, *device_id, keys)
                    .await
                    .map(Done::Count)
            }
            Op::SetFallbackKey(phone, device_id, key) => {
                require_device(conn, phone, *device_id).await?;
                sqlx::query(
                    "INSERT INTO fallback_keys (phone, device_id, key_id, key, signature) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (phone, device_id) DO UPDATE SET \
                     key_id = excluded.key_id, key = excluded.key, signature = excluded.signature",
                )
                .bind(phone.as_str())
                .bind(dev(*device_id))
                .bind(key.key_id.as_str())
                .bind(key.key.as_slice())
                .bind(key.signature.as_slice())
                .execute(&mut *conn)
                .await
                .map_err(db_device)?;
                Ok(Done::Unit)
            }
            Op::ClaimPrekey(phone, device_id) => claim_prekey(conn, phone, *device_id)
                .await
                .map(Done::Claimed),
            Op::Enqueue(msg) => enqueue(conn, msg).await.map(Done::Enqueued),
            Op::Ack(phone, device_id, seqs) => ack(conn, phone, *device_id, seqs)
                .await
                .map(|()| Done::Unit),
            Op::Expire(now_ms) => {
                let now = i64::try_from(*now_ms).unwrap_or(i64::MAX);
                let gone = sqlx::query("DELETE FROM queue WHERE expires_at_ms <= ?1")
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(db)?
                    .rows_affected();
                sqlx::query("DELETE FROM message_ids WHERE expires_at_ms <= ?1")
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(db)?;
                Ok(Done::Expired(gone))
            }
            Op::CreateBlob(blob, quota, now_ms) => create_blob(conn, blob, *quota, *now_ms)
                .await
                .map(Done::Created),
            Op::SetBlobOffset(id, offset) => {
                let offset = checked_i64("offset", *offset)?;
                blob_update(
                    conn,
                    "UPDATE blobs SET uploaded = ?2 WHERE id = ?1",
                    id,
                    offset,
                )
                .await
            }
            Op::CompleteBlob(id) => {
                blob_update(
                    conn,
                    "UPDATE blobs SET uploaded = size, complete = 1 WHERE id = ?1 AND ?2 = ?2",
                    id,
                    0,
                )
                .await
            }
            Op::ExtendBlob(id, expires) => {
                let expires = checked_i64("expires_at_ms", *expires)?;
                blob_update(
                    conn,
                    "UPDATE blobs SET expires_at_ms = MAX(expires_at_ms, ?2) WHERE id = ?1",
                    id,
                    expires,
                )
                .await
            }
            Op::DeleteExpiredBlobs(now_ms, limit) => {
                let now = i64::try_from(*now_ms).unwrap_or(i64::MAX);
                let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
                let ids: Vec<String> = sqlx::query_scalar(
                    "DELETE FROM blobs WHERE id IN (SELECT id FROM blobs WHERE expires_at_ms <= ?1 \
                     ORDER BY id LIMIT ?2) RETURNING id",
                )
                .bind(now)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
                Ok(Done::Ids(ids))
            }
            Op::PushAppState(phone, collection, base, patch, snapshot) => {
                push_app_state(conn, phone, collection, *base, patch, snapshot.as_deref())
                    .await
                    .map(Done::Version)
            }
            Op::Contacts(owner, contacts, add) => {
                let sql = if *add {
                    "INSERT INTO contacts (owner, contact) VALUES (?1, ?2) ON CONFLICT DO NOTHING"
                } else {
                    "DELETE FROM contacts WHERE owner = ?1 AND contact = ?2"
                };
                for c in contacts {
                    sqlx::query(sql)
                        .bind(owner.as_str())
                        .bind(c.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(db)?;
                }
                Ok(Done::Unit)
            }
            Op::SetProfile(owner, ciphertext, now_ms) => {
                sqlx::query(
                    "INSERT INTO profiles (phone, ciphertext, updated_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (phone) DO UPDATE SET ciphertext = excluded.ciphertext, \
                     updated_ms = excluded.updated_ms",
                )
                .bind(owner.as_str())
                .bind(ciphertext.as_slice())
                .bind(checked_i64("updated_ms", *now_ms)?)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                Ok(Done::Unit)
            }
            Op::SetPrivacy(owner, p) => {
                sqlx::query(
                    "INSERT INTO privacy (phone, last_seen, read_receipts_off) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (phone) DO UPDATE SET last_seen = excluded.last_seen, \
                     read_receipts_off = excluded.read_receipts_off",
                )
                .bind(owner.as_str())
                .bind(p.last_seen as i64)
                .bind(i64::from(p.read_receipts_off))
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                Ok(Done::Unit)
            }
            Op::WriteGroup(expected, state, announcement) => {
                write_group(conn, *expected, state, announcement)
                    .await
                    .map(Done::Group)
            }
            Op::SetBlocked(owner, other, blocked) => {
                let sql = if *blocked {
                    "INSERT INTO blocks (owner, blocked) VALUES (?1, ?2) ON CONFLICT DO NOTHING"
                } else {
                    "DELETE FROM blocks WHERE owner = ?1 AND blocked = ?2"
                };
                sqlx::query(sql)
                    .bind(owner.as_str())
                    .bind(other.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(db)?;
                Ok(Done::Unit)
            }
        }
    }
}

async fn push_app_state(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    collection: &str,
    base_version: u64,
    patch: &[u8],
    snapshot: Option<&[u8]>,
) -> StoreResult<u64> {
    let new_version = base_version.saturating_add(1);
    let new = checked_i64("version", new_version)?;
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM app_state_versions WHERE phone = ?1 AND collection = ?2",
    )
    .bind(phone.as_str())
    .bind(collection)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    let current = dec_u64("app-state version", current.unwrap_or(0))?;
    if current != base_version {
        return Err(StoreError::AppStateConflict { current });
    }
    sqlx::query(
        "INSERT INTO app_state_versions (phone, collection, version) VALUES (?1, ?2, ?3) \
         ON CONFLICT (phone, collection) DO UPDATE SET version = excluded.version",
    )
    .bind(phone.as_str())
    .bind(collection)
    .bind(new)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query(
        "INSERT OR REPLACE INTO app_state_patches (phone, collection, version, patch) \
         VALUES (?1, ?2, ?3, ?4)",
    )
    .bind(phone.as_str())
    .bind(collection)
    .bind(new)
    .bind(patch)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    if let Some(snapshot) = snapshot {
        let previous: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM app_state_snapshots WHERE phone = ?1 AND collection = ?2",
        )
        .bind(phone.as_str())
        .bind(collection)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
        if let Some(previous) = previous {
            sqlx::query(
                "DELETE FROM app_state_patches WHERE phone = ?1 AND collection = ?2 AND version <= ?3",
            )
            .bind(phone.as_str())
            .bind(collection)
            .bind(previous)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        }
        sqlx::query(
            "INSERT INTO app_state_snapshots (phone, collection, version, snapshot) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (phone, collection) DO UPDATE SET \
             version = excluded.version, snapshot = excluded.snapshot",
        )
        .bind(phone.as_str())
        .bind(collection)
        .bind(new)
        .bind(snapshot)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(new_version)
}

/// Runs an update of one blob row (`?1` the id, `?2` the value); no row is [`StoreError::NoSuchBlob`].
async fn blob_update(
    conn: &mut SqliteConnection,
    sql: &'static str,
    id: &str,
    value: i64,
) -> StoreResult<Done> {
    let res = sqlx::query(sql)
        .bind(id)
        .bind(value)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    if res.rows_affected() == 0 {
        return Err(StoreError::NoSuchBlob);
    }
    Ok(Done::Unit)
}

async fn blob_usage(
    conn: &mut SqliteConnection,
    owner: &PhoneNumber,
    now_ms: u64,
) -> StoreResult<u64> {
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let used: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = ?1 AND expires_at_ms > ?2",
    )
    .bind(owner.as_str())
    .bind(now)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    dec_u64("blob usage", used)
}

async fn create_blob(
    conn: &mut SqliteConnection,
    blob: &BlobRecord,
    quota: u64,
    now_ms: u64,
) -> StoreResult<bool> {
    let size = checked_i64("size", blob.size)?;
    let offset = checked_i64("offset", blob.offset)?;
    let created = checked_i64("created_at_ms", blob.created_at_ms)?;
    let expires = checked_i64("expires_at_ms", blob.expires_at_ms)?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM blobs WHERE id = ?1")
        .bind(blob.id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    if exists.is_some() {
        return Err(StoreError::Conflict);
    }
    let used = blob_usage(conn, &blob.owner, now_ms).await?;
    if used.saturating_add(blob.size) > quota {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO blobs (id, owner, size, uploaded, complete, created_at_ms, expires_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(blob.id.as_str())
    .bind(blob.owner.as_str())
    .bind(size)
    .bind(offset)
    .bind(i64::from(blob.complete))
    .bind(created)
    .bind(expires)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(true)
}

type BlobRow = (String, String, i64, i64, i64, i64, i64);

fn blob_from_row(
    (id, owner, size, uploaded, complete, created, expires): BlobRow,
) -> StoreResult<BlobRecord> {
    Ok(BlobRecord {
        id,
        owner: dec_phone(&owner)?,
        size: dec_u64("size", size)?,
        offset: dec_u64("uploaded", uploaded)?,
        complete: complete != 0,
        created_at_ms: dec_u64("created_at_ms", created)?,
        expires_at_ms: dec_u64("expires_at_ms", expires)?,
    })
}

async fn require_device(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
) -> StoreResult<()> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM devices WHERE phone = ?1 AND device_id = ?2")
            .bind(phone.as_str())
            .bind(dev(device_id))
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    found.map(|_| ()).ok_or(StoreError::NoSuchDevice)
}

async fn count_keys(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
) -> StoreResult<u32> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM one_time_keys WHERE phone = ?1 AND device_id = ?2",
    )
    .bind(phone.as_str())
    .bind(dev(device_id))
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    Ok(count_u32(n))
}

async fn save_code(conn: &mut SqliteConnection, code: &CodeRecord) -> StoreResult<()> {
    let sent = checked_i64("sent_at_ms", code.sent_at_ms)?;
    let expires = checked_i64("expires_at_ms", code.expires_at_ms)?;
    sqlx::query(
        "INSERT OR REPLACE INTO codes (phone, code_hash, sent_at_ms, expires_at_ms, attempts) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(code.phone.as_str())
    .bind(code.code_hash.as_slice())
    .bind(sent)
    .bind(expires)
    .bind(i64::from(code.attempts))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

async fn add_code_attempt(conn: &mut SqliteConnection, phone: &PhoneNumber) -> StoreResult<u32> {
    let attempts: Option<i64> = sqlx::query_scalar(
        "UPDATE codes SET attempts = MIN(attempts + 1, 4294967295) WHERE phone = ?1 \
         RETURNING attempts",
    )
    .bind(phone.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    attempts.map_or(Ok(0), |n| dec_u32("attempts", n))
}

async fn create_account(
    conn: &mut SqliteConnection,
    new: &NewAccount,
) -> StoreResult<Vec<DeviceId>> {
    let version = checked_i64("device_list_version", new.account.device_list_version)?;
    let created = checked_i64("created_at_ms", new.account.created_at_ms)?;
    let seen = checked_i64("last_seen_ms", new.primary.last_seen_ms)?;
    let phone = new.account.phone.as_str();

    let old: Vec<i64> =
        sqlx::query_scalar("SELECT device_id FROM devices WHERE phone = ?1 ORDER BY device_id")
            .bind(phone)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
    let removed = old
        .into_iter()
        .map(dec_device)
        .collect::<StoreResult<Vec<_>>>()?;
    // Explicit deletes (the foreign keys would cascade, but this does not depend on the pragma).
    for sql in [
        "DELETE FROM queue WHERE phone = ?1",
        "DELETE FROM one_time_keys WHERE phone = ?1",
        "DELETE FROM fallback_keys WHERE phone = ?1",
        "DELETE FROM devices WHERE phone = ?1",
        "DELETE FROM accounts WHERE phone = ?1",
    ] {
        sqlx::query(sql)
            .bind(phone)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    sqlx::query(
        "INSERT INTO accounts (phone, account_key, device_list, device_list_version, created_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(phone)
    .bind(new.account.account_key.as_slice())
    .bind(new.account.device_list.as_slice())
    .bind(version)
    .bind(created)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query(
        "INSERT INTO devices (phone, device_id, noise_key, identity_ed, last_seen_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(phone)
    .bind(dev(new.primary.device_id))
    .bind(new.primary.noise_key.as_slice())
    .bind(new.primary.identity_ed.as_slice())
    .bind(seen)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(removed)
}

async fn update_devices(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    update: &DeviceListUpdate,
) -> StoreResult<()> {
    let version = checked_i64("device_list_version", update.version)?;
    let changed = sqlx::query(
        "UPDATE accounts SET device_list = ?2, device_list_version = ?3 \
         WHERE phone = ?1 AND device_list_version < ?3",
    )
    .bind(phone.as_str())
    .bind(update.device_list.as_slice())
    .bind(version)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    if changed.rows_affected() == 0 {
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT device_list_version FROM accounts WHERE phone = ?1")
                .bind(phone.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
        return Err(match exists {
            Some(_) => StoreError::Conflict,
            None => StoreError::NoSuchAccount,
        });
    }
    remove_devices(conn, phone, &update.removed).await?;
    for d in &update.added {
        sqlx::query(
            "INSERT INTO devices (phone, device_id, noise_key, identity_ed, last_seen_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(phone.as_str())
        .bind(dev(d.device_id))
        .bind(d.noise_key.as_slice())
        .bind(d.identity_ed.as_slice())
        .bind(checked_i64("last_seen_ms", d.last_seen_ms)?)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(())
}

async fn remove_devices(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    devices: &[DeviceId],
) -> StoreResult<()> {
    for device in devices {
        for sql in [
            "DELETE FROM queue WHERE phone = ?1 AND device_id = ?2",
            "DELETE FROM one_time_keys WHERE phone = ?1 AND device_id = ?2",
            "DELETE FROM fallback_keys WHERE phone = ?1 AND device_id = ?2",
            "DELETE FROM devices WHERE phone = ?1 AND device_id = ?2",
        ] {
            sqlx::query(sql)
                .bind(phone.as_str())
                .bind(dev(*device))
                .execute(&mut *conn)
                .await
                .map_err(db)?;
        }
    }
    Ok(())
}

async fn add_one_time_keys(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
    keys: &[PreKeyRecord],
) -> StoreResult<u32> {
    require_device(conn, phone, device_id).await?;
    for key in keys {
        sqlx::query(
            "INSERT INTO one_time_keys (phone, device_id, key_id, key, signature) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (phone, device_id, key_id) DO NOTHING",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .bind(key.key_id.as_str())
        .bind(key.key.as_slice())
        .bind(key.signature.as_slice())
        .execute(&mut *conn)
        .await
        .map_err(db_device)?;
    }
    count_keys(conn, phone, device_id).await
}

async fn claim_prekey(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
) -> StoreResult<Option<ClaimedPreKey>> {
    let oldest: Option<(i64, String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT id, key_id, key, signature FROM one_time_keys \
         WHERE phone = ?1 AND device_id = ?2 ORDER BY id LIMIT 1",
    )
    .bind(phone.as_str())
    .bind(dev(device_id))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    if let Some((id, key_id, key, signature)) = oldest {
        let prekey = prekey_from_row((key_id, key, signature))?;
        sqlx::query("DELETE FROM one_time_keys WHERE id = ?1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        let remaining = count_keys(conn, phone, device_id).await?;
        return Ok(Some(ClaimedPreKey {
            prekey,
            fallback: false,
            remaining,
        }));
    }
    let fallback: Option<KeyRow> = sqlx::query_as(
        "SELECT key_id, key, signature FROM fallback_keys WHERE phone = ?1 AND device_id = ?2",
    )
    .bind(phone.as_str())
    .bind(dev(device_id))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    fallback
        .map(|row| {
            Ok(ClaimedPreKey {
                prekey: prekey_from_row(row)?,
                fallback: true,
                remaining: 0,
            })
        })
        .transpose()
}

async fn enqueue(conn: &mut SqliteConnection, msg: &NewMessage) -> StoreResult<EnqueueOutcome> {
    let ts = checked_i64("server_ts_ms", msg.server_ts_ms)?;
    let expires = checked_i64("expires_at_ms", msg.expires_at_ms)?;
    let sender = msg.sender.as_str();
    let sender_device = dev(msg.sender_device);
    let message_id = msg.message_id.as_bytes().as_slice();

    let first = sqlx::query(
        "INSERT INTO message_ids (sender, sender_device, message_id, server_ts_ms, expires_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (sender, sender_device, message_id) DO NOTHING",
    )
    .bind(sender)
    .bind(sender_device)
    .bind(message_id)
    .bind(ts)
    .bind(expires)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    if first.rows_affected() == 0 {
        let server_ts: i64 = sqlx::query_scalar(
            "SELECT server_ts_ms FROM message_ids \
             WHERE sender = ?1 AND sender_device = ?2 AND message_id = ?3",
        )
        .bind(sender)
        .bind(sender_device)
        .bind(message_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        return Ok(EnqueueOutcome::Duplicate {
            server_ts_ms: dec_u64("server_ts_ms", server_ts)?,
        });
    }

    let mut stored = Vec::with_capacity(msg.envelopes.len());
    for env in &msg.envelopes {
        // The foreign key on (phone, device_id) rejects a recipient device that does not exist; the
        // caller's savepoint then undoes the envelopes already inserted and the idempotency row.
        let res = sqlx::query(
            "INSERT INTO queue (phone, device_id, sender, sender_device, message_id, server_ts_ms, \
             olm_type, ciphertext, expires_at_ms, retry_of, retry_attempt) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(env.phone.as_str())
        .bind(dev(env.device_id))
        .bind(sender)
        .bind(sender_device)
        .bind(message_id)
        .bind(ts)
        .bind(i64::from(env.olm_type))
        .bind(env.ciphertext.as_slice())
        .bind(expires)
        .bind(msg.retry.map(|r| r.of.as_bytes().to_vec()))
        .bind(i64::from(msg.retry.map_or(0, |r| r.attempt)))
        .execute(&mut *conn)
        .await
        .map_err(db_device)?;
        stored.push(QueuedEnvelope {
            seq: dec_u64("seq", res.last_insert_rowid())?,
            phone: env.phone.clone(),
            device_id: env.device_id,
            sender: msg.sender.clone(),
            sender_device: msg.sender_device,
            message_id: msg.message_id,
            server_ts_ms: msg.server_ts_ms,
            olm_type: env.olm_type,
            ciphertext: env.ciphertext.clone(),
            retry: msg.retry,
        });
    }
    Ok(EnqueueOutcome::Stored(stored))
}

/// Whether an enqueue comes before the first command that is neither an enqueue nor an acknowledgement.
fn another_enqueue(pending: &VecDeque<Job>) -> bool {
    for job in pending {
        match job.op {
            Op::Enqueue(_) => return true,
            Op::Ack(..) => {}
            _ => return false,
        }
    }
    false
}

/// Deletes acknowledged envelopes in one statement (atomic on its own, so it needs no savepoint).
async fn ack(
    conn: &mut SqliteConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
    seqs: &[u64],
) -> StoreResult<()> {
    // Sequences beyond i64 were never handed out; the list is numbers only, so it is valid JSON.
    let mut list = String::with_capacity(seqs.len() * 8 + 2);
    list.push('[');
    for seq in seqs.iter().filter(|&&s| i64::try_from(s).is_ok()) {
        if list.len() > 1 {
            list.push(',');
        }
        let _ = write!(list, "{seq}"); // writing to a String cannot fail
    }
    list.push(']');
    sqlx::query(
        "DELETE FROM queue WHERE seq IN (SELECT value FROM json_each(?1)) \
         AND phone = ?2 AND device_id = ?3",
    )
    .bind(list)
    .bind(phone.as_str())
    .bind(dev(device_id))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Rows per multi-row INSERT: a run is cut greedily into these sizes, so only these few statements are
/// ever prepared (and stay in the statement cache).
const RUN_CHUNKS: [usize; 8] = [128, 64, 32, 16, 8, 4, 2, 1];

/// `INSERT INTO message_ids … VALUES (…)×n … RETURNING` for each size of [`RUN_CHUNKS`].
static IDS_SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    RUN_CHUNKS
        .iter()
        .map(|&n| {
            format!(
                "INSERT INTO message_ids (sender, sender_device, message_id, server_ts_ms, expires_at_ms) \
                 VALUES {} ON CONFLICT (sender, sender_device, message_id) DO NOTHING \
                 RETURNING sender, sender_device, message_id",
                vec!["(?, ?, ?, ?, ?)"; n].join(", ")
            )
        })
        .collect()
});

/// `INSERT INTO queue … VALUES (…)×n RETURNING` for each size of [`RUN_CHUNKS`].
static QUEUE_SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    RUN_CHUNKS
        .iter()
        .map(|&n| {
            format!(
                "INSERT INTO queue (phone, device_id, sender, sender_device, message_id, server_ts_ms, \
                 olm_type, ciphertext, expires_at_ms, retry_of, retry_attempt) VALUES {} \
                 RETURNING seq, sender, sender_device, message_id, phone, device_id",
                vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; n].join(", ")
            )
        })
        .collect()
});

/// Cuts `n` rows into `(start, index into RUN_CHUNKS)` pieces.
fn run_chunks(n: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &size) in RUN_CHUNKS.iter().enumerate() {
        while n - start >= size {
            out.push((start, i));
            start += size;
        }
    }
    out
}

/// Writes a run of consecutive enqueues together (two multi-row INSERTs instead of two statements and a
/// savepoint per message), inside a savepoint of its own. `Ok(None)`: the run was undone because some
/// command needs its own answer (a duplicate, a recipient device that is gone, a bad field); the caller
/// runs those commands one by one. `Err`: the transaction is unusable.
async fn enqueue_run(
    conn: &mut SqliteConnection,
    run: &[Job],
) -> Result<Option<Vec<EnqueueOutcome>>, String> {
    let msgs: Vec<&NewMessage> = run
        .iter()
        .filter_map(|j| match &j.op {
            Op::Enqueue(m) => Some(m),
            _ => None,
        })
        .collect();
    if msgs.len() != run.len() {
        return Ok(None);
    }
    exec(conn, "SAVEPOINT run")
        .await
        .map_err(|e| e.to_string())?;
    let written = try_enqueue_run(conn, &msgs).await;
    let end = match &written {
        Ok(Some(_)) => exec(conn, "RELEASE run").await,
        _ => match exec(conn, "ROLLBACK TO run").await {
            Ok(()) => exec(conn, "RELEASE run").await,
            Err(e) => Err(e),
        },
    };
    end.map_err(|e| e.to_string())?;
    Ok(written.ok().flatten())
}

/// The statements of [`enqueue_run`]; `Ok(None)` when the run cannot be written together.
async fn try_enqueue_run(
    conn: &mut SqliteConnection,
    msgs: &[&NewMessage],
) -> StoreResult<Option<Vec<EnqueueOutcome>>> {
    let mut index: std::collections::HashMap<(&str, i64, &[u8]), usize> =
        std::collections::HashMap::with_capacity(msgs.len());
    let mut times = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let key = (
            m.sender.as_str(),
            dev(m.sender_device),
            m.message_id.as_bytes().as_slice(),
        );
        if index.insert(key, i).is_some() {
            return Ok(None); // the same message twice: the second is a duplicate of the first
        }
        let (Ok(ts), Ok(expires)) = (
            checked_i64("server_ts_ms", m.server_ts_ms),
            checked_i64("expires_at_ms", m.expires_at_ms),
        ) else {
            return Ok(None);
        };
        times.push((ts, expires));
    }

    let mut inserted = 0;
    for (start, size) in run_chunks(msgs.len()) {
        let mut q = sqlx::query_as::<_, (String, i64, Vec<u8>)>(IDS_SQL[size].as_str());
        for (m, (ts, expires)) in msgs[start..start + RUN_CHUNKS[size]]
            .iter()
            .zip(&times[start..])
        {
            q = q
                .bind(m.sender.as_str())
                .bind(dev(m.sender_device))
                .bind(m.message_id.as_bytes().as_slice())
                .bind(*ts)
                .bind(*expires);
        }
        inserted += q.fetch_all(&mut *conn).await.map_err(db)?.len();
    }
    if inserted != msgs.len() {
        return Ok(None); // some were accepted before: each duplicate gets its first acceptance's time
    }

    let rows: Vec<(usize, &NewEnvelope)> = msgs
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.envelopes.iter().map(move |e| (i, e)))
        .collect();
    let mut seqs: Vec<Vec<Option<u64>>> =
        msgs.iter().map(|m| vec![None; m.envelopes.len()]).collect();
    for (start, size) in run_chunks(rows.len()) {
        let mut q =
            sqlx::query_as::<_, (i64, String, i64, Vec<u8>, String, i64)>(QUEUE_SQL[size].as_str());
        for &(i, env) in &rows[start..start + RUN_CHUNKS[size]] {
            let m = msgs[i];
            q = q
                .bind(env.phone.as_str())
                .bind(dev(env.device_id))
                .bind(m.sender.as_str())
                .bind(dev(m.sender_device))
                .bind(m.message_id.as_bytes().as_slice())
                .bind(times[i].0)
                .bind(i64::from(env.olm_type))
                .bind(env.ciphertext.as_slice())
                .bind(times[i].1)
                .bind(m.retry.map(|r| r.of.as_bytes().to_vec()))
                .bind(i64::from(m.retry.map_or(0, |r| r.attempt)));
        }
        // A recipient device that is gone fails the statement (foreign key): the run is undone.
        for (seq, sender, sender_device, message_id, phone, device_id) in
            q.fetch_all(&mut *conn).await.map_err(db)?
        {
            let Some(&i) = index.get(&(sender.as_str(), sender_device, message_id.as_slice()))
            else {
                return Ok(None);
            };
            let Some(slot) = msgs[i]
                .envelopes
                .iter()
                .position(|e| e.phone.as_str() == phone && dev(e.device_id) == device_id)
            else {
                return Ok(None);
            };
            seqs[i][slot] = Some(dec_u64("seq", seq)?);
        }
    }

    let mut outcomes = Vec::with_capacity(msgs.len());
    for (m, seqs) in msgs.iter().zip(seqs) {
        let mut stored = Vec::with_capacity(m.envelopes.len());
        for (env, seq) in m.envelopes.iter().zip(seqs) {
            let Some(seq) = seq else {
                return Ok(None);
            };
            stored.push(QueuedEnvelope {
                seq,
                phone: env.phone.clone(),
                device_id: env.device_id,
                sender: m.sender.clone(),
                sender_device: m.sender_device,
                message_id: m.message_id,
                server_ts_ms: m.server_ts_ms,
                olm_type: env.olm_type,
                ciphertext: env.ciphertext.clone(),
                retry: m.retry,
            });
        }
        outcomes.push(EnqueueOutcome::Stored(stored));
    }
    Ok(Some(outcomes))
}

type GroupRow = (Vec<u8>, String, String, i64, i64, i64);

/// Creates (`expected` is `None`) or conditionally replaces a group, then stores its announcement.
async fn write_group(
    conn: &mut SqliteConnection,
    expected: Option<u64>,
    state: &GroupState,
    announcement: &NewMessage,
) -> StoreResult<GroupWritten> {
    let g = &state.group;
    let id = g.id.as_bytes().as_slice();
    let version = checked_i64("group version", g.version)?;
    let created = checked_i64("created_at_ms", g.created_at_ms)?;
    let stored: Option<i64> = sqlx::query_scalar("SELECT version FROM groups WHERE id = ?1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    match (expected, stored) {
        (None, Some(_)) => return Err(StoreError::Conflict),
        (Some(_), None) => return Err(StoreError::NoSuchGroup),
        (Some(want), Some(have)) if dec_u64("group version", have)? != want => {
            return Err(StoreError::Conflict);
        }
        _ => {}
    }
    sqlx::query("DELETE FROM group_members WHERE group_id = ?1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    if state.members.is_empty() {
        sqlx::query("DELETE FROM groups WHERE id = ?1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    } else {
        sqlx::query(
            "INSERT INTO groups (id, name, description, version, all_members_may_edit, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
             description = excluded.description, version = excluded.version, \
             all_members_may_edit = excluded.all_members_may_edit",
        )
        .bind(id)
        .bind(g.name.as_str())
        .bind(g.description.as_str())
        .bind(version)
        .bind(i64::from(g.all_members_may_edit))
        .bind(created)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        for m in &state.members {
            sqlx::query(
                "INSERT INTO group_members (group_id, phone, admin, added_at_version) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(id)
            .bind(m.phone.as_str())
            .bind(i64::from(m.admin))
            .bind(checked_i64("added_at_version", m.added_at_version)?)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        }
    }
    Ok(match enqueue(conn, announcement).await? {
        EnqueueOutcome::Stored(queued) => queued,
        EnqueueOutcome::Duplicate { .. } => Vec::new(),
    })
}

fn dec_bool(what: &str, v: i64) -> StoreResult<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(StoreError::Corrupt(format!("{what}: {v}"))),
    }
}

fn dec_group_id(bytes: &[u8]) -> StoreResult<GroupId> {
    GroupId::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn mismatch<T>() -> StoreResult<T> {
    Err(writer_error(WriterError::Mismatch))
}

#[async_trait]
impl Store for SqliteStore {
    async fn close(&self) {
        if let Err(e) = self.write(Op::Close).await {
            tracing::debug!(error = %e, "the SQLite writer had already stopped");
        }
        self.pool.close().await;
    }

    async fn save_code(&self, code: &CodeRecord) -> StoreResult<()> {
        self.write_unit(Op::SaveCode(code.clone())).await
    }

    async fn get_code(&self, phone: &PhoneNumber) -> StoreResult<Option<CodeRecord>> {
        let row: Option<CodeRow> = sqlx::query_as(
            "SELECT phone, code_hash, sent_at_ms, expires_at_ms, attempts FROM codes WHERE phone = ?1",
        )
        .bind(phone.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(code_from_row).transpose()
    }

    async fn add_code_attempt(&self, phone: &PhoneNumber) -> StoreResult<u32> {
        match self.write(Op::AddCodeAttempt(phone.clone())).await? {
            Done::Count(n) => Ok(n),
            _ => mismatch(),
        }
    }

    async fn remove_code(&self, phone: &PhoneNumber) -> StoreResult<()> {
        self.write_unit(Op::RemoveCode(phone.clone())).await
    }

    async fn update_devices(
        &self,
        phone: &PhoneNumber,
        update: &DeviceListUpdate,
    ) -> StoreResult<()> {
        self.write_unit(Op::UpdateDevices(phone.clone(), update.clone()))
            .await
    }

    async fn stale_companions(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<(PhoneNumber, DeviceId)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT c.phone, c.device_id FROM devices c \
             JOIN devices p ON p.phone = c.phone AND p.device_id = 1 \
             WHERE c.device_id <> 1 AND p.last_seen_ms < ?1 \
             ORDER BY c.phone, c.device_id LIMIT ?2",
        )
        .bind(i64::try_from(cutoff_ms).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(phone, device)| Ok((dec_phone(&phone)?, dec_device(device)?)))
            .collect()
    }

    async fn remove_device(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<()> {
        self.write_unit(Op::RemoveDevice(phone.clone(), device_id))
            .await
    }

    async fn create_account(&self, new: &NewAccount) -> StoreResult<Vec<DeviceId>> {
        match self.write(Op::CreateAccount(new.clone())).await? {
            Done::Removed(ids) => Ok(ids),
            _ => mismatch(),
        }
    }

    async fn get_account(&self, phone: &PhoneNumber) -> StoreResult<Option<AccountRecord>> {
        let row: Option<AccountRow> = sqlx::query_as(
            "SELECT phone, account_key, device_list, device_list_version, created_at_ms \
             FROM accounts WHERE phone = ?1",
        )
        .bind(phone.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(account_from_row).transpose()
    }

    async fn get_device(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Option<DeviceRecord>> {
        let row: Option<DeviceRow> = sqlx::query_as(
            "SELECT phone, device_id, noise_key, identity_ed, last_seen_ms FROM devices \
             WHERE phone = ?1 AND device_id = ?2",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(device_from_row).transpose()
    }

    async fn list_devices(&self, phone: &PhoneNumber) -> StoreResult<Vec<DeviceRecord>> {
        let rows: Vec<DeviceRow> = sqlx::query_as(
            "SELECT phone, device_id, noise_key, identity_ed, last_seen_ms FROM devices \
             WHERE phone = ?1 ORDER BY device_id",
        )
        .bind(phone.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(device_from_row).collect()
    }

    async fn touch_device(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        now_ms: u64,
    ) -> StoreResult<()> {
        self.write_unit(Op::TouchDevice(phone.clone(), device_id, now_ms))
            .await
    }

    async fn add_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        keys: &[PreKeyRecord],
    ) -> StoreResult<u32> {
        match self
            .write(Op::AddOneTimeKeys(phone.clone(), device_id, keys.to_vec()))
            .await?
        {
            Done::Count(n) => Ok(n),
            _ => mismatch(),
        }
    }

    async fn set_fallback_key(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        key: &PreKeyRecord,
    ) -> StoreResult<()> {
        self.write_unit(Op::SetFallbackKey(phone.clone(), device_id, key.clone()))
            .await
    }

    async fn count_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<u32> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM one_time_keys WHERE phone = ?1 AND device_id = ?2",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(count_u32(n))
    }

    async fn claim_prekey(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Option<ClaimedPreKey>> {
        match self
            .write(Op::ClaimPrekey(phone.clone(), device_id))
            .await?
        {
            Done::Claimed(claimed) => Ok(claimed),
            _ => mismatch(),
        }
    }

    async fn enqueue(&self, msg: NewMessage) -> StoreResult<EnqueueOutcome> {
        match self.write(Op::Enqueue(msg)).await? {
            Done::Enqueued(outcome) => Ok(outcome),
            _ => mismatch(),
        }
    }

    async fn queued_bytes(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(length(ciphertext)), 0) FROM queue WHERE phone = ?1 AND device_id = ?2",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn load_queue(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<QueuedEnvelope>> {
        let rows: Vec<QueueRow> = sqlx::query_as(
            "SELECT seq, sender, sender_device, message_id, server_ts_ms, olm_type, ciphertext, \
             retry_of, retry_attempt FROM queue WHERE phone = ?1 AND device_id = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(
                |(
                    seq,
                    sender,
                    sender_device,
                    message_id,
                    ts,
                    olm_type,
                    ciphertext,
                    retry_of,
                    retry_attempt,
                )| {
                    let retry = match retry_of {
                        Some(of) => Some(RetryInfo {
                            of: dec_message_id(&of)?,
                            attempt: dec_u32("retry_attempt", retry_attempt)?,
                        }),
                        None => None,
                    };
                    Ok(QueuedEnvelope {
                        seq: dec_u64("seq", seq)?,
                        phone: phone.clone(),
                        device_id,
                        sender: dec_phone(&sender)?,
                        sender_device: dec_device(sender_device)?,
                        message_id: dec_message_id(&message_id)?,
                        server_ts_ms: dec_u64("server_ts_ms", ts)?,
                        olm_type: dec_u32("olm_type", olm_type)?,
                        ciphertext,
                        retry,
                    })
                },
            )
            .collect()
    }

    async fn ack(&self, phone: &PhoneNumber, device_id: DeviceId, seqs: &[u64]) -> StoreResult<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.write_unit(Op::Ack(phone.clone(), device_id, seqs.to_vec()))
            .await
    }

    async fn expire(&self, now_ms: u64) -> StoreResult<u64> {
        match self.write(Op::Expire(now_ms)).await? {
            Done::Expired(n) => Ok(n),
            _ => mismatch(),
        }
    }

    async fn create_blob(
        &self,
        blob: &BlobRecord,
        quota_bytes: u64,
        now_ms: u64,
    ) -> StoreResult<bool> {
        match self
            .write(Op::CreateBlob(blob.clone(), quota_bytes, now_ms))
            .await?
        {
            Done::Created(ok) => Ok(ok),
            _ => mismatch(),
        }
    }

    async fn get_blob(&self, id: &str) -> StoreResult<Option<BlobRecord>> {
        let row: Option<BlobRow> = sqlx::query_as(
            "SELECT id, owner, size, uploaded, complete, created_at_ms, expires_at_ms FROM blobs \
             WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(blob_from_row).transpose()
    }

    async fn set_blob_offset(&self, id: &str, offset: u64) -> StoreResult<()> {
        self.write_unit(Op::SetBlobOffset(id.to_owned(), offset))
            .await
    }

    async fn complete_blob(&self, id: &str) -> StoreResult<()> {
        self.write_unit(Op::CompleteBlob(id.to_owned())).await
    }

    async fn extend_blob(&self, id: &str, expires_at_ms: u64) -> StoreResult<()> {
        self.write_unit(Op::ExtendBlob(id.to_owned(), expires_at_ms))
            .await
    }

    async fn blob_usage(&self, owner: &PhoneNumber, now_ms: u64) -> StoreResult<u64> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        blob_usage(&mut conn, owner, now_ms).await
    }

    async fn delete_expired_blobs(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<String>> {
        match self.write(Op::DeleteExpiredBlobs(now_ms, limit)).await? {
            Done::Ids(ids) => Ok(ids),
            _ => mismatch(),
        }
    }

    async fn push_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        base_version: u64,
        patch: &[u8],
        snapshot: Option<&[u8]>,
    ) -> StoreResult<u64> {
        match self
            .write(Op::PushAppState(
                phone.clone(),
                collection.to_owned(),
                base_version,
                patch.to_vec(),
                snapshot.map(<[u8]>::to_vec),
            ))
            .await?
        {
            Done::Version(v) => Ok(v),
            _ => mismatch(),
        }
    }

    async fn fetch_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        after_version: u64,
        max_patches: usize,
    ) -> StoreResult<AppStateFetch> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let version: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM app_state_versions WHERE phone = ?1 AND collection = ?2",
        )
        .bind(phone.as_str())
        .bind(collection)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
        let Some(version) = version else {
            return Ok(AppStateFetch::default());
        };
        let version = dec_u64("app-state version", version)?;
        let after = i64::try_from(after_version).unwrap_or(i64::MAX);
        let snap: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT version, snapshot FROM app_state_snapshots \
             WHERE phone = ?1 AND collection = ?2 AND version > ?3",
        )
        .bind(phone.as_str())
        .bind(collection)
        .bind(after)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
        let from = snap.as_ref().map_or(after, |(v, _)| *v);
        let snapshot = snap
            .map(|(v, b)| Ok::<_, StoreError>((dec_u64("snapshot version", v)?, b)))
            .transpose()?;
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT version, patch FROM app_state_patches \
             WHERE phone = ?1 AND collection = ?2 AND version > ?3 ORDER BY version LIMIT ?4",
        )
        .bind(phone.as_str())
        .bind(collection)
        .bind(from)
        .bind(i64::try_from(max_patches).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        let patches = rows
            .into_iter()
            .map(|(v, p)| Ok((dec_u64("patch version", v)?, p)))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(AppStateFetch {
            version,
            snapshot,
            patches,
        })
    }

    async fn registered_among(&self, numbers: &[PhoneNumber]) -> StoreResult<Vec<PhoneNumber>> {
        // One statement for the whole batch: the numbers go in as one JSON array parameter.
        let list = serde_json::to_string(&numbers.iter().map(|n| n.as_str()).collect::<Vec<_>>())
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT phone FROM accounts WHERE phone IN (SELECT value FROM json_each(?1)) \
             ORDER BY phone",
        )
        .bind(list)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|p| dec_phone(p)).collect()
    }

    async fn add_contacts(&self, owner: &PhoneNumber, contacts: &[PhoneNumber]) -> StoreResult<()> {
        self.write_unit(Op::Contacts(owner.clone(), contacts.to_vec(), true))
            .await
    }

    async fn remove_contacts(
        &self,
        owner: &PhoneNumber,
        contacts: &[PhoneNumber],
    ) -> StoreResult<()> {
        self.write_unit(Op::Contacts(owner.clone(), contacts.to_vec(), false))
            .await
    }

    async fn is_contact(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool> {
        let row: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM contacts WHERE owner = ?1 AND contact = ?2")
                .bind(owner.as_str())
                .bind(other.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(row.is_some())
    }

    async fn set_profile(
        &self,
        owner: &PhoneNumber,
        ciphertext: &[u8],
        now_ms: u64,
    ) -> StoreResult<()> {
        self.write_unit(Op::SetProfile(owner.clone(), ciphertext.to_vec(), now_ms))
            .await
    }

    async fn get_profile(&self, owner: &PhoneNumber) -> StoreResult<Option<(Vec<u8>, u64)>> {
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT ciphertext, updated_ms FROM profiles WHERE phone = ?1")
                .bind(owner.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        row.map(|(c, at)| Ok((c, dec_u64("profile time", at)?)))
            .transpose()
    }

    async fn set_privacy(&self, owner: &PhoneNumber, privacy: PrivacyRecord) -> StoreResult<()> {
        self.write_unit(Op::SetPrivacy(owner.clone(), privacy))
            .await
    }

    async fn get_privacy(&self, owner: &PhoneNumber) -> StoreResult<PrivacyRecord> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT last_seen, read_receipts_off FROM privacy WHERE phone = ?1")
                .bind(owner.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        let Some((last_seen, off)) = row else {
            return Ok(PrivacyRecord::default());
        };
        Ok(PrivacyRecord {
            last_seen: i32::try_from(last_seen)
                .ok()
                .and_then(|v| natter_proto::social::Visibility::try_from(v).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("privacy setting {last_seen}")))?,
            read_receipts_off: match off {
                0 => false,
                1 => true,
                v => return Err(StoreError::Corrupt(format!("read_receipts_off: {v}"))),
            },
        })
    }

    async fn set_blocked(
        &self,
        owner: &PhoneNumber,
        other: &PhoneNumber,
        blocked: bool,
    ) -> StoreResult<()> {
        self.write_unit(Op::SetBlocked(owner.clone(), other.clone(), blocked))
            .await
    }

    async fn is_blocked(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool> {
        let row: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM blocks WHERE owner = ?1 AND blocked = ?2")
                .bind(owner.as_str())
                .bind(other.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(row.is_some())
    }

    async fn blocked(&self, owner: &PhoneNumber) -> StoreResult<Vec<PhoneNumber>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT blocked FROM blocks WHERE owner = ?1 ORDER BY blocked")
                .bind(owner.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.iter().map(|p| dec_phone(p)).collect()
    }

    async fn create_group(
        &self,
        state: &GroupState,
        announcement: NewMessage,
    ) -> StoreResult<GroupWritten> {
        match self
            .write(Op::WriteGroup(None, state.clone(), announcement))
            .await?
        {
            Done::Group(q) => Ok(q),
            _ => mismatch(),
        }
    }

    async fn get_group(&self, id: &GroupId) -> StoreResult<Option<GroupState>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let row: Option<GroupRow> = sqlx::query_as(
            "SELECT id, name, description, version, all_members_may_edit, created_at_ms \
             FROM groups WHERE id = ?1",
        )
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
        let Some((gid, name, description, version, all, created)) = row else {
            return Ok(None);
        };
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT phone, admin, added_at_version FROM group_members WHERE group_id = ?1 \
             ORDER BY phone",
        )
        .bind(id.as_bytes().as_slice())
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        let members = rows
            .into_iter()
            .map(|(phone, admin, added)| {
                Ok(GroupMemberRecord {
                    phone: dec_phone(&phone)?,
                    admin: dec_bool("admin", admin)?,
                    added_at_version: dec_u64("added_at_version", added)?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Some(GroupState {
            group: GroupRecord {
                id: dec_group_id(&gid)?,
                name,
                description,
                version: dec_u64("group version", version)?,
                all_members_may_edit: dec_bool("all_members_may_edit", all)?,
                created_at_ms: dec_u64("created_at_ms", created)?,
            },
            members,
        }))
    }

    async fn update_group(
        &self,
        expected_version: u64,
        state: &GroupState,
        announcement: NewMessage,
    ) -> StoreResult<GroupWritten> {
        match self
            .write(Op::WriteGroup(
                Some(expected_version),
                state.clone(),
                announcement,
            ))
            .await?
        {
            Done::Group(q) => Ok(q),
            _ => mismatch(),
        }
    }

    async fn group_devices(&self, id: &GroupId) -> StoreResult<Vec<(PhoneNumber, DeviceId)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT d.phone, d.device_id FROM group_members m JOIN devices d ON d.phone = m.phone \
             WHERE m.group_id = ?1 ORDER BY d.phone, d.device_id",
        )
        .bind(id.as_bytes().as_slice())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(p, d)| Ok((dec_phone(&p)?, dec_device(d)?)))
            .collect()
    }

    async fn groups_of(&self, phone: &PhoneNumber) -> StoreResult<Vec<GroupId>> {
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT group_id FROM group_members WHERE phone = ?1 ORDER BY group_id",
        )
        .bind(phone.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|g| dec_group_id(g)).collect()
    }

    async fn group_blockers(
        &self,
        id: &GroupId,
        sender: &PhoneNumber,
    ) -> StoreResult<Vec<PhoneNumber>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT m.phone FROM group_members m JOIN blocks b ON b.owner = m.phone \
             WHERE m.group_id = ?1 AND b.blocked = ?2 ORDER BY m.phone",
        )
        .bind(id.as_bytes().as_slice())
        .bind(sender.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|p| dec_phone(p)).collect()
    }
}

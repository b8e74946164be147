//! [`PgStore`]: the PostgreSQL [`Store`] for clusters, where several natterd nodes share one database.
//!
//! Semantics follow [`super::memory`] (the reference) and [`super::sqlite`]. Every method runs on a
//! connection from a pool (size configurable, see [`PgOptions`]); a method that writes several rows runs
//! them in one transaction at READ COMMITTED. Safety across nodes comes from row locks, not from
//! SERIALIZABLE: per-device seqs are taken while the recipient devices' rows are locked (so for one
//! device seq order is commit order), the device-list compare-and-set is a single conditional `UPDATE`,
//! app-state pushes lock the collection's version row, quota checks and account replacement take
//! transaction-scoped advisory locks, and locks on devices are always taken in (phone, device_id) order.
//! A deadlock or serialization failure (which the lock order should prevent) is retried
//! ([`MAX_ATTEMPTS`]).
//!
//! The delivery path is batched: [`Store::enqueue`] is one call of the `natter_enqueue` SQL function (one
//! round trip, one transaction) whatever the number of recipient devices; acks, contacts and one-time
//! keys are written with one statement over arrays.
//!
//! The schema lives in `migrations/postgres/NNN_*.sql`, applied by [`migrate`] (also `natterd migrate`)
//! in one transaction under an advisory lock, so nodes starting together are safe.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};

use super::memory::checked_i64;
use super::{
    AccountRecord, AppStateFetch, BlobRecord, ClaimedPreKey, CodeRecord, DeviceListUpdate,
    DeviceRecord, EnqueueOutcome, GroupMemberRecord, GroupRecord, GroupState, GroupWritten,
    NewAccount, NewMessage, PreKeyRecord, PrivacyRecord, QueuedEnvelope, RetryInfo, Store,
    StoreError, StoreResult,
};

/// One schema step: its number and its SQL (several statements).
#[derive(Clone, Copy, Debug)]
struct Migration {
    version: i64,
    sql: &'static str,
}

/// The migrations, in order; the numbers match the SQLite ones.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/postgres/001_initial.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/postgres/002_blobs.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/postgres/003_app_state.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../../migrations/postgres/004_social.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../../migrations/postgres/005_groups.sql"),
    },
];

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Key of the advisory lock that serializes migrations ("natter" in ASCII).
const MIGRATION_LOCK: i64 = 0x6e61_7474_6572;
/// How many times a transaction that lost a deadlock or serialization conflict is run.
pub const MAX_ATTEMPTS: u32 = 4;

/// Pool settings. In a store URL they are query parameters natterd reads and removes before handing the
/// URL to the driver: `postgres://host/db?pool_size=32&acquire_timeout_ms=2000`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgOptions {
    /// Connections in the pool. Default 16.
    pub pool_size: u32,
    /// How long a request waits for a connection (or for PostgreSQL to accept one) before it fails with
    /// [`StoreError::Unavailable`]. Default 5 s.
    pub acquire_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// A `postgres://` URL split into the driver's part and natterd's pool settings. `Display` and `Debug`
/// hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    driver_url: String,
    /// Pool settings from the URL.
    pub options: PgOptions,
}

/// A store URL that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid PostgreSQL URL: {0}")]
pub struct PgUrlError(String);

impl FromStr for PgUrl {
    type Err = PgUrlError;

    fn from_str(s: &str) -> Result<Self, PgUrlError> {
        if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
            return Err(PgUrlError("expected postgres://...".into()));
        }
        let (base, query) = s.split_once('?').unwrap_or((s, ""));
        let mut options = PgOptions::default();
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "pool_size" => {
                    options.pool_size = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| PgUrlError(format!("pool_size={value}")))?;
                }
                "acquire_timeout_ms" => {
                    let ms: u64 = value
                        .parse()
                        .map_err(|_| PgUrlError(format!("acquire_timeout_ms={value}")))?;
                    options.acquire_timeout = Duration::from_millis(ms.max(1));
                }
                _ => kept.push(pair),
            }
        }
        let driver_url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        // Let the driver check the rest now, so a bad URL fails at start-up with a clear message.
        PgConnectOptions::from_str(&driver_url).map_err(|e| PgUrlError(e.to_string()))?;
        Ok(PgUrl {
            driver_url,
            options,
        })
    }
}

impl PgUrl {
    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.driver_url)
    }

    fn connect_options(&self) -> StoreResult<PgConnectOptions> {
        PgConnectOptions::from_str(&self.driver_url)
            .map(|o| o.application_name("natterd"))
            .map_err(|e| StoreError::Backend(Box::new(e)))
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgUrl")
            .field("url", &self.redacted())
            .field("options", &self.options)
            .finish()
    }
}

/// Hides the password of `scheme://user:password@host...`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The PostgreSQL store. Cloning is cheap and shares the pool.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

// ---- errors ----

/// SQLSTATEs that mean "PostgreSQL is not serving right now": connection exceptions (class 08), admin
/// shutdown, crash shutdown, cannot connect now, too many connections.
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Maps an sqlx error: decoding failures mean a bad row, an unreachable or restarting server is
/// [`StoreError::Unavailable`], everything else is the backend's.
fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(Box::new(e)),
        sqlx::Error::Database(ref d) if d.code().is_some_and(|c| is_unavailable_code(&c)) => {
            StoreError::Unavailable(Box::new(e))
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

/// True for a deadlock or serialization failure: the transaction was rolled back and may run again.
fn is_transient(e: &StoreError) -> bool {
    let StoreError::Backend(inner) = e else {
        return false;
    };
    match inner.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("40001") | Some("40P01"))
        }
        _ => false,
    }
}

/// Runs `$body` (an expression using `$conn: &mut PgConnection`) in a transaction, commits, and runs it
/// again when it lost a deadlock or serialization conflict.
macro_rules! in_tx {
    ($pool:expr, |$conn:ident| $body:expr) => {{
        let mut attempt = 1;
        loop {
            let result = async {
                let mut tx = $pool.begin().await.map_err(db)?;
                let value = {
                    let $conn: &mut PgConnection = &mut tx;
                    $body.await?
                };
                tx.commit().await.map_err(db)?;
                Ok(value)
            }
            .await;
            match result {
                Err(e) if attempt < MAX_ATTEMPTS && is_transient(&e) => {
                    tracing::debug!(error = %e, attempt, "PostgreSQL transaction retried");
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}

// ---- row decoding (same checks as the SQLite backend) ----

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

/// A bound for a query parameter that is a limit or a lower bound: values above i64::MAX mean "all".
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
type BlobRow = (String, String, i64, i64, bool, i64, i64);

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

fn blob_from_row(
    (id, owner, size, uploaded, complete, created, expires): BlobRow,
) -> StoreResult<BlobRecord> {
    Ok(BlobRecord {
        id,
        owner: dec_phone(&owner)?,
        size: dec_u64("size", size)?,
        offset: dec_u64("uploaded", uploaded)?,
        complete,
        created_at_ms: dec_u64("created_at_ms", created)?,
        expires_at_ms: dec_u64("expires_at_ms", expires)?,
    })
}

// ---- migrations ----

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "database schema version {found} is newer than this build of natterd knows ({known}); upgrade natterd"
)]
struct TooNew {
    found: i64,
    known: i64,
}

/// Brings the database at `url` up to [`latest_version`] and returns the version it is at. Runs in one
/// transaction holding an advisory lock, so several nodes (or `natterd migrate` runs) starting at once
/// apply each migration exactly once; running it again is a no-op. A database written by a newer build
/// is refused.
pub async fn migrate(url: &PgUrl) -> StoreResult<i64> {
    let mut conn = PgConnection::connect_with(&url.connect_options()?)
        .await
        .map_err(db)?;
    let version = migrate_conn(&mut conn).await;
    let _ = conn.close().await;
    version
}

async fn migrate_conn(conn: &mut PgConnection) -> StoreResult<i64> {
    let mut tx = conn.begin().await.map_err(db)?;
    // No "already exists, skipping" notices in natterd's log.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL PRIMARY KEY, \
         applied_at_ms BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let from = current.unwrap_or(0);
    let mut current = from;
    let known = latest_version();
    if current > known {
        return Err(StoreError::Backend(Box::new(TooNew {
            found: current,
            known,
        })));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(db)?;
        sqlx::query("INSERT INTO schema_version (version, applied_at_ms) VALUES ($1, $2)")
            .bind(m.version)
            .bind(checked_i64("applied_at_ms", crate::now_ms())?)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tracing::info!(version = m.version, "PostgreSQL schema migrated");
        current = m.version;
    }
    tx.commit().await.map_err(db)?;
    Ok(current)
}

impl PgStore {
    /// Whether `sql` (a `SELECT 1 … WHERE owner = $1 AND … = $2`) finds a row for the pair.
    async fn pair_exists(
        &self,
        sql: &'static str,
        owner: &PhoneNumber,
        other: &PhoneNumber,
    ) -> StoreResult<bool> {
        let row: Option<i32> = sqlx::query_scalar(sql)
            .bind(owner.as_str())
            .bind(other.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(row.is_some())
    }
    /// Connects to PostgreSQL at `url`, applies pending migrations and opens the pool.
    pub async fn open(url: &PgUrl) -> StoreResult<PgStore> {
        migrate(url).await?;
        Self::open_migrated(url).await
    }

    /// Opens the pool without migrating (the schema must be at [`latest_version`]).
    pub async fn open_migrated(url: &PgUrl) -> StoreResult<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(url.options.pool_size)
            .min_connections(0)
            .acquire_timeout(url.options.acquire_timeout)
            // A connection that broke while idle (PostgreSQL restarted) is noticed and replaced on
            // acquire, so requests after a restart succeed without a failed one first.
            .test_before_acquire(true)
            .connect_with(url.connect_options()?)
            .await
            .map_err(db)?;
        Ok(PgStore { pool })
    }

    /// The schema version of the database (the highest migration applied).
    pub async fn schema_version(&self) -> StoreResult<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(v.unwrap_or(0))
    }

    /// The pool (tests tamper with rows through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

// ---- write helpers (run inside a transaction) ----

/// Locks the listed devices of `phone` (in id order) and deletes them with their keys and envelopes.
async fn remove_devices(
    conn: &mut PgConnection,
    phone: &PhoneNumber,
    devices: &[DeviceId],
) -> StoreResult<()> {
    if devices.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = devices.iter().map(|d| dev(*d)).collect();
    sqlx::query(
        "SELECT device_id FROM devices WHERE phone = $1 AND device_id = ANY($2) \
         ORDER BY device_id FOR UPDATE",
    )
    .bind(phone.as_str())
    .bind(&ids)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    for sql in [
        "DELETE FROM queue WHERE phone = $1 AND device_id = ANY($2)",
        "DELETE FROM one_time_keys WHERE phone = $1 AND device_id = ANY($2)",
        "DELETE FROM fallback_keys WHERE phone = $1 AND device_id = ANY($2)",
        "DELETE FROM devices WHERE phone = $1 AND device_id = ANY($2)",
    ] {
        sqlx::query(sql)
            .bind(phone.as_str())
            .bind(&ids)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

async fn create_account(conn: &mut PgConnection, new: &NewAccount) -> StoreResult<Vec<DeviceId>> {
    let version = checked_i64("device_list_version", new.account.device_list_version)?;
    let created = checked_i64("created_at_ms", new.account.created_at_ms)?;
    let seen = checked_i64("last_seen_ms", new.primary.last_seen_ms)?;
    let phone = new.account.phone.as_str();
    // Two registrations of the same new number on two nodes would both find no row; the advisory lock
    // makes the second wait and then replace the first, as on one node. Account row before device rows:
    // the lock order of update_devices.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('account:' || $1, 0))")
        .bind(phone)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    sqlx::query("SELECT 1 FROM accounts WHERE phone = $1 FOR UPDATE")
        .bind(phone)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let old: Vec<i64> = sqlx::query_scalar(
        "SELECT device_id FROM devices WHERE phone = $1 ORDER BY device_id FOR UPDATE",
    )
    .bind(phone)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let removed = old
        .into_iter()
        .map(dec_device)
        .collect::<StoreResult<Vec<_>>>()?;
    for sql in [
        "DELETE FROM queue WHERE phone = $1",
        "DELETE FROM one_time_keys WHERE phone = $1",
        "DELETE FROM fallback_keys WHERE phone = $1",
        "DELETE FROM devices WHERE phone = $1",
        "DELETE FROM accounts WHERE phone = $1",
    ] {
        sqlx::query(sql)
            .bind(phone)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    sqlx::query(
        "INSERT INTO accounts (phone, account_key, device_list, device_list_version, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5)",
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
         VALUES ($1, $2, $3, $4, $5)",
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
    conn: &mut PgConnection,
    phone: &PhoneNumber,
    update: &DeviceListUpdate,
) -> StoreResult<()> {
    let version = checked_i64("device_list_version", update.version)?;
    let mut added_ids = Vec::with_capacity(update.added.len());
    let mut added_noise = Vec::with_capacity(update.added.len());
    let mut added_ed = Vec::with_capacity(update.added.len());
    let mut added_seen = Vec::with_capacity(update.added.len());
    for d in &update.added {
        added_ids.push(dev(d.device_id));
        added_noise.push(d.noise_key.to_vec());
        added_ed.push(d.identity_ed.to_vec());
        added_seen.push(checked_i64("last_seen_ms", d.last_seen_ms)?);
    }
    // The compare-and-set: one conditional UPDATE. A concurrent update of the same account waits for the
    // row lock and then re-checks the condition against the committed version, so of two updates with
    // the same version exactly one wins.
    let changed = sqlx::query(
        "UPDATE accounts SET device_list = $2, device_list_version = $3 \
         WHERE phone = $1 AND device_list_version < $3",
    )
    .bind(phone.as_str())
    .bind(update.device_list.as_slice())
    .bind(version)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    if changed.rows_affected() == 0 {
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT device_list_version FROM accounts WHERE phone = $1")
                .bind(phone.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
        return Err(match exists {
            Some(_) => StoreError::Conflict,
            None => StoreError::NoSuchAccount,
        });
    }
    let mut removed = update.removed.clone();
    removed.sort_by_key(|d| d.get());
    remove_devices(conn, phone, &removed).await?;
    if !added_ids.is_empty() {
        sqlx::query(
            "INSERT INTO devices (phone, device_id, noise_key, identity_ed, last_seen_ms) \
             SELECT $1, t.id, t.noise, t.ed, t.seen \
             FROM unnest($2::bigint[], $3::bytea[], $4::bytea[], $5::bigint[]) AS t (id, noise, ed, seen)",
        )
        .bind(phone.as_str())
        .bind(&added_ids)
        .bind(&added_noise)
        .bind(&added_ed)
        .bind(&added_seen)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(())
}

async fn require_device(
    conn: &mut PgConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
) -> StoreResult<()> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM devices WHERE phone = $1 AND device_id = $2")
            .bind(phone.as_str())
            .bind(dev(device_id))
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    found.map(|_| ()).ok_or(StoreError::NoSuchDevice)
}

async fn count_keys(
    conn: &mut PgConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
) -> StoreResult<u32> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM one_time_keys WHERE phone = $1 AND device_id = $2",
    )
    .bind(phone.as_str())
    .bind(dev(device_id))
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    Ok(count_u32(n))
}

async fn add_one_time_keys(
    conn: &mut PgConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
    keys: &[PreKeyRecord],
) -> StoreResult<u32> {
    require_device(conn, phone, device_id).await?;
    if !keys.is_empty() {
        let ids: Vec<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
        let pubs: Vec<Vec<u8>> = keys.iter().map(|k| k.key.to_vec()).collect();
        let sigs: Vec<&[u8]> = keys.iter().map(|k| k.signature.as_slice()).collect();
        // In upload order, so that ids (and "oldest first") follow it; the first of duplicate ids wins.
        sqlx::query(
            "INSERT INTO one_time_keys (phone, device_id, key_id, key, signature) \
             SELECT $1, $2, t.key_id, t.key, t.signature \
             FROM unnest($3::text[], $4::bytea[], $5::bytea[]) WITH ORDINALITY \
                  AS t (key_id, key, signature, i) \
             ORDER BY t.i \
             ON CONFLICT (phone, device_id, key_id) DO NOTHING",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .bind(&ids)
        .bind(&pubs)
        .bind(&sigs)
        .execute(&mut *conn)
        .await
        .map_err(db_device)?;
    }
    count_keys(conn, phone, device_id).await
}

async fn claim_prekey(
    conn: &mut PgConnection,
    phone: &PhoneNumber,
    device_id: DeviceId,
) -> StoreResult<Option<ClaimedPreKey>> {
    // FOR UPDATE under LIMIT: a claimer that finds the oldest key taken by a concurrent claim skips to
    // the next one, so no key is handed out twice.
    let claimed: Option<KeyRow> = sqlx::query_as(
        "DELETE FROM one_time_keys WHERE id = (SELECT id FROM one_time_keys \
         WHERE phone = $1 AND device_id = $2 ORDER BY id LIMIT 1 FOR UPDATE) \
         RETURNING key_id, key, signature",
    )
    .bind(phone.as_str())
    .bind(dev(device_id))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    if let Some(row) = claimed {
        let prekey = prekey_from_row(row)?;
        let remaining = count_keys(conn, phone, device_id).await?;
        return Ok(Some(ClaimedPreKey {
            prekey,
            fallback: false,
            remaining,
        }));
    }
    let fallback: Option<KeyRow> = sqlx::query_as(
        "SELECT key_id, key, signature FROM fallback_keys WHERE phone = $1 AND device_id = $2",
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

async fn blob_usage<'e, E>(exec: E, owner: &PhoneNumber, now_ms: u64) -> StoreResult<u64>
where
    E: sqlx::PgExecutor<'e>,
{
    let used: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(size), 0)::BIGINT FROM blobs WHERE owner = $1 AND expires_at_ms > $2",
    )
    .bind(owner.as_str())
    .bind(saturating_i64(now_ms))
    .fetch_one(exec)
    .await
    .map_err(db)?;
    dec_u64("blob usage", used)
}

async fn create_blob(
    conn: &mut PgConnection,
    blob: &BlobRecord,
    quota: u64,
    now_ms: u64,
) -> StoreResult<bool> {
    let size = checked_i64("size", blob.size)?;
    let offset = checked_i64("offset", blob.offset)?;
    let created = checked_i64("created_at_ms", blob.created_at_ms)?;
    let expires = checked_i64("expires_at_ms", blob.expires_at_ms)?;
    // Two uploads of one owner on two nodes must not both pass the quota check.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('blobs:' || $1, 0))")
        .bind(blob.owner.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM blobs WHERE id = $1")
        .bind(blob.id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    if exists.is_some() {
        return Err(StoreError::Conflict);
    }
    let used = blob_usage(&mut *conn, &blob.owner, now_ms).await?;
    if used.saturating_add(blob.size) > quota {
        return Ok(false);
    }
    let inserted = sqlx::query(
        "INSERT INTO blobs (id, owner, size, uploaded, complete, created_at_ms, expires_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
    )
    .bind(blob.id.as_str())
    .bind(blob.owner.as_str())
    .bind(size)
    .bind(offset)
    .bind(blob.complete)
    .bind(created)
    .bind(expires)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    if inserted.rows_affected() == 0 {
        return Err(StoreError::Conflict); // created by another owner's upload meanwhile
    }
    Ok(true)
}

/// Runs an update of one blob row (`$1` the id, `$2` the value); no row is [`StoreError::NoSuchBlob`].
async fn blob_update(pool: &PgPool, sql: &'static str, id: &str, value: i64) -> StoreResult<()> {
    let res = sqlx::query(sql)
        .bind(id)
        .bind(value)
        .execute(pool)
        .await
        .map_err(db)?;
    if res.rows_affected() == 0 {
        return Err(StoreError::NoSuchBlob);
    }
    Ok(())
}

async fn push_app_state(
    conn: &mut PgConnection,
    phone: &PhoneNumber,
    collection: &str,
    base_version: u64,
    patch: &[u8],
    snapshot: Option<&[u8]>,
) -> StoreResult<u64> {
    let new_version = base_version.saturating_add(1);
    let new = checked_i64("version", new_version)?;
    // The compare-and-set on the version row: a conditional UPDATE (row lock, re-checked after a
    // concurrent push commits), or for a collection never pushed an INSERT that a concurrent first push
    // makes conflict.
    let advanced = if base_version == 0 {
        sqlx::query(
            "INSERT INTO app_state_versions (phone, collection, version) VALUES ($1, $2, $3) \
             ON CONFLICT (phone, collection) DO UPDATE SET version = excluded.version \
             WHERE app_state_versions.version = 0",
        )
    } else {
        sqlx::query(
            "UPDATE app_state_versions SET version = $3 \
             WHERE phone = $1 AND collection = $2 AND version = $3 - 1",
        )
    }
    .bind(phone.as_str())
    .bind(collection)
    .bind(new)
    .execute(&mut *conn)
    .await
    .map_err(db)?
    .rows_affected();
    if advanced == 0 {
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM app_state_versions WHERE phone = $1 AND collection = $2",
        )
        .bind(phone.as_str())
        .bind(collection)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
        return Err(StoreError::AppStateConflict {
            current: dec_u64("app-state version", current.unwrap_or(0))?,
        });
    }
    sqlx::query(
        "INSERT INTO app_state_patches (phone, collection, version, patch) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (phone, collection, version) DO UPDATE SET patch = excluded.patch",
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
            "SELECT version FROM app_state_snapshots WHERE phone = $1 AND collection = $2",
        )
        .bind(phone.as_str())
        .bind(collection)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
        if let Some(previous) = previous {
            sqlx::query(
                "DELETE FROM app_state_patches WHERE phone = $1 AND collection = $2 AND version <= $3",
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
             VALUES ($1, $2, $3, $4) ON CONFLICT (phone, collection) DO UPDATE SET \
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

/// Stores a message with one call of `natter_enqueue` (one round trip), on the pool (a transaction of
/// its own) or inside the caller's transaction.
async fn enqueue_on<'e, E>(exec: E, msg: &NewMessage) -> StoreResult<EnqueueOutcome>
where
    E: sqlx::PgExecutor<'e>,
{
    let ts = checked_i64("server_ts_ms", msg.server_ts_ms)?;
    let expires = checked_i64("expires_at_ms", msg.expires_at_ms)?;
    let n = msg.envelopes.len();
    let mut phones = Vec::with_capacity(n);
    let mut devices = Vec::with_capacity(n);
    let mut olm_types = Vec::with_capacity(n);
    let mut ciphertexts: Vec<&[u8]> = Vec::with_capacity(n);
    for env in &msg.envelopes {
        phones.push(env.phone.as_str());
        devices.push(dev(env.device_id));
        olm_types.push(i64::from(env.olm_type));
        ciphertexts.push(env.ciphertext.as_slice());
    }
    let rows = sqlx::query(
        "SELECT out_seq, out_first_ts FROM natter_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(msg.sender.as_str())
    .bind(dev(msg.sender_device))
    .bind(msg.message_id.as_bytes().as_slice())
    .bind(ts)
    .bind(expires)
    .bind(msg.retry.map(|r| r.of.as_bytes().to_vec()))
    .bind(i64::from(msg.retry.map_or(0, |r| r.attempt)))
    .bind(&phones)
    .bind(&devices)
    .bind(&olm_types)
    .bind(&ciphertexts)
    .fetch_all(exec)
    .await
    .map_err(db_device)?;
    let mut seqs = Vec::with_capacity(rows.len());
    for row in &rows {
        let seq: Option<i64> = row.try_get(0).map_err(db)?;
        match seq {
            Some(seq) => seqs.push(dec_u64("seq", seq)?),
            None => {
                let first: Option<i64> = row.try_get(1).map_err(db)?;
                return Ok(EnqueueOutcome::Duplicate {
                    server_ts_ms: dec_u64("server_ts_ms", first.unwrap_or(-1))?,
                });
            }
        }
    }
    if seqs.len() != n {
        return Err(StoreError::Corrupt(format!(
            "natter_enqueue returned {} seqs for {n} envelopes",
            seqs.len()
        )));
    }
    let stored = msg
        .envelopes
        .iter()
        .zip(seqs)
        .map(|(env, seq)| QueuedEnvelope {
            seq,
            phone: env.phone.clone(),
            device_id: env.device_id,
            sender: msg.sender.clone(),
            sender_device: msg.sender_device,
            message_id: msg.message_id,
            server_ts_ms: msg.server_ts_ms,
            olm_type: env.olm_type,
            ciphertext: env.ciphertext.clone(),
            retry: msg.retry,
        })
        .collect();
    Ok(EnqueueOutcome::Stored(stored))
}

/// Creates (`expected` None) or replaces (if the stored version is `expected`) a group with its members,
/// and stores the announcement, in the caller's transaction. The group row is locked first (then the
/// announcement's device rows, as every enqueue does), so two nodes changing one group serialize and the
/// second sees the first's version.
async fn write_group(
    conn: &mut PgConnection,
    expected: Option<u64>,
    state: &GroupState,
    announcement: &NewMessage,
) -> StoreResult<GroupWritten> {
    let g = &state.group;
    let id = g.id.as_bytes().as_slice();
    let version = checked_i64("group version", g.version)?;
    let created = checked_i64("created_at_ms", g.created_at_ms)?;
    let mut phones = Vec::with_capacity(state.members.len());
    let mut admins = Vec::with_capacity(state.members.len());
    let mut added = Vec::with_capacity(state.members.len());
    for m in &state.members {
        phones.push(m.phone.as_str());
        admins.push(m.admin);
        added.push(checked_i64("added_at_version", m.added_at_version)?);
    }
    match expected {
        None => {
            if state.members.is_empty() {
                // Nothing to create; an id in use is still a conflict.
                let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM groups WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db)?;
                if exists.is_some() {
                    return Err(StoreError::Conflict);
                }
            } else {
                let inserted = sqlx::query(
                    "INSERT INTO groups (id, name, description, version, all_members_may_edit, \
                     created_at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                )
                .bind(id)
                .bind(g.name.as_str())
                .bind(g.description.as_str())
                .bind(version)
                .bind(g.all_members_may_edit)
                .bind(created)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                if inserted.rows_affected() == 0 {
                    return Err(StoreError::Conflict);
                }
            }
        }
        Some(want) => {
            let stored: Option<i64> =
                sqlx::query_scalar("SELECT version FROM groups WHERE id = $1 FOR UPDATE")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db)?;
            let Some(have) = stored else {
                return Err(StoreError::NoSuchGroup);
            };
            if dec_u64("group version", have)? != want {
                return Err(StoreError::Conflict);
            }
            sqlx::query("DELETE FROM group_members WHERE group_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            if state.members.is_empty() {
                sqlx::query("DELETE FROM groups WHERE id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(db)?;
            } else {
                sqlx::query(
                    "UPDATE groups SET name = $2, description = $3, version = $4, \
                     all_members_may_edit = $5 WHERE id = $1",
                )
                .bind(id)
                .bind(g.name.as_str())
                .bind(g.description.as_str())
                .bind(version)
                .bind(g.all_members_may_edit)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            }
        }
    }
    if !state.members.is_empty() {
        sqlx::query(
            "INSERT INTO group_members (group_id, phone, admin, added_at_version) \
             SELECT $1, t.phone, t.admin, t.added \
             FROM unnest($2::text[], $3::boolean[], $4::bigint[]) AS t (phone, admin, added)",
        )
        .bind(id)
        .bind(&phones)
        .bind(&admins)
        .bind(&added)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(match enqueue_on(&mut *conn, announcement).await? {
        EnqueueOutcome::Stored(queued) => queued,
        EnqueueOutcome::Duplicate { .. } => Vec::new(),
    })
}

fn dec_group_id(bytes: &[u8]) -> StoreResult<GroupId> {
    GroupId::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

type GroupRow = (Vec<u8>, String, String, i64, bool, i64);

#[async_trait]
impl Store for PgStore {
    async fn close(&self) {
        self.pool.close().await;
    }

    async fn save_code(&self, code: &CodeRecord) -> StoreResult<()> {
        let sent = checked_i64("sent_at_ms", code.sent_at_ms)?;
        let expires = checked_i64("expires_at_ms", code.expires_at_ms)?;
        sqlx::query(
            "INSERT INTO codes (phone, code_hash, sent_at_ms, expires_at_ms, attempts) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (phone) DO UPDATE SET \
             code_hash = excluded.code_hash, sent_at_ms = excluded.sent_at_ms, \
             expires_at_ms = excluded.expires_at_ms, attempts = excluded.attempts",
        )
        .bind(code.phone.as_str())
        .bind(code.code_hash.as_slice())
        .bind(sent)
        .bind(expires)
        .bind(i64::from(code.attempts))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn get_code(&self, phone: &PhoneNumber) -> StoreResult<Option<CodeRecord>> {
        let row: Option<CodeRow> = sqlx::query_as(
            "SELECT phone, code_hash, sent_at_ms, expires_at_ms, attempts FROM codes WHERE phone = $1",
        )
        .bind(phone.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(code_from_row).transpose()
    }

    async fn add_code_attempt(&self, phone: &PhoneNumber) -> StoreResult<u32> {
        let attempts: Option<i64> = sqlx::query_scalar(
            "UPDATE codes SET attempts = LEAST(attempts + 1, 4294967295) WHERE phone = $1 \
             RETURNING attempts",
        )
        .bind(phone.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        attempts.map_or(Ok(0), |n| dec_u32("attempts", n))
    }

    async fn remove_code(&self, phone: &PhoneNumber) -> StoreResult<()> {
        sqlx::query("DELETE FROM codes WHERE phone = $1")
            .bind(phone.as_str())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn create_account(&self, new: &NewAccount) -> StoreResult<Vec<DeviceId>> {
        in_tx!(self.pool, |conn| create_account(conn, new))
    }

    async fn get_account(&self, phone: &PhoneNumber) -> StoreResult<Option<AccountRecord>> {
        let row: Option<AccountRow> = sqlx::query_as(
            "SELECT phone, account_key, device_list, device_list_version, created_at_ms \
             FROM accounts WHERE phone = $1",
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
             WHERE phone = $1 AND device_id = $2",
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
             WHERE phone = $1 ORDER BY device_id",
        )
        .bind(phone.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(device_from_row).collect()
    }

    async fn update_devices(
        &self,
        phone: &PhoneNumber,
        update: &DeviceListUpdate,
    ) -> StoreResult<()> {
        in_tx!(self.pool, |conn| update_devices(conn, phone, update))
    }

    async fn remove_device(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<()> {
        in_tx!(self.pool, |conn| remove_devices(conn, phone, &[device_id]))
    }

    async fn stale_companions(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<(PhoneNumber, DeviceId)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT c.phone, c.device_id FROM devices c \
             JOIN devices p ON p.phone = c.phone AND p.device_id = 1 \
             WHERE c.device_id <> 1 AND p.last_seen_ms < $1 \
             ORDER BY c.phone, c.device_id LIMIT $2",
        )
        .bind(saturating_i64(cutoff_ms))
        .bind(limit_i64(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(phone, device)| Ok((dec_phone(&phone)?, dec_device(device)?)))
            .collect()
    }

    async fn touch_device(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        now_ms: u64,
    ) -> StoreResult<()> {
        let now = checked_i64("now_ms", now_ms)?;
        let res =
            sqlx::query("UPDATE devices SET last_seen_ms = $3 WHERE phone = $1 AND device_id = $2")
                .bind(phone.as_str())
                .bind(dev(device_id))
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(db)?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchDevice);
        }
        Ok(())
    }

    async fn add_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        keys: &[PreKeyRecord],
    ) -> StoreResult<u32> {
        in_tx!(self.pool, |conn| add_one_time_keys(
            conn, phone, device_id, keys
        ))
    }

    async fn set_fallback_key(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
        key: &PreKeyRecord,
    ) -> StoreResult<()> {
        // The foreign key rejects an unknown device (mapped to NoSuchDevice).
        sqlx::query(
            "INSERT INTO fallback_keys (phone, device_id, key_id, key, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (phone, device_id) DO UPDATE SET \
             key_id = excluded.key_id, key = excluded.key, signature = excluded.signature",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .bind(key.key_id.as_str())
        .bind(key.key.as_slice())
        .bind(key.signature.as_slice())
        .execute(&self.pool)
        .await
        .map_err(db_device)?;
        Ok(())
    }

    async fn count_one_time_keys(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<u32> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        count_keys(&mut conn, phone, device_id).await
    }

    async fn claim_prekey(
        &self,
        phone: &PhoneNumber,
        device_id: DeviceId,
    ) -> StoreResult<Option<ClaimedPreKey>> {
        in_tx!(self.pool, |conn| claim_prekey(conn, phone, device_id))
    }

    async fn enqueue(&self, msg: NewMessage) -> StoreResult<EnqueueOutcome> {
        // One statement, so one transaction on its own; a deadlock (which the function's lock order
        // prevents) would be retried.
        let mut attempt = 1;
        loop {
            match enqueue_on(&self.pool, &msg).await {
                Err(e) if attempt < MAX_ATTEMPTS && is_transient(&e) => attempt += 1,
                other => return other,
            }
        }
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
             retry_of, retry_attempt FROM queue WHERE phone = $1 AND device_id = $2 AND seq > $3 \
             ORDER BY seq LIMIT $4",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .bind(saturating_i64(after_seq))
        .bind(limit_i64(limit))
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

    async fn queued_bytes(&self, phone: &PhoneNumber, device_id: DeviceId) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(octet_length(ciphertext)), 0)::BIGINT FROM queue \
             WHERE phone = $1 AND device_id = $2",
        )
        .bind(phone.as_str())
        .bind(dev(device_id))
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn ack(&self, phone: &PhoneNumber, device_id: DeviceId, seqs: &[u64]) -> StoreResult<()> {
        // Seqs above i64::MAX were never handed out.
        let seqs: Vec<i64> = seqs.iter().filter_map(|s| i64::try_from(*s).ok()).collect();
        if seqs.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM queue WHERE phone = $1 AND device_id = $2 AND seq = ANY($3)")
            .bind(phone.as_str())
            .bind(dev(device_id))
            .bind(&seqs)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn expire(&self, now_ms: u64) -> StoreResult<u64> {
        let now = saturating_i64(now_ms);
        in_tx!(self.pool, |conn| async move {
            let gone = sqlx::query("DELETE FROM queue WHERE expires_at_ms <= $1")
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db)?
                .rows_affected();
            sqlx::query("DELETE FROM message_ids WHERE expires_at_ms <= $1")
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            Ok::<_, StoreError>(gone)
        })
    }

    async fn create_blob(
        &self,
        blob: &BlobRecord,
        quota_bytes: u64,
        now_ms: u64,
    ) -> StoreResult<bool> {
        in_tx!(self.pool, |conn| create_blob(
            conn,
            blob,
            quota_bytes,
            now_ms
        ))
    }

    async fn get_blob(&self, id: &str) -> StoreResult<Option<BlobRecord>> {
        let row: Option<BlobRow> = sqlx::query_as(
            "SELECT id, owner, size, uploaded, complete, created_at_ms, expires_at_ms FROM blobs \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(blob_from_row).transpose()
    }

    async fn set_blob_offset(&self, id: &str, offset: u64) -> StoreResult<()> {
        let offset = checked_i64("offset", offset)?;
        blob_update(
            &self.pool,
            "UPDATE blobs SET uploaded = $2 WHERE id = $1",
            id,
            offset,
        )
        .await
    }

    async fn complete_blob(&self, id: &str) -> StoreResult<()> {
        blob_update(
            &self.pool,
            "UPDATE blobs SET uploaded = size, complete = TRUE WHERE id = $1 AND $2 = $2",
            id,
            0,
        )
        .await
    }

    async fn extend_blob(&self, id: &str, expires_at_ms: u64) -> StoreResult<()> {
        let expires = checked_i64("expires_at_ms", expires_at_ms)?;
        blob_update(
            &self.pool,
            "UPDATE blobs SET expires_at_ms = GREATEST(expires_at_ms, $2) WHERE id = $1",
            id,
            expires,
        )
        .await
    }

    async fn blob_usage(&self, owner: &PhoneNumber, now_ms: u64) -> StoreResult<u64> {
        blob_usage(&self.pool, owner, now_ms).await
    }

    async fn delete_expired_blobs(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<String>> {
        // SKIP LOCKED: two nodes sweeping at once take different rows, so each id is returned once.
        sqlx::query_scalar(
            "DELETE FROM blobs WHERE id IN (SELECT id FROM blobs WHERE expires_at_ms <= $1 \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id",
        )
        .bind(saturating_i64(now_ms))
        .bind(limit_i64(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    async fn push_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        base_version: u64,
        patch: &[u8],
        snapshot: Option<&[u8]>,
    ) -> StoreResult<u64> {
        in_tx!(self.pool, |conn| push_app_state(
            conn,
            phone,
            collection,
            base_version,
            patch,
            snapshot
        ))
    }

    async fn fetch_app_state(
        &self,
        phone: &PhoneNumber,
        collection: &str,
        after_version: u64,
        max_patches: usize,
    ) -> StoreResult<AppStateFetch> {
        // One snapshot of the database for the three reads, so a push in between cannot tear them.
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let version: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM app_state_versions WHERE phone = $1 AND collection = $2",
        )
        .bind(phone.as_str())
        .bind(collection)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(version) = version else {
            return Ok(AppStateFetch::default());
        };
        let version = dec_u64("app-state version", version)?;
        let after = saturating_i64(after_version);
        let snap: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT version, snapshot FROM app_state_snapshots \
             WHERE phone = $1 AND collection = $2 AND version > $3",
        )
        .bind(phone.as_str())
        .bind(collection)
        .bind(after)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let from = snap.as_ref().map_or(after, |(v, _)| *v);
        let snapshot = snap
            .map(|(v, b)| Ok::<_, StoreError>((dec_u64("snapshot version", v)?, b)))
            .transpose()?;
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT version, patch FROM app_state_patches \
             WHERE phone = $1 AND collection = $2 AND version > $3 ORDER BY version LIMIT $4",
        )
        .bind(phone.as_str())
        .bind(collection)
        .bind(from)
        .bind(limit_i64(max_patches))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
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
        let list: Vec<&str> = numbers.iter().map(|n| n.as_str()).collect();
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT phone FROM accounts WHERE phone = ANY($1) ORDER BY phone")
                .bind(&list)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.iter().map(|p| dec_phone(p)).collect()
    }

    async fn add_contacts(&self, owner: &PhoneNumber, contacts: &[PhoneNumber]) -> StoreResult<()> {
        let list: Vec<&str> = contacts.iter().map(|n| n.as_str()).collect();
        sqlx::query(
            "INSERT INTO contacts (owner, contact) SELECT $1, c FROM unnest($2::text[]) AS c \
             ON CONFLICT DO NOTHING",
        )
        .bind(owner.as_str())
        .bind(&list)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn remove_contacts(
        &self,
        owner: &PhoneNumber,
        contacts: &[PhoneNumber],
    ) -> StoreResult<()> {
        let list: Vec<&str> = contacts.iter().map(|n| n.as_str()).collect();
        sqlx::query("DELETE FROM contacts WHERE owner = $1 AND contact = ANY($2)")
            .bind(owner.as_str())
            .bind(&list)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn is_contact(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool> {
        self.pair_exists(
            "SELECT 1 FROM contacts WHERE owner = $1 AND contact = $2",
            owner,
            other,
        )
        .await
    }

    async fn set_profile(
        &self,
        owner: &PhoneNumber,
        ciphertext: &[u8],
        now_ms: u64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO profiles (phone, ciphertext, updated_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (phone) DO UPDATE SET ciphertext = excluded.ciphertext, \
             updated_ms = excluded.updated_ms",
        )
        .bind(owner.as_str())
        .bind(ciphertext)
        .bind(checked_i64("updated_ms", now_ms)?)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn get_profile(&self, owner: &PhoneNumber) -> StoreResult<Option<(Vec<u8>, u64)>> {
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT ciphertext, updated_ms FROM profiles WHERE phone = $1")
                .bind(owner.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        row.map(|(c, at)| Ok((c, dec_u64("profile time", at)?)))
            .transpose()
    }

    async fn set_privacy(&self, owner: &PhoneNumber, privacy: PrivacyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO privacy (phone, last_seen, read_receipts_off) VALUES ($1, $2, $3) \
             ON CONFLICT (phone) DO UPDATE SET last_seen = excluded.last_seen, \
             read_receipts_off = excluded.read_receipts_off",
        )
        .bind(owner.as_str())
        .bind(privacy.last_seen as i64)
        .bind(privacy.read_receipts_off)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn get_privacy(&self, owner: &PhoneNumber) -> StoreResult<PrivacyRecord> {
        let row: Option<(i64, bool)> =
            sqlx::query_as("SELECT last_seen, read_receipts_off FROM privacy WHERE phone = $1")
                .bind(owner.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        let Some((last_seen, read_receipts_off)) = row else {
            return Ok(PrivacyRecord::default());
        };
        Ok(PrivacyRecord {
            last_seen: i32::try_from(last_seen)
                .ok()
                .and_then(|v| natter_proto::social::Visibility::try_from(v).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("privacy setting {last_seen}")))?,
            read_receipts_off,
        })
    }

    async fn set_blocked(
        &self,
        owner: &PhoneNumber,
        other: &PhoneNumber,
        blocked: bool,
    ) -> StoreResult<()> {
        let sql = if blocked {
            "INSERT INTO blocks (owner, blocked) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM blocks WHERE owner = $1 AND blocked = $2"
        };
        sqlx::query(sql)
            .bind(owner.as_str())
            .bind(other.as_str())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn is_blocked(&self, owner: &PhoneNumber, other: &PhoneNumber) -> StoreResult<bool> {
        self.pair_exists(
            "SELECT 1 FROM blocks WHERE owner = $1 AND blocked = $2",
            owner,
            other,
        )
        .await
    }

    async fn blocked(&self, owner: &PhoneNumber) -> StoreResult<Vec<PhoneNumber>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT blocked FROM blocks WHERE owner = $1 ORDER BY blocked")
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
        in_tx!(self.pool, |conn| write_group(
            conn,
            None,
            state,
            &announcement
        ))
    }

    async fn get_group(&self, id: &GroupId) -> StoreResult<Option<GroupState>> {
        // One snapshot for the group row and its members.
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let row: Option<GroupRow> = sqlx::query_as(
            "SELECT id, name, description, version, all_members_may_edit, created_at_ms \
             FROM groups WHERE id = $1",
        )
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some((gid, name, description, version, all, created)) = row else {
            return Ok(None);
        };
        let rows: Vec<(String, bool, i64)> = sqlx::query_as(
            "SELECT phone, admin, added_at_version FROM group_members WHERE group_id = $1 \
             ORDER BY phone",
        )
        .bind(id.as_bytes().as_slice())
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let members = rows
            .into_iter()
            .map(|(phone, admin, added)| {
                Ok(GroupMemberRecord {
                    phone: dec_phone(&phone)?,
                    admin,
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
                all_members_may_edit: all,
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
        in_tx!(self.pool, |conn| write_group(
            conn,
            Some(expected_version),
            state,
            &announcement
        ))
    }

    async fn group_devices(&self, id: &GroupId) -> StoreResult<Vec<(PhoneNumber, DeviceId)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT d.phone, d.device_id FROM group_members m JOIN devices d ON d.phone = m.phone \
             WHERE m.group_id = $1 ORDER BY d.phone, d.device_id",
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
            "SELECT group_id FROM group_members WHERE phone = $1 ORDER BY group_id",
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
             WHERE m.group_id = $1 AND b.blocked = $2 ORDER BY m.phone",
        )
        .bind(id.as_bytes().as_slice())
        .bind(sender.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|p| dec_phone(p)).collect()
    }
}

pub mod testing {
    //! A fresh PostgreSQL schema per test run (`natter_test_<random>`), dropped when the guard goes, so
    //! tests running in parallel never share tables. Used by the store suite, natterd's end-to-end tests
    //! and the store benchmark.

    use std::str::FromStr;
    use std::time::Duration;

    use sqlx::postgres::{PgConnectOptions, PgConnection};
    use sqlx::{AssertSqlSafe, Connection};

    use super::PgUrl;

    /// Environment variable with the server tests use; default [`DEFAULT_URL`].
    pub const URL_ENV: &str = "NATTER_TEST_POSTGRES";
    /// The server tests use when [`URL_ENV`] is not set.
    pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    /// When set to `1`, an unreachable server fails the test instead of skipping it (CI sets it).
    pub const REQUIRE_ENV: &str = "NATTER_REQUIRE_CLUSTER";

    /// Why a test schema could not be made.
    #[derive(Debug, thiserror::Error)]
    pub enum TestDbError {
        /// PostgreSQL is not reachable and [`REQUIRE_ENV`] is set.
        #[error("PostgreSQL not reachable at {url} ({reason}) and {REQUIRE_ENV}=1")]
        Unreachable {
            /// The URL tried (password hidden).
            url: String,
            /// The connection error.
            reason: String,
        },
        /// The server answered but creating the schema failed.
        #[error("creating the test schema: {0}")]
        Sql(#[from] sqlx::Error),
        /// The URL does not parse.
        #[error(transparent)]
        Url(#[from] super::PgUrlError),
        /// No randomness for the schema name.
        #[error("random schema name: {0}")]
        Random(String),
    }

    /// A schema that exists until this guard is dropped.
    #[derive(Debug)]
    pub struct TestSchema {
        admin: String,
        schema: String,
        url: String,
    }

    impl TestSchema {
        /// Creates `natter_test_<random>` on the server in [`URL_ENV`]. `Ok(None)` (after printing
        /// "skipped: PostgreSQL not reachable at ...") when the server cannot be reached and
        /// [`REQUIRE_ENV`] is not `1`.
        pub async fn create() -> Result<Option<TestSchema>, TestDbError> {
            let admin = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned());
            let parsed = PgUrl::from_str(&admin)?;
            let opts = PgConnectOptions::from_str(&parsed.driver_url)?;
            let connected =
                tokio::time::timeout(Duration::from_secs(5), PgConnection::connect_with(&opts))
                    .await;
            let mut conn = match connected {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return unreachable(&parsed, e.to_string()),
                Err(_) => return unreachable(&parsed, "timed out".into()),
            };
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| TestDbError::Random(e.to_string()))?;
            let schema = format!("natter_test_{}", hex::encode(bytes));
            sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&mut conn)
                .await?;
            let _ = conn.close().await;
            let sep = if parsed.driver_url.contains('?') {
                '&'
            } else {
                '?'
            };
            // The application name marks this schema's connections, so that dropping the schema can
            // end the ones a test left behind (their pool's tasks may never run again).
            let url = format!(
                "{}{sep}options=-c%20search_path%3D{schema}&application_name={schema}",
                parsed.driver_url
            );
            Ok(Some(TestSchema {
                admin: parsed.driver_url,
                schema,
                url,
            }))
        }

        /// A store URL whose connections use this schema.
        pub fn url(&self) -> &str {
            &self.url
        }

        /// The schema's name.
        pub fn name(&self) -> &str {
            &self.schema
        }
    }

    fn unreachable(url: &PgUrl, reason: String) -> Result<Option<TestSchema>, TestDbError> {
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            return Err(TestDbError::Unreachable {
                url: url.redacted(),
                reason,
            });
        }
        eprintln!(
            "skipped: PostgreSQL not reachable at {} ({reason}); set {URL_ENV} to point at one, \
             {REQUIRE_ENV}=1 to fail instead",
            url.redacted()
        );
        Ok(None)
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            // Drop runs outside async code (maybe during a panic): a thread with its own runtime.
            let admin = self.admin.clone();
            let schema = self.schema.clone();
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let mut conn = PgConnection::connect(&admin)
                        .await
                        .map_err(|e| e.to_string())?;
                    // Connections still open in the schema (a dropped pool closes its connections
                    // asynchronously, on a runtime that may be gone) would hold locks the DROP waits
                    // for: end them first, and never wait on a lock for long.
                    sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(&schema)
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                    sqlx::query("SET lock_timeout = '10s'")
                        .execute(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    sqlx::query(AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                    let _ = conn.close().await;
                    Ok::<(), String>(())
                })
            })
            .join();
            if let Ok(Err(e)) = dropped {
                eprintln!("dropping test schema {}: {e}", self.schema);
            }
        }
    }
}

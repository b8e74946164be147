//! natter-sqlite: the SQLite plumbing that natterd's store and the client's store share. Today that is
//! [`migrate`]: numbered migrations (`NNN_name.sql`, `include_str!`'d by each store), each applied once in
//! its own transaction, with the applied versions kept in a `schema_version` table, and a database written
//! by a newer build refused rather than misread.

use sqlx::SqliteConnection;

/// One schema step.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its number; migrations run in ascending order, each once.
    pub version: i64,
    /// The SQL, usually `include_str!("…/NNN_name.sql")`.
    pub sql: &'static str,
}

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database was written by a newer build.
    #[error(
        "database schema version {found} is newer than this build of Natter knows ({known}); upgrade it"
    )]
    TooNew {
        /// The database's version.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// SQLite failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

/// Brings the database up to the last of `migrations` (which must be in ascending order).
pub async fn migrate(
    conn: &mut SqliteConnection,
    migrations: &[Migration],
) -> Result<(), MigrateError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL PRIMARY KEY, \
         applied_at_ms INTEGER NOT NULL) STRICT",
    )
    .execute(&mut *conn)
    .await?;
    let known = migrations.last().map_or(0, |m| m.version);
    for m in migrations {
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        let applied = apply(conn, m, known).await;
        let end = if applied.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let ended = sqlx::query(end).execute(&mut *conn).await;
        applied?;
        ended?;
    }
    Ok(())
}

/// Applies one migration inside the caller's transaction, unless the database already has it. The version
/// is read inside the transaction so that two processes opening a new file at once do not both apply it.
async fn apply(conn: &mut SqliteConnection, m: &Migration, known: i64) -> Result<(), MigrateError> {
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
        .fetch_one(&mut *conn)
        .await?;
    let current = current.unwrap_or(0);
    if current > known {
        return Err(MigrateError::TooNew {
            found: current,
            known,
        });
    }
    if current >= m.version {
        return Ok(());
    }
    sqlx::raw_sql(m.sql).execute(&mut *conn).await?;
    sqlx::query("INSERT INTO schema_version (version, applied_at_ms) VALUES (?1, ?2)")
        .bind(m.version)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    const V1: Migration = Migration {
        version: 1,
        sql: "CREATE TABLE a (x INTEGER);",
    };
    const V2: Migration = Migration {
        version: 2,
        sql: "CREATE TABLE b (y INTEGER);",
    };
    const BROKEN: Migration = Migration {
        version: 3,
        sql: "CREATE TABLE c (z INTEGER); THIS IS NOT SQL;",
    };

    async fn open(path: &std::path::Path) -> SqliteConnection {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        SqliteConnection::connect(&url).await.unwrap()
    }

    async fn versions(conn: &mut SqliteConnection) -> Vec<i64> {
        sqlx::query_scalar("SELECT version FROM schema_version ORDER BY version")
            .fetch_all(conn)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn migrations_apply_once_in_order_and_newer_databases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = open(&path).await;
        migrate(&mut conn, &[V1]).await.unwrap();
        migrate(&mut conn, &[V1, V2]).await.unwrap();
        migrate(&mut conn, &[V1, V2]).await.unwrap();
        assert_eq!(versions(&mut conn).await, vec![1, 2]);
        let too_new = migrate(&mut conn, &[V1]).await;
        assert!(matches!(
            too_new,
            Err(MigrateError::TooNew { found: 2, known: 1 })
        ));
    }

    #[tokio::test]
    async fn a_failing_migration_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("db")).await;
        assert!(migrate(&mut conn, &[V1, V2, BROKEN]).await.is_err());
        assert_eq!(versions(&mut conn).await, vec![1, 2]);
        let c: Option<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE name = 'c'")
                .fetch_optional(&mut conn)
                .await
                .unwrap();
        assert_eq!(c, None, "the failed migration's table was rolled back");
    }
}

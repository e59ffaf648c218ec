//! The store: every read and write of persistent state goes through here.
//!
//! One code path for SQLite (the embedded default) and PostgreSQL. The rest
//! of the crate never builds SQL; it calls the typed methods in this module's
//! files, one file per table.

mod audit;
mod direct;
mod executions;
mod keys;
mod leases;
mod notify;
mod owners;
mod providers;
mod replicas;
mod sandboxes;
mod templates;
mod workers;

pub use audit::{AuditFilter, NewAuditEvent};
pub use executions::ExecutionFinish;
pub use owners::{OwnerQuota, OwnerScope, QuotaSummary, overrides_quota};
pub use sandboxes::{LiveCounts, PageCursor, PoolClaim, ReconcileRow, SandboxFilter, SandboxQuery};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbBackend, DbErr};

/// Why a store call failed. Database errors are internal errors: they are
/// never the client's fault, so the API maps them to 500 and logs them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// Statements run so far; lets tests prove that batching bounds the
    /// number of queries a GraphQL page costs.
    queries: Arc<AtomicU64>,
    /// The control-plane replica using this handle: written on every
    /// sandbox transition it makes (empty for tools such as `stacyvm keys`).
    replica: Arc<str>,
    /// Reads of a SQLite file without sqlx's threads (see `direct`).
    direct: Option<Arc<direct::Direct>>,
    /// Statements the direct reader answered (a subset of `queries`).
    direct_reads: Arc<AtomicU64>,
}

impl Store {
    /// Connects to `url` (`sqlite://...` or `postgres://...`). SQLite runs in
    /// WAL mode with a busy timeout, so readers never block the writer and a
    /// process killed mid-write leaves a consistent database.
    pub async fn connect(url: &str) -> StoreResult<Store> {
        let mut options = ConnectOptions::new(url.to_string());
        options
            .sqlx_logging(false)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(30));
        if url.starts_with("sqlite:") {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            options
                .map_sqlx_sqlite_opts(|o| {
                    o.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal)
                        .busy_timeout(Duration::from_secs(10))
                        .foreign_keys(true)
                        .create_if_missing(true)
                })
                // SQLite has one writer; a small pool avoids lock convoys.
                .max_connections(4);
        } else {
            options.max_connections(16);
        }
        let mut db = Database::connect(options)
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        let queries = Arc::new(AtomicU64::new(0));
        let counter = queries.clone();
        db.set_metric_callback(move |info| {
            counter.fetch_add(1, Ordering::Relaxed);
            // `RUST_LOG=stacyvm::sql=trace` shows every statement with its
            // time (what a request costs in queries).
            tracing::trace!(
                target: "stacyvm::sql",
                elapsed_us = info.elapsed.as_micros() as u64,
                failed = info.failed,
                sql = %info.statement.sql,
            );
        });
        Ok(Store {
            db,
            queries,
            replica: Arc::from(""),
            direct: direct::Direct::for_url(url).map(Arc::new),
            direct_reads: Arc::new(AtomicU64::new(0)),
        })
    }

    /// This handle, acting for replica `id`.
    pub fn with_replica(mut self, id: &str) -> Store {
        self.replica = Arc::from(id);
        self
    }

    /// The replica this handle acts for.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether several replicas may share this database (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    /// Applies pending migrations. On PostgreSQL, under a session advisory
    /// lock: replicas starting together migrate one after the other (the
    /// later ones find nothing to do).
    pub async fn migrate(&self) -> StoreResult<()> {
        if !self.is_shared() {
            Migrator::up(&self.db, None).await?;
            return Ok(());
        }
        use sea_orm::sqlx;
        const MIGRATION_LOCK: i64 = 0x5374_6163_794d_6967; // "StacyMig"
        let sqlx_err = |e: sqlx::Error| StoreError::Db(DbErr::Custom(e.to_string()));
        let pool = self.db.get_postgres_connection_pool();
        let mut holder = pool.acquire().await.map_err(sqlx_err)?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *holder)
            .await
            .map_err(sqlx_err)?;
        let migrated = Migrator::up(&self.db, None).await;
        if let Err(e) = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *holder)
            .await
        {
            // The lock goes with the connection: drop it instead of
            // returning it to the pool.
            tracing::warn!(error = %e, "cannot release the migration lock; closing its connection");
            holder.detach();
        }
        migrated?;
        Ok(())
    }

    /// "sqlite" or "postgres", for logs and health answers.
    pub fn backend_name(&self) -> &'static str {
        match self.db.get_database_backend() {
            DbBackend::Sqlite => "sqlite",
            DbBackend::Postgres => "postgres",
            _ => "other",
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        self.db.ping().await?;
        Ok(())
    }

    /// How many statements this store has run.
    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    fn conn(&self) -> &DatabaseConnection {
        &self.db
    }

    /// This handle without the direct reader: every statement through
    /// sea-orm and sqlx. For comparing the two paths.
    pub fn without_direct_reads(mut self) -> Store {
        self.direct = None;
        self
    }

    /// Statements the direct SQLite reader answered so far.
    pub fn direct_read_count(&self) -> u64 {
        self.direct_reads.load(Ordering::Relaxed)
    }

    /// Counts and traces a statement run outside sea-orm, as the metric
    /// callback does for the others.
    fn note_direct(&self, stmt: &sea_orm::Statement, started: std::time::Instant, failed: bool) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(
            target: "stacyvm::sql",
            elapsed_us = started.elapsed().as_micros() as u64,
            failed,
            direct = true,
            sql = %stmt.sql,
        );
    }

    /// Rows of `stmt` read directly from the SQLite file (`blocking`: on a
    /// blocking thread, for reads of many rows), or `None` when there is
    /// no direct reader or it could not answer; the caller then runs the
    /// statement through sea-orm. Best effort: a failure is logged.
    async fn read_direct<T: Send + 'static>(
        &self,
        stmt: sea_orm::Statement,
        columns: &'static [&'static str],
        blocking: bool,
        decode: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Option<Vec<T>> {
        let direct = self.direct.as_ref()?;
        let started = std::time::Instant::now();
        let rows = if blocking {
            direct
                .rows_blocking(stmt.clone(), Some(columns), decode)
                .await
        } else {
            direct.rows(&stmt, Some(columns), decode)
        };
        self.note_direct(&stmt, started, rows.is_err());
        match rows {
            Ok(rows) => {
                self.direct_reads.fetch_add(1, Ordering::Relaxed);
                Some(rows)
            }
            Err(e) => {
                // A statement the reader cannot bind or decode is a defect
                // (tests fail on it); a busy or damaged file is not.
                debug_assert!(e.is_transient(), "direct read of {}: {e}", stmt.sql);
                tracing::debug!(error = %e, sql = %stmt.sql, "direct read failed; reading through sqlx");
                None
            }
        }
    }
}

/// The file of a SQLite database URL (`sqlite://path?mode=rwc`),
/// percent-decoded as sqlx decodes it (`my%20data.db` is `my data.db`);
/// `None` for other databases, in-memory ones and paths that do not
/// decode to UTF-8 (sqlx refuses those too).
pub fn sqlite_file(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    let memory = path.is_empty() || path.contains(":memory:") || rest.contains("mode=memory");
    if memory {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?;
    Some(decoded.into_owned())
}

/// Rows strictly after `cursor` in (created_at, id) order.
pub(crate) fn after_cursor<C: sea_orm::ColumnTrait>(
    created_at: C,
    id: C,
    cursor: &PageCursor,
) -> sea_orm::Condition {
    use sea_orm::Condition;
    Condition::any().add(created_at.gt(cursor.created_at)).add(
        Condition::all()
            .add(created_at.eq(cursor.created_at))
            .add(id.gt(cursor.id.as_str())),
    )
}

/// Converts a stored JSON object into a string map, refusing anything else.
pub fn json_to_map(
    value: &serde_json::Value,
) -> StoreResult<std::collections::BTreeMap<String, String>> {
    serde_json::from_value(value.clone()).map_err(|e| StoreError::Corrupt(e.to_string()))
}

//! Reads of the embedded SQLite database without sqlx's connection threads.
//!
//! sqlx runs every SQLite connection on a thread of its own and passes each
//! statement and each row across channels, so a point read costs several
//! thread wake-ups: most of what `GET /api/v1/sandboxes/{id}` cost, and
//! most of a reconcile pass at 10,000 records. Here the same statement,
//! built by sea-orm (so its SQL cannot drift from the sqlx path), runs on a
//! connection of a small pool, on the calling thread.
//!
//! Nothing changes in what a read sees: in WAL mode a reader never waits for
//! the writer and sees the last commit, whichever connection it uses, as the
//! reads through sqlx's pool already did. These connections never write
//! (`query_only`). Whatever this path cannot do (a busy database, a value it
//! does not bind, columns it does not expect) is an error, and the store then
//! runs the statement through sqlx as before.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Row, types::Value as SqlValue};
use sea_orm::{Statement, Value};

/// Idle connections kept; more are opened while more threads read at once,
/// and closed after.
const MAX_IDLE: usize = 8;

/// Connections open at once, idle or in use: past it a read goes through
/// sqlx (whose pool has its own bound) instead of opening another.
const MAX_OPEN: usize = 16;

/// How long a read waits on a locked database (WAL recovery, a checkpoint
/// that truncates) before it gives up and goes through sqlx, which waits
/// without holding a thread.
const BUSY_TIMEOUT: Duration = Duration::from_millis(20);

/// Why a direct read did not answer; the caller falls back to sqlx.
#[derive(Debug, thiserror::Error)]
pub(super) enum DirectError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot bind a {0} parameter")]
    Unbindable(&'static str),
    #[error("the statement's columns are not the ones expected: {0:?}")]
    Columns(Vec<String>),
    #[error("a read in a blocking task failed: {0}")]
    Task(String),
    #[error("{MAX_OPEN} direct connections are in use")]
    Busy,
}

impl DirectError {
    /// Whether the same read could succeed another time (the database was
    /// busy or unreadable), as opposed to a statement this reader cannot
    /// run at all.
    pub(super) fn is_transient(&self) -> bool {
        matches!(
            self,
            DirectError::Sqlite(_) | DirectError::Task(_) | DirectError::Busy
        )
    }
}

/// A pool of read-only connections on one SQLite file.
#[derive(Debug)]
pub(super) struct Direct {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Connections open, idle or in use (at most [`MAX_OPEN`]).
    open: std::sync::atomic::AtomicUsize,
}

impl Direct {
    /// A reader for the database at `url`, when it is a SQLite file (not an
    /// in-memory database, which other connections cannot see).
    pub(super) fn for_url(url: &str) -> Option<Direct> {
        let path = super::sqlite_file(url)?;
        Some(Direct {
            path: PathBuf::from(path),
            idle: Mutex::new(Vec::new()),
            open: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn open(path: &Path) -> Result<Connection, DirectError> {
        // NO_MUTEX: a connection is used by one thread at a time (it is
        // taken out of the pool while in use).
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "query_only", true)?;
        // 1 MiB of page cache each, not the default 2.
        conn.pragma_update(None, "cache_size", -1024)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }

    /// Runs `f` on a pooled connection.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DirectError>,
    ) -> Result<T, DirectError> {
        use std::sync::atomic::Ordering;
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let taken = self
                    .open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < MAX_OPEN).then_some(n + 1)
                    });
                if taken.is_err() {
                    return Err(DirectError::Busy);
                }
                match Self::open(&self.path) {
                    Ok(conn) => conn,
                    Err(e) => {
                        self.open.fetch_sub(1, Ordering::AcqRel);
                        return Err(e);
                    }
                }
            }
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        } else {
            drop(idle);
            drop(conn);
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
        out
    }

    /// Every row of `stmt`, decoded by `decode`, on this thread: for reads
    /// of a few rows (a record by id, a page), which cost microseconds.
    /// `columns`, when given, is the column list the statement must return,
    /// in order (what `decode` reads by position).
    pub(super) fn rows<T>(
        &self,
        stmt: &Statement,
        columns: Option<&[&str]>,
        decode: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, DirectError> {
        let params = bind(stmt)?;
        self.with_conn(|conn| {
            let mut prepared = conn.prepare_cached(&stmt.sql)?;
            if let Some(expected) = columns {
                let names = prepared.column_names();
                if names.len() != expected.len() || names.iter().zip(expected).any(|(a, b)| a != b)
                {
                    return Err(DirectError::Columns(
                        names.into_iter().map(str::to_string).collect(),
                    ));
                }
            }
            let rows = prepared.query_map(rusqlite::params_from_iter(params), decode)?;
            Ok(rows.collect::<rusqlite::Result<Vec<T>>>()?)
        })
    }

    /// [`Direct::rows`] on a blocking thread: for reads of many rows, which
    /// would hold an async worker for milliseconds.
    pub(super) async fn rows_blocking<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        stmt: Statement,
        columns: Option<&'static [&'static str]>,
        decode: fn(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, DirectError> {
        let direct = self.clone();
        tokio::task::spawn_blocking(move || direct.rows(&stmt, columns, decode))
            .await
            .map_err(|e| DirectError::Task(e.to_string()))?
    }
}

/// The statement's parameters as SQLite values, encoded as sqlx encodes
/// them (timestamps as RFC 3339 text, so comparisons with stored text agree).
fn bind(stmt: &Statement) -> Result<Vec<SqlValue>, DirectError> {
    let Some(values) = &stmt.values else {
        return Ok(Vec::new());
    };
    values.0.iter().map(sql_value).collect()
}

fn sql_value(value: &Value) -> Result<SqlValue, DirectError> {
    use chrono::SecondsFormat;
    fn opt<T>(v: &Option<T>, f: impl FnOnce(&T) -> SqlValue) -> SqlValue {
        v.as_ref().map_or(SqlValue::Null, f)
    }
    Ok(match value {
        Value::Bool(v) => opt(v, |b| SqlValue::Integer(i64::from(*b))),
        Value::TinyInt(v) => opt(v, |i| SqlValue::Integer(i64::from(*i))),
        Value::SmallInt(v) => opt(v, |i| SqlValue::Integer(i64::from(*i))),
        Value::Int(v) => opt(v, |i| SqlValue::Integer(i64::from(*i))),
        Value::BigInt(v) => opt(v, |i| SqlValue::Integer(*i)),
        Value::TinyUnsigned(v) => opt(v, |i| SqlValue::Integer(i64::from(*i))),
        Value::SmallUnsigned(v) => opt(v, |i| SqlValue::Integer(i64::from(*i))),
        Value::Unsigned(v) => opt(v, |i| SqlValue::Integer(i64::from(*i))),
        // LIMIT and OFFSET bind as u64; SQLite's integers are i64.
        Value::BigUnsigned(Some(i)) => match i64::try_from(*i) {
            Ok(i) => SqlValue::Integer(i),
            Err(_) => return Err(DirectError::Unbindable("u64 above i64::MAX")),
        },
        Value::BigUnsigned(None) => SqlValue::Null,
        Value::String(v) => opt(v, |s| SqlValue::Text(s.to_string())),
        Value::ChronoDateTimeUtc(v) => opt(v, |t| {
            SqlValue::Text(t.to_rfc3339_opts(SecondsFormat::AutoSi, false))
        }),
        Value::Json(v) => opt(v, |j| SqlValue::Text(j.to_string())),
        other => return Err(DirectError::Unbindable(value_kind(other))),
    })
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Float(_) | Value::Double(_) => "float",
        Value::Bytes(_) => "bytes",
        _ => "non-scalar",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{DbBackend, Values};

    #[test]
    fn timestamps_bind_as_sqlx_writes_them() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-03T11:17:24.243684462+00:00")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let stmt = Statement {
            sql: "SELECT ?".into(),
            values: Some(Values(vec![
                Value::ChronoDateTimeUtc(Some(at)),
                Value::Int(None),
                Value::BigUnsigned(Some(50)),
            ])),
            db_backend: DbBackend::Sqlite,
        };
        assert_eq!(
            bind(&stmt).unwrap(),
            vec![
                SqlValue::Text("2026-12-03T11:17:24.243684462+00:00".into()),
                SqlValue::Null,
                SqlValue::Integer(50),
            ]
        );
    }

    fn reader_on_a_table() -> (tempfile::TempDir, Direct) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (a TEXT, b INTEGER); INSERT INTO t VALUES ('x', 1);")
            .unwrap();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        (dir, Direct::for_url(&url).unwrap())
    }

    fn stmt(sql: &str) -> Statement {
        Statement {
            sql: sql.into(),
            values: None,
            db_backend: DbBackend::Sqlite,
        }
    }

    #[test]
    fn rows_are_decoded_only_from_the_expected_columns() {
        let (_dir, direct) = reader_on_a_table();
        let decode = |r: &Row<'_>| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?));
        let rows = direct.rows(&stmt("SELECT a, b FROM t"), Some(&["a", "b"]), decode);
        assert_eq!(rows.unwrap(), vec![("x".to_string(), 1)]);
        let swapped = direct.rows(&stmt("SELECT b, a FROM t"), Some(&["a", "b"]), decode);
        assert!(matches!(swapped, Err(DirectError::Columns(c)) if c == ["b", "a"]));
    }

    #[test]
    fn the_reader_cannot_write() {
        let (_dir, direct) = reader_on_a_table();
        let write = direct.rows(&stmt("DELETE FROM t RETURNING a"), None, |r| {
            r.get::<_, String>(0)
        });
        assert!(matches!(write, Err(DirectError::Sqlite(_))), "{write:?}");
        let still = direct.rows(&stmt("SELECT a FROM t"), None, |r| r.get::<_, String>(0));
        assert_eq!(still.unwrap(), ["x"]);
    }

    #[test]
    fn open_connections_are_bounded() {
        let (_dir, direct) = reader_on_a_table();
        // Each level holds a connection while the next asks for one.
        fn hold(direct: &Direct, depth: usize) -> Result<usize, DirectError> {
            direct.with_conn(|_| match hold(direct, depth + 1) {
                Err(DirectError::Busy) => Ok(depth + 1),
                other => other,
            })
        }
        assert_eq!(
            hold(&direct, 0).unwrap(),
            MAX_OPEN,
            "the next one was refused"
        );
        // All given back: reads work again, on the kept idle ones.
        let rows = direct.rows(&stmt("SELECT a FROM t"), None, |r| r.get::<_, String>(0));
        assert_eq!(rows.unwrap(), ["x"]);
        let open = direct.open.load(std::sync::atomic::Ordering::Acquire);
        assert_eq!(open, MAX_IDLE, "the rest were closed");
    }

    #[test]
    fn percent_encoded_paths_are_the_files_sqlx_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my data?.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (a TEXT); INSERT INTO t VALUES ('y');")
            .unwrap();
        let encoded = path
            .to_string_lossy()
            .replace(' ', "%20")
            .replace('?', "%3F");
        let direct = Direct::for_url(&format!("sqlite://{encoded}?mode=rwc")).unwrap();
        let rows = direct.rows(&stmt("SELECT a FROM t"), None, |r| r.get::<_, String>(0));
        assert_eq!(rows.unwrap(), ["y"]);
    }

    #[test]
    fn in_memory_databases_have_no_reader() {
        for url in [
            "sqlite::memory:",
            "sqlite://file?mode=memory",
            "postgres://h/db",
        ] {
            assert!(Direct::for_url(url).is_none(), "{url}");
        }
    }

    #[test]
    fn unbindable_values_are_refused() {
        let stmt = Statement {
            sql: "SELECT ?".into(),
            values: Some(Values(vec![Value::Double(Some(1.5))])),
            db_backend: DbBackend::Sqlite,
        };
        assert!(matches!(bind(&stmt), Err(DirectError::Unbindable("float"))));
    }
}

//! SQLite: the dialect of the store in a file.
//!
//! SQLite allows one writer at a time. Commit batches (the hot path) go to a thread of its own
//! with its own connection ([`SqliteCommitter`]), which writes a batch in one call; the other
//! writes go through a sqlx pool of exactly one connection, and the two take turns. A write
//! transaction begins IMMEDIATE, taking the write lock (across processes too) before it reads:
//! that lock is what makes read-decide-write atomic, so rows need no locks of their own. Reads
//! use a separate pool and, in WAL mode, never wait for the writer.
//!
//! `sqlite::memory:` is a database in a temporary file, removed with the store: the commit
//! thread needs a second connection to the same database, which an in-memory database cannot
//! give.

use std::str::FromStr;
use std::time::Duration;

use dagmesh_proto::v1::{Mutation, Run, RunEvent, mutation};
use prost::Message;
use sqlx::Pool;
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::records::{encode_event, encode_run, encode_step, seq_bound};
use super::sqlite_commit::SqliteCommitter;
use super::{Dialect, PgTls, SqliteStore};
use crate::StoreError;
use crate::error::is_unique_violation;
use crate::store::micros;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a statement waits for a lock held by another process before failing as busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent readers. Small: SQLite reads are fast and the machine may be small.
const READERS: u32 = 4;

impl Dialect for Sqlite {
    const BACKEND: &'static str = "sqlite";
    // IMMEDIATE takes the write lock up front, so the transaction cannot fail half-way because
    // another process started writing.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const FOR_UPDATE: &'static str = "";
    const FOR_SHARE: &'static str = "";
    // SQLite has no clock of its own that other processes share any better.
    const CLOCK: Option<&'static str> = None;

    type Local = SqliteLocal;

    async fn connect(url: &str) -> Result<(Pool<Sqlite>, Pool<Sqlite>, SqliteLocal), StoreError> {
        let mut options = SqliteConnectOptions::from_str(url)
            .map_err(|err| StoreError::InvalidArgument(format!("invalid SQLite URL: {err}")))?;
        let scratch = if is_in_memory(url) {
            let dir = tempfile::Builder::new()
                .prefix("dagmesh-memory-")
                .tempdir()
                .map_err(|err| {
                    StoreError::Unavailable(format!(
                        "cannot create a temporary file for sqlite::memory: {err}"
                    ))
                })?;
            options = SqliteConnectOptions::new().filename(dir.path().join("memory.db"));
            Some(dir)
        } else {
            None
        };
        // WAL: readers and the writer do not block each other. synchronous = NORMAL: no fsync
        // per commit, so a commit survives a killed process but a power loss or OS crash may
        // lose the last commits (the file itself stays consistent). A scratch database
        // (`sqlite::memory:`) need not survive anything.
        let synchronous = if scratch.is_some() {
            SqliteSynchronous::Off
        } else {
            SqliteSynchronous::Normal
        };
        options = options
            .create_if_missing(true)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(false)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous);
        let path = options.get_filename().to_path_buf();
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|err| {
                StoreError::Unavailable(format!(
                    "cannot create directory {} for the SQLite database: {err}",
                    parent.display()
                ))
            })?;
        }

        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options)
            .await?;
        let committer = SqliteCommitter::open(&path, BUSY_TIMEOUT, scratch.is_none())?;
        Ok((
            write,
            read,
            SqliteLocal {
                committer,
                _scratch: scratch,
            },
        ))
    }

    fn committer(local: &SqliteLocal) -> Option<&SqliteCommitter> {
        Some(&local.committer)
    }

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn apply<'a>(
        conn: &'a mut SqliteConnection,
        mutations: &'a mut [Mutation],
    ) -> Result<(), StoreError> {
        apply_batch(conn, mutations).await
    }

    async fn tls(_pool: &Pool<Sqlite>) -> Result<Option<PgTls>, StoreError> {
        Ok(None)
    }
}

/// What a SQLite store holds besides its pools.
pub struct SqliteLocal {
    committer: SqliteCommitter,
    /// The directory of a `sqlite::memory:` database, removed with the store.
    _scratch: Option<tempfile::TempDir>,
}

impl SqliteLocal {
    /// The directory of a `sqlite::memory:` database.
    #[cfg(test)]
    pub(super) fn scratch_dir(&self) -> Option<&std::path::Path> {
        self._scratch.as_ref().map(tempfile::TempDir::path)
    }
}

fn is_in_memory(url: &str) -> bool {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    rest.starts_with(":memory:") || rest.contains("mode=memory")
}

/// Updates a run's row (the common case: a state change); the idempotency key, partition and
/// tags are fixed at creation, so an update leaves them alone.
pub(super) const UPDATE_RUN: &str =
    "UPDATE runs SET workflow = $1, state = $2, body = $3 WHERE run_id = $4";
/// Inserts a new run's row.
pub(super) const INSERT_RUN: &str = "INSERT INTO runs \
     (run_id, workflow, state, idempotency_key, body, partition_no) \
     VALUES ($1, $2, $3, $4, $5, $6)";
/// Inserts one tag of a new run.
pub(super) const INSERT_TAG: &str = "INSERT INTO run_tags (run_id, key, value) VALUES ($1, $2, $3)";
/// Inserts or replaces a step row, keyed by (run_id, step_id); a step's position is kept.
pub(super) const UPSERT_STEP: &str = "INSERT INTO steps (run_id, step_id, body) \
     VALUES ($1, $2, $3) \
     ON CONFLICT (run_id, step_id) DO UPDATE SET body = excluded.body";
/// Appends one event of a run's log.
pub(super) const INSERT_EVENT: &str = "INSERT INTO events (run_id, seq, body) VALUES ($1, $2, $3)";
/// Inserts or replaces a step cache entry.
pub(super) const UPSERT_CACHE_ENTRY: &str = "INSERT INTO step_cache (key, expires_at, body) \
     VALUES ($1, $2, $3) \
     ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at, body = excluded.body";

/// The idempotency key's unique violation, named.
pub(super) fn key_taken(key: &str) -> StoreError {
    StoreError::AlreadyExists(format!(
        "idempotency key {key:?} is already used by another run"
    ))
}

/// An event's unique violation, named.
pub(super) fn event_exists(event: &RunEvent) -> StoreError {
    StoreError::AlreadyExists(format!(
        "event {} of run {:?} already exists",
        event.seq, event.run_id
    ))
}

/// Applies a validated batch inside the caller's sqlx transaction, one row per statement.
/// Only a quarantine takes this path, which reads the run in the same transaction; commit
/// batches go to the [`SqliteCommitter`], which writes the same rows with the same statements.
async fn apply_batch(
    conn: &mut SqliteConnection,
    mutations: &mut [Mutation],
) -> Result<(), StoreError> {
    let mut cached = false;
    for m in mutations {
        match &mut m.mutation {
            Some(mutation::Mutation::PutRun(run)) => put_run(conn, run).await?,
            Some(mutation::Mutation::PutStep(step)) => {
                let body = encode_step(step);
                sqlx::query(UPSERT_STEP)
                    .bind(&step.run_id)
                    .bind(&step.step_id)
                    .bind(body)
                    .execute(&mut *conn)
                    .await?;
            }
            Some(mutation::Mutation::AppendEvent(event)) => {
                let body = encode_event(event);
                sqlx::query(INSERT_EVENT)
                    .bind(&event.run_id)
                    .bind(seq_bound(event.seq))
                    .bind(body)
                    .execute(&mut *conn)
                    .await
                    .map_err(|err| {
                        if is_unique_violation(&err) {
                            event_exists(event)
                        } else {
                            err.into()
                        }
                    })?;
            }
            Some(mutation::Mutation::PutWebhookDelivery(delivery)) => {
                SqliteStore::put_delivery(conn, delivery).await?;
            }
            Some(mutation::Mutation::PutCacheEntry(entry)) => {
                sqlx::query(UPSERT_CACHE_ENTRY)
                    .bind(&entry.key)
                    .bind(entry.expires_at.as_ref().map_or(0, micros))
                    .bind(entry.encode_to_vec())
                    .execute(&mut *conn)
                    .await?;
                cached = true;
            }
            None => {} // rejected by validate_mutations
        }
    }
    if cached {
        SqliteStore::drop_expired_cache(conn).await?;
    }
    Ok(())
}

async fn put_run(conn: &mut SqliteConnection, run: &Run) -> Result<(), StoreError> {
    let body = encode_run(run);
    let updated = sqlx::query(UPDATE_RUN)
        .bind(&run.workflow)
        .bind(run.state)
        .bind(&body)
        .bind(&run.run_id)
        .execute(&mut *conn)
        .await?;
    if updated.rows_affected() > 0 {
        return Ok(());
    }
    let key = (!run.idempotency_key.is_empty()).then_some(run.idempotency_key.as_str());
    sqlx::query(INSERT_RUN)
        .bind(&run.run_id)
        .bind(&run.workflow)
        .bind(run.state)
        .bind(key)
        .bind(body)
        .bind(i64::from(run.partition))
        .execute(&mut *conn)
        .await
        .map_err(|err| match key {
            Some(key) if is_unique_violation(&err) => key_taken(key),
            _ => err.into(),
        })?;
    for (key, value) in &run.tags {
        sqlx::query(INSERT_TAG)
            .bind(&run.run_id)
            .bind(key)
            .bind(value)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

//! SQLite: the dialect of the store in a file (or in memory).
//!
//! SQLite allows one writer at a time. All writes go through a pool of exactly one connection,
//! so they queue in the pool instead of failing with SQLITE_BUSY, and a write transaction
//! begins IMMEDIATE, taking the write lock (across processes too) before it reads: that lock is
//! what makes read-decide-write atomic, so rows need no locks of their own. Reads use a
//! separate pool and, in WAL mode, never wait for the writer. Statements are prepared once per
//! connection (sqlx caches them), and SQLite runs in-process, so a commit is one cheap call per
//! mutation; steps and events still go in multi-row statements, since each statement is a
//! round trip to sqlx's SQLite thread.

use std::str::FromStr;
use std::time::Duration;

use dagmesh_proto::v1::{Mutation, Run, RunEvent, Step, mutation};
use prost::Message;
use sqlx::Pool;
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::records::{encode_run, seq_bound};
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

    async fn connect(url: &str) -> Result<(Pool<Sqlite>, Pool<Sqlite>), StoreError> {
        let in_memory = is_in_memory(url);
        let mut options = SqliteConnectOptions::from_str(url)
            .map_err(|err| StoreError::InvalidArgument(format!("invalid SQLite URL: {err}")))?
            .create_if_missing(true)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(false);
        if !in_memory {
            // WAL: readers and the writer do not block each other. synchronous = NORMAL: no
            // fsync per commit, so a commit survives a killed process but a power loss or OS
            // crash may lose the last commits (the file itself stays consistent).
            options = options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|err| {
                    StoreError::Unavailable(format!(
                        "cannot create directory {} for the SQLite database: {err}",
                        parent.display()
                    ))
                })?;
            }
        }

        // The writer connection is never recycled: an in-memory database would vanish with it.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        // An in-memory database lives and dies with its one connection: readers share it.
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(READERS)
                .connect_with(options)
                .await?
        };
        Ok((write, read))
    }

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn apply<'a>(
        conn: &'a mut SqliteConnection,
        mutations: &'a [Mutation],
    ) -> Result<(), StoreError> {
        apply_batch(conn, mutations).await
    }

    async fn tls(_pool: &Pool<Sqlite>) -> Result<Option<PgTls>, StoreError> {
        Ok(None)
    }
}

fn is_in_memory(url: &str) -> bool {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    rest.starts_with(":memory:") || rest.contains("mode=memory")
}

async fn put_run(conn: &mut SqliteConnection, run: &Run) -> Result<(), StoreError> {
    let body = encode_run(run);
    // Updates are the common case (state changes), inserts happen once per run; trying the
    // update first keeps the common case at one statement and tells us when to write tags.
    // The idempotency key, partition and tags are fixed at creation, so the update leaves them
    // alone.
    let updated =
        sqlx::query("UPDATE runs SET workflow = $1, state = $2, body = $3 WHERE run_id = $4")
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
    sqlx::query(
        "INSERT INTO runs (run_id, workflow, state, idempotency_key, body, partition_no) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&run.run_id)
    .bind(&run.workflow)
    .bind(run.state)
    .bind(key)
    .bind(body)
    .bind(i64::from(run.partition))
    .execute(&mut *conn)
    .await
    .map_err(|err| match key {
        Some(key) if is_unique_violation(&err) => StoreError::AlreadyExists(format!(
            "idempotency key {key:?} is already used by another run"
        )),
        _ => err.into(),
    })?;
    for (key, value) in &run.tags {
        sqlx::query("INSERT INTO run_tags (run_id, key, value) VALUES ($1, $2, $3)")
            .bind(&run.run_id)
            .bind(key)
            .bind(value)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Rows per multi-row statement: 3 parameters each stays far below SQLite's variable limit.
const ROWS_PER_STATEMENT: usize = 500;

/// Inserts or replaces step rows, keyed by (run_id, step_id); a step's position is kept.
async fn put_steps(conn: &mut SqliteConnection, steps: &[&Step]) -> Result<(), StoreError> {
    let mut query =
        sqlx::QueryBuilder::<sqlx::Sqlite>::new("INSERT INTO steps (run_id, step_id, body) ");
    query.push_values(steps, |mut row, step| {
        row.push_bind(&step.run_id)
            .push_bind(&step.step_id)
            .push_bind(step.encode_to_vec());
    });
    query.push(" ON CONFLICT (run_id, step_id) DO UPDATE SET body = excluded.body");
    query.build().execute(conn).await?;
    Ok(())
}

async fn append_events(
    conn: &mut SqliteConnection,
    events: &[&RunEvent],
) -> Result<(), StoreError> {
    let mut query =
        sqlx::QueryBuilder::<sqlx::Sqlite>::new("INSERT INTO events (run_id, seq, body) ");
    query.push_values(events, |mut row, event| {
        row.push_bind(&event.run_id)
            .push_bind(seq_bound(event.seq))
            .push_bind(event.encode_to_vec());
    });
    match query.build().execute(&mut *conn).await {
        Ok(_) => Ok(()),
        Err(err) if is_unique_violation(&err) => Err(duplicate_event(conn, events).await),
        Err(err) => Err(err.into()),
    }
}

/// Names the event that broke uniqueness (the error path only; the transaction rolls back).
async fn duplicate_event(conn: &mut SqliteConnection, events: &[&RunEvent]) -> StoreError {
    let mut seen = std::collections::HashSet::new();
    for event in events {
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM events WHERE run_id = $1 AND seq = $2")
                .bind(&event.run_id)
                .bind(seq_bound(event.seq))
                .fetch_optional(&mut *conn)
                .await
                .unwrap_or(None);
        if stored.is_some() || !seen.insert((event.run_id.as_str(), event.seq)) {
            return StoreError::AlreadyExists(format!(
                "event {} of run {:?} already exists",
                event.seq, event.run_id
            ));
        }
    }
    StoreError::AlreadyExists("an event of this batch already exists".into())
}

/// Applies a validated commit batch inside the caller's transaction.
async fn apply_batch(
    conn: &mut SqliteConnection,
    mutations: &[Mutation],
) -> Result<(), StoreError> {
    // Runs first (they carry the idempotency check), then steps and events in multi-row
    // statements: each statement is a round trip to sqlx's SQLite thread, and a batch of a
    // busy executor holds thousands of rows.
    let mut steps = Vec::new();
    let mut events = Vec::new();
    let mut cached = false;
    for m in mutations {
        match &m.mutation {
            Some(mutation::Mutation::PutRun(run)) => put_run(conn, run).await?,
            Some(mutation::Mutation::PutStep(step)) => steps.push(step),
            Some(mutation::Mutation::AppendEvent(event)) => events.push(event),
            Some(mutation::Mutation::PutWebhookDelivery(delivery)) => {
                SqliteStore::put_delivery(conn, delivery).await?;
            }
            Some(mutation::Mutation::PutCacheEntry(entry)) => {
                let expires_at = entry.expires_at.as_ref().map_or(0, micros);
                sqlx::query(
                    "INSERT INTO step_cache (key, expires_at, body) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at, \
                     body = excluded.body",
                )
                .bind(&entry.key)
                .bind(expires_at)
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
    for chunk in steps.chunks(ROWS_PER_STATEMENT) {
        put_steps(conn, chunk).await?;
    }
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        append_events(conn, chunk).await?;
    }
    Ok(())
}

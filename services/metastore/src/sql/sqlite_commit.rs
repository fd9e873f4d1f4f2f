//! The SQLite batch commit in one call: a thread of its own holds a second connection to the
//! database file and writes a whole commit batch (fence check, rows, COMMIT) with prepared
//! statements, answering once per batch.
//!
//! Why not sqlx: each sqlx statement is a round trip to sqlx's SQLite thread (a channel send,
//! a thread wake-up and one back), and a commit is about six of them; on a small machine those
//! wake-ups were most of a commit's time and most of a chain step's (a commit took ~0.5 ms of a
//! 0.75 ms step). Here a commit is one round trip, and SQLite runs the statements in-process.
//!
//! A second thread checkpoints (copies the write-ahead log into the database file) every
//! quarter second, so that commits pay for little of it (see [`checkpoint_while_open`]).
//!
//! The two connections (sqlx's writer for the rare writes, this one for commits) take turns
//! through [`SqliteCommitter::turn`], so in this process they never wait on each other's
//! database lock; another process is still excluded by SQLite's own lock (`BEGIN IMMEDIATE`,
//! with the same busy timeout as the sqlx connections).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use dagmesh_proto::v1::{CacheEntry, Mutation, Run, RunEvent, Step, WebhookDelivery, mutation};
use prost::Message;
use rusqlite::{
    CachedStatement, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};
use tokio::sync::{OwnedMutexGuard, oneshot};

use super::records::{encode_event, encode_run, encode_step, seq_bound};
use super::sqlite::{
    INSERT_EVENT, INSERT_RUN, INSERT_TAG, UPDATE_RUN, UPSERT_CACHE_ENTRY, UPSERT_STEP,
    event_exists, key_taken,
};
use super::store::{DELETE_EXPIRED_CACHE, UPSERT_DELIVERY};
use crate::StoreError;
use crate::error::{sqlite_code_is_bad_value, sqlite_code_is_transient};
use crate::store::{Lease, epoch_bound, fenced, micros, now_micros};

/// One commit batch for the thread, with the channel its outcome goes back on.
struct Request {
    fences: Vec<Lease>,
    mutations: Vec<Mutation>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Commits batches on a thread of its own (see the module documentation).
pub struct SqliteCommitter {
    /// `None` once closed.
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    /// Answered when the thread has closed its connection.
    closed: Mutex<Option<oneshot::Receiver<()>>>,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteCommitter {
    /// Opens a connection to the (existing, migrated) database file at `path` on a new thread.
    /// `durable`: `synchronous = NORMAL` as the sqlx connections have (a commit survives a
    /// killed process); otherwise `OFF` (a scratch database).
    pub(super) fn open(
        path: &Path,
        busy_timeout: Duration,
        durable: bool,
    ) -> Result<Self, StoreError> {
        let open = |what: &str| {
            Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )
            .and_then(|connection| {
                connection.busy_timeout(busy_timeout)?;
                connection.pragma_update(
                    None,
                    "synchronous",
                    if durable { "NORMAL" } else { "OFF" },
                )?;
                connection.pragma_update(None, "foreign_keys", "OFF")?;
                Ok(connection)
            })
            .map_err(|err| {
                StoreError::Unavailable(format!(
                    "cannot open {} for the {what} thread: {err}",
                    path.display()
                ))
            })
        };
        let connection = open("commit")?;
        // The checkpointer copies most of the log; a commit finishes the copy only once the log
        // holds this many pages (16 MiB), so that the log is restarted: a checkpoint that runs
        // beside a stream of commits never catches up with them on its own.
        connection
            .pragma_update(None, "wal_autocheckpoint", WAL_RESTART_PAGES)
            .map_err(|err| StoreError::Unavailable(format!("cannot configure SQLite: {err}")))?;
        // The statements of a commit, with room to spare.
        connection.set_prepared_statement_cache_capacity(32);
        let checkpoints = open("checkpoint")?;
        let committed = Arc::new(AtomicU64::new(0));
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let checkpointer = {
            let committed = committed.clone();
            std::thread::Builder::new()
                .name("sqlite-checkpoint".into())
                .spawn(move || checkpoint_while_open(&checkpoints, &committed, &stopped))
                .map_err(|err| {
                    StoreError::Unavailable(format!(
                        "cannot start the SQLite checkpoint thread: {err}"
                    ))
                })?
        };
        let (requests, inbox) = mpsc::channel::<Request>();
        let (closed_tx, closed) = oneshot::channel();
        std::thread::Builder::new()
            .name("sqlite-commit".into())
            .spawn(move || {
                let mut connection = connection;
                while let Ok(mut request) = inbox.recv() {
                    let outcome = commit(&mut connection, &request.fences, &mut request.mutations);
                    if outcome.is_ok() {
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = request.reply.send(outcome); // the caller may have gone
                }
                drop(connection);
                drop(stop_checkpoints);
                let _ = checkpointer.join();
                let _ = closed_tx.send(());
            })
            .map_err(|err| {
                StoreError::Unavailable(format!("cannot start the SQLite commit thread: {err}"))
            })?;
        Ok(SqliteCommitter {
            requests: Mutex::new(Some(requests)),
            closed: Mutex::new(Some(closed)),
            turn: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// This process's turn to write: held by a commit here and by every sqlx write
    /// transaction, so that the two connections never wait on each other's database lock.
    pub(super) async fn turn(&self) -> OwnedMutexGuard<()> {
        self.turn.clone().lock_owned().await
    }

    /// Checks `fences` and writes `mutations` (validated by the caller) in one transaction.
    /// A caller that goes away does not cancel a commit already handed to the thread.
    pub(super) async fn commit(
        &self,
        fences: &[Lease],
        mutations: Vec<Mutation>,
    ) -> Result<(), StoreError> {
        let _turn = self.turn().await;
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            fences: fences.to_vec(),
            mutations,
            reply,
        };
        let sent = match &*self.requests.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(requests) => requests.send(request).is_ok(),
            None => false,
        };
        if !sent {
            return Err(closed());
        }
        outcome.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Stops the thread after the commits already handed to it, and closes its connection.
    pub(super) async fn close(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(closed) = closed {
            let _ = closed.await;
        }
    }
}

/// The size of the write-ahead log, in pages, at which a commit completes the checkpoint.
const WAL_RESTART_PAGES: i64 = 4096;

/// How often the checkpointer looks for new commits to copy into the database file. Often, so
/// that the commit that completes the checkpoint at [`WAL_RESTART_PAGES`] finds little left to
/// copy: at 250 ms a fan-out logged ~6,000 pages between two passes, and the commit thread
/// copied most of them itself (a sixth of its time).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(25);

/// Copies committed pages from the write-ahead log into the database file, mostly off the
/// commit path: with SQLite's automatic checkpoint alone, one commit in ~170 paid for copying
/// a thousand pages and an fsync (about 15% of a chain step). PASSIVE never blocks a writer or
/// a reader. Runs until `stop` is dropped.
fn checkpoint_while_open(
    connection: &Connection,
    committed: &AtomicU64,
    stop: &mpsc::Receiver<()>,
) {
    let mut checkpointed = 0;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let now = committed.load(Ordering::Relaxed);
        if now == checkpointed {
            continue;
        }
        match connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(0)
        }) {
            // 1: busy (another checkpoint in progress); try again next round.
            Ok(0) => checkpointed = now,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "SQLite checkpoint failed; retrying"),
        }
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the metadata store is closed".into())
}

/// One commit batch, in one transaction that rolls back (on drop) at the first error.
fn commit(
    connection: &mut Connection,
    fences: &[Lease],
    mutations: &mut [Mutation],
) -> Result<(), StoreError> {
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(store_error)?;
    check_fences(&tx, fences)?;
    let mut cached = false;
    // A batch is mostly step rows and events: their statements are taken from the cache once
    // per batch rather than once per row.
    let mut upsert_step = tx.prepare_cached(UPSERT_STEP).map_err(store_error)?;
    let mut insert_event = tx.prepare_cached(INSERT_EVENT).map_err(store_error)?;
    for m in mutations {
        match &mut m.mutation {
            Some(mutation::Mutation::PutRun(run)) => put_run(&tx, run)?,
            Some(mutation::Mutation::PutStep(step)) => put_step(&mut upsert_step, step)?,
            Some(mutation::Mutation::AppendEvent(event)) => append_event(&mut insert_event, event)?,
            Some(mutation::Mutation::PutWebhookDelivery(delivery)) => put_delivery(&tx, delivery)?,
            Some(mutation::Mutation::PutCacheEntry(entry)) => {
                put_cache_entry(&tx, entry)?;
                cached = true;
            }
            None => {} // rejected by validate_mutations
        }
    }
    if cached {
        // A few expired entries go, paid for by the commits that add entries.
        execute(&tx, DELETE_EXPIRED_CACHE, [now_micros()]).map_err(store_error)?;
    }
    // Back to the cache before the transaction ends.
    drop((upsert_step, insert_event));
    tx.commit().map_err(store_error)
}

/// The write lock is held from `BEGIN IMMEDIATE`, so no acquire can move an epoch until the
/// commit.
fn check_fences(tx: &Transaction<'_>, fences: &[Lease]) -> Result<(), StoreError> {
    if fences.is_empty() {
        return Ok(());
    }
    let mut statement = tx
        .prepare_cached("SELECT epoch FROM leases WHERE name = ?1")
        .map_err(store_error)?;
    for fence in fences {
        let current: Option<i64> = statement
            .query_row([fence.name.as_str()], |row| row.get(0))
            .optional()
            .map_err(store_error)?;
        if current != Some(epoch_bound(fence.epoch)) {
            return Err(fenced(fence, current));
        }
    }
    Ok(())
}

fn put_run(tx: &Transaction<'_>, run: &Run) -> Result<(), StoreError> {
    let body = encode_run(run);
    // Updates are the common case; the idempotency key, partition and tags are fixed at
    // creation, so an update leaves them alone.
    let updated = execute(
        tx,
        UPDATE_RUN,
        rusqlite::params![run.workflow, run.state, body, run.run_id],
    )
    .map_err(store_error)?;
    if updated > 0 {
        return Ok(());
    }
    let key = (!run.idempotency_key.is_empty()).then_some(run.idempotency_key.as_str());
    execute(
        tx,
        INSERT_RUN,
        rusqlite::params![
            run.run_id,
            run.workflow,
            run.state,
            key,
            body,
            i64::from(run.partition)
        ],
    )
    .map_err(|err| match key {
        Some(key) if is_unique_violation(&err) => key_taken(key),
        _ => store_error(err),
    })?;
    let mut statement = tx.prepare_cached(INSERT_TAG).map_err(store_error)?;
    for (key, value) in &run.tags {
        statement
            .execute(rusqlite::params![run.run_id, key, value])
            .map_err(store_error)?;
    }
    Ok(())
}

fn put_step(upsert: &mut CachedStatement<'_>, step: &mut Step) -> Result<(), StoreError> {
    let body = encode_step(step);
    upsert
        .execute(rusqlite::params![step.run_id, step.step_id, body])
        .map_err(store_error)?;
    Ok(())
}

fn append_event(insert: &mut CachedStatement<'_>, event: &mut RunEvent) -> Result<(), StoreError> {
    let body = encode_event(event);
    insert
        .execute(rusqlite::params![event.run_id, seq_bound(event.seq), body])
        .map_err(|err| {
            if is_unique_violation(&err) {
                event_exists(event)
            } else {
                store_error(err)
            }
        })?;
    Ok(())
}

fn put_delivery(tx: &Transaction<'_>, delivery: &WebhookDelivery) -> Result<(), StoreError> {
    execute(
        tx,
        UPSERT_DELIVERY,
        rusqlite::params![
            delivery.delivery_id,
            delivery.run_id,
            delivery.state,
            delivery.next_attempt_at.as_ref().map_or(0, micros),
            delivery.created_at.as_ref().map_or(0, micros),
            delivery.encode_to_vec()
        ],
    )
    .map_err(store_error)?;
    Ok(())
}

fn put_cache_entry(tx: &Transaction<'_>, entry: &CacheEntry) -> Result<(), StoreError> {
    execute(
        tx,
        UPSERT_CACHE_ENTRY,
        rusqlite::params![
            entry.key,
            entry.expires_at.as_ref().map_or(0, micros),
            entry.encode_to_vec()
        ],
    )
    .map_err(store_error)?;
    Ok(())
}

/// Runs one of the commit's statements, prepared once per connection.
fn execute(
    tx: &Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    // SQLITE_CONSTRAINT_PRIMARYKEY (1555) and SQLITE_CONSTRAINT_UNIQUE (2067).
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if matches!(e.extended_code, 1555 | 2067))
}

/// The mapping of the sqlx connections' errors (see `StoreError: From<sqlx::Error>`).
fn store_error(err: rusqlite::Error) -> StoreError {
    match &err {
        rusqlite::Error::SqliteFailure(_, _) if is_unique_violation(&err) => {
            StoreError::AlreadyExists(err.to_string())
        }
        rusqlite::Error::SqliteFailure(e, _) if sqlite_code_is_transient(e.extended_code) => {
            StoreError::Unavailable(format!("database busy: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _) if sqlite_code_is_bad_value(e.extended_code) => {
            StoreError::InvalidArgument(format!("the database refused a value: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(
                e.code,
                rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DiskFull
            ) =>
        {
            StoreError::Unavailable(format!("database unavailable: {err}"))
        }
        _ => StoreError::Internal(format!("database error: {err}")),
    }
}

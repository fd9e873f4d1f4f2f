//! SQLite backend.
//!
//! SQLite allows one writer at a time. All writes go through a pool of exactly one connection,
//! so they queue in the pool instead of failing with SQLITE_BUSY; reads use a separate pool and,
//! in WAL mode, never wait for the writer. Statements are prepared once per connection (sqlx
//! caches them), and SQLite runs in-process, so a commit is one cheap call per mutation.

use std::str::FromStr;
use std::time::Duration;

use dagmesh_proto::v1::{
    ActiveRuns, Backfill, CacheEntry, ListRunsRequest, ListRunsResponse, Mutation, Run, RunEvent,
    RunState, Schedule, Step, StoredToken, Trigger, Workflow, WorkflowSpec, mutation,
};
use prost::Message;
use prost_types::Timestamp;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::{
    ListRow, PUT_WORKFLOW_ATTEMPTS, UnionRow, active_runs, active_runs_strict, decode, encode_run,
    event_from_row, list_runs_query, new_workflow, one_run, quarantine_mutations, runs_page,
    seq_bound, validate_spec,
};
use crate::StoreError;
use crate::error::is_unique_violation;
use crate::store::{
    Lease, LeaseRow, MetadataStore, acquire_decision, epoch_bound, event_limit, fenced,
    lease_from_row, now_micros, run_not_found, ttl_micros, validate_lease, validate_mutations,
    workflow_not_found,
};
use crate::store::{
    mark_revoked, micros, name_taken, not_found, schedule_body, schedule_from_row, token_key,
    validate_named,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a statement waits for a lock held by another process before failing as busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent readers. Small: SQLite reads are fast and the machine may be small.
const READERS: u32 = 4;

pub(super) struct SqliteStore {
    /// One connection: the only writer.
    write: SqlitePool,
    /// Readers; the same pool as `write` for an in-memory database, which lives and dies with
    /// its one connection.
    read: SqlitePool,
}

impl SqliteStore {
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
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
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(READERS)
                .connect_with(options)
                .await?
        };
        Ok(SqliteStore { write, read })
    }

    pub(super) async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    /// The union rows of every QUEUED or RUNNING run, by run, then run row first, then steps
    /// in position order.
    async fn active_rows(&self) -> Result<Vec<UnionRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT run_id, 0 AS kind, 0 AS position, '' AS step_id, workflow, state, body \
             FROM runs WHERE state IN (?1, ?2) \
             UNION ALL \
             SELECT s.run_id, 1, s.position, s.step_id, '', 0, s.body FROM steps s \
             JOIN runs r ON r.run_id = s.run_id WHERE r.state IN (?1, ?2) \
             ORDER BY run_id, kind, position",
        )
        .bind(RunState::Queued as i32)
        .bind(RunState::Running as i32)
        .fetch_all(&self.read)
        .await?)
    }

    /// One attempt of `put_workflow`, in one write transaction.
    async fn try_put_workflow(
        &self,
        spec: &WorkflowSpec,
        content_hash: &str,
    ) -> Result<(Workflow, bool), StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let latest: Option<(i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT version, content_hash, body FROM workflows WHERE name = ?1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(&spec.name)
        .fetch_optional(&mut *tx)
        .await?;
        let next = match latest {
            Some((_, hash, body)) if hash == content_hash => {
                let wf = decode(&body, || format!("workflow {:?}", spec.name))?;
                return Ok((wf, false));
            }
            Some((version, _, _)) => version_after(version, &spec.name)?,
            None => 1,
        };
        let wf = new_workflow(spec.clone(), content_hash.to_owned(), next);
        sqlx::query(
            "INSERT INTO workflows (name, version, content_hash, body) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&wf.name)
        .bind(i64::from(next))
        .bind(&wf.content_hash)
        .bind(wf.encode_to_vec())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((wf, true))
    }
}

fn is_in_memory(url: &str) -> bool {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    rest.starts_with(":memory:") || rest.contains("mode=memory")
}

fn version_after(version: i64, name: &str) -> Result<u32, StoreError> {
    u32::try_from(version + 1)
        .map_err(|_| StoreError::Internal(format!("workflow {name:?} has too many versions")))
}

async fn put_run(conn: &mut SqliteConnection, run: &Run) -> Result<(), StoreError> {
    let body = encode_run(run);
    // Updates are the common case (state changes), inserts happen once per run; trying the
    // update first keeps the common case at one statement and tells us when to write tags.
    // The idempotency key and tags are fixed at creation, so the update leaves them alone.
    let updated =
        sqlx::query("UPDATE runs SET workflow = ?1, state = ?2, body = ?3 WHERE run_id = ?4")
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
        "INSERT INTO runs (run_id, workflow, state, idempotency_key, body) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(&run.run_id)
    .bind(&run.workflow)
    .bind(run.state)
    .bind(key)
    .bind(body)
    .execute(&mut *conn)
    .await
    .map_err(|err| match key {
        Some(key) if is_unique_violation(&err) => StoreError::AlreadyExists(format!(
            "idempotency key {key:?} is already used by another run"
        )),
        _ => err.into(),
    })?;
    for (key, value) in &run.tags {
        sqlx::query("INSERT INTO run_tags (run_id, key, value) VALUES (?1, ?2, ?3)")
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
            sqlx::query_scalar("SELECT seq FROM events WHERE run_id = ?1 AND seq = ?2")
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

/// Inserts or replaces one webhook delivery of the outbox.
async fn put_delivery(
    conn: &mut SqliteConnection,
    delivery: &dagmesh_proto::v1::WebhookDelivery,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_deliveries \
         (delivery_id, run_id, state, next_attempt_at, created_at, body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT (delivery_id) DO UPDATE SET state = excluded.state, \
         next_attempt_at = excluded.next_attempt_at, body = excluded.body",
    )
    .bind(&delivery.delivery_id)
    .bind(&delivery.run_id)
    .bind(delivery.state)
    .bind(delivery.next_attempt_at.as_ref().map_or(0, micros))
    .bind(delivery.created_at.as_ref().map_or(0, micros))
    .bind(delivery.encode_to_vec())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Applies a validated commit batch inside the caller's transaction.
async fn apply(conn: &mut SqliteConnection, mutations: &[Mutation]) -> Result<(), StoreError> {
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
                put_delivery(conn, delivery).await?;
            }
            Some(mutation::Mutation::PutCacheEntry(entry)) => {
                let expires_at = entry.expires_at.as_ref().map_or(0, micros);
                sqlx::query(
                    "INSERT INTO step_cache (key, expires_at, body) VALUES (?1, ?2, ?3) \
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
        // Expired entries go a few at a time, paid for by the commits that add entries.
        sqlx::query(
            "DELETE FROM step_cache WHERE key IN \
             (SELECT key FROM step_cache WHERE expires_at < ?1 LIMIT 64)",
        )
        .bind(now_micros())
        .execute(&mut *conn)
        .await?;
    }
    for chunk in steps.chunks(ROWS_PER_STATEMENT) {
        put_steps(conn, chunk).await?;
    }
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        append_events(conn, chunk).await?;
    }
    Ok(())
}

/// The stored epoch of a lease, `None` when it was never taken.
async fn stored_epoch(conn: &mut SqliteConnection, name: &str) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT epoch FROM leases WHERE name = ?1")
            .bind(name)
            .fetch_optional(conn)
            .await?,
    )
}

/// The union rows of one run (see [`UnionRow`]), from one statement so that the run and its
/// steps come from the same snapshot.
const RUN_ROWS: &str = "SELECT run_id, 0 AS kind, 0 AS position, '' AS step_id, workflow, state, \
                        body FROM runs WHERE run_id = ?1 \
                        UNION ALL \
                        SELECT run_id, 1, position, step_id, '', 0, body FROM steps \
                        WHERE run_id = ?1 \
                        ORDER BY kind, position";

#[async_trait::async_trait]
impl MetadataStore for SqliteStore {
    async fn put_workflow(
        &self,
        spec: WorkflowSpec,
        content_hash: String,
    ) -> Result<(Workflow, bool), StoreError> {
        validate_spec(&spec)?;
        // With a single writer connection the race cannot happen in-process; the retry covers
        // another process writing the same file.
        let mut attempt = 0;
        loop {
            match self.try_put_workflow(&spec, &content_hash).await {
                Err(StoreError::AlreadyExists(_)) if attempt + 1 < PUT_WORKFLOW_ATTEMPTS => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn get_workflow(&self, name: &str, version: Option<u32>) -> Result<Workflow, StoreError> {
        let body: Option<Vec<u8>> = match version {
            Some(v) => {
                sqlx::query_scalar("SELECT body FROM workflows WHERE name = ?1 AND version = ?2")
                    .bind(name)
                    .bind(i64::from(v))
                    .fetch_optional(&self.read)
                    .await?
            }
            None => {
                sqlx::query_scalar(
                    "SELECT body FROM workflows WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                )
                .bind(name)
                .fetch_optional(&self.read)
                .await?
            }
        };
        let body = body.ok_or_else(|| workflow_not_found(name, version))?;
        decode(&body, || format!("workflow {name:?}"))
    }

    async fn list_workflows(&self) -> Result<Vec<Workflow>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT w.name, w.body FROM workflows w \
             WHERE w.version = (SELECT MAX(version) FROM workflows WHERE name = w.name) \
             ORDER BY w.name",
        )
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|(name, body)| decode(body, || format!("workflow {name:?}")))
            .collect()
    }

    async fn commit(&self, mutations: Vec<Mutation>) -> Result<(), StoreError> {
        validate_mutations(&mutations)?;
        if mutations.is_empty() {
            return Ok(());
        }
        // IMMEDIATE takes the write lock up front, so the transaction cannot fail half-way
        // because another process started writing; dropping `tx` on error rolls back.
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        apply(&mut tx, &mutations).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, StoreError> {
        let rows: Vec<UnionRow> = sqlx::query_as(RUN_ROWS)
            .bind(run_id)
            .fetch_all(&self.read)
            .await?;
        one_run(run_id, rows)
    }

    async fn list_runs(&self, req: &ListRunsRequest) -> Result<ListRunsResponse, StoreError> {
        let rows: Vec<ListRow> = list_runs_query::<sqlx::Sqlite>(req)
            .build_query_as()
            .fetch_all(&self.read)
            .await?;
        runs_page(req, rows)
    }

    async fn find_run_by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        if key.is_empty() {
            return Ok(None);
        }
        Ok(
            sqlx::query_scalar("SELECT run_id FROM runs WHERE idempotency_key = ?1")
                .bind(key)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    async fn read_events(
        &self,
        run_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, body FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(run_id)
        .bind(seq_bound(after_seq))
        .bind(i64::from(event_limit(limit)))
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .iter()
            .map(|(seq, body)| event_from_row(run_id, *seq, body))
            .collect())
    }

    async fn read_active_runs(&self) -> Result<Vec<Run>, StoreError> {
        active_runs_strict(self.active_rows().await?)
    }

    async fn read_active_runs_checked(&self) -> Result<ActiveRuns, StoreError> {
        Ok(active_runs(self.active_rows().await?))
    }

    async fn quarantine_run(&self, run_id: &str, reason: &str) -> Result<Run, StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let rows: Vec<UnionRow> = sqlx::query_as(RUN_ROWS)
            .bind(run_id)
            .fetch_all(&mut *tx)
            .await?;
        let stored = super::group_runs(rows)
            .pop()
            .ok_or_else(|| run_not_found(run_id))?;
        let max_seq: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE run_id = ?1")
                .bind(run_id)
                .fetch_one(&mut *tx)
                .await?;
        let mutations = quarantine_mutations(stored, max_seq.unwrap_or(0), reason)?;
        apply(&mut tx, &mutations).await?;
        tx.commit().await?;
        self.get_run(run_id).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        validate_lease(name, holder)?;
        let ttl = ttl_micros(ttl)?;
        // The write lock (IMMEDIATE) makes read-decide-write atomic, across processes too.
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(String, i64, i64)> =
            sqlx::query_as("SELECT holder, epoch, expires_at FROM leases WHERE name = ?1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let row = row.map(|(holder, epoch, expires_at)| LeaseRow {
            holder,
            epoch,
            expires_at,
        });
        let next = acquire_decision(name, row.as_ref(), holder, now_micros(), ttl)?;
        sqlx::query(
            "INSERT INTO leases (name, holder, epoch, expires_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, epoch = excluded.epoch, \
             expires_at = excluded.expires_at",
        )
        .bind(name)
        .bind(&next.holder)
        .bind(next.epoch)
        .bind(next.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(lease_from_row(name, &next))
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
        validate_lease(&lease.name, &lease.holder)?;
        let expires_at = now_micros().saturating_add(ttl_micros(ttl)?);
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query(
            "UPDATE leases SET expires_at = ?4 WHERE name = ?1 AND holder = ?2 AND epoch = ?3",
        )
        .bind(&lease.name)
        .bind(&lease.holder)
        .bind(epoch_bound(lease.epoch))
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(fenced(lease, stored_epoch(&mut tx, &lease.name).await?));
        }
        tx.commit().await?;
        Ok(Lease {
            expires_at: crate::store::system_time_from_micros(expires_at),
            ..lease.clone()
        })
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        validate_lease(&lease.name, &lease.holder)?;
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        // Expired as of now (not deleted: the epoch must keep counting up).
        let updated = sqlx::query(
            "UPDATE leases SET expires_at = MIN(expires_at, ?4) \
             WHERE name = ?1 AND holder = ?2 AND epoch = ?3",
        )
        .bind(&lease.name)
        .bind(&lease.holder)
        .bind(epoch_bound(lease.epoch))
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(fenced(lease, stored_epoch(&mut tx, &lease.name).await?));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn commit_fenced(
        &self,
        fence: &Lease,
        mutations: Vec<Mutation>,
    ) -> Result<(), StoreError> {
        validate_mutations(&mutations)?;
        // Writers queue for the one write connection and IMMEDIATE holds the database's write
        // lock, so no acquire can slip between this check and the commit.
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let current = stored_epoch(&mut tx, &fence.name).await?;
        if current != Some(epoch_bound(fence.epoch)) {
            return Err(fenced(fence, current));
        }
        apply(&mut tx, &mutations).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_schedule(&self, schedule: Schedule) -> Result<Schedule, StoreError> {
        validate_named("schedule", &schedule.id, &schedule.name)?;
        let last_tick = schedule.last_tick.as_ref().map(micros);
        sqlx::query(
            "INSERT INTO schedules (id, name, paused, last_tick, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&schedule.id)
        .bind(&schedule.name)
        .bind(schedule.paused)
        .bind(last_tick)
        .bind(schedule_body(&schedule))
        .execute(&self.write)
        .await
        .map_err(|err| {
            if is_unique_violation(&err) {
                name_taken("schedule", &schedule.name)
            } else {
                err.into()
            }
        })?;
        Ok(Schedule {
            next_tick: None,
            ..schedule
        })
    }

    async fn get_schedule(&self, id_or_name: &str) -> Result<Schedule, StoreError> {
        let row: Option<(Vec<u8>, bool, Option<i64>)> = sqlx::query_as(
            "SELECT body, paused, last_tick FROM schedules WHERE id = ?1 OR name = ?1 \
             ORDER BY id = ?1 DESC LIMIT 1",
        )
        .bind(id_or_name)
        .fetch_optional(&self.read)
        .await?;
        let (body, paused, last_tick) = row.ok_or_else(|| not_found("schedule", id_or_name))?;
        schedule_from_row(&body, paused, last_tick)
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>, StoreError> {
        let rows: Vec<(Vec<u8>, bool, Option<i64>)> =
            sqlx::query_as("SELECT body, paused, last_tick FROM schedules ORDER BY name")
                .fetch_all(&self.read)
                .await?;
        rows.iter()
            .map(|(body, paused, last_tick)| schedule_from_row(body, *paused, *last_tick))
            .collect()
    }

    async fn delete_schedule(&self, id_or_name: &str) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM schedules WHERE id = ?1 OR name = ?1")
            .bind(id_or_name)
            .execute(&self.write)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(not_found("schedule", id_or_name));
        }
        Ok(())
    }

    async fn set_schedule_paused(
        &self,
        id_or_name: &str,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        let updated = sqlx::query("UPDATE schedules SET paused = ?2 WHERE id = ?1 OR name = ?1")
            .bind(id_or_name)
            .bind(paused)
            .execute(&self.write)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(not_found("schedule", id_or_name));
        }
        self.get_schedule(id_or_name).await
    }

    async fn advance_schedule(
        &self,
        id: &str,
        expected: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        let updated =
            sqlx::query("UPDATE schedules SET last_tick = ?2 WHERE id = ?1 AND last_tick IS ?3")
                .bind(id)
                .bind(micros(&to))
                .bind(expected.as_ref().map(micros))
                .execute(&self.write)
                .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, StoreError> {
        validate_named("trigger", &trigger.id, &trigger.name)?;
        sqlx::query("INSERT INTO triggers (id, name, topic, body) VALUES (?1, ?2, ?3, ?4)")
            .bind(&trigger.id)
            .bind(&trigger.name)
            .bind(&trigger.topic)
            .bind(trigger.encode_to_vec())
            .execute(&self.write)
            .await
            .map_err(|err| {
                if is_unique_violation(&err) {
                    name_taken("trigger", &trigger.name)
                } else {
                    err.into()
                }
            })?;
        Ok(trigger)
    }

    async fn list_triggers(&self, topic: &str) -> Result<Vec<Trigger>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT name, body FROM triggers WHERE ?1 = '' OR topic = ?1 ORDER BY name",
        )
        .bind(topic)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|(name, body)| decode(body, || format!("trigger {name:?}")))
            .collect()
    }

    async fn delete_trigger(&self, id_or_name: &str) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM triggers WHERE id = ?1 OR name = ?1")
            .bind(id_or_name)
            .execute(&self.write)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(not_found("trigger", id_or_name));
        }
        Ok(())
    }

    async fn put_backfill(&self, backfill: Backfill) -> Result<(), StoreError> {
        if backfill.id.is_empty() {
            return Err(StoreError::InvalidArgument(
                "backfill.id: must not be empty".to_owned(),
            ));
        }
        sqlx::query(
            "INSERT INTO backfills (id, body) VALUES (?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )
        .bind(&backfill.id)
        .bind(backfill.encode_to_vec())
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn get_backfill(&self, id: &str) -> Result<Backfill, StoreError> {
        let body: Option<Vec<u8>> = sqlx::query_scalar("SELECT body FROM backfills WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        let body = body.ok_or_else(|| not_found("backfill", id))?;
        decode(&body, || format!("backfill {id:?}"))
    }

    async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, body FROM backfills ORDER BY id DESC")
                .fetch_all(&self.read)
                .await?;
        rows.iter()
            .map(|(id, body)| decode(body, || format!("backfill {id:?}")))
            .collect()
    }

    async fn put_token(&self, token: StoredToken) -> Result<(), StoreError> {
        let (id, name, created) = token_key(&token)?;
        sqlx::query(
            "INSERT INTO tokens (token_id, name, created_at, body) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(name)
        .bind(created)
        .bind(token.encode_to_vec())
        .execute(&self.write)
        .await
        .map_err(|err| {
            if is_unique_violation(&err) {
                name_taken("token", name)
            } else {
                err.into()
            }
        })?;
        Ok(())
    }

    async fn read_webhook_deliveries(
        &self,
        request: &dagmesh_proto::v1::ReadWebhookDeliveriesRequest,
    ) -> Result<Vec<dagmesh_proto::v1::WebhookDelivery>, StoreError> {
        let limit = crate::store::deliveries_limit(request);
        let rows: Vec<(String, String, Vec<u8>)> = match &request.due_before {
            Some(due) => {
                sqlx::query_as(
                    "SELECT delivery_id, run_id, body FROM webhook_deliveries \
                     WHERE state = ?1 AND next_attempt_at <= ?2 \
                     AND (?3 = '' OR run_id = ?3) ORDER BY next_attempt_at LIMIT ?4",
                )
                .bind(dagmesh_proto::v1::DeliveryState::Pending as i32)
                .bind(micros(due))
                .bind(&request.run_id)
                .bind(limit)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query_as(
                    "SELECT delivery_id, run_id, body FROM webhook_deliveries \
                     WHERE (?1 = '' OR run_id = ?1) \
                     ORDER BY created_at DESC, delivery_id DESC LIMIT ?2",
                )
                .bind(&request.run_id)
                .bind(limit)
                .fetch_all(&self.read)
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(|(id, run_id, body)| super::decode_delivery(id, run_id, body))
            .collect())
    }

    async fn read_cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let body: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM step_cache WHERE key = ?1 AND expires_at > ?2")
                .bind(key)
                .bind(now_micros())
                .fetch_optional(&self.read)
                .await?;
        body.map(|body| decode(&body, || format!("cache entry {key:?}")))
            .transpose()
    }

    async fn get_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let body: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM tokens WHERE token_id = ?1 OR name = ?1")
                .bind(id_or_name)
                .fetch_optional(&self.read)
                .await?;
        let body = body.ok_or_else(|| not_found("token", id_or_name))?;
        decode(&body, || format!("token {id_or_name:?}"))
    }

    async fn list_tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT token_id, body FROM tokens ORDER BY created_at DESC, token_id DESC",
        )
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|(id, body)| decode(body, || format!("token {id:?}")))
            .collect()
    }

    async fn revoke_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(String, Vec<u8>)> =
            sqlx::query_as("SELECT token_id, body FROM tokens WHERE token_id = ?1 OR name = ?1")
                .bind(id_or_name)
                .fetch_optional(&mut *tx)
                .await?;
        let (id, body) = row.ok_or_else(|| not_found("token", id_or_name))?;
        let mut token: StoredToken = decode(&body, || format!("token {id:?}"))?;
        mark_revoked(&mut token);
        sqlx::query("UPDATE tokens SET body = ?2 WHERE token_id = ?1")
            .bind(&id)
            .bind(token.encode_to_vec())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(token)
    }
}

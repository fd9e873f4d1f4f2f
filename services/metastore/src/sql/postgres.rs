//! PostgreSQL backend.
//!
//! Every statement is a network round trip, so a commit batch is written with one statement per
//! table, whatever its size: the batch goes as arrays that `UNNEST` turns into rows. A commit is
//! thus BEGIN, at most four prepared statements, COMMIT.

use std::collections::HashMap;
use std::time::Duration;

use dagmesh_proto::v1::{
    ActiveRuns, Backfill, CacheEntry, ListRunsRequest, ListRunsResponse, Mutation, Run, RunEvent,
    RunState, Schedule, Step, StoredToken, Trigger, Workflow, WorkflowSpec, mutation,
};
use prost::Message;
use prost_types::Timestamp;
use sqlx::postgres::{PgConnection, PgDatabaseError, PgPool, PgPoolOptions};

use super::{
    ListRow, PUT_WORKFLOW_ATTEMPTS, UnionRow, active_runs, active_runs_strict, decode, encode_run,
    event_from_row, group_runs, list_runs_query, new_workflow, one_run, quarantine_mutations,
    runs_page, seq_bound, validate_spec,
};
use crate::StoreError;
use crate::error::is_unique_violation;
use crate::store::{
    Lease, LeaseRow, MetadataStore, acquire_decision, epoch_bound, event_limit, fenced,
    lease_from_row, now_micros, run_not_found, system_time_from_micros, ttl_micros, validate_lease,
    validate_mutations, workflow_not_found,
};
use crate::store::{
    mark_revoked, micros, name_taken, not_found, schedule_body, schedule_from_row, token_key,
    validate_named,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

const MAX_CONNECTIONS: u32 = 16;
/// How long a caller waits for a free connection before getting `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        // The migrator holds an advisory lock, so replicas starting together migrate once.
        MIGRATOR.run(&pool).await?;
        Ok(PgStore { pool })
    }

    pub(super) async fn tls(&self) -> Result<super::PgTls, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let server: String = sqlx::query_scalar("SHOW ssl").fetch_one(&mut *conn).await?;
        let encrypted: Option<bool> =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_optional(&mut *conn)
                .await?;
        Ok(super::PgTls {
            server_enabled: server == "on",
            connection_encrypted: encrypted.unwrap_or(false),
        })
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    /// The union rows of every QUEUED or RUNNING run, by run, then run row first, then steps
    /// in position order.
    async fn active_rows(&self) -> Result<Vec<UnionRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT run_id, 0 AS kind, 0::int8 AS position, ''::text AS step_id, workflow, \
             state, body FROM runs WHERE state IN ($1, $2) \
             UNION ALL \
             SELECT s.run_id, 1, s.position, s.step_id, '', 0, s.body FROM steps s \
             JOIN runs r ON r.run_id = s.run_id WHERE r.state IN ($1, $2) \
             ORDER BY run_id, kind, position",
        )
        .bind(RunState::Queued as i32)
        .bind(RunState::Running as i32)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The stored epoch of a lease, `None` when it was never taken.
    async fn stored_epoch(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT epoch FROM leases WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// One attempt of `put_workflow`. Two writers may both read version N and insert N+1; the
    /// loser gets a unique violation (`AlreadyExists`) and retries.
    async fn try_put_workflow(
        &self,
        spec: &WorkflowSpec,
        content_hash: &str,
    ) -> Result<(Workflow, bool), StoreError> {
        let mut tx = self.pool.begin().await?;
        let latest: Option<(i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT version, content_hash, body FROM workflows WHERE name = $1 \
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
            Some((version, _, _)) => u32::try_from(version + 1).map_err(|_| {
                StoreError::Internal(format!("workflow {:?} has too many versions", spec.name))
            })?,
            None => 1,
        };
        let wf = new_workflow(spec.clone(), content_hash.to_owned(), next);
        sqlx::query(
            "INSERT INTO workflows (name, version, content_hash, body) VALUES ($1, $2, $3, $4)",
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

/// A commit batch split by table. Repeated writes of one row keep the last value (and the
/// first one's place), which is what applying them one by one would leave, and is required:
/// one upsert statement may not touch the same row twice.
#[derive(Default)]
struct Batch<'a> {
    runs: Vec<&'a Run>,
    steps: Vec<&'a Step>,
    events: Vec<&'a RunEvent>,
    cache: Vec<&'a CacheEntry>,
    deliveries: Vec<&'a dagmesh_proto::v1::WebhookDelivery>,
}

impl<'a> Batch<'a> {
    fn new(mutations: &'a [Mutation]) -> Self {
        let mut batch = Batch::default();
        let mut run_index: HashMap<&str, usize> = HashMap::new();
        let mut step_index: HashMap<(&str, &str), usize> = HashMap::new();
        for m in mutations {
            match &m.mutation {
                Some(mutation::Mutation::PutRun(run)) => match run_index.get(run.run_id.as_str()) {
                    Some(&i) => batch.runs[i] = run,
                    None => {
                        run_index.insert(&run.run_id, batch.runs.len());
                        batch.runs.push(run);
                    }
                },
                Some(mutation::Mutation::PutStep(step)) => {
                    let key = (step.run_id.as_str(), step.step_id.as_str());
                    match step_index.get(&key) {
                        Some(&i) => batch.steps[i] = step,
                        None => {
                            step_index.insert(key, batch.steps.len());
                            batch.steps.push(step);
                        }
                    }
                }
                // Duplicates stay: the insert must fail on them.
                Some(mutation::Mutation::AppendEvent(event)) => batch.events.push(event),
                Some(mutation::Mutation::PutCacheEntry(entry)) => batch.cache.push(entry),
                Some(mutation::Mutation::PutWebhookDelivery(delivery)) => {
                    batch.deliveries.push(delivery)
                }
                None => {}
            }
        }
        batch
    }
}

async fn put_runs(conn: &mut PgConnection, runs: &[&Run]) -> Result<(), StoreError> {
    if runs.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
    let workflows: Vec<&str> = runs.iter().map(|r| r.workflow.as_str()).collect();
    let states: Vec<i32> = runs.iter().map(|r| r.state).collect();
    let keys: Vec<&str> = runs.iter().map(|r| r.idempotency_key.as_str()).collect();
    let bodies: Vec<Vec<u8>> = runs.iter().map(|r| encode_run(r)).collect();
    // The idempotency key is fixed at creation, so the update leaves it alone; on insert, a
    // key used by another run violates the unique index (only `run_id` is the arbiter).
    sqlx::query(
        "INSERT INTO runs (run_id, workflow, state, idempotency_key, body) \
         SELECT run_id, workflow, state, NULLIF(idempotency_key, ''), body \
         FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::bytea[]) \
             AS t(run_id, workflow, state, idempotency_key, body) \
         ON CONFLICT (run_id) DO UPDATE \
         SET workflow = EXCLUDED.workflow, state = EXCLUDED.state, body = EXCLUDED.body",
    )
    .bind(ids)
    .bind(workflows)
    .bind(states)
    .bind(keys)
    .bind(bodies)
    .execute(&mut *conn)
    .await
    .map_err(|err| {
        if is_unique_violation(&err) {
            let key = duplicate_value(&err).unwrap_or_default();
            StoreError::AlreadyExists(format!(
                "idempotency key {key:?} is already used by another run"
            ))
        } else {
            err.into()
        }
    })?;

    // Tags never change, so rows already there are kept; the statement costs one round trip.
    let mut tag_runs = Vec::new();
    let mut tag_keys = Vec::new();
    let mut tag_values = Vec::new();
    for run in runs {
        for (key, value) in &run.tags {
            tag_runs.push(run.run_id.as_str());
            tag_keys.push(key.as_str());
            tag_values.push(value.as_str());
        }
    }
    if !tag_runs.is_empty() {
        sqlx::query(
            "INSERT INTO run_tags (run_id, key, value) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) \
             ON CONFLICT (run_id, key) DO NOTHING",
        )
        .bind(tag_runs)
        .bind(tag_keys)
        .bind(tag_values)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn put_steps(conn: &mut PgConnection, steps: &[&Step]) -> Result<(), StoreError> {
    if steps.is_empty() {
        return Ok(());
    }
    let run_ids: Vec<&str> = steps.iter().map(|s| s.run_id.as_str()).collect();
    let step_ids: Vec<&str> = steps.iter().map(|s| s.step_id.as_str()).collect();
    let bodies: Vec<Vec<u8>> = steps.iter().map(|s| s.encode_to_vec()).collect();
    // ORDER BY ord: new steps take identity values (their `position`) in batch order.
    sqlx::query(
        "INSERT INTO steps (run_id, step_id, body) \
         SELECT run_id, step_id, body \
         FROM UNNEST($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY \
             AS t(run_id, step_id, body, ord) \
         ORDER BY ord \
         ON CONFLICT (run_id, step_id) DO UPDATE SET body = EXCLUDED.body",
    )
    .bind(run_ids)
    .bind(step_ids)
    .bind(bodies)
    .execute(conn)
    .await?;
    Ok(())
}

async fn append_events(conn: &mut PgConnection, events: &[&RunEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let run_ids: Vec<&str> = events.iter().map(|e| e.run_id.as_str()).collect();
    let seqs: Vec<i64> = events.iter().map(|e| seq_bound(e.seq)).collect();
    let bodies: Vec<Vec<u8>> = events.iter().map(|e| e.encode_to_vec()).collect();
    sqlx::query(
        "INSERT INTO events (run_id, seq, body) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::bytea[])",
    )
    .bind(run_ids)
    .bind(seqs)
    .bind(bodies)
    .execute(conn)
    .await
    .map_err(|err| {
        if !is_unique_violation(&err) {
            return err.into();
        }
        // The detail reads "Key (run_id, seq)=(<run>, <seq>) already exists."
        match duplicate_value(&err)
            .as_deref()
            .and_then(|v| v.rsplit_once(", "))
        {
            Some((run_id, seq)) => {
                StoreError::AlreadyExists(format!("event {seq} of run {run_id:?} already exists"))
            }
            None => StoreError::AlreadyExists("event already exists".to_owned()),
        }
    })?;
    Ok(())
}

/// The key value of a PostgreSQL unique violation, from its detail
/// `Key (<columns>)=(<value>) already exists.`
fn duplicate_value(err: &sqlx::Error) -> Option<String> {
    let detail = err
        .as_database_error()?
        .try_downcast_ref::<PgDatabaseError>()?
        .detail()?;
    let (_, rest) = detail.split_once(")=(")?;
    let value = rest.strip_suffix(") already exists.")?;
    Some(value.to_owned())
}

/// The database's clock, in microseconds since the Unix epoch, as a SQL fragment (a macro so
/// that statements stay `&'static str`). `clock_timestamp()` rather than `now()`: a lease's
/// expiry is judged when the statement runs, not when its transaction began.
macro_rules! now_micros {
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::int8"
    };
}

/// The union rows of one run (see [`UnionRow`]), from one statement so that the run and its
/// steps come from the same snapshot.
const RUN_ROWS: &str = "SELECT run_id, 0 AS kind, 0::int8 AS position, ''::text AS step_id, \
                        workflow, state, body FROM runs WHERE run_id = $1 \
                        UNION ALL \
                        SELECT run_id, 1, position, step_id, '', 0, body FROM steps \
                        WHERE run_id = $1 \
                        ORDER BY kind, position";

/// Applies a validated commit batch inside the caller's transaction: at most four statements.
async fn apply(conn: &mut PgConnection, mutations: &[Mutation]) -> Result<(), StoreError> {
    let batch = Batch::new(mutations);
    put_runs(conn, &batch.runs).await?;
    put_steps(conn, &batch.steps).await?;
    append_events(conn, &batch.events).await?;
    put_cache_entries(conn, &batch.cache).await?;
    put_deliveries(conn, &batch.deliveries).await
}

/// Upserts webhook deliveries of the outbox, one statement each (a batch holds a few: one per
/// notified event or attempt).
async fn put_deliveries(
    conn: &mut PgConnection,
    deliveries: &[&dagmesh_proto::v1::WebhookDelivery],
) -> Result<(), StoreError> {
    for delivery in deliveries {
        sqlx::query(
            "INSERT INTO webhook_deliveries \
             (delivery_id, run_id, state, next_attempt_at, created_at, body) \
             VALUES ($1, $2, $3, $4, $5, $6) \
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
    }
    Ok(())
}

/// Upserts step cache entries (the last of one key wins), then removes a few expired ones.
async fn put_cache_entries(
    conn: &mut PgConnection,
    entries: &[&CacheEntry],
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut latest: HashMap<&str, &CacheEntry> = HashMap::new();
    for entry in entries {
        latest.insert(entry.key.as_str(), entry);
    }
    let keys: Vec<&str> = latest.keys().copied().collect();
    let expires: Vec<i64> = keys
        .iter()
        .map(|key| latest[key].expires_at.as_ref().map_or(0, micros))
        .collect();
    let bodies: Vec<Vec<u8>> = keys.iter().map(|key| latest[key].encode_to_vec()).collect();
    sqlx::query(
        "INSERT INTO step_cache (key, expires_at, body) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::bytea[]) \
         ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at, body = excluded.body",
    )
    .bind(&keys)
    .bind(&expires)
    .bind(&bodies)
    .execute(&mut *conn)
    .await?;
    // Expired entries go a few at a time, paid for by the commits that add entries.
    sqlx::query(
        "DELETE FROM step_cache WHERE key IN \
         (SELECT key FROM step_cache WHERE expires_at < $1 LIMIT 64)",
    )
    .bind(now_micros())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MetadataStore for PgStore {
    async fn put_workflow(
        &self,
        spec: WorkflowSpec,
        content_hash: String,
    ) -> Result<(Workflow, bool), StoreError> {
        validate_spec(&spec)?;
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
                sqlx::query_scalar("SELECT body FROM workflows WHERE name = $1 AND version = $2")
                    .bind(name)
                    .bind(i64::from(v))
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query_scalar(
                    "SELECT body FROM workflows WHERE name = $1 ORDER BY version DESC LIMIT 1",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        let body = body.ok_or_else(|| workflow_not_found(name, version))?;
        decode(&body, || format!("workflow {name:?}"))
    }

    async fn list_workflows(&self) -> Result<Vec<Workflow>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT DISTINCT ON (name) name, body FROM workflows ORDER BY name, version DESC",
        )
        .fetch_all(&self.pool)
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
        // Dropping `tx` on an error rolls the whole batch back.
        let mut tx = self.pool.begin().await?;
        apply(&mut tx, &mutations).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, StoreError> {
        let rows: Vec<UnionRow> = sqlx::query_as(RUN_ROWS)
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        one_run(run_id, rows)
    }

    async fn list_runs(&self, req: &ListRunsRequest) -> Result<ListRunsResponse, StoreError> {
        let rows: Vec<ListRow> = list_runs_query::<sqlx::Postgres>(req)
            .build_query_as()
            .fetch_all(&self.pool)
            .await?;
        runs_page(req, rows)
    }

    async fn find_run_by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        if key.is_empty() {
            return Ok(None);
        }
        Ok(
            sqlx::query_scalar("SELECT run_id FROM runs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
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
            "SELECT seq, body FROM events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(run_id)
        .bind(seq_bound(after_seq))
        .bind(i64::from(event_limit(limit)))
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        // Locks the run row first, so that two quarantines of one run do not both number
        // their events after the same seq.
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE")
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Err(run_not_found(run_id));
        }
        let rows: Vec<UnionRow> = sqlx::query_as(RUN_ROWS)
            .bind(run_id)
            .fetch_all(&mut *tx)
            .await?;
        let stored = group_runs(rows)
            .pop()
            .ok_or_else(|| run_not_found(run_id))?;
        let max_seq: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE run_id = $1")
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
        let mut tx = self.pool.begin().await?;
        // A free row to lock, so that concurrent first acquirers queue on it like later ones
        // (an acquirer that finds another's uncommitted insert waits for it, then does nothing).
        sqlx::query(
            "INSERT INTO leases (name, holder, epoch, expires_at) VALUES ($1, '', 0, 0) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(&mut *tx)
        .await?;
        // FOR UPDATE also waits for fenced commits in flight (they hold FOR KEY SHARE), so a
        // commit checked against the old epoch never lands after the new holder took over.
        let (holder_now, epoch, expires_at, now): (String, i64, i64, i64) =
            sqlx::query_as(concat!(
                "SELECT holder, epoch, expires_at, ",
                now_micros!(),
                " FROM leases WHERE name = $1 FOR UPDATE"
            ))
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        let row = LeaseRow {
            holder: holder_now,
            epoch,
            expires_at,
        };
        let next = acquire_decision(name, Some(&row), holder, now, ttl)?;
        sqlx::query("UPDATE leases SET holder = $2, epoch = $3, expires_at = $4 WHERE name = $1")
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
        let ttl = ttl_micros(ttl)?;
        let renewed: Option<i64> = sqlx::query_scalar(concat!(
            "UPDATE leases SET expires_at = ",
            now_micros!(),
            " + $4 WHERE name = $1 AND holder = $2 AND epoch = $3 RETURNING expires_at"
        ))
        .bind(&lease.name)
        .bind(&lease.holder)
        .bind(epoch_bound(lease.epoch))
        .bind(ttl)
        .fetch_optional(&self.pool)
        .await?;
        match renewed {
            Some(expires_at) => Ok(Lease {
                expires_at: system_time_from_micros(expires_at),
                ..lease.clone()
            }),
            None => Err(fenced(lease, self.stored_epoch(&lease.name).await?)),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        validate_lease(&lease.name, &lease.holder)?;
        // Expired as of now (not deleted: the epoch must keep counting up).
        let released = sqlx::query(concat!(
            "UPDATE leases SET expires_at = LEAST(expires_at, ",
            now_micros!(),
            ") WHERE name = $1 AND holder = $2 AND epoch = $3"
        ))
        .bind(&lease.name)
        .bind(&lease.holder)
        .bind(epoch_bound(lease.epoch))
        .execute(&self.pool)
        .await?;
        if released.rows_affected() == 0 {
            return Err(fenced(lease, self.stored_epoch(&lease.name).await?));
        }
        Ok(())
    }

    async fn commit_fenced(
        &self,
        fence: &Lease,
        mutations: Vec<Mutation>,
    ) -> Result<(), StoreError> {
        validate_mutations(&mutations)?;
        let mut tx = self.pool.begin().await?;
        // FOR KEY SHARE: concurrent commits and renewals do not wait for each other, but an
        // acquire (FOR UPDATE) waits for this transaction, and this check waits for an acquire
        // in flight and then reads the epoch it wrote.
        let current: Option<i64> =
            sqlx::query_scalar("SELECT epoch FROM leases WHERE name = $1 FOR KEY SHARE")
                .bind(&fence.name)
                .fetch_optional(&mut *tx)
                .await?;
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
            "INSERT INTO schedules (id, name, paused, last_tick, body) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&schedule.id)
        .bind(&schedule.name)
        .bind(schedule.paused)
        .bind(last_tick)
        .bind(schedule_body(&schedule))
        .execute(&self.pool)
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
            "SELECT body, paused, last_tick FROM schedules WHERE id = $1 OR name = $1 \
             ORDER BY (id = $1) DESC LIMIT 1",
        )
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        let (body, paused, last_tick) = row.ok_or_else(|| not_found("schedule", id_or_name))?;
        schedule_from_row(&body, paused, last_tick)
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>, StoreError> {
        let rows: Vec<(Vec<u8>, bool, Option<i64>)> =
            sqlx::query_as("SELECT body, paused, last_tick FROM schedules ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|(body, paused, last_tick)| schedule_from_row(body, *paused, *last_tick))
            .collect()
    }

    async fn delete_schedule(&self, id_or_name: &str) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1 OR name = $1")
            .bind(id_or_name)
            .execute(&self.pool)
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
        let updated = sqlx::query("UPDATE schedules SET paused = $2 WHERE id = $1 OR name = $1")
            .bind(id_or_name)
            .bind(paused)
            .execute(&self.pool)
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
        let updated = sqlx::query(
            "UPDATE schedules SET last_tick = $2 WHERE id = $1 AND last_tick IS NOT DISTINCT FROM $3",
        )
        .bind(id)
        .bind(micros(&to))
        .bind(expected.as_ref().map(micros))
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, StoreError> {
        validate_named("trigger", &trigger.id, &trigger.name)?;
        sqlx::query("INSERT INTO triggers (id, name, topic, body) VALUES ($1, $2, $3, $4)")
            .bind(&trigger.id)
            .bind(&trigger.name)
            .bind(&trigger.topic)
            .bind(trigger.encode_to_vec())
            .execute(&self.pool)
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
            "SELECT name, body FROM triggers WHERE $1 = '' OR topic = $1 ORDER BY name",
        )
        .bind(topic)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|(name, body)| decode(body, || format!("trigger {name:?}")))
            .collect()
    }

    async fn delete_trigger(&self, id_or_name: &str) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM triggers WHERE id = $1 OR name = $1")
            .bind(id_or_name)
            .execute(&self.pool)
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
            "INSERT INTO backfills (id, body) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )
        .bind(&backfill.id)
        .bind(backfill.encode_to_vec())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_backfill(&self, id: &str) -> Result<Backfill, StoreError> {
        let body: Option<Vec<u8>> = sqlx::query_scalar("SELECT body FROM backfills WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let body = body.ok_or_else(|| not_found("backfill", id))?;
        decode(&body, || format!("backfill {id:?}"))
    }

    async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, body FROM backfills ORDER BY id DESC")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|(id, body)| decode(body, || format!("backfill {id:?}")))
            .collect()
    }

    async fn put_token(&self, token: StoredToken) -> Result<(), StoreError> {
        let (id, name, created) = token_key(&token)?;
        sqlx::query(
            "INSERT INTO tokens (token_id, name, created_at, body) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(name)
        .bind(created)
        .bind(token.encode_to_vec())
        .execute(&self.pool)
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
                     WHERE state = $1 AND next_attempt_at <= $2 \
                     AND ($3 = '' OR run_id = $3) ORDER BY next_attempt_at LIMIT $4",
                )
                .bind(dagmesh_proto::v1::DeliveryState::Pending as i32)
                .bind(micros(due))
                .bind(&request.run_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(
                    "SELECT delivery_id, run_id, body FROM webhook_deliveries \
                     WHERE ($1 = '' OR run_id = $1) \
                     ORDER BY created_at DESC, delivery_id DESC LIMIT $2",
                )
                .bind(&request.run_id)
                .bind(limit)
                .fetch_all(&self.pool)
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
            sqlx::query_scalar("SELECT body FROM step_cache WHERE key = $1 AND expires_at > $2")
                .bind(key)
                .bind(now_micros())
                .fetch_optional(&self.pool)
                .await?;
        body.map(|body| decode(&body, || format!("cache entry {key:?}")))
            .transpose()
    }

    async fn get_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let body: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM tokens WHERE token_id = $1 OR name = $1")
                .bind(id_or_name)
                .fetch_optional(&self.pool)
                .await?;
        let body = body.ok_or_else(|| not_found("token", id_or_name))?;
        decode(&body, || format!("token {id_or_name:?}"))
    }

    async fn list_tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT token_id, body FROM tokens ORDER BY created_at DESC, token_id DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|(id, body)| decode(body, || format!("token {id:?}")))
            .collect()
    }

    async fn revoke_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT token_id, body FROM tokens WHERE token_id = $1 OR name = $1 FOR UPDATE",
        )
        .bind(id_or_name)
        .fetch_optional(&mut *tx)
        .await?;
        let (id, body) = row.ok_or_else(|| not_found("token", id_or_name))?;
        let mut token: StoredToken = decode(&body, || format!("token {id:?}"))?;
        mark_revoked(&mut token);
        sqlx::query("UPDATE tokens SET body = $2 WHERE token_id = $1")
            .bind(&id)
            .bind(token.encode_to_vec())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(token)
    }
}

//! PostgreSQL: the dialect of the store on a server that several processes share.
//!
//! Every statement is a network round trip, so a commit batch is written with one statement per
//! table, whatever its size: the batch goes as arrays that `UNNEST` turns into rows. A commit is
//! thus BEGIN, a handful of prepared statements, COMMIT. Rows that a transaction reads and then
//! writes are locked (`FOR UPDATE`), and lease expiries are judged by the server's clock.

use std::collections::HashMap;
use std::time::Duration;

use dagmesh_proto::v1::{CacheEntry, Mutation, Run, RunEvent, Step, WebhookDelivery, mutation};
use prost::Message;
use sqlx::Pool;
use sqlx::postgres::{PgConnection, PgDatabaseError, PgPoolOptions, Postgres};

use super::records::{encode_row_bodies, encode_run, seq_bound};
use super::{Dialect, PgTls, PostgresStore};
use crate::StoreError;
use crate::error::is_unique_violation;
use crate::store::micros;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

const MAX_CONNECTIONS: u32 = 16;
/// How long a caller waits for a free connection before getting `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

impl Dialect for Postgres {
    const BACKEND: &'static str = "postgres";
    const BEGIN_WRITE: &'static str = "BEGIN";
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    // Concurrent commits and renewals do not wait for each other, but an acquire (FOR UPDATE)
    // waits for the commit, and the commit's check waits for an acquire in flight.
    const FOR_SHARE: &'static str = " FOR KEY SHARE";
    // `clock_timestamp()` rather than `now()`: a lease's expiry is judged when the statement
    // runs, not when its transaction began.
    const CLOCK: Option<&'static str> =
        Some("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::int8");

    type Local = ();

    async fn connect(url: &str) -> Result<(Pool<Postgres>, Pool<Postgres>, ()), StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        // The migrator holds an advisory lock, so replicas starting together migrate once.
        MIGRATOR.run(&pool).await?;
        Ok((pool.clone(), pool, ()))
    }

    fn committer((): &()) -> Option<&super::SqliteCommitter> {
        None
    }

    /// Applies a validated commit batch inside the caller's transaction: one statement per
    /// table (a few for webhook deliveries).
    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn apply<'a>(
        conn: &'a mut PgConnection,
        mutations: &'a mut [Mutation],
    ) -> Result<(), StoreError> {
        let bodies = encode_row_bodies(mutations);
        let batch = Batch::new(mutations, bodies);
        put_runs(conn, &batch.runs).await?;
        put_steps(conn, batch.steps).await?;
        append_events(conn, batch.events).await?;
        put_cache_entries(conn, &batch.cache).await?;
        for delivery in batch.deliveries {
            PostgresStore::put_delivery(conn, delivery).await?;
        }
        Ok(())
    }

    async fn tls(pool: &Pool<Postgres>) -> Result<Option<PgTls>, StoreError> {
        let mut conn = pool.acquire().await?;
        let server: String = sqlx::query_scalar("SHOW ssl").fetch_one(&mut *conn).await?;
        let encrypted: Option<bool> =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_optional(&mut *conn)
                .await?;
        Ok(Some(PgTls {
            server_enabled: server == "on",
            connection_encrypted: encrypted.unwrap_or(false),
        }))
    }
}

/// A commit batch split by table. Repeated writes of one row keep the last value (and the
/// first one's place), which is what applying them one by one would leave, and is required:
/// one upsert statement may not touch the same row twice.
/// Steps and events come with their stored bodies (`encode_row_bodies`).
#[derive(Default)]
struct Batch<'a> {
    runs: Vec<&'a Run>,
    steps: Vec<(&'a Step, Vec<u8>)>,
    events: Vec<(&'a RunEvent, Vec<u8>)>,
    cache: Vec<&'a CacheEntry>,
    deliveries: Vec<&'a WebhookDelivery>,
}

impl<'a> Batch<'a> {
    /// `bodies`: [`encode_row_bodies`] of `mutations`.
    fn new(mutations: &'a [Mutation], bodies: Vec<Vec<u8>>) -> Self {
        let mut batch = Batch::default();
        let mut run_index: HashMap<&str, usize> = HashMap::new();
        let mut step_index: HashMap<(&str, &str), usize> = HashMap::new();
        for (m, body) in mutations.iter().zip(bodies) {
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
                        Some(&i) => batch.steps[i] = (step, body),
                        None => {
                            step_index.insert(key, batch.steps.len());
                            batch.steps.push((step, body));
                        }
                    }
                }
                // Duplicates stay: the insert must fail on them.
                Some(mutation::Mutation::AppendEvent(event)) => batch.events.push((event, body)),
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
    let partitions: Vec<i32> = runs
        .iter()
        .map(|r| i32::try_from(r.partition).unwrap_or(i32::MAX))
        .collect();
    // The idempotency key and the partition are fixed at creation, so the update leaves them
    // alone; on insert, a key used by another run violates the unique index (only `run_id` is
    // the arbiter).
    sqlx::query(
        "INSERT INTO runs (run_id, workflow, state, idempotency_key, body, partition_no) \
         SELECT run_id, workflow, state, NULLIF(idempotency_key, ''), body, partition_no \
         FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::bytea[], $6::int4[]) \
             AS t(run_id, workflow, state, idempotency_key, body, partition_no) \
         ON CONFLICT (run_id) DO UPDATE \
         SET workflow = EXCLUDED.workflow, state = EXCLUDED.state, body = EXCLUDED.body",
    )
    .bind(ids)
    .bind(workflows)
    .bind(states)
    .bind(keys)
    .bind(bodies)
    .bind(partitions)
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

async fn put_steps(
    conn: &mut PgConnection,
    steps: Vec<(&Step, Vec<u8>)>,
) -> Result<(), StoreError> {
    if steps.is_empty() {
        return Ok(());
    }
    let run_ids: Vec<&str> = steps.iter().map(|(s, _)| s.run_id.as_str()).collect();
    let step_ids: Vec<&str> = steps.iter().map(|(s, _)| s.step_id.as_str()).collect();
    let bodies: Vec<Vec<u8>> = steps.into_iter().map(|(_, body)| body).collect();
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

async fn append_events(
    conn: &mut PgConnection,
    events: Vec<(&RunEvent, Vec<u8>)>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let run_ids: Vec<&str> = events.iter().map(|(e, _)| e.run_id.as_str()).collect();
    let seqs: Vec<i64> = events.iter().map(|(e, _)| seq_bound(e.seq)).collect();
    let bodies: Vec<Vec<u8>> = events.into_iter().map(|(_, body)| body).collect();
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
    PostgresStore::drop_expired_cache(conn).await
}

//! The one [`MetadataStore`] implementation in SQL, for every [`Dialect`]. Statements use
//! numbered `$N` parameters, which PostgreSQL and SQLite both read, so one text serves both;
//! what really differs (locking, the clock, the batch commit) comes from the dialect.

use std::collections::HashMap;
use std::time::Duration;

use dagmesh_proto::limits::MAX_NAME_LEN;
use dagmesh_proto::v1::{
    ActiveRuns, Backfill, CacheEntry, DeliveryState, ListRunsRequest, ListRunsResponse, Mutation,
    ReadWebhookDeliveriesRequest, Run, RunEvent, RunState, Schedule, StoredToken, Trigger,
    WebhookDelivery, Workflow, WorkflowSpec,
};
use prost::Message;
use prost_types::Timestamp;
use sqlx::{
    AssertSqlSafe, ColumnIndex, Decode, Encode, Executor, IntoArguments, QueryBuilder, Type,
};

use super::records::{
    ListRow, UnionRow, active_runs, active_runs_strict, decode, decode_delivery, event_from_row,
    group_runs, list_runs_query, new_workflow, one_run, quarantine_mutations, runs_page, seq_bound,
    validate_spec,
};
use super::{Dialect, SqlStore};
use crate::StoreError;
use crate::error::is_unique_violation;
use crate::store::{
    ClaimedLeases, Lease, LeaseRow, MAX_LIVE_LEASES, MAX_PARTITIONS, MEMBER_LEASES, MetadataStore,
    acquire_decision, check_claim, check_fences, check_partition_count, check_partition_filter,
    check_text, deliveries_limit, epoch_bound, event_limit, fenced, lease_duration_micros,
    lease_from_row, mark_revoked, micros, name_taken, not_found, now_micros, run_not_found,
    schedule_body, schedule_from_row, system_time_from_micros, token_key, ttl_micros,
    validate_lease, validate_mutations, validate_named, workflow_not_found,
};

/// How often `put_workflow` retries after losing a race for the next version number. Each lost
/// race means another writer committed a version, so this bounds the number of concurrent
/// writers of one workflow name, not the time.
const PUT_WORKFLOW_ATTEMPTS: usize = 64;

/// Inserts or replaces one webhook delivery of the outbox (parameters in order of appearance,
/// which SQLite's own binding by position needs too).
pub(super) const UPSERT_DELIVERY: &str = "INSERT INTO webhook_deliveries \
     (delivery_id, run_id, state, next_attempt_at, created_at, body) \
     VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (delivery_id) DO UPDATE SET state = excluded.state, \
     next_attempt_at = excluded.next_attempt_at, body = excluded.body";

/// Removes up to 64 step cache entries that expired before `$1`.
pub(super) const DELETE_EXPIRED_CACHE: &str = "DELETE FROM step_cache WHERE key IN \
     (SELECT key FROM step_cache WHERE expires_at < $1 LIMIT 64)";

/// The union rows of one run (see [`UnionRow`]), from one statement so that the run and its
/// steps come from the same snapshot.
const RUN_ROWS: &str = "SELECT run_id, 0 AS kind, CAST(0 AS BIGINT) AS position, \
                        CAST('' AS TEXT) AS step_id, workflow, state, body FROM runs \
                        WHERE run_id = $1 \
                        UNION ALL \
                        SELECT run_id, 1, position, step_id, '', 0, body FROM steps \
                        WHERE run_id = $1 \
                        ORDER BY kind, position";

/// The union rows of every QUEUED or RUNNING run (of the partitions `only` lists, when given),
/// by run, then run row first, then steps in position order. The partitions are numbers checked
/// below [`MAX_PARTITIONS`], written into the text (a recovery reads this once).
fn active_rows_sql(only: Option<&[u32]>) -> String {
    let filter = only.map_or_else(String::new, |partitions| {
        let list: Vec<String> = partitions.iter().map(u32::to_string).collect();
        format!(" AND r.partition_no IN ({})", list.join(", "))
    });
    format!(
        "SELECT r.run_id, 0 AS kind, CAST(0 AS BIGINT) AS position, \
         CAST('' AS TEXT) AS step_id, r.workflow, r.state, r.body FROM runs r \
         WHERE r.state IN ($1, $2){filter} \
         UNION ALL \
         SELECT s.run_id, 1, s.position, s.step_id, '', 0, s.body FROM steps s \
         JOIN runs r ON r.run_id = s.run_id WHERE r.state IN ($1, $2){filter} \
         ORDER BY run_id, kind, position"
    )
}

/// See [`SqlStore::write_turn`].
type WriteTurn = Option<tokio::sync::OwnedMutexGuard<()>>;

/// A statement with a dialect's fragment in it (the fragments are constants of this crate).
fn with_fragment(sql: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(sql)
}

impl<D> SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    usize: ColumnIndex<D::Row>,
    for<'q> &'q str: Encode<'q, D> + Type<D>,
    for<'r> String: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'r> i32: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'r> i64: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'q> Option<i64>: Encode<'q, D>,
    for<'r> bool: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'r> Vec<u8>: Encode<'r, D> + Decode<'r, D> + Type<D>,
{
    /// Opens a write transaction (SQLite: holding the database's write lock from the start, so
    /// it cannot fail half-way because another process started writing). Dropping it on an
    /// error rolls back.
    async fn begin_write(&self) -> Result<(WriteTurn, sqlx::Transaction<'static, D>), StoreError> {
        let turn = self.write_turn().await;
        Ok((turn, self.write.begin_with(D::BEGIN_WRITE).await?))
    }

    /// This process's turn to write, where the dialect has a commit thread beside the write
    /// pool (SQLite): held across a write so that the two never wait on each other's lock.
    async fn write_turn(&self) -> WriteTurn {
        match D::committer(&self.local) {
            Some(committer) => Some(committer.turn().await),
            None => None,
        }
    }

    /// The clock that lease expiries are judged by, in microseconds since the Unix epoch.
    async fn clock(conn: &mut D::Connection) -> Result<i64, StoreError> {
        match D::CLOCK {
            Some(sql) => Ok(sqlx::query_scalar(sql).fetch_one(conn).await?),
            None => Ok(now_micros()),
        }
    }

    /// Writes what [`acquire_decision`] decided for the lease `name`, in the caller's
    /// transaction (which holds the row's lock).
    async fn write_lease(
        conn: &mut D::Connection,
        name: &str,
        row: &LeaseRow,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE leases SET holder = $2, epoch = $3, expires_at = $4 WHERE name = $1")
            .bind(name)
            .bind(row.holder.as_str())
            .bind(row.epoch)
            .bind(row.expires_at)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// The stored epoch of a lease, `None` when it was never taken.
    async fn stored_epoch(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT epoch FROM leases WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.write)
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
        let (_turn, mut tx) = self.begin_write().await?;
        let latest: Option<(i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT version, content_hash, body FROM workflows WHERE name = $1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(spec.name.as_str())
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
        .bind(wf.name.as_str())
        .bind(i64::from(next))
        .bind(wf.content_hash.as_str())
        .bind(wf.encode_to_vec())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((wf, true))
    }

    /// Inserts or replaces one webhook delivery of the outbox (a batch holds a few: one per
    /// notified event or attempt). Part of both dialects' batch commit.
    pub(super) async fn put_delivery(
        conn: &mut D::Connection,
        delivery: &WebhookDelivery,
    ) -> Result<(), StoreError> {
        sqlx::query(UPSERT_DELIVERY)
            .bind(delivery.delivery_id.as_str())
            .bind(delivery.run_id.as_str())
            .bind(delivery.state)
            .bind(delivery.next_attempt_at.as_ref().map_or(0, micros))
            .bind(delivery.created_at.as_ref().map_or(0, micros))
            .bind(delivery.encode_to_vec())
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Removes a few expired step cache entries, paid for by the commits that add entries.
    /// Part of both dialects' batch commit.
    pub(super) async fn drop_expired_cache(conn: &mut D::Connection) -> Result<(), StoreError> {
        sqlx::query(DELETE_EXPIRED_CACHE)
            .bind(now_micros())
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Inserts a row whose only unique keys are its id and its name, naming it in the error
    /// when either is taken.
    async fn insert_named(
        &self,
        query: sqlx::query::Query<'_, D, D::Arguments>,
        kind: &str,
        name: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        query.execute(&self.write).await.map_err(|err| {
            if is_unique_violation(&err) {
                name_taken(kind, name)
            } else {
                err.into()
            }
        })?;
        Ok(())
    }

    /// Deletes by id or name from `table`; `NotFound` naming `kind` when nothing matched.
    async fn delete_named(
        &self,
        sql: &'static str,
        kind: &str,
        id_or_name: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let deleted = sqlx::query(sql)
            .bind(id_or_name)
            .execute(&self.write)
            .await?;
        if D::rows_affected(&deleted) == 0 {
            return Err(not_found(kind, id_or_name));
        }
        Ok(())
    }

    /// Rows of `(name, body)` decoded into records; `kind` names them in the error.
    async fn read_bodies<M: Message + Default>(
        &self,
        sql: &'static str,
        kind: &str,
    ) -> Result<Vec<M>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(sql).fetch_all(&self.read).await?;
        rows.iter()
            .map(|(name, body)| decode(body, || format!("{kind} {name:?}")))
            .collect()
    }

    async fn active_rows(&self, only: Option<&[u32]>) -> Result<Vec<UnionRow>, StoreError> {
        if only.is_some_and(<[u32]>::is_empty) {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(with_fragment(active_rows_sql(only)))
            .bind(RunState::Queued as i32)
            .bind(RunState::Running as i32)
            .fetch_all(&self.read)
            .await?)
    }
}

#[async_trait::async_trait]
impl<D> MetadataStore for SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    usize: ColumnIndex<D::Row>,
    for<'q> &'q str: Encode<'q, D> + Type<D>,
    for<'r> String: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'r> i32: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'r> i64: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'q> Option<i64>: Encode<'q, D>,
    for<'r> bool: Encode<'r, D> + Decode<'r, D> + Type<D>,
    for<'r> Vec<u8>: Encode<'r, D> + Decode<'r, D> + Type<D>,
{
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
                    .fetch_optional(&self.read)
                    .await?
            }
            None => {
                sqlx::query_scalar(
                    "SELECT body FROM workflows WHERE name = $1 ORDER BY version DESC LIMIT 1",
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
        self.read_bodies(
            "SELECT w.name, w.body FROM workflows w \
             WHERE w.version = (SELECT MAX(version) FROM workflows WHERE name = w.name) \
             ORDER BY w.name",
            "workflow",
        )
        .await
    }

    async fn commit(&self, mut mutations: Vec<Mutation>) -> Result<(), StoreError> {
        validate_mutations(&mutations)?;
        if mutations.is_empty() {
            return Ok(());
        }
        if let Some(committer) = D::committer(&self.local) {
            return committer.commit(&[], mutations).await;
        }
        let (_turn, mut tx) = self.begin_write().await?;
        D::apply(&mut tx, &mut mutations).await?;
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
        let rows: Vec<ListRow> = list_runs_query::<D>(req)
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
            sqlx::query_scalar("SELECT run_id FROM runs WHERE idempotency_key = $1")
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
            "SELECT seq, body FROM events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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
        active_runs_strict(self.active_rows(None).await?)
    }

    async fn read_active_runs_checked(
        &self,
        partitions: Option<&[u32]>,
    ) -> Result<ActiveRuns, StoreError> {
        if let Some(partitions) = partitions {
            check_partition_filter(partitions)?;
        }
        Ok(active_runs(self.active_rows(partitions).await?))
    }

    async fn init_cluster(&self, partitions: u32) -> Result<u32, StoreError> {
        check_partition_count(partitions)?;
        let (_turn, mut tx) = self.begin_write().await?;
        // A concurrent first caller's uncommitted insert makes this one wait, then do nothing.
        sqlx::query(
            "INSERT INTO cluster (id, partitions) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(i64::from(partitions))
        .execute(&mut *tx)
        .await?;
        let stored: i64 =
            sqlx::query_scalar("SELECT CAST(partitions AS BIGINT) FROM cluster WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        u32::try_from(stored)
            .ok()
            .filter(|stored| (1..=MAX_PARTITIONS).contains(stored))
            .ok_or_else(|| {
                StoreError::DataLoss(format!(
                    "the cluster row holds partitions = {stored}, outside 1 to {MAX_PARTITIONS}"
                ))
            })
    }

    async fn quarantine_run(&self, run_id: &str, reason: &str) -> Result<Run, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        // Locks the run row first, so that two quarantines of one run do not both number
        // their events after the same seq.
        let exists: Option<i32> = sqlx::query_scalar(with_fragment(format!(
            "SELECT 1 FROM runs WHERE run_id = $1{}",
            D::FOR_UPDATE
        )))
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
        let mut mutations = quarantine_mutations(stored, max_seq.unwrap_or(0), reason)?;
        D::apply(&mut tx, &mut mutations).await?;
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
        let (_turn, mut tx) = self.begin_write().await?;
        // A free row to lock, so that concurrent first acquirers queue on it like later ones
        // (an acquirer that finds another's uncommitted insert waits for it, then does nothing).
        sqlx::query(
            "INSERT INTO leases (name, holder, epoch, expires_at) VALUES ($1, '', 0, 0) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(&mut *tx)
        .await?;
        // The lock (FOR UPDATE, or SQLite's write lock) makes read-decide-write atomic, and
        // waits for fenced commits in flight (they hold FOR KEY SHARE), so a commit checked
        // against the old epoch never lands after the new holder took over.
        let (holder_now, epoch, expires_at): (String, i64, i64) =
            sqlx::query_as(with_fragment(format!(
                "SELECT holder, epoch, expires_at FROM leases WHERE name = $1{}",
                D::FOR_UPDATE
            )))
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        // Read once the row is locked: expiry is judged when the lock is held.
        let now = Self::clock(&mut tx).await?;
        let row = LeaseRow {
            holder: holder_now,
            epoch,
            expires_at,
        };
        let next = acquire_decision(name, Some(&row), holder, now, ttl)?;
        Self::write_lease(&mut tx, name, &next).await?;
        tx.commit().await?;
        Ok(lease_from_row(name, &next))
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
        validate_lease(&lease.name, &lease.holder)?;
        let ttl = ttl_micros(ttl)?;
        let mut conn = self.write.acquire().await?;
        let expires_at = Self::clock(&mut conn).await?.saturating_add(ttl);
        let renewed = sqlx::query(
            "UPDATE leases SET expires_at = $4 WHERE name = $1 AND holder = $2 AND epoch = $3",
        )
        .bind(lease.name.as_str())
        .bind(lease.holder.as_str())
        .bind(epoch_bound(lease.epoch))
        .bind(expires_at)
        .execute(&mut *conn)
        .await?;
        drop(conn);
        if D::rows_affected(&renewed) == 0 {
            return Err(fenced(lease, self.stored_epoch(&lease.name).await?));
        }
        Ok(Lease {
            expires_at: system_time_from_micros(expires_at),
            ..lease.clone()
        })
    }

    async fn claim_leases(
        &self,
        holder: &str,
        ttl: Duration,
        keep: &[Lease],
        take: &[String],
    ) -> Result<ClaimedLeases, StoreError> {
        check_claim(holder, keep, take)?;
        let ttl = ttl_micros(ttl)?;
        let mut claimed = ClaimedLeases::default();
        if keep.is_empty() && take.is_empty() {
            return Ok(claimed);
        }
        let (_turn, mut tx) = self.begin_write().await?;
        // Rows to take are locked first, in name order (as `acquire_lease` locks one), so two
        // members taking overlapping sets queue instead of deadlocking.
        let mut take: Vec<&str> = take.iter().map(String::as_str).collect();
        take.sort_unstable();
        let mut rows_to_take = HashMap::new();
        if !take.is_empty() {
            let mut insert =
                QueryBuilder::<D>::new("INSERT INTO leases (name, holder, epoch, expires_at) ");
            insert.push_values(&take, |mut row, name| {
                row.push_bind(name.to_string())
                    .push_bind(String::new())
                    .push_bind(0_i64)
                    .push_bind(0_i64);
            });
            insert.push(" ON CONFLICT (name) DO NOTHING");
            insert.build().execute(&mut *tx).await?;
            let mut select = QueryBuilder::<D>::new(
                "SELECT name, holder, epoch, expires_at FROM leases WHERE name IN (",
            );
            let mut names = select.separated(", ");
            for name in &take {
                names.push_bind(name.to_string());
            }
            select.push(") ORDER BY name").push(D::FOR_UPDATE);
            let rows: Vec<(String, String, i64, i64)> =
                select.build_query_as().fetch_all(&mut *tx).await?;
            rows_to_take = rows
                .into_iter()
                .map(|(name, holder, epoch, expires_at)| {
                    (
                        name,
                        LeaseRow {
                            holder,
                            epoch,
                            expires_at,
                        },
                    )
                })
                .collect();
        }
        // Read once the rows are locked: expiry is judged when the lock is held.
        let now = Self::clock(&mut tx).await?;
        let expires_at = now.saturating_add(ttl);
        if !keep.is_empty() {
            let mut update = QueryBuilder::<D>::new("UPDATE leases SET expires_at = ");
            update
                .push_bind(expires_at)
                .push(" WHERE holder = ")
                .push_bind(holder.to_owned())
                .push(" AND name IN (");
            let mut names = update.separated(", ");
            for lease in keep {
                names.push_bind(lease.name.clone());
            }
            update.push(") RETURNING name, epoch");
            let renewed: HashMap<String, i64> = update
                .build_query_as::<(String, i64)>()
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            for lease in keep {
                if renewed.get(&lease.name) == Some(&epoch_bound(lease.epoch)) {
                    claimed.kept.push(Lease {
                        expires_at: system_time_from_micros(expires_at),
                        ..lease.clone()
                    });
                } else {
                    claimed.lost.push(lease.name.clone());
                }
            }
        }
        for name in take {
            let row = rows_to_take.get(name);
            let next = match acquire_decision(name, row, holder, now, ttl) {
                Ok(next) => next,
                Err(StoreError::LeaseHeld { .. }) => continue,
                Err(error) => return Err(error),
            };
            Self::write_lease(&mut tx, name, &next).await?;
            claimed.taken.push(lease_from_row(name, &next));
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        validate_lease(&lease.name, &lease.holder)?;
        let mut conn = self.write.acquire().await?;
        let now = Self::clock(&mut conn).await?;
        // Expired as of now (not deleted: the epoch must keep counting up).
        let released = sqlx::query(
            "UPDATE leases SET expires_at = CASE WHEN expires_at < $4 THEN expires_at ELSE $4 END \
             WHERE name = $1 AND holder = $2 AND epoch = $3",
        )
        .bind(lease.name.as_str())
        .bind(lease.holder.as_str())
        .bind(epoch_bound(lease.epoch))
        .bind(now)
        .execute(&mut *conn)
        .await?;
        drop(conn);
        if D::rows_affected(&released) == 0 {
            return Err(fenced(lease, self.stored_epoch(&lease.name).await?));
        }
        Ok(())
    }

    async fn list_live_leases(&self, prefix: &str) -> Result<Vec<Lease>, StoreError> {
        check_text("prefix", prefix, MAX_NAME_LEN)?;
        let mut conn = self.read.acquire().await?;
        let now = Self::clock(&mut conn).await?;
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT name, holder, epoch, expires_at FROM leases \
             WHERE substr(name, 1, length($1)) = $1 AND expires_at > $2 ORDER BY name LIMIT $3",
        )
        .bind(prefix)
        .bind(now)
        .bind(i64::from(MAX_LIVE_LEASES))
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, holder, epoch, expires_at)| {
                lease_from_row(
                    &name,
                    &LeaseRow {
                        holder,
                        epoch,
                        expires_at,
                    },
                )
            })
            .collect())
    }

    async fn delete_expired_leases(
        &self,
        prefix: &str,
        expired_for: Duration,
    ) -> Result<u64, StoreError> {
        check_text("prefix", prefix, MAX_NAME_LEN)?;
        if !prefix.starts_with(MEMBER_LEASES) {
            return Err(StoreError::InvalidArgument(format!(
                "prefix: {prefix:?} does not start with {MEMBER_LEASES:?}; only member leases \
                 may be deleted (a deleted lease would restart its fencing epochs)"
            )));
        }
        let expired_for = lease_duration_micros("expired_for", expired_for)?;
        let mut conn = self.write.acquire().await?;
        let now = Self::clock(&mut conn).await?;
        let deleted = sqlx::query(
            "DELETE FROM leases WHERE substr(name, 1, length($1)) = $1 AND expires_at < $2",
        )
        .bind(prefix)
        .bind(now.saturating_sub(expired_for))
        .execute(&mut *conn)
        .await?;
        Ok(D::rows_affected(&deleted))
    }

    async fn commit_fenced(
        &self,
        fences: &[Lease],
        mut mutations: Vec<Mutation>,
    ) -> Result<(), StoreError> {
        check_fences(fences)?;
        validate_mutations(&mutations)?;
        if let Some(committer) = D::committer(&self.local) {
            return committer.commit(fences, mutations).await;
        }
        let (_turn, mut tx) = self.begin_write().await?;
        // PostgreSQL: FOR KEY SHARE lets concurrent commits and renewals go on together, but an
        // acquire (FOR UPDATE) waits for this transaction, and this check waits for an acquire
        // in flight and then reads the epoch it wrote. SQLite: the write lock already excludes
        // every other writer until the commit.
        let stale = if let [fence] = fences {
            // The common case (one lease per batch): one scalar read, no map.
            let current: Option<i64> = sqlx::query_scalar(with_fragment(format!(
                "SELECT epoch FROM leases WHERE name = $1{}",
                D::FOR_SHARE
            )))
            .bind(fence.name.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            (current != Some(epoch_bound(fence.epoch))).then(|| fenced(fence, current))
        } else {
            let mut query =
                QueryBuilder::<D>::new("SELECT name, epoch FROM leases WHERE name IN (");
            let mut names = query.separated(", ");
            for fence in fences {
                names.push_bind(fence.name.clone());
            }
            query.push(")").push(D::FOR_SHARE);
            let rows: Vec<(String, i64)> = query.build_query_as().fetch_all(&mut *tx).await?;
            let current: HashMap<&str, i64> = rows
                .iter()
                .map(|(name, epoch)| (name.as_str(), *epoch))
                .collect();
            fences.iter().find_map(|fence| {
                let stored = current.get(fence.name.as_str()).copied();
                (stored != Some(epoch_bound(fence.epoch))).then(|| fenced(fence, stored))
            })
        };
        if let Some(error) = stale {
            return Err(error);
        }
        D::apply(&mut tx, &mut mutations).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_schedule(&self, schedule: Schedule) -> Result<Schedule, StoreError> {
        validate_named("schedule", &schedule.id, &schedule.name)?;
        let query = sqlx::query(
            "INSERT INTO schedules (id, name, paused, last_tick, body) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(schedule.id.as_str())
        .bind(schedule.name.as_str())
        .bind(schedule.paused)
        .bind(schedule.last_tick.as_ref().map(micros))
        .bind(schedule_body(&schedule));
        self.insert_named(query, "schedule", &schedule.name).await?;
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
        self.delete_named(
            "DELETE FROM schedules WHERE id = $1 OR name = $1",
            "schedule",
            id_or_name,
        )
        .await
    }

    async fn set_schedule_paused(
        &self,
        id_or_name: &str,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        let _turn = self.write_turn().await;
        let updated = sqlx::query("UPDATE schedules SET paused = $2 WHERE id = $1 OR name = $1")
            .bind(id_or_name)
            .bind(paused)
            .execute(&self.write)
            .await?;
        if D::rows_affected(&updated) == 0 {
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
        let _turn = self.write_turn().await;
        let updated = sqlx::query(
            "UPDATE schedules SET last_tick = $2 WHERE id = $1 AND last_tick IS NOT DISTINCT FROM $3",
        )
        .bind(id)
        .bind(micros(&to))
        .bind(expected.as_ref().map(micros))
        .execute(&self.write)
        .await?;
        Ok(D::rows_affected(&updated) == 1)
    }

    async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, StoreError> {
        validate_named("trigger", &trigger.id, &trigger.name)?;
        let query =
            sqlx::query("INSERT INTO triggers (id, name, topic, body) VALUES ($1, $2, $3, $4)")
                .bind(trigger.id.as_str())
                .bind(trigger.name.as_str())
                .bind(trigger.topic.as_str())
                .bind(trigger.encode_to_vec());
        self.insert_named(query, "trigger", &trigger.name).await?;
        Ok(trigger)
    }

    async fn list_triggers(&self, topic: &str) -> Result<Vec<Trigger>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT name, body FROM triggers WHERE $1 = '' OR topic = $1 ORDER BY name",
        )
        .bind(topic)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|(name, body)| decode(body, || format!("trigger {name:?}")))
            .collect()
    }

    async fn delete_trigger(&self, id_or_name: &str) -> Result<(), StoreError> {
        self.delete_named(
            "DELETE FROM triggers WHERE id = $1 OR name = $1",
            "trigger",
            id_or_name,
        )
        .await
    }

    async fn put_backfill(&self, mut backfill: Backfill) -> Result<Backfill, StoreError> {
        if backfill.id.is_empty() {
            return Err(StoreError::InvalidArgument(
                "backfill.id: must not be empty".to_owned(),
            ));
        }
        let (_turn, mut tx) = self.begin_write().await?;
        let stored: Option<Vec<u8>> = sqlx::query_scalar(with_fragment(format!(
            "SELECT body FROM backfills WHERE id = $1{}",
            D::FOR_UPDATE
        )))
        .bind(backfill.id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        // Records written before revisions existed, and unreadable ones (which a scheduler
        // replaces to fail the backfill with the reason), count as revision 0.
        let expected = backfill.revision;
        match &stored {
            None if expected != 0 => return Err(not_found("backfill", &backfill.id)),
            None => {}
            Some(body) => {
                let current = Backfill::decode(body.as_slice()).map_or(0, |b| b.revision);
                if current != expected {
                    return Err(StoreError::Conflict(format!(
                        "backfill {:?} was changed by another writer: stored revision \
                         {current}, written from revision {expected}; nothing was written",
                        backfill.id
                    )));
                }
            }
        }
        backfill.revision = expected.saturating_add(1);
        sqlx::query(
            "INSERT INTO backfills (id, body) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )
        .bind(backfill.id.as_str())
        .bind(backfill.encode_to_vec())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(backfill)
    }

    async fn get_backfill(&self, id: &str) -> Result<Backfill, StoreError> {
        let body: Option<Vec<u8>> = sqlx::query_scalar("SELECT body FROM backfills WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        let body = body.ok_or_else(|| not_found("backfill", id))?;
        decode(&body, || format!("backfill {id:?}"))
    }

    async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError> {
        self.read_bodies(
            "SELECT id, body FROM backfills ORDER BY id DESC",
            "backfill",
        )
        .await
    }

    async fn put_token(&self, token: StoredToken) -> Result<(), StoreError> {
        let (id, name, created) = token_key(&token)?;
        let query = sqlx::query(
            "INSERT INTO tokens (token_id, name, created_at, body) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(name)
        .bind(created)
        .bind(token.encode_to_vec());
        self.insert_named(query, "token", name).await
    }

    async fn get_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let body: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM tokens WHERE token_id = $1 OR name = $1")
                .bind(id_or_name)
                .fetch_optional(&self.read)
                .await?;
        let body = body.ok_or_else(|| not_found("token", id_or_name))?;
        decode(&body, || format!("token {id_or_name:?}"))
    }

    async fn list_tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        self.read_bodies(
            "SELECT token_id, body FROM tokens ORDER BY created_at DESC, token_id DESC",
            "token",
        )
        .await
    }

    async fn revoke_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let row: Option<(String, Vec<u8>)> = sqlx::query_as(with_fragment(format!(
            "SELECT token_id, body FROM tokens WHERE token_id = $1 OR name = $1{}",
            D::FOR_UPDATE
        )))
        .bind(id_or_name)
        .fetch_optional(&mut *tx)
        .await?;
        let (id, body) = row.ok_or_else(|| not_found("token", id_or_name))?;
        let mut token: StoredToken = decode(&body, || format!("token {id:?}"))?;
        mark_revoked(&mut token);
        sqlx::query("UPDATE tokens SET body = $2 WHERE token_id = $1")
            .bind(id.as_str())
            .bind(token.encode_to_vec())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(token)
    }

    async fn read_cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let body: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM step_cache WHERE key = $1 AND expires_at > $2")
                .bind(key)
                .bind(now_micros())
                .fetch_optional(&self.read)
                .await?;
        body.map(|body| decode(&body, || format!("cache entry {key:?}")))
            .transpose()
    }

    async fn read_webhook_deliveries(
        &self,
        request: &ReadWebhookDeliveriesRequest,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        let limit = deliveries_limit(request);
        let rows: Vec<(String, String, Vec<u8>)> = match &request.due_before {
            Some(due) => {
                sqlx::query_as(
                    "SELECT delivery_id, run_id, body FROM webhook_deliveries \
                     WHERE state = $1 AND next_attempt_at <= $2 \
                     AND ($3 = '' OR run_id = $3) ORDER BY next_attempt_at LIMIT $4",
                )
                .bind(DeliveryState::Pending as i32)
                .bind(micros(due))
                .bind(request.run_id.as_str())
                .bind(limit)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query_as(
                    "SELECT delivery_id, run_id, body FROM webhook_deliveries \
                     WHERE ($1 = '' OR run_id = $1) \
                     ORDER BY created_at DESC, delivery_id DESC LIMIT $2",
                )
                .bind(request.run_id.as_str())
                .bind(limit)
                .fetch_all(&self.read)
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(|(id, run_id, body)| decode_delivery(id, run_id, body))
            .collect())
    }
}

//! The `MetadataStore` trait: the operations of the system of record, on proto records.

use std::time::{Duration, SystemTime};

use dagmesh_proto::limits::{MAX_NAME_LEN, MAX_VALUE_LEN};
use dagmesh_proto::v1::{
    ActiveRuns, Backfill, CacheEntry, ListRunsRequest, ListRunsResponse, Mutation,
    ReadWebhookDeliveriesRequest, Run, RunEvent, Schedule, StoredToken, Trigger, WebhookDelivery,
    Workflow, WorkflowSpec, mutation,
};
use prost_types::Timestamp;

use crate::StoreError;

/// The longest lease a holder may ask for: a holder that dies is replaced within this time at
/// worst, and a longer lease would only hide a holder that stopped renewing.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// A named lease and its fencing epoch (e.g. `"executor"`, later `"executor/partition-3"`).
///
/// The epoch goes up by one each time the lease is taken while free or expired, so a writer
/// that passes its lease to [`MetadataStore::commit_fenced`] is refused as soon as someone else
/// has taken over, even if it does not know yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    /// Unique per process: a restarted process that reused its predecessor's holder name
    /// would refresh the lease instead of taking it, and share its epoch.
    pub holder: String,
    pub epoch: u64,
    /// When the lease expires, by the database's clock. Renew on a timer of your own (e.g. every
    /// third of the TTL) rather than by comparing this with the local clock.
    pub expires_at: SystemTime,
}

/// What [`MetadataStore::claim_leases`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimedLeases {
    /// The leases of `keep` still held, renewed.
    pub kept: Vec<Lease>,
    /// The names of the leases of `keep` that someone else has taken since (or that were
    /// deleted): their writes are fenced now.
    pub lost: Vec<String>,
    /// The leases of `take` that were free or expired, taken (epoch + 1); a name of `take`
    /// that another holder holds unexpired is in none of the three lists.
    pub taken: Vec<Lease>,
}

/// Where the leases that announce group members are named (`members/<group>/<holder>`): the
/// only leases [`MetadataStore::delete_expired_leases`] deletes.
pub const MEMBER_LEASES: &str = "members/";

/// The most leases one `list_live_leases` answers (a group has a handful of members).
pub const MAX_LIVE_LEASES: u32 = 4096;

/// The most partitions a cluster may have (`init_cluster`), and so the most leases one fenced
/// commit checks and the most partitions one recovery reads.
pub const MAX_PARTITIONS: u32 = 4096;

/// Runs per `list_runs` page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Upper bound of a `list_runs` page; larger requests are clamped.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Events per `read_events` call when the request says 0.
pub const DEFAULT_EVENT_LIMIT: u32 = 1000;

/// The system of record: workflow versions, runs, their steps and their event logs.
///
/// Implemented by [`crate::SqlStore`] (in-process, SQLite or PostgreSQL) and by
/// [`crate::grpc::MetadataGrpcClient`] (a remote metastore), so callers hold an
/// `Arc<dyn MetadataStore>` and do not care which.
///
/// A new method goes here, in the SQL implementation (`sql/store.rs`, for every dialect at
/// once) and in the gRPC adapter (`grpc.rs`), with an RPC of the same name in
/// `proto/dagmesh/v1/metadata.proto`.
#[async_trait::async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Stores `spec` as the next version of `spec.name`, unless the latest version already has
    /// `content_hash`: then that version is returned with `false`. Safe under concurrent calls.
    async fn put_workflow(
        &self,
        spec: WorkflowSpec,
        content_hash: String,
    ) -> Result<(Workflow, bool), StoreError>;

    /// One version of a workflow; `None` means the latest.
    async fn get_workflow(&self, name: &str, version: Option<u32>) -> Result<Workflow, StoreError>;

    /// The latest version of every workflow, sorted by name.
    async fn list_workflows(&self) -> Result<Vec<Workflow>, StoreError>;

    /// Applies all `mutations` in one transaction: all or nothing. This is the group commit of
    /// the executor, its hot path.
    async fn commit(&self, mutations: Vec<Mutation>) -> Result<(), StoreError>;

    /// The run with its steps in workflow order.
    async fn get_run(&self, run_id: &str) -> Result<Run, StoreError>;

    /// Runs matching the filters, newest first, without their steps.
    async fn list_runs(&self, req: &ListRunsRequest) -> Result<ListRunsResponse, StoreError>;

    /// The id of the run that was created with this idempotency key, if any.
    async fn find_run_by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Events of a run with `seq > after_seq`, ascending, at most `limit` (0 means 1000).
    async fn read_events(
        &self,
        run_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<RunEvent>, StoreError>;

    /// Every QUEUED or RUNNING run with its steps, oldest first: what an executor recovers.
    /// Fails with `DataLoss` naming the run when a record of any of them does not decode; see
    /// [`MetadataStore::read_active_runs_checked`].
    async fn read_active_runs(&self) -> Result<Vec<Run>, StoreError>;

    // Recovery that never bricks.

    /// Like [`MetadataStore::read_active_runs`], but only the runs of `partitions` (`None`:
    /// every partition), and a run whose run record or any step record does not decode goes to
    /// `unreadable` (with the reason naming the record) instead of failing the call.
    async fn read_active_runs_checked(
        &self,
        partitions: Option<&[u32]>,
    ) -> Result<ActiveRuns, StoreError>;

    /// The cluster's partition count: the stored one, or `partitions` (1 to
    /// [`MAX_PARTITIONS`]) stored now when the database has none yet. Atomic under concurrent
    /// first callers: all of them get the one value that was stored.
    async fn init_cluster(&self, partitions: u32) -> Result<u32, StoreError>;

    /// Ends the run FAILED with `error = reason`, in one transaction, whatever its records hold:
    /// an undecodable run record is rebuilt from its indexed columns (and what of its header
    /// still decodes), undecodable step records become FAILED steps whose error says why,
    /// unfinished steps are CANCELLED with `reason`, each step change is appended as a
    /// StepStateChanged event and a RunStateChanged{FAILED, reason} event closes the log (after
    /// the highest stored seq). Returns the run as `get_run` now reads it. Unfenced, like
    /// `commit`. `NotFound` when the run does not exist.
    async fn quarantine_run(&self, run_id: &str, reason: &str) -> Result<Run, StoreError>;

    // Leases and fencing.

    /// Takes the lease `name` for `holder` until now + `ttl` (the database's now) when it is
    /// free or expired (the epoch goes up by one), or refreshes it when `holder` already holds
    /// it unexpired (same epoch). `LeaseHeld` when another holder holds it. Atomic under
    /// concurrent callers. `ttl` must be more than 0 and at most [`MAX_LEASE_TTL`].
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError>;

    /// Extends the lease to now + `ttl` if its stored holder and epoch still match `lease`
    /// (even if it expired meanwhile: nobody took it, so the epoch still fences). `Fenced`
    /// otherwise.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError>;

    /// A group member's refresh in one transaction: renews each lease of `keep` whose stored
    /// holder and epoch still match (to now + `ttl`), and takes each name of `take` that is
    /// free or expired (as [`MetadataStore::acquire_lease`] would, epoch + 1), for `holder`.
    /// Every lease of `keep` must name `holder`; `keep` and `take` hold at most
    /// [`MAX_PARTITIONS`] names each, and no name twice. An executor that owns 256 partitions
    /// renews them with one call instead of 256.
    async fn claim_leases(
        &self,
        holder: &str,
        ttl: Duration,
        keep: &[Lease],
        take: &[String],
    ) -> Result<ClaimedLeases, StoreError>;

    /// Marks the lease free (expired now) if holder and epoch match, so that a standby can take
    /// it at once. `Fenced` otherwise (someone else holds it; nothing changed).
    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError>;

    /// The leases whose name starts with `prefix` and that have not expired by the database's
    /// clock, by name, at most [`MAX_LIVE_LEASES`]. Members of a group announce themselves
    /// this way (`members/scheduler/...`), so every member computes the same partition owners.
    async fn list_live_leases(&self, prefix: &str) -> Result<Vec<Lease>, StoreError>;

    /// Deletes the member announcements (leases named `members/...`) under `prefix` that
    /// expired more than `expired_for` ago, by the database's clock; returns how many. Only
    /// member leases may be deleted: a deleted lease would start its epochs again at 1, and
    /// the epoch is what fences a partition's writers.
    async fn delete_expired_leases(
        &self,
        prefix: &str,
        expired_for: Duration,
    ) -> Result<u64, StoreError>;

    /// [`MetadataStore::commit`], fenced: in the same transaction, checks that the stored epoch
    /// of each lease of `fences` (one, or one per partition the batch touches) still equals
    /// its `epoch` (expiry is not checked: the epoch is the fence). `Fenced`, naming the first
    /// stale lease, with nothing applied, when one does not. One extra indexed read per lease.
    async fn commit_fenced(
        &self,
        fences: &[Lease],
        mutations: Vec<Mutation>,
    ) -> Result<(), StoreError>;

    // The scheduler's state.

    /// Stores a new schedule (`id` and `name` set by the caller). `AlreadyExists` when the id or
    /// the name is taken. `last_tick` and `next_tick` are not stored; `paused` is.
    async fn create_schedule(&self, schedule: Schedule) -> Result<Schedule, StoreError>;

    /// A schedule by id or name, with `paused` and `last_tick` filled in.
    async fn get_schedule(&self, id_or_name: &str) -> Result<Schedule, StoreError>;

    /// Every schedule, sorted by name.
    async fn list_schedules(&self) -> Result<Vec<Schedule>, StoreError>;

    /// Deletes a schedule by id or name; `NotFound` when absent.
    async fn delete_schedule(&self, id_or_name: &str) -> Result<(), StoreError>;

    /// Sets `paused` (and nothing else) of a schedule by id or name; returns it.
    async fn set_schedule_paused(
        &self,
        id_or_name: &str,
        paused: bool,
    ) -> Result<Schedule, StoreError>;

    /// Compare-and-set of a schedule's `last_tick`: moves it to `to` only if it still is
    /// `expected` (`None`: no tick yet). Returns whether it moved; `false` means another
    /// scheduler advanced it first (or the schedule was deleted).
    async fn advance_schedule(
        &self,
        id: &str,
        expected: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Stores a new trigger; `AlreadyExists` when the id or the name is taken.
    async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, StoreError>;

    /// Triggers of `topic` (every trigger when empty), sorted by name.
    async fn list_triggers(&self, topic: &str) -> Result<Vec<Trigger>, StoreError>;

    /// Deletes a trigger by id or name; `NotFound` when absent.
    async fn delete_trigger(&self, id_or_name: &str) -> Result<(), StoreError>;

    /// Inserts a backfill (`revision` 0; stored with revision 1) or replaces the stored one if
    /// it still has `backfill.revision` (stored with revision + 1); returns what was stored.
    /// `Conflict` when the stored revision differs (another writer came first; nothing
    /// written); `NotFound` when a revision other than 0 names no record.
    async fn put_backfill(&self, backfill: Backfill) -> Result<Backfill, StoreError>;

    /// `NotFound` when absent.
    async fn get_backfill(&self, id: &str) -> Result<Backfill, StoreError>;

    /// Every backfill, newest first.
    async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError>;

    // --- API tokens (only hashes of their secrets) ---

    /// Stores a new token; `AlreadyExists` when its id or name is taken.
    async fn put_token(&self, token: StoredToken) -> Result<(), StoreError>;

    /// A token by id or name, revoked or not; `NotFound` when absent.
    async fn get_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError>;

    /// Every token, newest first.
    async fn list_tokens(&self) -> Result<Vec<StoredToken>, StoreError>;

    /// Marks a token revoked now (an earlier revocation keeps its time) and returns it.
    async fn revoke_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError>;

    // --- step cache (written by `commit`, `Mutation.put_cache_entry`) ---

    /// The entry stored under `key`, unless there is none or it has expired.
    async fn read_cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError>;

    // --- webhook outbox (written by `commit`, `Mutation.put_webhook_delivery`) ---

    /// Deliveries of one run or all, or the due PENDING ones (see the request's fields).
    async fn read_webhook_deliveries(
        &self,
        request: &ReadWebhookDeliveriesRequest,
    ) -> Result<Vec<WebhookDelivery>, StoreError>;
}

/// The row limit of a `ReadWebhookDeliveriesRequest` (0 means 100, at most 1000).
pub(crate) fn deliveries_limit(request: &ReadWebhookDeliveriesRequest) -> i64 {
    match request.limit {
        0 => 100,
        limit => i64::from(limit.min(1000)),
    }
}

/// Checks a token before it is stored; returns its id, name and creation time (micros).
pub(crate) fn token_key(stored: &StoredToken) -> Result<(&str, &str, i64), StoreError> {
    let token = stored
        .token
        .as_ref()
        .ok_or_else(|| StoreError::InvalidArgument("token: required".to_owned()))?;
    check_text("token.token_id", &token.token_id, MAX_NAME_LEN)?;
    check_text("token.name", &token.name, MAX_NAME_LEN)?;
    if stored.secret_sha256.len() != 64 {
        return Err(StoreError::InvalidArgument(
            "secret_sha256: must be 64 hex digits".to_owned(),
        ));
    }
    let created = token.created_at.as_ref().map(micros).unwrap_or_default();
    Ok((&token.token_id, &token.name, created))
}

/// Sets `revoked_at` to now unless the token was revoked before.
pub(crate) fn mark_revoked(stored: &mut StoredToken) {
    if let Some(token) = stored.token.as_mut()
        && token.revoked_at.is_none()
    {
        token.revoked_at = Some(from_micros(now_micros()));
    }
}

/// A timestamp as the microseconds column that compare-and-set compares.
pub(crate) fn micros(ts: &Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos / 1000))
}

pub(crate) fn from_micros(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

pub(crate) fn validate_named(kind: &str, id: &str, name: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::InvalidArgument(format!(
            "{kind}.id: must not be empty"
        )));
    }
    if name.is_empty() {
        return Err(StoreError::InvalidArgument(format!(
            "{kind}.name: must not be empty"
        )));
    }
    Ok(())
}

/// Checks the name and holder of a lease request against the limits of the contract.
pub(crate) fn validate_lease(name: &str, holder: &str) -> Result<(), StoreError> {
    check_text("lease.name", name, MAX_NAME_LEN)?;
    check_text("lease.holder", holder, MAX_VALUE_LEN)
}

/// A partition count for `init_cluster`: 1 to [`MAX_PARTITIONS`].
pub(crate) fn check_partition_count(partitions: u32) -> Result<(), StoreError> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(StoreError::InvalidArgument(format!(
            "partitions: {partitions} is out of range (1 to {MAX_PARTITIONS})"
        )));
    }
    Ok(())
}

/// A partition filter of `read_active_runs_checked`: at most [`MAX_PARTITIONS`] entries, each
/// below it.
pub(crate) fn check_partition_filter(partitions: &[u32]) -> Result<(), StoreError> {
    if partitions.len() > MAX_PARTITIONS as usize {
        return Err(StoreError::InvalidArgument(format!(
            "partitions: {} entries, over the limit of {MAX_PARTITIONS}",
            partitions.len()
        )));
    }
    if let Some((index, partition)) = partitions
        .iter()
        .enumerate()
        .find(|(_, partition)| **partition >= MAX_PARTITIONS)
    {
        return Err(StoreError::InvalidArgument(format!(
            "partitions[{index}]: {partition} is out of range (below {MAX_PARTITIONS})"
        )));
    }
    Ok(())
}

/// The fences of a `commit_fenced`: 1 to [`MAX_PARTITIONS`] leases, each name valid and given
/// once.
pub(crate) fn check_fences(fences: &[Lease]) -> Result<(), StoreError> {
    if fences.is_empty() {
        return Err(StoreError::InvalidArgument(
            "fences: at least one lease is required".into(),
        ));
    }
    // One per partition, and the writer's own lease (the executor's) beside them.
    let limit = MAX_PARTITIONS as usize + 1;
    if fences.len() > limit {
        return Err(StoreError::InvalidArgument(format!(
            "fences: {} leases, over the limit of {limit}",
            fences.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(fences.len());
    for (index, fence) in fences.iter().enumerate() {
        check_text(&format!("fences[{index}].name"), &fence.name, MAX_NAME_LEN)?;
        if !seen.insert(fence.name.as_str()) {
            return Err(StoreError::InvalidArgument(format!(
                "fences[{index}].name: {:?} is given twice",
                fence.name
            )));
        }
    }
    Ok(())
}

/// The arguments of `claim_leases`: a valid holder, each list at most [`MAX_PARTITIONS`]
/// long, `keep` all held by `holder`, and no name twice in either list.
pub(crate) fn check_claim(holder: &str, keep: &[Lease], take: &[String]) -> Result<(), StoreError> {
    check_text("holder", holder, MAX_VALUE_LEN)?;
    for (field, len) in [("keep", keep.len()), ("take", take.len())] {
        if len > MAX_PARTITIONS as usize {
            return Err(StoreError::InvalidArgument(format!(
                "{field}: {len} leases, over the limit of {MAX_PARTITIONS}"
            )));
        }
    }
    let mut seen = std::collections::HashSet::with_capacity(keep.len() + take.len());
    let names = keep
        .iter()
        .enumerate()
        .map(|(index, lease)| (format!("keep[{index}].name"), lease.name.as_str()))
        .chain(
            take.iter()
                .enumerate()
                .map(|(index, name)| (format!("take[{index}]"), name.as_str())),
        );
    for (field, name) in names {
        check_text(&field, name, MAX_NAME_LEN)?;
        if !seen.insert(name) {
            return Err(StoreError::InvalidArgument(format!(
                "{field}: {name:?} is given twice"
            )));
        }
    }
    if let Some((index, lease)) = keep
        .iter()
        .enumerate()
        .find(|(_, lease)| lease.holder != holder)
    {
        return Err(StoreError::InvalidArgument(format!(
            "keep[{index}].holder: {:?} is not the caller's holder {holder:?}",
            lease.holder
        )));
    }
    Ok(())
}

pub(crate) fn check_text(field: &str, value: &str, limit: usize) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(StoreError::InvalidArgument(format!(
            "{field}: must not be empty"
        )));
    }
    if value.len() > limit {
        return Err(StoreError::InvalidArgument(format!(
            "{field}: {} bytes, over the limit of {limit}",
            value.len()
        )));
    }
    Ok(())
}

/// A lease TTL in microseconds, checked against (0, [`MAX_LEASE_TTL`]].
pub(crate) fn ttl_micros(ttl: Duration) -> Result<i64, StoreError> {
    lease_duration_micros("ttl", ttl)
}

/// A lease duration named `field`, checked like a TTL, in microseconds.
pub(crate) fn lease_duration_micros(field: &str, ttl: Duration) -> Result<i64, StoreError> {
    if ttl.is_zero() || ttl > MAX_LEASE_TTL {
        return Err(StoreError::InvalidArgument(format!(
            "{field}: {ttl:?} is out of range (more than 0, at most {MAX_LEASE_TTL:?})"
        )));
    }
    // At most an hour: always fits.
    Ok(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX))
}

/// A lease epoch as stored (BIGINT) for comparisons; epochs beyond `i64::MAX` are never stored,
/// so a larger one matches nothing.
pub(crate) fn epoch_bound(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

/// A stored lease row: `(holder, epoch, expires_at)`, times in microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRow {
    pub holder: String,
    pub epoch: i64,
    pub expires_at: i64,
}

/// The decision of `acquire_lease`, shared by both dialects: what the lease row becomes, given
/// what it is (`None`: never taken) and the database's `now`.
pub(crate) fn acquire_decision(
    name: &str,
    row: Option<&LeaseRow>,
    holder: &str,
    now: i64,
    ttl: i64,
) -> Result<LeaseRow, StoreError> {
    let expires_at = now.saturating_add(ttl);
    let epoch = match row {
        None => 1,
        Some(row) if row.expires_at <= now => row.epoch.saturating_add(1),
        Some(row) if row.holder == holder => row.epoch,
        Some(row) => {
            return Err(StoreError::LeaseHeld {
                name: name.to_owned(),
                holder: row.holder.clone(),
                expires_in: Duration::from_micros(
                    u64::try_from(row.expires_at.saturating_sub(now)).unwrap_or(0),
                ),
            });
        }
    };
    Ok(LeaseRow {
        holder: holder.to_owned(),
        epoch,
        expires_at,
    })
}

/// The [`Lease`] of a stored row.
pub(crate) fn lease_from_row(name: &str, row: &LeaseRow) -> Lease {
    Lease {
        name: name.to_owned(),
        holder: row.holder.clone(),
        epoch: u64::try_from(row.epoch).unwrap_or(0),
        expires_at: system_time_from_micros(row.expires_at),
    }
}

/// Microseconds since the Unix epoch as a `SystemTime`, clamped to what the platform holds.
pub(crate) fn system_time_from_micros(micros: i64) -> SystemTime {
    let offset = Duration::from_micros(micros.unsigned_abs());
    let time = if micros >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(offset)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(offset)
    };
    time.unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The process clock in microseconds since the Unix epoch (SQLite has no clock of its own
/// that other processes share any better).
pub(crate) fn now_micros() -> i64 {
    match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

/// The error for a lease whose stored epoch (`current`, `None` when never taken) is not the
/// caller's.
pub(crate) fn fenced(lease: &Lease, current: Option<i64>) -> StoreError {
    StoreError::Fenced {
        name: lease.name.clone(),
        epoch: lease.epoch,
        current_epoch: current.and_then(|c| u64::try_from(c).ok()).unwrap_or(0),
    }
}

pub(crate) fn not_found(kind: &str, id_or_name: &str) -> StoreError {
    StoreError::NotFound(format!("{kind} {id_or_name:?} not found"))
}

pub(crate) fn name_taken(kind: &str, name: &str) -> StoreError {
    StoreError::AlreadyExists(format!("{kind} {name:?} already exists"))
}

/// The stored form of a schedule: `paused` and `last_tick` have columns of their own and
/// `next_tick` is computed, so none is in the body.
pub(crate) fn schedule_body(schedule: &Schedule) -> Vec<u8> {
    use prost::Message as _;
    Schedule {
        paused: false,
        last_tick: None,
        next_tick: None,
        ..schedule.clone()
    }
    .encode_to_vec()
}

/// A schedule from its row.
pub(crate) fn schedule_from_row(
    body: &[u8],
    paused: bool,
    last_tick: Option<i64>,
) -> Result<Schedule, StoreError> {
    use prost::Message as _;
    let mut schedule = Schedule::decode(body)?;
    schedule.paused = paused;
    schedule.last_tick = last_tick.map(from_micros);
    Ok(schedule)
}

/// Checks a commit batch before any database work, so a malformed batch never half-applies and
/// gets a message that points at the offending mutation.
pub(crate) fn validate_mutations(mutations: &[Mutation]) -> Result<(), StoreError> {
    for (i, m) in mutations.iter().enumerate() {
        match &m.mutation {
            None => {
                return Err(StoreError::InvalidArgument(format!(
                    "mutations[{i}]: empty mutation"
                )));
            }
            Some(mutation::Mutation::PutRun(run)) => {
                if run.run_id.is_empty() {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].put_run.run_id: must not be empty"
                    )));
                }
                if run.partition >= MAX_PARTITIONS {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].put_run.partition: {} is out of range (below {MAX_PARTITIONS})",
                        run.partition
                    )));
                }
            }
            Some(mutation::Mutation::PutCacheEntry(entry)) => {
                if entry.key.is_empty() || entry.key.len() > MAX_NAME_LEN {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].put_cache_entry.key: 1 to {MAX_NAME_LEN} bytes expected, got {}",
                        entry.key.len()
                    )));
                }
                if entry.expires_at.is_none() {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].put_cache_entry.expires_at: required"
                    )));
                }
            }
            Some(mutation::Mutation::PutWebhookDelivery(delivery)) => {
                if delivery.delivery_id.is_empty()
                    || delivery.delivery_id.len() > MAX_NAME_LEN
                    || delivery.run_id.is_empty()
                    || delivery.run_id.len() > MAX_NAME_LEN
                {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].put_webhook_delivery: delivery_id and run_id must be \
                         1 to {MAX_NAME_LEN} bytes"
                    )));
                }
            }
            Some(mutation::Mutation::PutStep(step)) => {
                if step.run_id.is_empty() || step.step_id.is_empty() {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].put_step: run_id and step_id must not be empty"
                    )));
                }
            }
            Some(mutation::Mutation::AppendEvent(event)) => {
                if event.run_id.is_empty() {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].append_event.run_id: must not be empty"
                    )));
                }
                if event.seq == 0 || i64::try_from(event.seq).is_err() {
                    return Err(StoreError::InvalidArgument(format!(
                        "mutations[{i}].append_event.seq: {} is out of range (1..2^63)",
                        event.seq
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The effective page size of a `list_runs` request.
pub(crate) fn page_size(req: &ListRunsRequest) -> u32 {
    match req.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// The effective limit of a `read_events` call.
pub(crate) fn event_limit(limit: u32) -> u32 {
    match limit {
        0 => DEFAULT_EVENT_LIMIT,
        n => n,
    }
}

pub(crate) fn workflow_not_found(name: &str, version: Option<u32>) -> StoreError {
    match version {
        Some(v) => StoreError::NotFound(format!("workflow {name:?} version {v} not found")),
        None => StoreError::NotFound(format!("workflow {name:?} not found")),
    }
}

pub(crate) fn run_not_found(run_id: &str) -> StoreError {
    StoreError::NotFound(format!("run {run_id:?} not found"))
}

//! The `MetadataStore` trait: the operations of the system of record, on proto records.

use dagmesh_proto::v1::{
    Backfill, ListRunsRequest, ListRunsResponse, Mutation, Run, RunEvent, Schedule, Trigger,
    Workflow, WorkflowSpec, mutation,
};
use prost_types::Timestamp;

use crate::StoreError;

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
    async fn read_active_runs(&self) -> Result<Vec<Run>, StoreError>;

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

    /// Inserts or replaces a backfill, keyed by id.
    async fn put_backfill(&self, backfill: Backfill) -> Result<(), StoreError>;

    /// `NotFound` when absent.
    async fn get_backfill(&self, id: &str) -> Result<Backfill, StoreError>;

    /// Every backfill, newest first.
    async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError>;
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

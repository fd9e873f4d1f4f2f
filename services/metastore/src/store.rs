//! The `MetadataStore` trait: the operations of the system of record, on proto records.

use dagmesh_proto::v1::{
    ListRunsRequest, ListRunsResponse, Mutation, Run, RunEvent, Workflow, WorkflowSpec, mutation,
};

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

//! The executor's run API as a Rust trait: [`ExecutorApi`].
//!
//! Implemented in-process by the executor (`dagmesh_executor::Executor`) and remotely by
//! [`GrpcExecutor`], a `RunService` client, so that callers — the CLI, the scheduler, and
//! replicas forwarding to the owner of a run — hold an `Arc<dyn ExecutorApi>` and do not care
//! which. The executor's `RunService` server is a thin adapter over the same trait. Requests
//! and answers are the messages of `proto/dagmesh/v1/run.proto`; errors are [`ApiError`],
//! which names the gRPC code a caller can act on without being a `tonic::Status`.

mod error;
mod grpc;

use std::pin::Pin;

use dagmesh_proto::v1::{
    ApplyWorkflowRequest, ApplyWorkflowResponse, ApproveStepRequest, CancelRunRequest,
    DeliverEventRequest, DeliverEventResponse, GetStepLogsRequest, GetStepLogsResponse,
    GetWorkflowRequest, ListQueuesRequest, ListQueuesResponse, ListRunsRequest, ListRunsResponse,
    ListWorkersRequest, ListWorkersResponse, ListWorkflowsRequest, ListWorkflowsResponse,
    ResumeRunRequest, RetryRunRequest, Run, SubmitRunRequest, SubmitRunResponse, SuspendRunRequest,
    WatchRunRequest, WatchRunResponse, Workflow,
};
use futures::Stream;

pub use error::{ApiError, ErrorKind};
pub use grpc::GrpcExecutor;

/// A stream of answers (WatchRun, GetStepLogs); it ends when there is nothing more to send,
/// and an error item ends it too.
pub type ApiStream<T> = Pin<Box<dyn Stream<Item = Result<T, ApiError>> + Send>>;

/// Who makes a call, as far as the executor records it. In-process callers say so here; a
/// remote executor learns the actor from the caller's token instead, and receives the trace
/// context as the `traceparent` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// Recorded as `Run.submitted_by` and in the audit trail of cancels, retries and approvals.
    pub actor: String,
    /// A W3C trace context: the run's spans continue this trace.
    pub traceparent: Option<String>,
    /// The call was forwarded by another executor replica to the one that drives its run
    /// (executors that share the partitions): it is answered there, never forwarded again.
    pub forwarded: bool,
}

/// The header a forwarding replica names the original caller in (`Caller::forwarded`); only
/// calls made with the services' internal token may carry it.
pub const ON_BEHALF_OF: &str = "dagmesh-on-behalf-of";

impl Caller {
    pub fn new(actor: impl Into<String>) -> Self {
        Caller {
            actor: actor.into(),
            traceparent: None,
            forwarded: false,
        }
    }
}

/// The API of an executor, call for call: `RunService`, `WorkflowService` and
/// `ClusterService`.
#[async_trait::async_trait]
pub trait ExecutorApi: Send + Sync + 'static {
    /// Registers a workflow version (`created` false when the content is unchanged).
    async fn apply_workflow(
        &self,
        request: ApplyWorkflowRequest,
    ) -> Result<ApplyWorkflowResponse, ApiError>;

    /// A workflow version (0: the latest); `NotFound` when absent.
    async fn get_workflow(&self, request: GetWorkflowRequest) -> Result<Workflow, ApiError>;

    /// The latest version of every workflow.
    async fn list_workflows(
        &self,
        request: ListWorkflowsRequest,
    ) -> Result<ListWorkflowsResponse, ApiError>;

    /// The workers connected to this executor.
    async fn list_workers(
        &self,
        request: ListWorkersRequest,
    ) -> Result<ListWorkersResponse, ApiError>;

    /// What waits for workers, per task type, version requirement and labels.
    async fn list_queues(&self, request: ListQueuesRequest)
    -> Result<ListQueuesResponse, ApiError>;

    /// Starts a run, or answers the run an earlier submit with the same idempotency key made
    /// (`created` false).
    async fn submit_run(
        &self,
        caller: &Caller,
        request: SubmitRunRequest,
    ) -> Result<SubmitRunResponse, ApiError>;

    /// The run with its steps; `NotFound` when there is none.
    async fn get_run(&self, run_id: &str) -> Result<Run, ApiError>;

    /// Runs matching the filters, newest first, a page at a time.
    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, ApiError>;

    /// The run's snapshot (unless resuming after `after_seq`), then its events live until the
    /// run's final event. `NotFound` before the stream opens when the run does not exist.
    async fn watch_run(
        &self,
        request: WatchRunRequest,
    ) -> Result<ApiStream<WatchRunResponse>, ApiError>;

    /// The logs of a step (and its map items), optionally followed until the run ends.
    async fn get_step_logs(
        &self,
        request: GetStepLogsRequest,
    ) -> Result<ApiStream<GetStepLogsResponse>, ApiError>;

    /// Cancels a run that has not ended (`FailedPrecondition` once it has).
    async fn cancel_run(&self, caller: &Caller, request: CancelRunRequest)
    -> Result<Run, ApiError>;

    /// Runs a failed or cancelled run again (from a step, keeping what came before it).
    async fn retry_run(&self, caller: &Caller, request: RetryRunRequest) -> Result<Run, ApiError>;

    /// Approves or denies a step waiting for approval.
    async fn approve_step(
        &self,
        caller: &Caller,
        request: ApproveStepRequest,
    ) -> Result<Run, ApiError>;

    /// Stops dispatching a run's steps until it is resumed.
    async fn suspend_run(
        &self,
        caller: &Caller,
        request: SuspendRunRequest,
    ) -> Result<Run, ApiError>;

    async fn resume_run(&self, caller: &Caller, request: ResumeRunRequest)
    -> Result<Run, ApiError>;

    /// Resumes the steps waiting for an event on the topic that accept its payload (on every
    /// executor replica, when they share the runs).
    async fn deliver_event(
        &self,
        caller: &Caller,
        request: DeliverEventRequest,
    ) -> Result<DeliverEventResponse, ApiError>;
}

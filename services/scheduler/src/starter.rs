//! [`RunStarter`]: how the scheduler starts, cancels and reads runs — the port through which it
//! uses the executor's API without depending on the executor crate. [`ExecutorStarter`]
//! implements it over any [`ExecutorApi`]: the in-process executor in `dagmesh up`, a
//! [`GrpcExecutor`] standalone (`dagmesh scheduler --executor URL`).

use std::sync::Arc;

use dagmesh_api::{ApiError, Caller, ErrorKind, ExecutorApi, GrpcExecutor};
use dagmesh_proto::connect::ClientSettings;
use dagmesh_proto::v1::{
    CancelRunRequest, DeliverEventRequest, ListRunsRequest, ListRunsResponse, Run,
    SubmitRunRequest, WatchRunRequest,
};
use futures::StreamExt;

use crate::SchedError;

#[async_trait::async_trait]
pub trait RunStarter: Send + Sync + 'static {
    /// Starts a run, or returns the run an earlier submit with the same idempotency key made
    /// (`false`).
    async fn submit(&self, request: SubmitRunRequest) -> Result<(Run, bool), SchedError>;
    /// Cancels a run that has not ended (`FailedPrecondition` if it has).
    async fn cancel(&self, run_id: &str, reason: &str) -> Result<(), SchedError>;
    async fn get_run(&self, run_id: &str) -> Result<Run, SchedError>;
    /// Runs matching the request's filters (tags), newest first, paginated.
    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, SchedError>;
    /// Resumes the steps waiting for an event on `topic` that accept `payload`; their task ids.
    async fn deliver_event(
        &self,
        topic: &str,
        payload: prost_types::Struct,
    ) -> Result<Vec<String>, SchedError>;
    /// Returns once the run has ended (at once if it already has), so that a backfill starts
    /// its next partition the moment a slot frees. A starter that cannot tell never returns;
    /// the backfill's poll then notices the end.
    async fn wait_ended(&self, run_id: &str) -> Result<(), SchedError> {
        let _ = run_id;
        std::future::pending().await
    }
}

/// The actor recorded on the runs the scheduler starts or cancels in-process (a remote
/// executor records the scheduler's token instead).
const SCHEDULER: &str = "scheduler";

/// The [`RunStarter`] over any [`ExecutorApi`]: the executor in the same process (`dagmesh up`)
/// or a remote one's `RunService` (`dagmesh scheduler --executor URL`).
#[derive(Clone)]
pub struct ExecutorStarter {
    api: Arc<dyn ExecutorApi>,
    caller: Caller,
}

impl ExecutorStarter {
    pub fn new(api: Arc<dyn ExecutorApi>) -> Self {
        ExecutorStarter {
            api,
            caller: Caller::new(SCHEDULER),
        }
    }

    /// A remote executor, connected lazily with the TLS settings and (internal) token of
    /// `settings`: it may start later; calls fail `Unavailable` until it does.
    pub fn connect(url: &str, settings: &ClientSettings) -> Result<Self, SchedError> {
        Ok(Self::new(Arc::new(GrpcExecutor::connect_lazy(
            url, settings,
        )?)))
    }
}

impl From<ApiError> for SchedError {
    fn from(error: ApiError) -> Self {
        let message = error.message;
        match error.kind {
            ErrorKind::InvalidArgument => SchedError::InvalidArgument(message),
            ErrorKind::NotFound => SchedError::NotFound(message),
            ErrorKind::AlreadyExists => SchedError::AlreadyExists(message),
            ErrorKind::FailedPrecondition => SchedError::FailedPrecondition(message),
            // All worth retrying: the request was not applied.
            ErrorKind::Unavailable
            | ErrorKind::Aborted
            | ErrorKind::DeadlineExceeded
            | ErrorKind::Cancelled => {
                SchedError::Unavailable(format!("executor unavailable: {message}"))
            }
            kind => SchedError::Internal(format!("executor error ({kind:?}): {message}")),
        }
    }
}

#[async_trait::async_trait]
impl RunStarter for ExecutorStarter {
    async fn submit(&self, request: SubmitRunRequest) -> Result<(Run, bool), SchedError> {
        let response = self.api.submit_run(&self.caller, request).await?;
        let run = response
            .run
            .ok_or_else(|| SchedError::Internal("SubmitRun answered without a run".into()))?;
        Ok((run, response.created))
    }

    async fn cancel(&self, run_id: &str, reason: &str) -> Result<(), SchedError> {
        let request = CancelRunRequest {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        };
        self.api.cancel_run(&self.caller, request).await?;
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, SchedError> {
        Ok(self.api.get_run(run_id).await?)
    }

    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, SchedError> {
        Ok(self.api.list_runs(request).await?)
    }

    async fn deliver_event(
        &self,
        topic: &str,
        payload: prost_types::Struct,
    ) -> Result<Vec<String>, SchedError> {
        let request = DeliverEventRequest {
            topic: topic.to_owned(),
            payload: Some(payload),
        };
        Ok(self.api.deliver_event(&self.caller, request).await?.resumed)
    }

    /// Follows the run's events until the executor closes the stream (after the final event,
    /// or when it goes away: GetRun tells which).
    async fn wait_ended(&self, run_id: &str) -> Result<(), SchedError> {
        let request = WatchRunRequest {
            run_id: run_id.to_owned(),
            after_seq: None,
        };
        let mut events = self.api.watch_run(request).await?;
        while let Some(event) = events.next().await {
            event?;
        }
        require_ended(&self.get_run(run_id).await?)
    }
}

/// What [`RunStarter::wait_ended`] returns for the run it waited for: `Ok` for a run that has
/// ended; a run still going (the executor is a standby, or went away) is `Unavailable`, so the
/// caller falls back to polling instead of waiting again at once.
pub fn require_ended(run: &Run) -> Result<(), SchedError> {
    use dagmesh_proto::v1::RunState;
    match run.state() {
        RunState::Succeeded | RunState::Failed | RunState::Cancelled => Ok(()),
        _ => Err(SchedError::Unavailable(format!(
            "run {} has not ended here",
            run.run_id
        ))),
    }
}

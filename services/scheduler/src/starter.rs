//! [`RunStarter`]: how the scheduler starts, cancels and reads runs — the port through which it
//! uses the executor's API without depending on the executor crate. In `dagmesh up` the
//! composition root implements it over the in-process executor (`dagmesh::mesh::InProcessStarter`);
//! standalone (`dagmesh scheduler --executor URL`) it is [`RunServiceStarter`], a `RunService`
//! client.

use std::time::Duration;

use dagmesh_proto::connect::{AuthChannel, ClientSettings, Credentials};
use dagmesh_proto::v1::run_service_client::RunServiceClient;
use dagmesh_proto::v1::{
    CancelRunRequest, GetRunRequest, ListRunsRequest, ListRunsResponse, Run, SubmitRunRequest,
    WatchRunRequest,
};
use tonic::transport::Channel;

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

/// A [`RunStarter`] that is a remote executor's `RunService`.
#[derive(Clone)]
pub struct RunServiceStarter {
    client: RunServiceClient<AuthChannel>,
}

impl RunServiceStarter {
    /// Connects lazily, with the TLS settings and (internal) token of `settings`: the
    /// executor may start later; calls fail `Unavailable` until it does.
    pub fn connect(url: &str, settings: &ClientSettings) -> Result<Self, SchedError> {
        let channel = settings
            .connect_lazy(url, |endpoint| {
                endpoint.connect_timeout(Duration::from_secs(5))
            })
            .map_err(|err| SchedError::InvalidArgument(format!("executor {url}: {err}")))?;
        Ok(Self {
            client: RunServiceClient::new(channel),
        })
    }

    /// Over an existing channel, without credentials.
    pub fn from_channel(channel: Channel) -> Self {
        RunServiceStarter {
            client: RunServiceClient::new(Credentials::none().wrap(channel)),
        }
    }
}

#[async_trait::async_trait]
impl RunStarter for RunServiceStarter {
    async fn submit(&self, request: SubmitRunRequest) -> Result<(Run, bool), SchedError> {
        let resp = self.client.clone().submit_run(request).await?.into_inner();
        let run = resp
            .run
            .ok_or_else(|| SchedError::Internal("SubmitRun answered without a run".into()))?;
        Ok((run, resp.created))
    }

    async fn cancel(&self, run_id: &str, reason: &str) -> Result<(), SchedError> {
        let request = CancelRunRequest {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        };
        self.client.clone().cancel_run(request).await?;
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, SchedError> {
        let request = GetRunRequest {
            run_id: run_id.to_owned(),
        };
        Ok(self.client.clone().get_run(request).await?.into_inner())
    }

    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, SchedError> {
        Ok(self.client.clone().list_runs(request).await?.into_inner())
    }

    async fn deliver_event(
        &self,
        topic: &str,
        payload: prost_types::Struct,
    ) -> Result<Vec<String>, SchedError> {
        let request = dagmesh_proto::v1::DeliverEventRequest {
            topic: topic.to_owned(),
            payload: Some(payload),
        };
        let response = self.client.clone().deliver_event(request).await?;
        Ok(response.into_inner().resumed)
    }

    /// Follows the run's events until the executor closes the stream (after the final event,
    /// or when it goes away: GetRun tells which).
    async fn wait_ended(&self, run_id: &str) -> Result<(), SchedError> {
        let request = WatchRunRequest {
            run_id: run_id.to_owned(),
            after_seq: None,
        };
        let mut events = self.client.clone().watch_run(request).await?.into_inner();
        while events.message().await?.is_some() {}
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

//! [`RunStarter`]: how the scheduler starts, cancels and reads runs. In `dagmesh up` it is the
//! in-process [`Executor`]; standalone (`dagmesh scheduler --executor URL`) it is
//! [`RunServiceStarter`], a `RunService` client.

use std::time::Duration;

use dagmesh_executor::Executor;
use dagmesh_proto::connect::{AuthChannel, ClientSettings, Credentials};
use dagmesh_proto::v1::run_service_client::RunServiceClient;
use dagmesh_proto::v1::{
    CancelRunRequest, GetRunRequest, ListRunsRequest, ListRunsResponse, Run, SubmitRunRequest,
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
}

/// The actor recorded on runs the in-process scheduler starts or cancels.
const SCHEDULER: &str = "scheduler";

#[async_trait::async_trait]
impl RunStarter for Executor {
    async fn submit(&self, request: SubmitRunRequest) -> Result<(Run, bool), SchedError> {
        Ok(Executor::submit_as(self, request, SCHEDULER).await?)
    }

    async fn cancel(&self, run_id: &str, reason: &str) -> Result<(), SchedError> {
        Executor::cancel_as(self, run_id, reason, SCHEDULER).await?;
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, SchedError> {
        Ok(self.store().get_run(run_id).await?)
    }

    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, SchedError> {
        Ok(self.store().list_runs(&request).await?)
    }

    async fn deliver_event(
        &self,
        topic: &str,
        payload: prost_types::Struct,
    ) -> Result<Vec<String>, SchedError> {
        Ok(Executor::deliver_event(self, topic, payload).await?)
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
}

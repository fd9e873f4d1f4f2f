//! The gRPC edge of the API: [`GrpcExecutor`] (a client of the executor's services that is an
//! [`ExecutorApi`]) and the conversions between [`ApiError`] and `tonic::Status`.

use std::time::Duration;

use dagmesh_proto::connect::{AuthChannel, ClientSettings};
use dagmesh_proto::v1::cluster_service_client::ClusterServiceClient;
use dagmesh_proto::v1::run_service_client::RunServiceClient;
use dagmesh_proto::v1::workflow_service_client::WorkflowServiceClient;
use dagmesh_proto::v1::{
    ApplyWorkflowRequest, ApplyWorkflowResponse, ApproveStepRequest, CancelRunRequest,
    DeliverEventRequest, DeliverEventResponse, GetRunRequest, GetStepLogsRequest,
    GetStepLogsResponse, GetWorkflowRequest, ListQueuesRequest, ListQueuesResponse,
    ListRunsRequest, ListRunsResponse, ListWorkersRequest, ListWorkersResponse,
    ListWorkflowsRequest, ListWorkflowsResponse, ResumeRunRequest, RetryRunRequest, Run,
    SubmitRunRequest, SubmitRunResponse, SuspendRunRequest, WatchRunRequest, WatchRunResponse,
    Workflow,
};
use futures::StreamExt;
use tonic::{Code, Status};

use crate::{ApiError, ApiStream, Caller, ErrorKind, ExecutorApi};

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let code = match error.kind {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::Aborted => Code::Aborted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Cancelled => Code::Cancelled,
            ErrorKind::Unimplemented => Code::Unimplemented,
            ErrorKind::Internal => Code::Internal,
        };
        Status::new(code, error.message)
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let kind = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::Aborted => ErrorKind::Aborted,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Cancelled => ErrorKind::Cancelled,
            Code::Unimplemented => ErrorKind::Unimplemented,
            // A status with a source was made here, from a broken connection (the executor
            // died mid-call, a hop reset the stream), not answered by the executor: the call
            // may not have been applied, so it is worth retrying.
            Code::Unknown | Code::Internal if std::error::Error::source(&status).is_some() => {
                return ApiError::unavailable(format!(
                    "the connection to the executor broke during the call: {}",
                    transport_chain(&status)
                ));
            }
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => ErrorKind::Internal,
        };
        ApiError {
            kind,
            message: status.message().to_owned(),
        }
    }
}

/// A remote executor (its `RunService`, `WorkflowService` and `ClusterService` on one
/// channel), as an [`ExecutorApi`]. Cheap to clone.
#[derive(Clone)]
pub struct GrpcExecutor {
    client: RunServiceClient<AuthChannel>,
    workflows: WorkflowServiceClient<AuthChannel>,
    cluster: ClusterServiceClient<AuthChannel>,
}

impl GrpcExecutor {
    pub fn new(channel: AuthChannel) -> Self {
        GrpcExecutor {
            client: RunServiceClient::new(channel.clone()),
            workflows: WorkflowServiceClient::new(channel.clone()),
            cluster: ClusterServiceClient::new(channel),
        }
    }

    /// Connects lazily, with the TLS settings and token of `settings`: the executor may start
    /// later; calls fail `Unavailable` until it does.
    pub fn connect_lazy(url: &str, settings: &ClientSettings) -> Result<Self, ApiError> {
        let channel = settings
            .connect_lazy(url, |endpoint| {
                endpoint.connect_timeout(Duration::from_secs(5))
            })
            .map_err(|err| ApiError::invalid_argument(format!("executor {url}: {err}")))?;
        Ok(Self::new(channel))
    }

    fn client(&self) -> RunServiceClient<AuthChannel> {
        self.client.clone()
    }
}

/// A request carrying the caller's trace context (the actor comes from the channel's token, or,
/// for a call a replica forwards, from `ON_BEHALF_OF`).
fn traced<T>(caller: &Caller, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(traceparent) = &caller.traceparent
        && let Ok(value) = traceparent.parse()
    {
        request.metadata_mut().insert("traceparent", value);
    }
    if caller.forwarded
        && let Ok(value) = caller.actor.parse()
    {
        request.metadata_mut().insert(crate::ON_BEHALF_OF, value);
    }
    request
}

fn stream<T: Send + 'static>(streaming: tonic::Streaming<T>) -> ApiStream<T> {
    Box::pin(streaming.map(|item| item.map_err(ApiError::from)))
}

#[async_trait::async_trait]
impl ExecutorApi for GrpcExecutor {
    async fn apply_workflow(
        &self,
        request: ApplyWorkflowRequest,
    ) -> Result<ApplyWorkflowResponse, ApiError> {
        let response = self.workflows.clone().apply_workflow(request).await?;
        Ok(response.into_inner())
    }

    async fn get_workflow(&self, request: GetWorkflowRequest) -> Result<Workflow, ApiError> {
        let response = self.workflows.clone().get_workflow(request).await?;
        Ok(response.into_inner())
    }

    async fn list_workflows(
        &self,
        request: ListWorkflowsRequest,
    ) -> Result<ListWorkflowsResponse, ApiError> {
        let response = self.workflows.clone().list_workflows(request).await?;
        Ok(response.into_inner())
    }

    async fn list_workers(
        &self,
        request: ListWorkersRequest,
    ) -> Result<ListWorkersResponse, ApiError> {
        Ok(self
            .cluster
            .clone()
            .list_workers(request)
            .await?
            .into_inner())
    }

    async fn list_queues(
        &self,
        request: ListQueuesRequest,
    ) -> Result<ListQueuesResponse, ApiError> {
        Ok(self
            .cluster
            .clone()
            .list_queues(request)
            .await?
            .into_inner())
    }

    async fn submit_run(
        &self,
        caller: &Caller,
        request: SubmitRunRequest,
    ) -> Result<SubmitRunResponse, ApiError> {
        let response = self.client().submit_run(traced(caller, request)).await?;
        Ok(response.into_inner())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, ApiError> {
        let request = GetRunRequest {
            run_id: run_id.to_owned(),
        };
        Ok(self.client().get_run(request).await?.into_inner())
    }

    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, ApiError> {
        Ok(self.client().list_runs(request).await?.into_inner())
    }

    async fn watch_run(
        &self,
        request: WatchRunRequest,
    ) -> Result<ApiStream<WatchRunResponse>, ApiError> {
        Ok(stream(self.client().watch_run(request).await?.into_inner()))
    }

    async fn get_step_logs(
        &self,
        request: GetStepLogsRequest,
    ) -> Result<ApiStream<GetStepLogsResponse>, ApiError> {
        Ok(stream(
            self.client().get_step_logs(request).await?.into_inner(),
        ))
    }

    async fn cancel_run(
        &self,
        caller: &Caller,
        request: CancelRunRequest,
    ) -> Result<Run, ApiError> {
        Ok(self
            .client()
            .cancel_run(traced(caller, request))
            .await?
            .into_inner())
    }

    async fn retry_run(&self, caller: &Caller, request: RetryRunRequest) -> Result<Run, ApiError> {
        Ok(self
            .client()
            .retry_run(traced(caller, request))
            .await?
            .into_inner())
    }

    async fn approve_step(
        &self,
        caller: &Caller,
        request: ApproveStepRequest,
    ) -> Result<Run, ApiError> {
        Ok(self
            .client()
            .approve_step(traced(caller, request))
            .await?
            .into_inner())
    }

    async fn suspend_run(
        &self,
        caller: &Caller,
        request: SuspendRunRequest,
    ) -> Result<Run, ApiError> {
        Ok(self
            .client()
            .suspend_run(traced(caller, request))
            .await?
            .into_inner())
    }

    async fn resume_run(
        &self,
        caller: &Caller,
        request: ResumeRunRequest,
    ) -> Result<Run, ApiError> {
        Ok(self
            .client()
            .resume_run(traced(caller, request))
            .await?
            .into_inner())
    }

    async fn deliver_event(
        &self,
        caller: &Caller,
        request: DeliverEventRequest,
    ) -> Result<DeliverEventResponse, ApiError> {
        Ok(self
            .client()
            .deliver_event(traced(caller, request))
            .await?
            .into_inner())
    }
}

/// The status's message and the causes below it (`transport error: connection reset`).
fn transport_chain(status: &Status) -> String {
    let mut text = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        let line = error.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_wire() {
        use ErrorKind::*;
        for kind in [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            Unauthenticated,
            FailedPrecondition,
            ResourceExhausted,
            Aborted,
            Unavailable,
            DeadlineExceeded,
            Cancelled,
            Unimplemented,
            Internal,
        ] {
            let error = ApiError {
                kind,
                message: format!("{kind:?} happened"),
            };
            assert_eq!(ApiError::from(Status::from(error.clone())), error);
        }
        assert!(ApiError::unavailable("away").is_transient());
        assert!(!ApiError::not_found("gone").is_transient());
    }

    /// An executor that dies in the middle of a call is away, not broken: the caller (the
    /// scheduler starting a tick) retries instead of giving up. An `Internal` the executor
    /// answers stays `Internal`.
    #[tokio::test]
    async fn a_connection_broken_mid_call_is_unavailable() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                // Read the request's first bytes, then go away like a killed process.
                let mut buffer = [0u8; 64];
                let _ = socket.read(&mut buffer).await;
                drop(socket);
            }
        });
        let api = GrpcExecutor::connect_lazy(&url, &ClientSettings::default()).unwrap();
        let error = api.get_run("r").await.unwrap_err();
        assert_eq!(error.kind, ErrorKind::Unavailable, "{error}");
        assert!(error.is_transient());

        let answered = ApiError::from(Status::internal("the engine stopped"));
        assert_eq!(answered.kind, ErrorKind::Internal);
    }
}

//! `RunService` over any [`ExecutorApi`]: the caller (its principal and trace context) from the
//! request's metadata, then one trait call. The checks and the watch algorithm live behind the
//! trait (`crate::api`), so a replica that forwards to another serves the same adapter.

use std::sync::Arc;

use dagmesh_api::{ApiStream, Caller, ExecutorApi};
use dagmesh_auth::Principal;
use dagmesh_proto::v1::{
    ApproveStepRequest, CancelRunRequest, DeliverEventRequest, DeliverEventResponse, GetRunRequest,
    GetStepLogsRequest, GetStepLogsResponse, ListRunsRequest, ListRunsResponse, ResumeRunRequest,
    RetryRunRequest, Run, SubmitRunRequest, SubmitRunResponse, SuspendRunRequest, WatchRunRequest,
    WatchRunResponse, run_service_server::RunService,
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

pub(super) struct Runs(pub Arc<dyn ExecutorApi>);

/// Who calls: the authenticated principal, and the backend's W3C trace context so that the
/// run's spans continue its trace.
fn caller<T>(request: &Request<T>) -> Caller {
    let principal = Principal::of(request);
    // A replica forwarding a call to the owner of its run names who made it; only the
    // services' internal token may speak for someone else.
    let on_behalf = request
        .metadata()
        .get(dagmesh_api::ON_BEHALF_OF)
        .and_then(|value| value.to_str().ok())
        .filter(|_| principal.allows(dagmesh_proto::v1::Scope::Internal));
    Caller {
        actor: on_behalf.map_or_else(|| principal.name.to_string(), str::to_owned),
        traceparent: request
            .metadata()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
        forwarded: on_behalf.is_some(),
    }
}

type StatusStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn statuses<T: Send + 'static>(stream: ApiStream<T>) -> StatusStream<T> {
    Box::pin(stream.map(|item| item.map_err(Status::from)))
}

#[tonic::async_trait]
impl RunService for Runs {
    async fn submit_run(
        &self,
        request: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        let caller = caller(&request);
        let response = self.0.submit_run(&caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let run = self.0.get_run(&request.into_inner().run_id).await?;
        Ok(Response::new(run))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let runs = self.0.list_runs(request.into_inner()).await?;
        Ok(Response::new(runs))
    }

    type WatchRunStream = StatusStream<WatchRunResponse>;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let stream = self.0.watch_run(request.into_inner()).await?;
        Ok(Response::new(statuses(stream)))
    }

    type GetStepLogsStream = StatusStream<GetStepLogsResponse>;

    async fn get_step_logs(
        &self,
        request: Request<GetStepLogsRequest>,
    ) -> Result<Response<Self::GetStepLogsStream>, Status> {
        let stream = self.0.get_step_logs(request.into_inner()).await?;
        Ok(Response::new(statuses(stream)))
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let caller = caller(&request);
        let run = self.0.cancel_run(&caller, request.into_inner()).await?;
        Ok(Response::new(run))
    }

    async fn retry_run(&self, request: Request<RetryRunRequest>) -> Result<Response<Run>, Status> {
        let caller = caller(&request);
        let run = self.0.retry_run(&caller, request.into_inner()).await?;
        Ok(Response::new(run))
    }

    async fn approve_step(
        &self,
        request: Request<ApproveStepRequest>,
    ) -> Result<Response<Run>, Status> {
        let caller = caller(&request);
        let run = self.0.approve_step(&caller, request.into_inner()).await?;
        Ok(Response::new(run))
    }

    async fn suspend_run(
        &self,
        request: Request<SuspendRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let caller = caller(&request);
        let run = self.0.suspend_run(&caller, request.into_inner()).await?;
        Ok(Response::new(run))
    }

    async fn resume_run(
        &self,
        request: Request<ResumeRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let caller = caller(&request);
        let run = self.0.resume_run(&caller, request.into_inner()).await?;
        Ok(Response::new(run))
    }

    async fn deliver_event(
        &self,
        request: Request<DeliverEventRequest>,
    ) -> Result<Response<DeliverEventResponse>, Status> {
        let caller = caller(&request);
        let response = self.0.deliver_event(&caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}

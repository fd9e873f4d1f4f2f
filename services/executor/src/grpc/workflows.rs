//! `WorkflowService` over any [`ExecutorApi`].

use std::sync::Arc;

use dagmesh_api::ExecutorApi;
use dagmesh_proto::v1::{
    ApplyWorkflowRequest, ApplyWorkflowResponse, GetWorkflowRequest, ListWorkflowsRequest,
    ListWorkflowsResponse, Workflow, workflow_service_server::WorkflowService,
};
use tonic::{Request, Response, Status};

pub(super) struct Workflows(pub Arc<dyn ExecutorApi>);

#[tonic::async_trait]
impl WorkflowService for Workflows {
    async fn apply_workflow(
        &self,
        request: Request<ApplyWorkflowRequest>,
    ) -> Result<Response<ApplyWorkflowResponse>, Status> {
        Ok(Response::new(
            self.0.apply_workflow(request.into_inner()).await?,
        ))
    }

    async fn get_workflow(
        &self,
        request: Request<GetWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        Ok(Response::new(
            self.0.get_workflow(request.into_inner()).await?,
        ))
    }

    async fn list_workflows(
        &self,
        request: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        Ok(Response::new(
            self.0.list_workflows(request.into_inner()).await?,
        ))
    }
}

use dagmesh_proto::v1::{
    ApplyWorkflowRequest, ApplyWorkflowResponse, GetWorkflowRequest, ListWorkflowsRequest,
    ListWorkflowsResponse, Workflow, workflow_service_server::WorkflowService,
};
use tonic::{Request, Response, Status};

use crate::{ExecError, Executor};

pub(super) struct Workflows(pub Executor);

#[tonic::async_trait]
impl WorkflowService for Workflows {
    async fn apply_workflow(
        &self,
        request: Request<ApplyWorkflowRequest>,
    ) -> Result<Response<ApplyWorkflowResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| ExecError::InvalidArgument("spec: required".into()))?;
        let (workflow, created) = self.0.apply_workflow(spec).await?;
        Ok(Response::new(ApplyWorkflowResponse {
            workflow: Some(workflow),
            created,
        }))
    }

    async fn get_workflow(
        &self,
        request: Request<GetWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        let request = request.into_inner();
        dagmesh_proto::limits::check_len(
            "name",
            &request.name,
            dagmesh_proto::limits::MAX_NAME_LEN,
        )
        .map_err(Status::invalid_argument)?;
        let version = (request.version != 0).then_some(request.version);
        let workflow = self
            .0
            .store()
            .get_workflow(&request.name, version)
            .await
            .map_err(ExecError::from)?;
        Ok(Response::new(workflow))
    }

    async fn list_workflows(
        &self,
        _: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let workflows = self
            .0
            .store()
            .list_workflows()
            .await
            .map_err(ExecError::from)?;
        Ok(Response::new(ListWorkflowsResponse { workflows }))
    }
}

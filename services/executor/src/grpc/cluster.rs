//! `ClusterService` over any [`ExecutorApi`].

use std::sync::Arc;

use dagmesh_api::ExecutorApi;
use dagmesh_proto::v1::{
    ListQueuesRequest, ListQueuesResponse, ListWorkersRequest, ListWorkersResponse,
    cluster_service_server::ClusterService,
};
use tonic::{Request, Response, Status};

pub(super) struct Cluster(pub Arc<dyn ExecutorApi>);

#[tonic::async_trait]
impl ClusterService for Cluster {
    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(
            self.0.list_workers(request.into_inner()).await?,
        ))
    }

    async fn list_queues(
        &self,
        request: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        Ok(Response::new(
            self.0.list_queues(request.into_inner()).await?,
        ))
    }
}

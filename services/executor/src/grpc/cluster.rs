use dagmesh_proto::v1::{
    ListWorkersRequest, ListWorkersResponse, cluster_service_server::ClusterService,
};
use tonic::{Request, Response, Status};

use crate::Executor;

pub(super) struct Cluster(pub Executor);

#[tonic::async_trait]
impl ClusterService for Cluster {
    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self.0.list_workers().await?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }
}

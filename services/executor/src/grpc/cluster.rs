use dagmesh_proto::v1::{
    ListQueuesRequest, ListQueuesResponse, ListWorkersRequest, ListWorkersResponse, QueueInfo,
    cluster_service_server::ClusterService,
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

    async fn list_queues(
        &self,
        request: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        let task_type = request.into_inner().task_type;
        dagmesh_proto::limits::check_len(
            "task_type",
            &task_type,
            dagmesh_proto::limits::MAX_NAME_LEN,
        )
        .map_err(Status::invalid_argument)?;
        let snapshot = self.0.queues().await?;
        let queues = snapshot
            .queues
            .into_iter()
            .filter(|queue| task_type.is_empty() || queue.task_type == task_type)
            .map(|queue| QueueInfo {
                task_type: queue.task_type,
                version_requirement: queue.version_req.to_string(),
                labels: queue.labels.into_iter().collect(),
                slots_per_task: queue.slots_per_task,
                queued: queue.queued,
                oldest_age: queue
                    .oldest_age
                    .and_then(|age| prost_types::Duration::try_from(age).ok()),
                running: queue.running,
                matching_workers: queue.matching_workers,
                free_slots: queue.free_slots,
            })
            .collect();
        Ok(Response::new(ListQueuesResponse { queues }))
    }
}

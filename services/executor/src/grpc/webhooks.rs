use dagmesh_proto::v1::{
    ListDeliveriesRequest, ListDeliveriesResponse, ReadWebhookDeliveriesRequest,
    webhook_service_server::WebhookService,
};
use tonic::{Request, Response, Status};

use crate::{ExecError, Executor};

pub(super) struct Webhooks(pub Executor);

#[tonic::async_trait]
impl WebhookService for Webhooks {
    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let request = request.into_inner();
        dagmesh_proto::limits::check_len(
            "run_id",
            &request.run_id,
            dagmesh_proto::limits::MAX_NAME_LEN,
        )
        .map_err(Status::invalid_argument)?;
        if request.limit > 1000 {
            return Err(Status::invalid_argument(format!(
                "limit: {} is over the maximum of 1000",
                request.limit
            )));
        }
        let deliveries = self
            .0
            .store()
            .read_webhook_deliveries(&ReadWebhookDeliveriesRequest {
                run_id: request.run_id,
                due_before: None,
                limit: request.limit,
            })
            .await
            .map_err(ExecError::from)?;
        Ok(Response::new(ListDeliveriesResponse { deliveries }))
    }
}

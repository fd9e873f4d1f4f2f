//! Thin gRPC adapters over [`Executor`]: decode, call, encode. Errors become statuses through
//! `From<ExecError> for Status`.

mod cluster;
pub mod forward;
mod runs;
mod scaler;
mod webhooks;
mod workers;
mod workflows;

use dagmesh_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use dagmesh_proto::v1::{
    cluster_service_server::ClusterServiceServer, run_service_server::RunServiceServer,
    webhook_service_server::WebhookServiceServer, worker_service_server::WorkerServiceServer,
    workflow_service_server::WorkflowServiceServer,
};
use dagmesh_runtime::ServiceSet;

use crate::Executor;

impl Executor {
    /// The executor's public gRPC services, ready for [`dagmesh_runtime::serve`].
    pub fn services(&self) -> ServiceSet {
        // Messages may carry a payload up to the limit plus envelope; accept somewhat more so an
        // oversized payload reaches the executor and fails its step with a clear error instead
        // of breaking the stream.
        let max_message = self.config().max_payload_bytes * 2 + (1 << 20);
        // The run, workflow and cluster services answer through the trait a forwarding
        // replica implements too.
        let api: std::sync::Arc<dyn dagmesh_api::ExecutorApi> = std::sync::Arc::new(self.clone());
        ServiceSet::new()
            .with(
                RunServiceServer::new(runs::Runs(api.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(usize::MAX),
            )
            .with(
                WorkflowServiceServer::new(workflows::Workflows(api.clone()))
                    .max_decoding_message_size(max_message),
            )
            .with(
                WorkerServiceServer::new(workers::Workers::new(self.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(usize::MAX),
            )
            .with(ClusterServiceServer::new(cluster::Cluster(api)))
            .with(ExternalScalerServer::new(scaler::Scaler::new(self.clone())))
            .with(WebhookServiceServer::new(webhooks::Webhooks(self.clone())))
    }
}

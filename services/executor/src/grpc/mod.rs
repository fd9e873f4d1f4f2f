//! Thin gRPC adapters over [`Executor`]: decode, call, encode. Errors become statuses through
//! `From<ExecError> for Status`.

mod cluster;
pub mod forward;
pub(crate) mod peers;
mod runs;
mod scaler;
mod webhooks;
mod workers;
mod workflows;

use dagmesh_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use dagmesh_proto::v1::{
    cluster_service_server::ClusterServiceServer, peer_service_server::PeerServiceServer,
    run_service_server::RunServiceServer, webhook_service_server::WebhookServiceServer,
    worker_service_server::WorkerServiceServer, workflow_service_server::WorkflowServiceServer,
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
        let workers = WorkerServiceServer::new(workers::Workers::new(self.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(usize::MAX);
        let cluster = ClusterServiceServer::new(cluster::Cluster(api.clone()));
        let scaler = ExternalScalerServer::new(scaler::Scaler::new(self.clone()));
        let set = ServiceSet::new()
            .with(
                RunServiceServer::new(runs::Runs(api.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(usize::MAX),
            )
            .with(
                WorkflowServiceServer::new(workflows::Workflows(api))
                    .max_decoding_message_size(max_message),
            )
            .with(
                PeerServiceServer::new(peers::Peers::new(self.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(usize::MAX),
            )
            .with(WebhookServiceServer::new(webhooks::Webhooks(self.clone())));
        if !self.config().share_partitions {
            return set.with(workers).with(cluster).with(scaler);
        }
        // Sharing the partitions: workers, their queues and the scaler live on the replica
        // that dispatches; the others forward those calls to it.
        let route = std::sync::Arc::new(forward::LeaseHolderRoute::new(
            self.store().clone(),
            self.config().peers.clone(),
            self.config().advertise_url.clone().unwrap_or_default(),
        ));
        route.forget_idle_upstreams_while_used();
        set.with(forward::WhileDispatching::new(
            workers,
            route.clone(),
            self.clone(),
        ))
        .with(forward::WhileDispatching::new(
            cluster,
            route.clone(),
            self.clone(),
        ))
        .with(forward::WhileDispatching::new(
            scaler,
            route.clone(),
            self.clone(),
        ))
    }
}

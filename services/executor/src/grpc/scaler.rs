//! `externalscaler.ExternalScaler` (KEDA) over [`crate::scaler`].

use std::pin::Pin;
use std::sync::Arc;

use dagmesh_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef, external_scaler_server::ExternalScaler,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Executor;
use crate::scaler::Trigger;

/// StreamIsActive streams open at once; each looks at the queues after every batch that
/// changed them, so a client may not open them without bound.
const MAX_STREAMS: usize = 256;

pub(super) struct Scaler {
    executor: Executor,
    streams: Arc<tokio::sync::Semaphore>,
}

impl Scaler {
    pub fn new(executor: Executor) -> Self {
        Self {
            executor,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }
}

fn trigger(object: &ScaledObjectRef) -> Result<Trigger, Status> {
    Ok(Trigger::from_metadata(&object.scaler_metadata)?)
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let trigger = trigger(request.get_ref())?;
        let snapshot = self.executor.queues().await?;
        Ok(Response::new(IsActiveResponse {
            result: trigger.is_active(&snapshot),
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    /// Answers at once, then again each time the answer changes.
    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let trigger = trigger(request.get_ref())?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "StreamIsActive: {MAX_STREAMS} streams are open, the limit; close one or poll \
                 IsActive"
            ))
        })?;
        let executor = self.executor.clone();
        let mut changes = executor.queue_changes();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            let mut last = None;
            loop {
                changes.borrow_and_update();
                let active = match executor.queues().await {
                    Ok(snapshot) => trigger.is_active(&snapshot),
                    Err(error) => {
                        let _ = tx.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                if last != Some(active) {
                    last = Some(active);
                    if tx
                        .send(Ok(IsActiveResponse { result: active }))
                        .await
                        .is_err()
                    {
                        return; // KEDA went away
                    }
                }
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return; // the engine stopped
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let trigger = trigger(request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: trigger.metric_name(),
                target_size: trigger.tasks_per_replica.ceil() as i64,
                target_size_float: trigger.tasks_per_replica,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.into_inner();
        let object = request.scaled_object_ref.ok_or_else(|| {
            Status::invalid_argument(
                "scaledObjectRef: required (the ScaledObject and its scalerMetadata)",
            )
        })?;
        let trigger = trigger(&object)?;
        let snapshot = self.executor.queues().await?;
        let wanted = trigger.wanted(&snapshot);
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: trigger.metric_name(),
                metric_value: i64::try_from(wanted).unwrap_or(i64::MAX),
                metric_value_float: wanted as f64,
            }],
        }))
    }
}

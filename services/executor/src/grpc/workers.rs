use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dagmesh_proto::v1::{
    Hello, ServerMessage, WorkerMessage, worker_message, worker_service_server::WorkerService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Executor;
use crate::engine::Command;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Workers {
    executor: Executor,
    generations: AtomicU64,
}

impl Workers {
    pub fn new(executor: Executor) -> Self {
        Self {
            executor,
            generations: AtomicU64::new(1),
        }
    }
}

#[tonic::async_trait]
impl WorkerService for Workers {
    type ConnectStream = UnboundedReceiverStream<Result<ServerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded("no Hello within 10s of opening the stream")
            })??;
        let hello = match first.and_then(|m| m.message) {
            Some(worker_message::Message::Hello(hello)) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be Hello",
                ));
            }
        };
        validate_hello(&hello).map_err(Status::invalid_argument)?;

        let engine = self.executor.inner.engine.clone();
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let instance: Arc<str> = Arc::from(hello.instance_id.as_str());
        // Unbounded is safe here: credit flow bounds Assigns to the worker's slots, and every
        // other server message answers one the worker sent.
        let (outbound, stream) = mpsc::unbounded_channel();
        engine
            .send(Command::Connect {
                hello,
                generation,
                outbound,
            })
            .await?;
        tokio::spawn(async move {
            loop {
                // Stop reading when the engine has stopped (drained): dropping the inbound half
                // lets the connection close even if the worker keeps its side open.
                let received = tokio::select! {
                    received = inbound.message() => received,
                    () = engine.closed() => return,
                };
                match received {
                    Ok(Some(WorkerMessage {
                        message: Some(message),
                    })) => {
                        let command = Command::FromWorker {
                            instance: instance.clone(),
                            message,
                        };
                        if engine.send(command).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(worker = %instance, %status, "worker stream error");
                        break;
                    }
                }
            }
            let _ = engine
                .send(Command::Disconnect {
                    instance,
                    generation,
                })
                .await;
        });
        Ok(Response::new(UnboundedReceiverStream::new(stream)))
    }
}

fn validate_hello(hello: &Hello) -> Result<(), String> {
    if hello.instance_id.is_empty() {
        return Err("hello.instance_id: required".into());
    }
    if hello.instance_id.contains('/') {
        return Err(format!(
            "hello.instance_id: \"{}\" must not contain '/'",
            hello.instance_id
        ));
    }
    if hello.slots == 0 {
        return Err("hello.slots: must be at least 1".into());
    }
    if hello.task_types.is_empty() {
        return Err("hello.task_types: at least one task type is required".into());
    }
    for (index, task_type) in hello.task_types.iter().enumerate() {
        if task_type.name.is_empty() {
            return Err(format!("hello.task_types[{index}].name: required"));
        }
        if let Err(error) = semver::Version::parse(&task_type.version) {
            return Err(format!(
                "hello.task_types[{index}].version: \"{}\" is not a semantic version ({error})",
                task_type.version
            ));
        }
    }
    Ok(())
}

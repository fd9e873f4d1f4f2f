use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dagmesh_proto::v1::{
    Hello, ServerMessage, WorkerMessage, worker_message, worker_service_server::WorkerService,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use dagmesh_auth::Principal;

use crate::engine::Command;
use crate::{ExecError, Executor};

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
    type ConnectStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ServerMessage, Status>> + Send + 'static>,
    >;

    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let principal = Principal::of(&request);
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
        authorize_hello(&principal, &hello).map_err(Status::permission_denied)?;

        let engine = self.executor.inner.engine.clone();
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let instance: Arc<str> = Arc::from(hello.instance_id.as_str());
        // Unbounded is safe here: credit flow bounds Assigns to the worker's slots, and every
        // other server message answers one the worker sent.
        let (outbound, stream) = mpsc::unbounded_channel();
        // The reader ends the stream itself when the worker breaks a limit. Weak: the stream
        // must end when the engine drops the session (a lease that ran out), so the reader may
        // not keep it open.
        let closer = outbound.downgrade();
        let max_payload = self.executor.config().max_payload_bytes;
        engine
            .send(Command::Connect {
                hello,
                principal: principal.name.clone(),
                generation,
                outbound,
            })
            .await?;
        tokio::spawn(async move {
            let reason = loop {
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
                            generation,
                            message,
                        };
                        if engine.send(command).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break "the worker closed its stream".to_owned(),
                    Err(status) if is_too_large(&status) => {
                        // Say why before closing, so the worker is not left guessing at a stream
                        // that ended with OK; the task it was about goes back through the
                        // lost-attempt cap, so a result that never fits cannot loop forever.
                        let reason = format!(
                            "a message from the worker is over the size limit ({}); payloads \
                             may be at most {max_payload} bytes (Welcome.max_payload_bytes)",
                            status.message()
                        );
                        tracing::warn!(worker = %instance, %reason, "closing worker stream");
                        if let Some(closer) = closer.upgrade() {
                            let _ = closer.send(Err(ExecError::ResourceExhausted(reason.clone())));
                        }
                        break reason;
                    }
                    Err(status) => {
                        tracing::debug!(worker = %instance, %status, "worker stream error");
                        break format!("its stream broke: {}", status.message());
                    }
                }
            };
            drop(closer);
            let _ = engine
                .send(Command::Disconnect {
                    instance,
                    generation,
                    reason,
                })
                .await;
        });
        // The engine speaks ExecError; only here does it become a gRPC status.
        let stream = UnboundedReceiverStream::new(stream).map(|item| item.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// tonic reports a message over `max_decoding_message_size` as OUT_OF_RANGE (older versions as
/// RESOURCE_EXHAUSTED).
fn is_too_large(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) || status.message().contains("too large")
}

/// A worker may register only the task types its token allows, and claim only the labels it
/// allows: otherwise anyone with a worker token could pull (and read) another team's steps.
fn authorize_hello(principal: &Principal, hello: &Hello) -> Result<(), String> {
    for (index, task_type) in hello.task_types.iter().enumerate() {
        if !principal.may_serve(&task_type.name) {
            let patterns = if principal.task_patterns.is_empty() {
                "none".to_owned()
            } else {
                principal.task_patterns.join(", ")
            };
            return Err(format!(
                "hello.task_types[{index}]: {} may not serve task type {:?} (its token allows: \
                 {patterns})",
                principal.name, task_type.name
            ));
        }
    }
    principal
        .check_labels(&hello.labels)
        .map_err(|error| format!("hello.{error}"))
}

fn validate_hello(hello: &Hello) -> Result<(), String> {
    use dagmesh_proto::limits::{
        MAX_ENTRIES, MAX_IN_FLIGHT, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_SLOTS, MAX_TASK_TYPES,
        MAX_VALUE_LEN, check_len,
    };
    if hello.instance_id.is_empty() {
        return Err("hello.instance_id: required".into());
    }
    check_len("hello.instance_id", &hello.instance_id, MAX_NAME_LEN)?;
    check_len("hello.worker_name", &hello.worker_name, MAX_NAME_LEN)?;
    check_len("hello.sdk_language", &hello.sdk_language, MAX_MESSAGE_LEN)?;
    check_len("hello.sdk_version", &hello.sdk_version, MAX_MESSAGE_LEN)?;
    if hello.slots > MAX_SLOTS {
        return Err(format!(
            "hello.slots: {} is over the limit of {MAX_SLOTS}",
            hello.slots
        ));
    }
    let counts = [
        ("hello.task_types", hello.task_types.len(), MAX_TASK_TYPES),
        ("hello.labels", hello.labels.len(), MAX_ENTRIES),
        ("hello.in_flight", hello.in_flight.len(), MAX_IN_FLIGHT),
    ];
    for (field, count, limit) in counts {
        if count > limit {
            return Err(format!(
                "{field}: {count} entries, over the limit of {limit}"
            ));
        }
    }
    for (key, value) in &hello.labels {
        check_len("hello.labels key", key, MAX_NAME_LEN)?;
        check_len(&format!("hello.labels.{key}"), value, MAX_VALUE_LEN)?;
    }
    for (index, task) in hello.in_flight.iter().enumerate() {
        check_len(
            &format!("hello.in_flight[{index}].task_id"),
            &task.task_id,
            MAX_VALUE_LEN,
        )?;
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
        check_len(
            &format!("hello.task_types[{index}].name"),
            &task_type.name,
            MAX_NAME_LEN,
        )?;
        check_len(
            &format!("hello.task_types[{index}].version"),
            &task_type.version,
            MAX_NAME_LEN,
        )?;
        if let Err(error) = semver::Version::parse(&task_type.version) {
            return Err(format!(
                "hello.task_types[{index}].version: \"{}\" is not a semantic version ({error})",
                task_type.version
            ));
        }
    }
    Ok(())
}

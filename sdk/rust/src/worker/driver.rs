//! The one task that owns a worker's state: the task table, the current stream, the drain.
//!
//! Everything that changes state arrives here as a message: server messages from the stream,
//! [`Event`]s from task pumps (bounded `mpsc`), ticks, and the drain/abort tokens. Handlers run on
//! their own tokio tasks and never touch the table, so there are no locks around protocol state.
//!
//! Each task is two tokio tasks: the user's handler, and a *pump* that forwards the context's
//! progress and log buffers while the handler runs, then builds the result. The pump awaits the
//! bounded event channel, so a slow stream pushes back on the pump, never on the handler (whose
//! progress just coalesces in the context).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dagmesh_proto::connect::error_chain;
use dagmesh_proto::json::{from_struct, to_struct};
use dagmesh_proto::limits::{PayloadError, check_payload};
use dagmesh_proto::v1::worker_service_client::WorkerServiceClient;
use dagmesh_proto::v1::{
    Assign, Cancel, Draining, Heartbeat, Hello, RecordOutcome, Recorded, ServerMessage, TaskFailed,
    TaskLog, TaskRef, TaskStarted, TaskTypeVersion, Welcome, WorkerMessage, server_message,
    worker_message::Message,
};
use dagmesh_proto::v1::{LogLine, TaskCompleted};
use prost::Message as _;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinError, JoinHandle};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tracing::{Instrument, debug, info, info_span, warn};

use super::context::{LOG_FLUSH_INTERVAL, TaskContext};
use super::task::TaskError;
use super::{Config, Registered, Shared, WorkerError, WorkerState};
use crate::backoff::Backoff;

/// Messages queued towards the executor per stream. Large enough that bursts of progress and
/// results rarely wait; when it is full the driver waits, and pumps coalesce behind it.
const OUTBOUND_CAPACITY: usize = 1024;
const EVENT_CAPACITY: usize = 1024;
/// Hello to Welcome. An executor that accepts the connection but never answers is as good as
/// down.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// After a drain, how long to wait for the executor to close its side of the stream.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Progress is for people watching; more often than this only costs the executor writes.
const PROGRESS_MIN_INTERVAL: Duration = Duration::from_millis(50);

type TaskKey = (String, u32);

enum Entry {
    Running {
        slots: u32,
        ctx: TaskContext,
        pump: AbortHandle,
    },
    /// The result (Completed or Failed) waits here until Recorded.
    Finished { result: Message },
}

/// From task pumps to the driver.
enum Event {
    /// Progress or logs: best effort, dropped while disconnected.
    Forward(Message),
    /// The handler finished; `result` is Completed or Failed.
    Finished { key: TaskKey, result: Message },
}

/// How a session (one welcomed stream) ended.
enum SessionEnd {
    /// Drained: every result recorded; the worker is done.
    Drained,
    /// The executor asked this stream to drain (it is going away) and nothing is in flight any
    /// more: reconnect, to the next executor, and resume.
    ExecutorDrained,
    Aborted,
    /// Reconnect.
    Broken(String),
}

/// Why the worker stops while no stream is open.
enum Stop {
    Drained,
    Aborted,
}

enum OpenError {
    /// The executor refused the Hello; retrying cannot help.
    Rejected(tonic::Status),
    Retry(String),
}

struct Session {
    out: mpsc::Sender<WorkerMessage>,
    inbound: Streaming<ServerMessage>,
    welcome: Welcome,
}

pub(crate) struct Driver {
    config: Arc<Config>,
    shared: Arc<Shared>,
    /// Ordered so that Hello.in_flight and re-sent results come out in a stable order.
    tasks: BTreeMap<TaskKey, Entry>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    /// The worker itself was told to stop: it drains and exits.
    draining: bool,
    /// The executor of the current stream sent Drain: this stream takes no new work, and once
    /// nothing is in flight the worker closes it and reconnects.
    executor_draining: bool,
    session_id: Option<String>,
    sessions: u64,
    /// Entries of `tasks` that are Running (kept as they change: `publish` runs several times
    /// per task and must not walk the table each time).
    running: usize,
}

impl Drop for Driver {
    /// Whether `run` returned or its future was dropped, no handler outlives the worker.
    fn drop(&mut self) {
        for entry in self.tasks.values() {
            if let Entry::Running { pump, .. } = entry {
                pump.abort();
            }
        }
    }
}

impl Driver {
    pub(crate) fn new(config: Arc<Config>, shared: Arc<Shared>) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        Self {
            config,
            shared,
            tasks: BTreeMap::new(),
            events_tx,
            events_rx,
            draining: false,
            executor_draining: false,
            session_id: None,
            sessions: 0,
            running: 0,
        }
    }

    pub(crate) async fn run(mut self) -> Result<(), WorkerError> {
        let span = info_span!(
            "worker",
            worker = %self.config.name,
            instance = %self.config.instance_id,
        );
        let result = self.run_sessions().instrument(span).await;
        self.session_id = None;
        self.publish();
        result
    }

    async fn run_sessions(&mut self) -> Result<(), WorkerError> {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        // After a stream the executor drained, the next Welcome does not reset the backoff: an
        // executor that drains every stream at once is then dialled ever more slowly, not in a
        // loop.
        let mut reset_on_welcome = true;
        loop {
            if self.draining && self.tasks.is_empty() {
                info!("drained");
                return Ok(());
            }
            let opening = open_session(self.config.clone(), self.hello());
            match self.offline(opening).await {
                Ok(Ok(session)) => {
                    if reset_on_welcome {
                        backoff.reset();
                    }
                    reset_on_welcome = true;
                    match self.serve(session).await {
                        SessionEnd::Drained => {
                            info!("drained");
                            return Ok(());
                        }
                        SessionEnd::ExecutorDrained => {
                            reset_on_welcome = false;
                            info!("executor drained this stream; reconnecting");
                        }
                        SessionEnd::Aborted => return Err(self.aborted()),
                        SessionEnd::Broken(reason) => warn!(%reason, "stream broken, reconnecting"),
                    }
                }
                Ok(Err(OpenError::Rejected(status))) => {
                    warn!(status = %status.message(), "executor rejected the hello");
                    return Err(WorkerError::Rejected(status));
                }
                Ok(Err(OpenError::Retry(reason))) => {
                    warn!(%reason, "cannot open a stream, retrying");
                }
                Err(stop) => return self.stopped(stop),
            }
            if let Err(stop) = self.offline(tokio::time::sleep(backoff.next_delay())).await {
                return self.stopped(stop);
            }
        }
    }

    fn stopped(&mut self, stop: Stop) -> Result<(), WorkerError> {
        match stop {
            Stop::Drained => {
                info!("drained");
                Ok(())
            }
            Stop::Aborted => Err(self.aborted()),
        }
    }

    fn aborted(&self) -> WorkerError {
        let state = self.state();
        warn!(
            running = state.running,
            unacknowledged = state.unacknowledged,
            "aborted"
        );
        // Drop aborts the handlers.
        WorkerError::Aborted {
            running: state.running,
            unacknowledged: state.unacknowledged,
        }
    }

    /// Runs `fut` (connecting, or waiting to retry) while keeping up with what happens without
    /// a stream: handlers finishing, a drain, an abort.
    async fn offline<T>(&mut self, fut: impl Future<Output = T>) -> Result<T, Stop> {
        let drain = self.shared.drain.clone();
        let abort = self.shared.abort.clone();
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                () = abort.cancelled() => return Err(Stop::Aborted),
                out = &mut fut => return Ok(out),
                Some(event) = self.events_rx.recv() => self.on_event_offline(event),
                () = drain.cancelled(), if !self.draining => self.begin_drain("drain requested"),
            }
            if self.draining && self.tasks.is_empty() {
                return Err(Stop::Drained);
            }
        }
    }

    async fn serve(&mut self, session: Session) -> SessionEnd {
        let Session {
            out,
            mut inbound,
            welcome,
        } = session;
        self.shared
            .max_payload
            .store(welcome.max_payload_bytes, Ordering::Relaxed);
        self.sessions += 1;
        self.session_id = Some(welcome.session_id.clone());
        self.executor_draining = false;
        info!(
            session = %welcome.session_id,
            resumed = welcome.resumed.len(),
            in_flight = self.tasks.len(),
            "connected"
        );
        // Tasks missing from `resumed` are stopped by the Cancel the executor sends for each
        // (protocol point 8), not by this list; it is only logged.
        for (task_id, attempt) in self.tasks.keys() {
            let resumed = welcome
                .resumed
                .iter()
                .any(|r| r.task_id == *task_id && r.attempt == *attempt);
            if !resumed {
                debug!(%task_id, attempt, "task not resumed by the executor");
            }
        }
        self.publish();

        let heartbeat = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let end = self.serve_stream(&out, &mut inbound, heartbeat).await;

        self.session_id = None;
        self.executor_draining = false;
        self.publish();
        if let SessionEnd::Drained | SessionEnd::ExecutorDrained = end {
            // Half-close our side, then give the executor a moment to end its side, so it sees
            // a clean end of stream rather than a reset. Anything it still sends is ignored:
            // nothing is in flight, and an Assign racing the close comes back to the queue
            // after the lease.
            drop(out);
            let closed = async { while let Ok(Some(_)) = inbound.message().await {} };
            if tokio::time::timeout(CLOSE_GRACE, closed).await.is_err() {
                debug!("executor kept the stream open after the drain; closing it");
            }
        }
        end
    }

    async fn serve_stream(
        &mut self,
        out: &mpsc::Sender<WorkerMessage>,
        inbound: &mut Streaming<ServerMessage>,
        heartbeat_every: Duration,
    ) -> SessionEnd {
        // Results the executor has not recorded go again: it records a duplicate once and
        // answers Recorded either way.
        let unrecorded: Vec<Message> = self
            .tasks
            .values()
            .filter_map(|entry| match entry {
                Entry::Finished { result } => Some(result.clone()),
                Entry::Running { .. } => None,
            })
            .collect();
        for result in unrecorded {
            if let Err(end) = send(out, result).await {
                return end;
            }
        }

        let drain = self.shared.drain.clone();
        let abort = self.shared.abort.clone();
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sent_draining = false;
        loop {
            if self.draining && !sent_draining {
                if let Err(end) = send(out, Message::Draining(Draining {})).await {
                    return end;
                }
                sent_draining = true;
            }
            if self.draining && self.tasks.is_empty() {
                return SessionEnd::Drained;
            }
            if self.executor_draining && self.tasks.is_empty() {
                return SessionEnd::ExecutorDrained;
            }
            // Biased so that a flood of progress cannot starve the rarer branches; those are
            // ready at most once per tick or message.
            let step = tokio::select! {
                biased;
                () = abort.cancelled() => return SessionEnd::Aborted,
                _ = heartbeat.tick() => send(out, Message::Heartbeat(Heartbeat {})).await,
                () = drain.cancelled(), if !self.draining => {
                    self.begin_drain("drain requested");
                    Ok(())
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.on_server_message(message, out).await,
                    Ok(None) => Err(SessionEnd::Broken("executor closed the stream".into())),
                    Err(status) => Err(SessionEnd::Broken(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    ))),
                },
                Some(event) = self.events_rx.recv() => self.on_event(event, out).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn on_server_message(
        &mut self,
        message: ServerMessage,
        out: &mpsc::Sender<WorkerMessage>,
    ) -> Result<(), SessionEnd> {
        match message.message {
            Some(server_message::Message::Assign(assign)) => self.on_assign(assign, out).await?,
            Some(server_message::Message::Recorded(recorded)) => self.on_recorded(recorded),
            Some(server_message::Message::Cancel(cancel)) => self.on_cancel(cancel),
            // The executor is going away (a restart, a rollout): finish here, then resume with
            // whichever executor answers next. Only the worker's own stop ends the worker.
            Some(server_message::Message::Drain(drain)) => {
                if !self.executor_draining {
                    info!(
                        reason = %drain.reason,
                        in_flight = self.tasks.len(),
                        "executor is draining; finishing in-flight work, then reconnecting"
                    );
                    self.executor_draining = true;
                    self.publish();
                }
            }
            Some(server_message::Message::Welcome(_)) => warn!("second welcome ignored"),
            // A message kind from a newer executor.
            None => debug!("unknown server message ignored"),
        }
        Ok(())
    }

    async fn on_assign(
        &mut self,
        assign: Assign,
        out: &mpsc::Sender<WorkerMessage>,
    ) -> Result<(), SessionEnd> {
        let key: TaskKey = (assign.task_id.clone(), assign.attempt);
        // The same attempt twice (the executor lost our Started): answer from what we hold.
        match self.tasks.get(&key) {
            Some(Entry::Running { .. }) => return send(out, started(&key)).await,
            Some(Entry::Finished { result }) => return send(out, result.clone()).await,
            None => {}
        }

        let config = self.config.clone();
        let task_type = assign.task_type.clone().unwrap_or_default();
        let slots = assign.slots.max(1);
        // u64: a broken executor may send any `slots`, and the sum must not overflow.
        let used: u64 = self
            .tasks
            .values()
            .map(|entry| match entry {
                Entry::Running { slots, .. } => u64::from(*slots),
                Entry::Finished { .. } => 0,
            })
            .sum();
        let registered = config.handler(&task_type.name, &task_type.version);
        let refusal = if self.draining {
            Some(TaskError::retryable("worker is draining"))
        } else if self.executor_draining {
            Some(TaskError::retryable(
                "worker is draining: the executor asked it to (assigned after Drain)",
            ))
        } else if used + u64::from(slots) > u64::from(config.slots) {
            Some(TaskError::retryable(format!(
                "worker {} has no room: task needs {slots} slot(s), {used} of {} in use",
                config.instance_id, config.slots
            )))
        } else if registered.is_none() {
            Some(TaskError::retryable(format!(
                "worker {} has no handler for {:?} version {:?}",
                config.instance_id, task_type.name, task_type.version
            )))
        } else {
            self.check_inputs(&assign, &task_type.name).err()
        };
        match (refusal, registered) {
            (None, Some(registered)) => {
                // Started only for work taken: a refusal without Started tells a draining
                // worker's executor that the task was handed back, not attempted.
                send(out, started(&key)).await?;
                self.spawn(key, assign, slots, registered);
                self.publish();
                Ok(())
            }
            (refusal, _) => {
                let error = refusal.unwrap_or_else(|| TaskError::retryable("refused"));
                warn!(task_id = %key.0, attempt = key.1, error = %error.message, "assignment refused");
                let result = failed(&key, error);
                let before = self.tasks.insert(
                    key,
                    Entry::Finished {
                        result: result.clone(),
                    },
                );
                if matches!(before, Some(Entry::Running { .. })) {
                    self.running -= 1;
                }
                self.publish();
                send(out, result).await
            }
        }
    }

    /// The executor checks step inputs against the limits it announced; inputs past them mean
    /// a broken executor, and are refused here rather than handed to the handler. Not
    /// retryable: the same inputs would come again.
    fn check_inputs(&self, assign: &Assign, task_type: &str) -> Result<(), TaskError> {
        let Some(inputs) = &assign.inputs else {
            return Ok(());
        };
        check_payload("inputs", inputs, payload_limit(&self.shared)).map_err(|err| {
            TaskError::fatal(match err {
                PayloadError::TooLarge { size, limit, .. } => format!(
                    "inputs of {task_type:?} are {size} bytes, over the {limit}-byte payload limit"
                ),
                PayloadError::TooDeep { .. } => format!("inputs of {task_type:?}: {err}"),
            })
        })
    }

    fn spawn(&mut self, key: TaskKey, assign: Assign, slots: u32, registered: &Registered) {
        let span = info_span!(
            "task",
            task_id = %assign.task_id,
            attempt = assign.attempt,
            run_id = %assign.run_id,
            step_id = %assign.step_id,
            task_type = %registered.name,
            task_version = %registered.version,
            traceparent = %assign.traceparent,
        );
        super::trace_context::continue_trace(&span, &assign.traceparent);
        let ctx = TaskContext::from_assign(&assign, Default::default());
        let input = Value::Object(from_struct(assign.inputs.as_ref()));
        let handler = registered.handler.clone();
        let handler_ctx = ctx.clone();
        // The user's function is called inside the task too, so even a panic before its first
        // await becomes a failed attempt rather than a dead worker.
        let handler =
            tokio::spawn(async move { handler(handler_ctx, input).await }.instrument(span.clone()));
        let pump = tokio::spawn(
            pump(
                key.clone(),
                ctx.clone(),
                handler,
                self.events_tx.clone(),
                self.shared.clone(),
                registered.name.clone(),
            )
            .instrument(span),
        );
        let before = self.tasks.insert(
            key,
            Entry::Running {
                slots,
                ctx,
                pump: pump.abort_handle(),
            },
        );
        if !matches!(before, Some(Entry::Running { .. })) {
            self.running += 1;
        }
    }

    fn on_recorded(&mut self, recorded: Recorded) {
        let outcome = recorded.outcome();
        let key: TaskKey = (recorded.task_id, recorded.attempt);
        match self.tasks.get(&key) {
            Some(Entry::Finished { .. }) => {
                self.tasks.remove(&key);
                match outcome {
                    RecordOutcome::Stale => warn!(
                        task_id = %key.0, attempt = key.1, detail = %recorded.detail,
                        "result refused as stale"
                    ),
                    _ => debug!(task_id = %key.0, attempt = key.1, ?outcome, "result recorded"),
                }
                self.publish();
            }
            Some(Entry::Running { .. }) => {
                warn!(task_id = %key.0, attempt = key.1, "recorded before any result; ignored");
            }
            None => debug!(task_id = %key.0, attempt = key.1, "recorded for an unknown task"),
        }
    }

    fn on_cancel(&mut self, cancel: Cancel) {
        let key: TaskKey = (cancel.task_id, cancel.attempt);
        match self.tasks.get(&key) {
            Some(Entry::Running { ctx, .. }) => {
                info!(task_id = %key.0, attempt = key.1, reason = %cancel.reason, "task cancelled");
                ctx.cancel();
            }
            // A result that is already on its way is answered with Recorded anyway.
            Some(Entry::Finished { .. }) | None => {
                debug!(task_id = %key.0, attempt = key.1, "cancel for a task that is not running");
            }
        }
    }

    fn begin_drain(&mut self, why: &str) {
        if !self.draining {
            info!(in_flight = self.tasks.len(), why, "draining");
            self.draining = true;
            self.publish();
        }
    }

    async fn on_event(
        &mut self,
        event: Event,
        out: &mpsc::Sender<WorkerMessage>,
    ) -> Result<(), SessionEnd> {
        match event {
            Event::Forward(message) => send(out, message).await,
            Event::Finished { key, result } => {
                if self.finish(key, result.clone()) {
                    send(out, result).await
                } else {
                    Ok(())
                }
            }
        }
    }

    fn on_event_offline(&mut self, event: Event) {
        match event {
            Event::Forward(_) => {}
            Event::Finished { key, result } => {
                self.finish(key, result);
            }
        }
    }

    /// Moves a running task to Finished; false if the task is not running (cannot happen
    /// unless the pump outlived its entry).
    fn finish(&mut self, key: TaskKey, result: Message) -> bool {
        match self.tasks.get_mut(&key) {
            Some(entry @ Entry::Running { .. }) => {
                *entry = Entry::Finished { result };
                self.running -= 1;
                self.publish();
                true
            }
            _ => false,
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            worker_name: self.config.name.clone(),
            instance_id: self.config.instance_id.clone(),
            task_types: self
                .config
                .tasks
                .iter()
                .map(|t| TaskTypeVersion {
                    name: t.name.clone(),
                    version: t.version.clone(),
                })
                .collect(),
            labels: self.config.labels.clone(),
            slots: self.config.slots,
            sdk_language: "rust".to_owned(),
            sdk_version: env!("CARGO_PKG_VERSION").to_owned(),
            in_flight: self
                .tasks
                .keys()
                .map(|(task_id, attempt)| TaskRef {
                    task_id: task_id.clone(),
                    attempt: *attempt,
                })
                .collect(),
        }
    }

    fn state(&self) -> WorkerState {
        WorkerState {
            connected: self.session_id.is_some(),
            session_id: self.session_id.clone(),
            draining: self.draining,
            executor_draining: self.executor_draining,
            running: self.running,
            unacknowledged: self.tasks.len() - self.running,
            sessions: self.sessions,
        }
    }

    /// Field by field, so that the common publish (a count moved) allocates nothing.
    fn publish(&self) {
        debug_assert_eq!(
            self.running,
            self.tasks
                .values()
                .filter(|entry| matches!(entry, Entry::Running { .. }))
                .count(),
            "the running count follows the task table"
        );
        self.shared.state.update(|current| {
            let mut changed = update(&mut current.connected, self.session_id.is_some());
            changed |= update(&mut current.draining, self.draining);
            changed |= update(&mut current.executor_draining, self.executor_draining);
            changed |= update(&mut current.running, self.running);
            changed |= update(&mut current.unacknowledged, self.tasks.len() - self.running);
            changed |= update(&mut current.sessions, self.sessions);
            if current.session_id != self.session_id {
                current.session_id.clone_from(&self.session_id);
                changed = true;
            }
            changed
        });
    }
}

/// Sets `field` to `value`; whether that changed it.
pub(crate) fn update<T: PartialEq>(field: &mut T, value: T) -> bool {
    let changed = *field != value;
    *field = value;
    changed
}

/// Dials the executor, sends Hello and waits for Welcome.
async fn open_session(config: Arc<Config>, hello: Hello) -> Result<Session, OpenError> {
    let channel = config.endpoint.connect().await.map_err(|err| {
        OpenError::Retry(format!(
            "cannot connect to {}: {}",
            config.url,
            error_chain(&err)
        ))
    })?;
    // The executor enforces payload limits (and says which in Welcome); the transport should
    // not cut in first with its 4 MiB default.
    let mut client = WorkerServiceClient::new(config.credentials.clone().wrap(channel))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let (out, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    out.send(WorkerMessage {
        message: Some(Message::Hello(hello)),
    })
    .await
    .map_err(|_| OpenError::Retry("stream closed before hello".into()))?;
    let handshake = async {
        let mut inbound = client
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(refused)?
            .into_inner();
        match inbound.message().await {
            Ok(Some(ServerMessage {
                message: Some(server_message::Message::Welcome(welcome)),
            })) => Ok((inbound, welcome)),
            Ok(Some(_)) => Err(OpenError::Retry(
                "first server message is not welcome".into(),
            )),
            Ok(None) => Err(OpenError::Retry("stream closed before welcome".into())),
            Err(status) => Err(refused(status)),
        }
    };
    let (inbound, welcome) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| OpenError::Retry(format!("no welcome within {HANDSHAKE_TIMEOUT:?}")))??;
    Ok(Session {
        out,
        inbound,
        welcome,
    })
}

/// INVALID_ARGUMENT answers the Hello itself (a bad field), UNAUTHENTICATED and
/// PERMISSION_DENIED the credentials (a bad token, a task type outside the token): retrying
/// cannot help. Anything else may pass.
fn refused(status: tonic::Status) -> OpenError {
    if matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    ) {
        OpenError::Rejected(status)
    } else {
        OpenError::Retry(format!("{:?}: {}", status.code(), status.message()))
    }
}

/// A failed send means the stream is gone: reconnect.
async fn send(out: &mpsc::Sender<WorkerMessage>, message: Message) -> Result<(), SessionEnd> {
    out.send(WorkerMessage {
        message: Some(message),
    })
    .await
    .map_err(|_| SessionEnd::Broken("stream closed while sending".into()))
}

fn started((task_id, attempt): &TaskKey) -> Message {
    Message::Started(TaskStarted {
        task_id: task_id.clone(),
        attempt: *attempt,
    })
}

fn failed((task_id, attempt): &TaskKey, error: TaskError) -> Message {
    Message::Failed(TaskFailed {
        task_id: task_id.clone(),
        attempt: *attempt,
        error: error.message,
        retryable: error.retryable,
    })
}

/// Aborts the handler when the pump is aborted (worker abort, or the worker dropped).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Forwards a task's progress and logs while its handler runs, then reports the result.
async fn pump(
    key: TaskKey,
    ctx: TaskContext,
    handler: JoinHandle<Result<Value, TaskError>>,
    events: mpsc::Sender<Event>,
    shared: Arc<Shared>,
    task_type: String,
) {
    info!("task started");
    let mut handler = AbortOnDrop(handler);
    let mut tick = tokio::time::interval(LOG_FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_progress: Option<Instant> = None;
    let joined = loop {
        let progress_due = tokio::select! {
            joined = &mut handler.0 => break joined,
            () = ctx.woken() => last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_MIN_INTERVAL),
            _ = tick.tick() => true,
        };
        if progress_due && !forward_progress(&ctx, &events, &mut last_progress).await {
            return;
        }
        if !forward_logs(&key, &ctx, &events).await {
            return;
        }
    };
    // Whatever the handler reported last goes out before its result.
    if !forward_progress(&ctx, &events, &mut last_progress).await
        || !forward_logs(&key, &ctx, &events).await
    {
        return;
    }
    let result = match joined {
        Ok(Ok(output)) => completed(&key, &task_type, &output, &shared),
        Ok(Err(error)) => {
            warn!(error = %error.message, retryable = error.retryable, "task failed");
            failed(&key, error)
        }
        Err(err) if err.is_panic() => {
            let error = TaskError::retryable(format!("task handler panicked: {}", panic_text(err)));
            warn!(error = %error.message, "task failed");
            failed(&key, error)
        }
        // Aborted: the worker is shutting down and reports nothing.
        Err(_) => return,
    };
    // An error means the driver is gone, and with it anyone to report to.
    let _ = events.send(Event::Finished { key, result }).await;
}

fn completed(key: &TaskKey, task_type: &str, output: &Value, shared: &Shared) -> Message {
    let outputs = to_struct(output);
    let size = outputs.encoded_len();
    if let Err(err) = check_payload("outputs", &outputs, payload_limit(shared)) {
        let error = TaskError::fatal(match err {
            PayloadError::TooLarge { size, limit, .. } => format!(
                "output of {task_type:?} is {size} bytes, over the {limit}-byte payload limit"
            ),
            PayloadError::TooDeep { .. } => format!("output of {task_type:?}: {err}"),
        });
        warn!(error = %error.message, "task failed");
        return failed(key, error);
    }
    info!(output_bytes = size, "task completed");
    Message::Completed(TaskCompleted {
        task_id: key.0.clone(),
        attempt: key.1,
        outputs: Some(outputs),
    })
}

/// `Welcome.max_payload_bytes`; 0 (an executor that announced none) checks only the depth.
fn payload_limit(shared: &Shared) -> usize {
    let limit = shared.max_payload.load(Ordering::Relaxed);
    usize::try_from(limit)
        .ok()
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX)
}

/// False when the driver is gone.
async fn forward_progress(
    ctx: &TaskContext,
    events: &mpsc::Sender<Event>,
    last: &mut Option<Instant>,
) -> bool {
    let Some(progress) = ctx.take_progress() else {
        return true;
    };
    *last = Some(Instant::now());
    events
        .send(Event::Forward(Message::Progress(progress)))
        .await
        .is_ok()
}

async fn forward_logs(key: &TaskKey, ctx: &TaskContext, events: &mpsc::Sender<Event>) -> bool {
    let (mut lines, dropped) = ctx.take_logs();
    if dropped > 0 {
        lines.push(LogLine {
            at: Some(std::time::SystemTime::now().into()),
            level: "warn".to_owned(),
            text: format!("{dropped} log line(s) dropped: logged faster than the stream carried"),
        });
    }
    if lines.is_empty() {
        return true;
    }
    let log = TaskLog {
        task_id: key.0.clone(),
        attempt: key.1,
        lines,
    };
    events.send(Event::Forward(Message::Log(log))).await.is_ok()
}

fn panic_text(err: JoinError) -> String {
    let payload = err.into_panic();
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

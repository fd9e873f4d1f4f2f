//! Step workers: register task handlers, dial the run-executor, run what it assigns.
//!
//! A [`Worker`] holds one `WorkerService.Connect` stream at a time and owns all of its state in
//! a single task (see `driver`). It implements the protocol described at the top of
//! `proto/dagmesh/v1/worker.proto`:
//!
//! - Hello (task types, labels, slots, tasks in flight), then heartbeats at the interval the
//!   Welcome asks for;
//! - each Assign runs its handler on its own tokio task; Started, progress, logs, then exactly
//!   one Completed or Failed;
//! - a result is kept until the executor answers Recorded for it, and sent again after a
//!   reconnect, so a result is never lost when the stream breaks;
//! - Cancel fires the attempt's [`TaskContext::cancelled`];
//! - each attempt runs in a `task` span whose OpenTelemetry parent is the Assign's
//!   `traceparent`, so a process that exports its `tracing` spans (a `tracing-opentelemetry`
//!   layer) continues the executor's trace in step code;
//! - the worker's own stop (SIGTERM/SIGINT for [`Worker::run`], the future given to
//!   [`Worker::run_until`], or [`WorkerHandle::drain`]) sends Draining, takes no new work, waits
//!   until every result is Recorded, closes the stream and returns `Ok(())`;
//! - Drain from the executor means the *executor* is going away (a restart, a rollout): the
//!   worker takes no new work from that stream, finishes what runs, and once every result is
//!   Recorded (or the executor closed the stream first, leaving results to send again) it
//!   closes the stream and reconnects, to resume with the next executor. It does not return.
//!
//! When the stream breaks, the executor drained it, or the executor is unreachable, the worker
//! reconnects with exponential backoff and jitter (100 ms to 5 s by default) under the same
//! `instance_id`.
//! The only error it does not retry is an executor that refuses the Hello
//! (`INVALID_ARGUMENT`): that is a configuration mistake, reported as
//! [`WorkerError::Rejected`].

mod context;
mod driver;
mod task;
mod trace_context;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use dagmesh_proto::connect::{ClientSettings, Credentials};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

pub use context::{LogLevel, TaskContext};
pub use task::TaskError;

use task::ErasedHandler;

const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a worker could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid server url {url:?}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A TLS or token setting that cannot be used.
    #[error("{0}")]
    Settings(String),
    #[error("a worker needs at least one task type")]
    NoTasks,
    #[error("task type name is empty")]
    EmptyTaskName,
    #[error("task type {name:?} has an invalid version {version:?}: {source}")]
    InvalidVersion {
        name: String,
        version: String,
        #[source]
        source: semver::Error,
    },
    #[error("task type {name:?} version {version} is registered twice")]
    DuplicateTask { name: String, version: String },
    #[error("slots must be at least 1")]
    NoSlots,
    #[error("worker name is empty")]
    EmptyName,
}

/// Why [`Worker::run`] stopped without a clean drain.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The executor refused the Hello (`INVALID_ARGUMENT`, naming the bad field). Retrying the
    /// same Hello cannot help.
    #[error("executor rejected the worker: {}", .0.message())]
    Rejected(tonic::Status),
    /// [`WorkerHandle::abort`] (or a second SIGTERM/SIGINT) stopped the worker before every
    /// result was recorded. The executor re-runs those tasks after the lease.
    #[error(
        "worker aborted with {running} task(s) running and {unacknowledged} unrecorded result(s)"
    )]
    Aborted {
        running: usize,
        unacknowledged: usize,
    },
}

/// A snapshot of the worker, published by the worker task after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerState {
    /// Whether a stream is open and welcomed.
    pub connected: bool,
    /// `Welcome.session_id` of the current stream, if connected.
    pub session_id: Option<String>,
    /// The worker was told to stop (its handle, a signal, `run_until`'s future): it takes no
    /// new work and returns once every result is recorded.
    pub draining: bool,
    /// The executor of the current stream sent Drain (it is going away): no new work is taken
    /// from it, and once nothing is in flight the worker reconnects and resumes.
    pub executor_draining: bool,
    /// Handlers still running.
    pub running: usize,
    /// Finished tasks whose results the executor has not yet Recorded.
    pub unacknowledged: usize,
    /// Streams that got a Welcome so far, the current one included.
    pub sessions: u64,
}

impl WorkerState {
    /// Tasks the worker still answers for: running or with an unrecorded result.
    pub fn in_flight(&self) -> usize {
        self.running + self.unacknowledged
    }
}

/// The worker's published [`WorkerState`]: a value behind a lock, and a wake-up only when
/// someone waits. The driver publishes two or three times per task; `tokio::sync::watch`
/// notified its (absent) receivers each time, ~2% of a fan-out's CPU in the bench.
#[derive(Default)]
pub(crate) struct StateCell {
    /// The state, and how many `wait_for` calls are waiting for a change.
    inner: std::sync::Mutex<(WorkerState, usize)>,
    changed: tokio::sync::Notify,
}

impl StateCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, (WorkerState, usize)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self) -> WorkerState {
        self.lock().0.clone()
    }

    fn read<R>(&self, read: impl FnOnce(&WorkerState) -> R) -> R {
        read(&self.lock().0)
    }

    /// Applies `modify`, which says whether it changed anything; waiters are woken if so.
    pub(crate) fn update(&self, modify: impl FnOnce(&mut WorkerState) -> bool) {
        let mut inner = self.lock();
        let wake = modify(&mut inner.0) && inner.1 > 0;
        drop(inner);
        if wake {
            self.changed.notify_waiters();
        }
    }

    /// Waits until the state satisfies `predicate`; returns that state.
    async fn wait_for(&self, mut predicate: impl FnMut(&WorkerState) -> bool) -> WorkerState {
        /// Counts a waiter for as long as it waits (the future may be dropped mid-wait).
        struct Waiting<'a>(&'a StateCell);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.lock().1 -= 1;
            }
        }
        loop {
            // Registered before the state is read, so a change after the read wakes it.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let waiting = {
                let mut inner = self.lock();
                if predicate(&inner.0) {
                    return inner.0.clone();
                }
                inner.1 += 1;
                Waiting(self)
            };
            changed.await;
            drop(waiting);
        }
    }
}

/// What the worker task shares with handles and task pumps.
pub(crate) struct Shared {
    pub(crate) drain: CancellationToken,
    pub(crate) abort: CancellationToken,
    pub(crate) state: StateCell,
    /// `Welcome.max_payload_bytes` of the current session; 0 means no limit known.
    pub(crate) max_payload: AtomicU64,
}

pub(crate) struct Registered {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) handler: ErasedHandler,
}

pub(crate) struct Config {
    pub(crate) url: String,
    pub(crate) endpoint: Endpoint,
    pub(crate) credentials: Credentials,
    pub(crate) name: String,
    pub(crate) instance_id: String,
    pub(crate) labels: HashMap<String, String>,
    pub(crate) slots: u32,
    pub(crate) tasks: Vec<Registered>,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
}

impl Config {
    /// The handler for an Assign's task type. An empty version (an executor that does not
    /// say) matches the one registered version of that name.
    pub(crate) fn handler(&self, name: &str, version: &str) -> Option<&Registered> {
        if version.is_empty() {
            let mut by_name = self.tasks.iter().filter(|t| t.name == name);
            let first = by_name.next()?;
            return by_name.next().is_none().then_some(first);
        }
        self.tasks
            .iter()
            .find(|t| t.name == name && t.version == version)
    }
}

/// A configured worker; see the [module docs](self).
pub struct Worker {
    config: Arc<Config>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("url", &self.config.url)
            .field("name", &self.config.name)
            .field("instance_id", &self.config.instance_id)
            .field("slots", &self.config.slots)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts configuring a worker that dials `url`, e.g. `http://127.0.0.1:7070`.
    pub fn builder(url: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            url: url.into(),
            name: None,
            instance_id: None,
            labels: BTreeMap::new(),
            slots: 1,
            tasks: Vec::new(),
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            settings: ClientSettings::default(),
        }
    }

    /// A handle to drain, abort or observe the worker while it runs.
    pub fn handle(&self) -> WorkerHandle {
        WorkerHandle {
            shared: self.shared.clone(),
            instance_id: self.config.instance_id.clone().into(),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.config.instance_id
    }

    /// Runs until drained. The first SIGTERM or SIGINT starts a drain; a second one aborts
    /// (tasks still running are dropped, and the executor re-runs them after the lease).
    pub async fn run(self) -> Result<(), WorkerError> {
        let drain = self.shared.drain.clone();
        let abort = self.shared.abort.clone();
        let signals = async move {
            shutdown_signal().await;
            tracing::info!("signal received, draining (signal again to abort)");
            drain.cancel();
            shutdown_signal().await;
            tracing::warn!("second signal, aborting");
            abort.cancel();
        };
        self.run_until(signals).await
    }

    /// Runs until drained; `shutdown` resolving starts a drain, and so does
    /// [`WorkerHandle::drain`]. The executor's Drain does not: the worker finishes its work on
    /// that stream and reconnects (see the [module docs](self)).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let drain = self.shared.drain.clone();
        // Polled in this task, not spawned, so `shutdown` needs to be neither Send nor 'static.
        let trigger = async move {
            shutdown.await;
            drain.cancel();
            std::future::pending::<Infallible>().await
        };
        let driver = driver::Driver::new(self.config, self.shared);
        tokio::select! {
            result = driver.run() => result,
            never = trigger => match never {},
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(err) => tracing::warn!(%err, "cannot listen for SIGTERM; only SIGINT drains"),
        }
    }
    if let Err(err) = tokio::signal::ctrl_c().await {
        tracing::warn!(%err, "cannot listen for SIGINT; drain through the worker handle");
        std::future::pending::<()>().await
    }
}

/// Drains, aborts and observes a running [`Worker`]. Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
    instance_id: Arc<str>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("instance_id", &self.instance_id)
            .field("state", &self.shared.state.get())
            .finish()
    }
}

impl WorkerHandle {
    /// Starts a drain: Draining is sent, no new work is taken, and `run` returns once every
    /// running task has finished and its result is recorded.
    pub fn drain(&self) {
        self.shared.drain.cancel();
    }

    /// Stops at once: running handlers are dropped and unrecorded results are lost to this
    /// worker (the executor re-runs those tasks after the lease). `run` returns
    /// [`WorkerError::Aborted`].
    pub fn abort(&self) {
        self.shared.abort.cancel();
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn state(&self) -> WorkerState {
        self.shared.state.get()
    }

    pub fn is_connected(&self) -> bool {
        self.shared.state.read(|state| state.connected)
    }

    /// Tasks running or with an unrecorded result (what the next Hello lists in `in_flight`).
    pub fn in_flight(&self) -> usize {
        self.shared.state.read(WorkerState::in_flight)
    }

    /// Waits until the state satisfies `predicate` and returns that state. For tests and
    /// readiness probes; it waits forever if the state never gets there.
    pub async fn wait_for(&self, predicate: impl FnMut(&WorkerState) -> bool) -> WorkerState {
        self.shared.state.wait_for(predicate).await
    }
}

/// Configures a [`Worker`]; see [`Worker::builder`].
#[must_use]
pub struct WorkerBuilder {
    url: String,
    name: Option<String>,
    instance_id: Option<String>,
    labels: BTreeMap<String, String>,
    slots: u32,
    tasks: Vec<(String, String, ErasedHandler)>,
    backoff_initial: Duration,
    backoff_max: Duration,
    settings: ClientSettings,
}

impl WorkerBuilder {
    /// The bearer token (default: `DAGMESH_TOKEN`, or the file named by `DAGMESH_TOKEN_FILE`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.settings.token = Some(token.into());
        self
    }

    /// TLS and token settings; whatever they leave unset still comes from the environment
    /// (`DAGMESH_TLS_CA`, `DAGMESH_TLS_CLIENT_CERT`, ...). TLS is used for `https://` URLs.
    pub fn client_settings(mut self, settings: ClientSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Logical worker name (the pool), `Hello.worker_name`. Defaults to the executable's name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Unique id of this process, kept across reconnects so the executor hands back the
    /// tasks it held. Defaults to the name plus a random suffix.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// A label matched against `StepSpec.labels`, e.g. `("gpu", "true")`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// How many task slots this worker holds at once (default 1).
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Bounds of the reconnect backoff (defaults 100 ms and 5 s).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Registers the handler of task type `name` at `version` (semver, e.g. `1.3.0`).
    ///
    /// The Assign's inputs (a JSON object) are deserialized into `I`; if that fails the attempt
    /// fails with `retryable: false`. The output is serialized to JSON and should be an object
    /// (anything else is wrapped as `{"value": ...}`).
    pub fn task<I, O, E, F, Fut>(
        mut self,
        name: impl Into<String>,
        version: impl Into<String>,
        handler: F,
    ) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        E: Into<TaskError> + Send + 'static,
        F: Fn(TaskContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, E>> + Send + 'static,
    {
        let name = name.into();
        let handler = task::erase(name.clone(), handler);
        self.tasks.push((name, version.into(), handler));
        self
    }

    pub fn build(self) -> Result<Worker, BuildError> {
        Endpoint::from_shared(self.url.clone()).map_err(|source| BuildError::InvalidUrl {
            url: self.url.clone(),
            source,
        })?;
        let settings = self.settings.clone().or_env();
        let credentials = settings
            .credentials()
            .map_err(|error| BuildError::Settings(error.to_string()))?;
        let endpoint = settings
            .endpoint(&self.url)
            .map_err(|error| BuildError::Settings(error.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            // The executor never writes to an idle worker, so only pings notice a dead peer.
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if self.tasks.is_empty() {
            return Err(BuildError::NoTasks);
        }
        if self.slots == 0 {
            return Err(BuildError::NoSlots);
        }
        let mut tasks: Vec<Registered> = Vec::with_capacity(self.tasks.len());
        for (name, version, handler) in self.tasks {
            if name.is_empty() {
                return Err(BuildError::EmptyTaskName);
            }
            let parsed =
                semver::Version::parse(&version).map_err(|source| BuildError::InvalidVersion {
                    name: name.clone(),
                    version: version.clone(),
                    source,
                })?;
            let version = parsed.to_string();
            if tasks.iter().any(|t| t.name == name && t.version == version) {
                return Err(BuildError::DuplicateTask { name, version });
            }
            tasks.push(Registered {
                name,
                version,
                handler,
            });
        }
        let name = match self.name {
            Some(name) => name,
            None => default_name(),
        };
        if name.is_empty() {
            return Err(BuildError::EmptyName);
        }
        let instance_id = self.instance_id.unwrap_or_else(|| {
            let suffix = uuid::Uuid::new_v4().simple().to_string();
            format!("{name}-{}", &suffix[..12])
        });
        let config = Config {
            url: self.url,
            credentials,
            endpoint,
            name,
            instance_id,
            labels: self.labels.into_iter().collect(),
            slots: self.slots,
            tasks,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
        };
        let shared = Shared {
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
            state: StateCell::default(),
            max_payload: AtomicU64::new(0),
        };
        Ok(Worker {
            config: Arc::new(config),
            shared: Arc::new(shared),
        })
    }
}

fn default_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn noop(_: TaskContext, _: serde_json::Value) -> Result<(), TaskError> {
        Ok(())
    }

    use driver::update;

    #[tokio::test]
    async fn state_waiters_are_woken_by_a_change_and_counted_only_while_waiting() {
        let cell = Arc::new(StateCell::default());
        // Already true: returns at once, without counting as a waiter.
        assert_eq!(
            cell.wait_for(|s| !s.connected).await,
            WorkerState::default()
        );
        let waiter = tokio::spawn({
            let cell = cell.clone();
            async move { cell.wait_for(|s| s.running == 2).await }
        });
        while cell.lock().1 == 0 {
            tokio::task::yield_now().await;
        }
        cell.update(|s| update(&mut s.running, 1)); // not yet
        cell.update(|s| update(&mut s.running, 2));
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the change")
            .expect("no panic");
        assert_eq!(seen.running, 2);
        assert_eq!(
            cell.lock().1,
            0,
            "a waiter that returned is no longer counted"
        );
        // A wait given up (its future dropped) is no longer counted either.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), cell.wait_for(|s| s.draining)).await;
        assert!(gave_up.is_err());
        assert_eq!(cell.lock().1, 0);
    }

    #[test]
    fn build_validates_tasks_versions_and_slots() {
        let url = "http://127.0.0.1:1";
        assert!(matches!(
            Worker::builder(url).name("w").build(),
            Err(BuildError::NoTasks)
        ));
        assert!(matches!(
            Worker::builder(url).task("t", "1.x", noop).build(),
            Err(BuildError::InvalidVersion { .. })
        ));
        assert!(matches!(
            Worker::builder(url)
                .slots(0)
                .task("t", "1.0.0", noop)
                .build(),
            Err(BuildError::NoSlots)
        ));
        assert!(matches!(
            Worker::builder(url)
                .task("t", "1.0.0", noop)
                .task("t", "1.0.0", noop)
                .build(),
            Err(BuildError::DuplicateTask { .. })
        ));
        assert!(matches!(
            Worker::builder("not a url")
                .task("t", "1.0.0", noop)
                .build(),
            Err(BuildError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn run_futures_and_contexts_cross_threads() {
        fn assert_send<T: Send>(_: &T) {}
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        let worker = Worker::builder("http://127.0.0.1:1")
            .task("t", "1.0.0", noop)
            .build()
            .unwrap();
        assert_send(&worker.run());
        assert_send_sync::<TaskContext>();
        assert_send_sync::<WorkerHandle>();
    }

    #[test]
    fn default_instance_id_is_the_name_plus_a_suffix() {
        let worker = Worker::builder("http://127.0.0.1:1")
            .name("mesher")
            .task("t", "1.0.0", noop)
            .build()
            .unwrap();
        let id = worker.instance_id();
        assert!(
            id.starts_with("mesher-") && id.len() == "mesher-".len() + 12,
            "{id}"
        );
        assert_eq!(worker.handle().instance_id(), id);
    }

    #[test]
    fn handler_lookup_prefers_exact_version() {
        let worker = Worker::builder("http://127.0.0.1:1")
            .task("t", "1.0.0", noop)
            .task("t", "2.0.0", noop)
            .task("u", "1.0.0", noop)
            .build()
            .unwrap();
        let c = &worker.config;
        assert_eq!(c.handler("t", "2.0.0").map(|t| &*t.version), Some("2.0.0"));
        assert!(c.handler("t", "3.0.0").is_none());
        assert!(c.handler("t", "").is_none(), "ambiguous without a version");
        assert!(c.handler("u", "").is_some());
    }
}

//! The executor's Prometheus metrics (served by `dagmesh_runtime::metrics`).
//!
//! Counters and latency histograms are derived from the events each batch commits, like the
//! spans ([`Meter::observe`] beside `Timeline::observe`), so what they count is what the run
//! logs say happened. Gauges of the queues and workers are filled in at each scrape from a
//! queue snapshot ([`refresh`]). Labels are bounded: workflow names, task types, pools and
//! routes — never run, step or worker instance ids.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use dagmesh_runtime::metrics::{LatencyFamily, latency_family, register};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::queues::QueueSnapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkflowLabels {
    workflow: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RunEndLabels {
    workflow: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TaskLabels {
    task_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    task_type: String,
    version: String,
    labels: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PoolTaskLabels {
    pool: String,
    task_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PoolLabels {
    pool: String,
}

pub(crate) struct Metrics {
    runs_started: Family<WorkflowLabels, Counter>,
    runs_finished: Family<RunEndLabels, Counter>,
    steps_started: Family<TaskLabels, Counter>,
    steps_succeeded: Family<TaskLabels, Counter>,
    steps_failed: Family<TaskLabels, Counter>,
    steps_retried: Family<TaskLabels, Counter>,
    steps_lost: Family<TaskLabels, Counter>,
    schedule_to_start: LatencyFamily<TaskLabels>,
    step_duration: LatencyFamily<TaskLabels>,
    batch_size: Histogram,
    commit_duration: Histogram,
    store_errors: Family<KindLabels, Counter>,
    queue_depth: Family<RouteLabels, Gauge>,
    queue_oldest_age: Family<RouteLabels, Gauge<f64, AtomicU64>>,
    slots_used: Family<PoolTaskLabels, Gauge>,
    slots_free: Family<PoolTaskLabels, Gauge>,
    workers_connected: Family<PoolLabels, Gauge>,
    scaler_wanted: Family<TaskLabels, Gauge>,
    partitions_driven: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let metrics = Metrics {
        runs_started: Family::default(),
        runs_finished: Family::default(),
        steps_started: Family::default(),
        steps_succeeded: Family::default(),
        steps_failed: Family::default(),
        steps_retried: Family::default(),
        steps_lost: Family::default(),
        schedule_to_start: latency_family(),
        step_duration: latency_family(),
        batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
        commit_duration: Histogram::new(dagmesh_runtime::metrics::latency_buckets()),
        store_errors: Family::default(),
        queue_depth: Family::default(),
        queue_oldest_age: Family::default(),
        slots_used: Family::default(),
        slots_free: Family::default(),
        workers_connected: Family::default(),
        scaler_wanted: Family::default(),
        partitions_driven: Gauge::default(),
    };
    let m = &metrics;
    for kind in ["refused", "outage"] {
        // Exported at zero, so a rate() over them works before the first error.
        let _ = m
            .store_errors
            .get_or_create(&KindLabels { kind: kind.into() });
    }
    register(
        "dagmesh_runs_started",
        "Runs created, by workflow.",
        m.runs_started.clone(),
    );
    register(
        "dagmesh_runs_finished",
        "Runs that reached an end state, by workflow and state (succeeded, failed, cancelled).",
        m.runs_finished.clone(),
    );
    register(
        "dagmesh_steps_started",
        "Task attempts a worker started, by task type.",
        m.steps_started.clone(),
    );
    register(
        "dagmesh_steps_succeeded",
        "Task steps that succeeded on a worker, by task type (cache hits not included).",
        m.steps_succeeded.clone(),
    );
    register(
        "dagmesh_steps_failed",
        "Task steps that failed for good, by task type.",
        m.steps_failed.clone(),
    );
    register(
        "dagmesh_steps_retried",
        "Failed task attempts that will be retried, by task type.",
        m.steps_retried.clone(),
    );
    register(
        "dagmesh_steps_lost",
        "Task attempts lost with their worker, by task type.",
        m.steps_lost.clone(),
    );
    register(
        "dagmesh_step_schedule_to_start_seconds",
        "Time from a task being queued (READY) to a worker starting it, by task type.",
        m.schedule_to_start.clone(),
    );
    register(
        "dagmesh_step_duration_seconds",
        "Time from a worker starting a task attempt to its result, by task type.",
        m.step_duration.clone(),
    );
    register(
        "dagmesh_engine_batch_size",
        "Commands the engine folded into one batch.",
        m.batch_size.clone(),
    );
    register(
        "dagmesh_engine_commit_duration_seconds",
        "Time of one group commit of the engine to the store.",
        m.commit_duration.clone(),
    );
    register(
        "dagmesh_store_errors",
        "Commits the store did not take: kind=refused (the runs were reloaded) or outage (the \
         engine stopped).",
        m.store_errors.clone(),
    );
    register(
        "dagmesh_queue_depth",
        "Tasks waiting for a worker, per route (task type, version requirement, labels).",
        m.queue_depth.clone(),
    );
    register(
        "dagmesh_queue_oldest_age_seconds",
        "How long the oldest waiting task of a route has waited.",
        m.queue_oldest_age.clone(),
    );
    register(
        "dagmesh_worker_slots_used",
        "Slots in use on connected workers, by pool and task type (a worker that serves several \
         task types counts under each).",
        m.slots_used.clone(),
    );
    register(
        "dagmesh_worker_slots_free",
        "Free slots on connected, not draining workers, by pool and task type.",
        m.slots_free.clone(),
    );
    register(
        "dagmesh_workers_connected",
        "Connected worker instances, by pool.",
        m.workers_connected.clone(),
    );
    register(
        "dagmesh_scaler_wanted_slots",
        "Slots wanted per task type (queued plus running tasks), what the KEDA scaler reports \
         for a pool without version or label filters.",
        m.scaler_wanted.clone(),
    );
    register(
        "dagmesh_executor_partitions_driven",
        "Partitions whose runs this executor drives (it holds their leases); below the \
         database's partition count while partitions are being handed over.",
        m.partitions_driven.clone(),
    );
    metrics
});

/// Registers the families (so they are exported, at zero, from the first scrape).
pub(crate) fn register_all() {
    LazyLock::force(&METRICS);
}

/// The metrics, when recording is on.
pub(crate) fn get() -> Option<&'static Metrics> {
    dagmesh_runtime::metrics::enabled().then(|| &*METRICS)
}

fn task(task_type: &str) -> TaskLabels {
    TaskLabels {
        task_type: task_type.to_owned(),
    }
}

/// The task type of a step's requirement, "mesh.build@^1.2" -> "mesh.build".
pub(crate) fn task_type(requirement: &str) -> &str {
    requirement
        .split_once('@')
        .map_or(requirement, |(name, _)| name)
}

impl Metrics {
    pub fn run_started(&self, workflow: &str) {
        self.runs_started
            .get_or_create(&WorkflowLabels {
                workflow: workflow.to_owned(),
            })
            .inc();
    }

    pub fn run_finished(&self, workflow: &str, state: &str) {
        self.runs_finished
            .get_or_create(&RunEndLabels {
                workflow: workflow.to_owned(),
                state: state.to_owned(),
            })
            .inc();
    }

    pub fn step_lost(&self, task_type: &str) {
        self.steps_lost.get_or_create(&task(task_type)).inc();
    }

    pub fn batch(&self, commands: usize) {
        self.batch_size.observe(commands as f64);
    }

    pub fn commit(&self, seconds: f64) {
        self.commit_duration.observe(seconds);
    }

    pub fn store_error(&self, kind: &str) {
        self.store_errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }
}

/// What the step counters and histograms need that the step rows do not keep: when each task
/// became ready and when its attempt started. Empty (no allocation) while metrics are off.
pub(crate) struct Meter<K> {
    ready_since: HashMap<K, SystemTime>,
    running_since: HashMap<K, SystemTime>,
}

impl<K> Default for Meter<K> {
    fn default() -> Self {
        Self {
            ready_since: HashMap::new(),
            running_since: HashMap::new(),
        }
    }
}

/// A task step's state change, as the meter sees it.
pub(crate) enum TaskChange {
    Ready,
    /// Handed to a worker, not started yet (the wait for a worker goes on until Running).
    Assigned,
    Running,
    Succeeded,
    Failed,
    Retrying,
    /// Cancelled, skipped, reused from a cache: nothing to count.
    Other,
}

impl<K: std::hash::Hash + Eq + Copy> Meter<K> {
    pub fn observe(&mut self, at: K, task_type: &str, change: TaskChange, when: SystemTime) {
        let Some(metrics) = get() else {
            return;
        };
        let since =
            |start: Option<SystemTime>| start.and_then(|start| when.duration_since(start).ok());
        let labels = task(task_type);
        match change {
            TaskChange::Ready => {
                self.ready_since.insert(at, when);
                self.running_since.remove(&at);
            }
            TaskChange::Assigned => {}
            TaskChange::Running => {
                metrics.steps_started.get_or_create(&labels).inc();
                if let Some(waited) = since(self.ready_since.remove(&at)) {
                    metrics
                        .schedule_to_start
                        .get_or_create(&labels)
                        .observe(waited.as_secs_f64());
                }
                self.running_since.insert(at, when);
            }
            TaskChange::Succeeded | TaskChange::Failed | TaskChange::Retrying => {
                let counter = match change {
                    TaskChange::Succeeded => &metrics.steps_succeeded,
                    TaskChange::Failed => &metrics.steps_failed,
                    _ => &metrics.steps_retried,
                };
                counter.get_or_create(&labels).inc();
                self.ready_since.remove(&at);
                if let Some(ran) = since(self.running_since.remove(&at)) {
                    metrics
                        .step_duration
                        .get_or_create(&labels)
                        .observe(ran.as_secs_f64());
                }
            }
            TaskChange::Other => {
                self.ready_since.remove(&at);
                self.running_since.remove(&at);
            }
        }
    }
}

/// Fills the queue and worker gauges from `snapshot` (series of queues that emptied and pools
/// that left are dropped).
pub(crate) fn refresh(snapshot: &QueueSnapshot) {
    let metrics = &*METRICS;
    metrics
        .partitions_driven
        .set(i64::from(snapshot.partitions_driven));
    metrics.queue_depth.clear();
    metrics.queue_oldest_age.clear();
    metrics.slots_used.clear();
    metrics.slots_free.clear();
    metrics.workers_connected.clear();
    metrics.scaler_wanted.clear();
    let mut wanted: HashMap<&str, i64> = HashMap::new();
    for queue in &snapshot.queues {
        let labels: Vec<String> = queue
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let route = RouteLabels {
            task_type: queue.task_type.clone(),
            version: queue.version_req.to_string(),
            labels: labels.join(","),
        };
        metrics
            .queue_depth
            .get_or_create(&route)
            .set(i64::from(queue.queued));
        metrics
            .queue_oldest_age
            .get_or_create(&route)
            .set(queue.oldest_age.unwrap_or_default().as_secs_f64());
        *wanted.entry(&queue.task_type).or_default() +=
            i64::from(queue.queued + queue.running) * i64::from(queue.slots_per_task.max(1));
    }
    for (task_type, slots) in wanted {
        metrics
            .scaler_wanted
            .get_or_create(&task(task_type))
            .set(slots);
    }
    for worker in &snapshot.workers {
        if !worker.live {
            continue;
        }
        metrics
            .workers_connected
            .get_or_create(&PoolLabels {
                pool: worker.pool.clone(),
            })
            .inc();
        for (task_type, _) in &worker.task_types {
            let labels = PoolTaskLabels {
                pool: worker.pool.clone(),
                task_type: task_type.clone(),
            };
            metrics
                .slots_used
                .get_or_create(&labels)
                .inc_by(i64::from(worker.used_slots));
            metrics
                .slots_free
                .get_or_create(&labels)
                .inc_by(i64::from(worker.slots.saturating_sub(worker.used_slots)));
        }
    }
}

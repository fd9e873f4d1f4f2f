//! The engine: one task that owns every active run and every worker session.
//!
//! It is the only writer of run state. Commands arrive on a bounded channel; the loop takes all
//! that are waiting (up to `max_batch`), applies them to memory, dispatches ready tasks, commits
//! everything those commands changed in **one** store transaction (group commit), and only then
//! acts: replies to callers, sends Assign/Recorded/Cancel to workers, wakes watchers. So nothing
//! is acknowledged or acted upon before it is durable, and one commit serves many messages.
//!
//! A failed commit stops the engine (the process exits and a restart recovers from the store);
//! memory is never trusted past a write that did not happen.

mod admission;
#[cfg(test)]
mod machine_tests;
mod queues;
mod relay;
mod run;
mod timers;
mod traces;
mod workers;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use dagmesh_metastore::ownership::partition_of;
use dagmesh_metastore::{Lease, MetadataStore, StoreError};
use dagmesh_proto::v1::{
    self as pb, Hello, Run, RunState, WorkerInfo, server_message, worker_message,
};
use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::plans::{Plan, PlanCache};
use crate::{ExecError, ExecutorConfig};
use admission::Admission;
pub(crate) use relay::{OfferedRun, PeerId, PeerOutbound, Relay, ToDispatcher, ToOwner};
use run::StepRef;
pub(crate) use run::{Memo, Memoized, RunEntry};
use timers::{Timer, Timers};
pub(crate) use traces::valid_traceparent;
use workers::{Origin, QueuedTask, ReadyQueues, Session, Workers};
pub(crate) use workers::{Outbound, Route};

pub(crate) enum Command {
    Submit {
        plan: Arc<Plan>,
        inputs: Map<String, Json>,
        idempotency_key: String,
        tags: HashMap<String, String>,
        priority: i32,
        /// Admission buckets (see `Limits::buckets`), computed by the caller.
        buckets: Vec<String>,
        /// The principal submitting (Run.submitted_by).
        submitted_by: String,
        /// A memoized resubmit: the steps to reuse.
        memo: Option<Arc<Memo>>,
        /// The run's own webhooks, as given and checked.
        notifications: (
            Vec<pb::Notification>,
            Vec<dagmesh_spec::notify::CompiledNotification>,
        ),
        /// The caller's W3C traceparent (validated), or empty.
        traceparent: String,
        reply: oneshot::Sender<Submitted>,
    },
    Cancel {
        run_id: String,
        reason: String,
        /// The principal cancelling, recorded on the run's CANCELLED event.
        actor: String,
        reply: oneshot::Sender<Option<Run>>,
    },
    Retry {
        run: Box<Run>,
        plan: Arc<Plan>,
        /// `RetryRunRequest.from_step`, resolved to its plan position.
        from: Option<usize>,
        actor: String,
        reply: oneshot::Sender<Result<Run, ExecError>>,
    },
    /// ApproveStep. `None`: the run is not active here.
    Approve {
        run_id: String,
        step_id: String,
        approve: bool,
        outputs: Map<String, Json>,
        comment: String,
        actor: String,
        reply: oneshot::Sender<Option<Result<Run, String>>>,
    },
    /// DeliverEvent: resume the steps waiting for an event on `topic` that accept it.
    DeliverEvent {
        topic: String,
        payload: Map<String, Json>,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// SuspendRun (`suspend`) or ResumeRun. `None`: the run is not active here.
    Suspend {
        run_id: String,
        suspend: bool,
        reason: String,
        actor: String,
        reply: oneshot::Sender<Option<Result<Run, String>>>,
    },
    Watch {
        run_id: String,
        reply: oneshot::Sender<Option<watch::Receiver<u64>>>,
    },
    AwaitRun {
        run_id: String,
        reply: oneshot::Sender<Option<Run>>,
    },
    Connect {
        hello: Hello,
        /// Who opened the stream: only the same principal may resume the instance's session.
        principal: Arc<str>,
        generation: u64,
        outbound: Outbound,
    },
    /// A message from the stream `generation` of `instance`; ignored unless that stream is the
    /// session's current one (a refused second stream cannot speak for the session).
    FromWorker {
        instance: Arc<str>,
        generation: u64,
        message: worker_message::Message,
    },
    Disconnect {
        instance: Arc<str>,
        generation: u64,
        /// Why the stream ended, e.g. "stream closed by the worker".
        reason: String,
    },
    /// Why each READY step of a run waits, for the steps no connected worker can take.
    WaitingReasons {
        run_id: String,
        reply: oneshot::Sender<HashMap<String, String>>,
    },
    ListWorkers {
        reply: oneshot::Sender<Vec<WorkerInfo>>,
    },
    /// The ready queues and the workers that could take them.
    Queues {
        reply: oneshot::Sender<crate::queues::QueueSnapshot>,
    },
    /// Admission queue positions (1 = next) of the QUEUED runs.
    QueuePositions {
        reply: oneshot::Sender<HashMap<String, u32>>,
    },
    Drain {
        reply: oneshot::Sender<()>,
    },
    /// The plan of a child run that step `step` (attempt `attempt`) of `parent` asked for (see
    /// `Asked::StartChild`), loaded off the engine task; `Err`: why it cannot be run.
    ChildPlan {
        parent: Arc<str>,
        step: StepRef,
        attempt: u32,
        plan: Result<Arc<Plan>, String>,
    },
    /// The partitions this executor drives changed (see `crate::partitions`): drive the
    /// runs of `gained` from the store, forget those of `dropped`. Applied after the batch it
    /// arrives in is committed.
    Partitions(PartitionChange),
    /// An owner attached to this dispatcher (see `relay`); `outbound` carries what it is told.
    PeerAttached {
        peer: PeerId,
        outbound: PeerOutbound,
    },
    FromPeer {
        peer: PeerId,
        message: ToDispatcher,
    },
    PeerDetached {
        peer: PeerId,
    },
    /// On an owner: a message from the dispatcher.
    FromDispatcher(ToOwner),
    /// On an owner: its stream to a dispatcher is (re)attached.
    DispatcherAttached,
    /// On an owner: this executor took the executor lease and dispatches from now on; `lost`
    /// fires if the lease is lost again (the engine then stops, as a dispatcher does).
    Promote {
        fence: Lease,
        lost: oneshot::Receiver<String>,
    },
    /// The answer of `Asked::CacheLookup`; `None`: a miss (or the store could not answer).
    CacheAnswer {
        run: Arc<str>,
        step: StepRef,
        attempt: u32,
        entry: Option<Box<pb::CacheEntry>>,
    },
}

/// What a run's transition asks of the engine beyond the run itself (other runs, store reads);
/// the engine applies these after each command, until none is left (see `Engine::settle`).
pub(crate) enum Asked {
    /// A memoized step is READY: look its cache key up before it is queued for a worker.
    CacheLookup {
        run: Arc<str>,
        step: StepRef,
        attempt: u32,
        key: String,
    },
    /// A child workflow step started attempt `attempt`: load the workflow and start its run.
    StartChild {
        parent: Arc<str>,
        step: StepRef,
        attempt: u32,
        workflow: String,
        version: Option<u32>,
    },
    /// A child workflow step was cancelled (its parent stopped): cancel its run.
    CancelChild { child: String, reason: String },
    /// The parent of a child run was suspended or resumed: so is the child.
    SuspendChild {
        child: String,
        suspend: bool,
        reason: String,
        actor: String,
    },
    /// A run with a parent ended: the step that started it ends with it.
    ChildEnded { child: Arc<str> },
}

pub(crate) enum Submitted {
    Created(Box<Run>),
    /// The idempotency key matched this run.
    Existing(String),
    /// The run would belong to this partition, which this executor does not drive now
    /// (`None`: a run without a key, and this executor drives no partition at all).
    NotDriven(Option<u32>),
}

/// Partitions taken (with the leases whose epochs fence their commits) and given up.
#[derive(Debug, Default)]
pub(crate) struct PartitionChange {
    pub gained: Vec<(u32, Lease)>,
    pub dropped: Vec<u32>,
}

/// Cloneable handle to the engine task.
#[derive(Clone)]
pub(crate) struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// Bumped after a batch that changed the ready queues or the worker sessions (a hint to
    /// look again, for the scaler's StreamIsActive).
    pub queue_changes: watch::Receiver<u64>,
}

impl EngineHandle {
    pub async fn send(&self, command: Command) -> Result<(), ExecError> {
        self.tx
            .send(command)
            .await
            .map_err(|_| crate::error::engine_gone())
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once the engine task has stopped.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    pub async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ExecError> {
        let (reply, response) = oneshot::channel();
        self.send(command(reply)).await?;
        response.await.map_err(|_| {
            if self.tx.is_closed() {
                crate::error::engine_gone()
            } else {
                // The engine is up but dropped the reply: the store refused what this request
                // changed (see `Engine::flush`), and nothing of it was kept.
                ExecError::Aborted(
                    "the request was not applied: the store refused the batch it was in (it \
                     conflicted with the stored state of its run, which was reloaded, or another \
                     executor took over the run's partition) — retry the request"
                        .into(),
                )
            }
        })
    }
}

/// Something to do once the current batch is durable.
// `Send` is almost every effect; boxing it would cost an allocation per worker message.
#[allow(clippy::large_enum_variant)]
enum Effect {
    Send {
        instance: Arc<str>,
        message: server_message::Message,
    },
    /// `run`: the run the reply is about, if any; dropped with that run's changes when the
    /// store refuses them.
    Reply {
        run: Option<Arc<str>>,
        reply: Box<dyn FnOnce() + Send>,
    },
}

impl Effect {
    /// The run this effect depends on, if any.
    fn run_id(&self) -> Option<&str> {
        match self {
            Effect::Reply { run, .. } => run.as_deref(),
            Effect::Send { message, .. } => {
                let task_id = match message {
                    server_message::Message::Assign(m) => &m.task_id,
                    server_message::Message::Recorded(m) => &m.task_id,
                    server_message::Message::Cancel(m) => &m.task_id,
                    _ => return None,
                };
                task_id.split_once('/').map(|(run_id, _)| run_id)
            }
        }
    }
}

/// The executor's hold on the database: the lease whose epoch fences every commit, and the
/// signal that it was lost (see `crate::lease`). An owner that is not the dispatcher (see
/// `relay`) holds no executor lease: its partitions' leases fence its commits.
pub(crate) struct Ownership {
    /// Woken when a commit added webhook deliveries.
    pub webhooks: Arc<tokio::sync::Notify>,
    pub fence: Option<Lease>,
    /// Whether this engine dispatches to workers itself or hands its tasks to a dispatcher.
    pub relay: Relay,
    /// The cluster's partition count (`init_cluster`): what a new root run hashes into.
    pub partitions: u32,
    /// The partitions driven from the start, with their leases (see `crate::partitions`).
    pub driven: Vec<(u32, Lease)>,
    /// Fired once the partition keeper has handed the partition leases back after the engine
    /// stopped: the engine task ends only then (bounded), so a successor takes them at once.
    pub partitions_released: oneshot::Receiver<()>,
    pub lost: Option<oneshot::Receiver<String>>,
    /// Fired when the engine stops; the engine then waits for `renewal` and releases the lease.
    pub stop_renewal: Option<oneshot::Sender<()>>,
    pub renewal: Option<tokio::task::JoinHandle<()>>,
}

/// A change to what all runs share — ready queues, timers, worker sessions, admission
/// counters — asked for by one run's transition. Transitions only record these (the `Ctx`
/// methods below); the engine applies them after the transition returns
/// ([`Ctx::apply_shared`]), before it reads that state again. So a transition is a function of
/// its run, its input and what it may read (time, config, who can take a task) to the run's
/// new state plus these changes, events, dirty rows and effects.
pub(crate) enum Shared {
    Enqueue {
        route: Arc<Route>,
        priority: i32,
        task: QueuedTask,
    },
    Schedule {
        at: Instant,
        timer: Timer,
    },
    /// A worker session holds an attempt (created, with its principal, for a recovered one).
    Hold {
        instance: Arc<str>,
        principal: Option<Arc<str>>,
        task_id: String,
        attempt: u32,
        slots: u32,
    },
    Release {
        instance: Arc<str>,
        task_id: String,
        attempt: u32,
    },
    HoldResource(String),
    ReleaseResource(String),
    ReleaseBuckets(Vec<String>),
}

/// Everything the engine owns except the runs, so run logic can borrow both at once.
pub(crate) struct Ctx {
    config: ExecutorConfig,
    queues: ReadyQueues,
    workers: Workers,
    timers: Timers,
    admission: Admission,
    effects: Vec<Effect>,
    /// What the runs' transitions asked beyond themselves (see `Engine::settle`).
    asked: Vec<Asked>,
    /// Changes to shared state the transitions recorded, not yet applied (see [`Shared`]).
    shared: Vec<Shared>,
    /// Runs changed in this batch, in first-touched order.
    dirty_runs: Vec<Arc<str>>,
    dirty_set: HashSet<Arc<str>>,
    now: Instant,
    /// Set when the ready queues or the worker sessions changed (see `EngineHandle::queue_changes`).
    queues_touched: bool,
    /// Dispatcher or owner (see `relay`).
    relay: Relay,
}

impl Ctx {
    fn touch(&mut self, run_id: &Arc<str>) {
        if self.dirty_set.insert(run_id.clone()) {
            self.dirty_runs.push(run_id.clone());
        }
    }

    fn send(&mut self, instance: Arc<str>, message: server_message::Message) {
        self.effects.push(Effect::Send { instance, message });
    }

    fn schedule(&mut self, at: Instant, timer: Timer) {
        self.shared.push(Shared::Schedule { at, timer });
    }

    fn enqueue(&mut self, route: &Arc<Route>, priority: i32, task: QueuedTask) {
        let route = route.clone();
        self.shared.push(Shared::Enqueue {
            route,
            priority,
            task,
        });
    }

    fn hold_resource(&mut self, resource: &str) {
        self.shared.push(Shared::HoldResource(resource.to_owned()));
    }

    fn release_resource(&mut self, resource: &str) {
        self.shared
            .push(Shared::ReleaseResource(resource.to_owned()));
    }

    /// Applies the shared-state changes the transitions recorded, in order.
    fn apply_shared(&mut self) {
        for change in std::mem::take(&mut self.shared) {
            match change {
                Shared::Enqueue {
                    route,
                    priority,
                    task,
                } => {
                    self.queues_touched = true;
                    self.queues.push(&route, priority, task);
                }
                Shared::Schedule { at, timer } => self.timers.schedule(at, timer),
                Shared::Hold {
                    instance,
                    principal,
                    task_id,
                    attempt,
                    slots,
                } => {
                    let now = self.now;
                    let relay = &self.relay;
                    let session = self
                        .workers
                        .sessions
                        .entry(instance.clone())
                        .or_insert_with(|| relay.new_session(instance.clone(), now));
                    // Only the principal that held the attempt may resume the session.
                    if session.principal.is_none() {
                        session.principal = principal;
                    }
                    self.workers.hold(&instance, task_id, attempt, slots);
                }
                Shared::Release {
                    instance,
                    task_id,
                    attempt,
                } => {
                    self.workers.release(&instance, &task_id, attempt);
                }
                Shared::HoldResource(resource) => self.admission.hold_resource(&resource),
                Shared::ReleaseResource(resource) => self.admission.release_resource(&resource),
                Shared::ReleaseBuckets(buckets) => self.admission.release(&buckets),
            }
        }
    }

    /// `now + delay`, saturating far in the future instead of overflowing: delays are bounded
    /// at the boundary, but time arithmetic must never be what panics.
    fn after(&self, delay: std::time::Duration) -> Instant {
        self.now
            .checked_add(delay)
            .or_else(|| self.now.checked_add(dagmesh_proto::limits::MAX_TIMEOUT))
            .unwrap_or(self.now)
    }

    fn reply<T: Send + 'static>(&mut self, reply: oneshot::Sender<T>, value: T) {
        self.reply_about(None, reply, value);
    }

    /// A reply that only makes sense if `run`'s changes in this batch are committed.
    fn reply_about<T: Send + 'static>(
        &mut self,
        run: Option<Arc<str>>,
        reply: oneshot::Sender<T>,
        value: T,
    ) {
        self.effects.push(Effect::Reply {
            run,
            reply: Box::new(move || {
                let _ = reply.send(value);
            }),
        });
    }
}

pub(crate) struct Engine {
    store: Arc<dyn MetadataStore>,
    runs: HashMap<Arc<str>, RunEntry>,
    ctx: Ctx,
    /// Idempotency key -> run id of runs created by this process (bounded, oldest dropped);
    /// older keys are found in the store before a submit reaches the engine.
    idempotency: HashMap<String, Arc<str>>,
    idempotency_order: VecDeque<String>,
    watchers: HashMap<Arc<str>, watch::Sender<u64>>,
    waiters: HashMap<Arc<str>, Vec<oneshot::Sender<Option<Run>>>>,
    drain: Option<Vec<oneshot::Sender<()>>>,
    drain_expired: bool,
    /// The executor lease, while this engine holds it (the dispatcher).
    fence: Option<Lease>,
    /// Fires when the executor lease is lost (the engine then stops).
    lost: Option<oneshot::Receiver<String>>,
    /// The cluster's partition count.
    partitions: u32,
    /// The partitions this engine drives, with the leases that fence their commits: it holds
    /// runs of these partitions only.
    driven: BTreeMap<u32, Lease>,
    /// Partition changes received in this batch, applied once it is committed.
    repartitions: Vec<PartitionChange>,
    /// Bounds the store look-ups answering results for runs that are not active, so a worker
    /// spraying results for made-up tasks cannot queue up unbounded reads.
    lookups: Arc<tokio::sync::Semaphore>,
    /// Loads the plans of child runs (off the engine task, see `Command::ChildPlan`).
    plans: Arc<PlanCache>,
    /// The engine's own command channel, for answers of work done off the engine task; weak,
    /// so that the engine still stops when every handle is dropped.
    commands: Option<mpsc::WeakSender<Command>>,
    queue_changes: watch::Sender<u64>,
    /// Woken after a commit that added webhook deliveries (see [`crate::webhooks`]).
    webhooks: Arc<tokio::sync::Notify>,
}

/// Store look-ups for results of inactive runs that may be in flight at once.
const MAX_RESULT_LOOKUPS: usize = 16;

const IDEMPOTENCY_MEMORY: usize = 100_000;

/// How long changes that nobody waits for may stay uncommitted. They are still written before
/// anything depends on them: any batch with a reply or a worker message commits at once.
const LAZY_COMMIT: std::time::Duration = std::time::Duration::from_millis(2);

impl Engine {
    /// Loads every active run from the store and spawns the engine task.
    pub async fn start(
        store: Arc<dyn MetadataStore>,
        plans: Arc<PlanCache>,
        config: ExecutorConfig,
        ownership: Ownership,
    ) -> Result<(EngineHandle, tokio::task::JoinHandle<Result<(), ExecError>>), ExecError> {
        let now = Instant::now();
        let mut engine = Engine {
            store: store.clone(),
            runs: HashMap::new(),
            ctx: Ctx {
                admission: Admission::new(config.limits.clone()),
                config,
                queues: ReadyQueues::default(),
                workers: Workers::default(),
                timers: Timers::default(),
                effects: Vec::new(),
                asked: Vec::new(),
                shared: Vec::new(),
                dirty_runs: Vec::new(),
                dirty_set: HashSet::new(),
                now,
                queues_touched: false,
                relay: ownership.relay,
            },
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            watchers: HashMap::new(),
            waiters: HashMap::new(),
            drain: None,
            drain_expired: false,
            fence: ownership.fence,
            lost: ownership.lost,
            partitions: ownership.partitions,
            driven: ownership.driven.into_iter().collect(),
            repartitions: Vec::new(),
            lookups: Arc::new(tokio::sync::Semaphore::new(MAX_RESULT_LOOKUPS)),
            plans: plans.clone(),
            commands: None,
            queue_changes: watch::Sender::new(0),
            webhooks: ownership.webhooks.clone(),
        };
        let (tx, rx) = mpsc::channel(engine.ctx.config.max_batch * 2);
        engine.commands = Some(tx.downgrade());
        let driven: Vec<u32> = engine.driven.keys().copied().collect();
        engine.recover(&driven).await?;
        engine.ctx.workers.mirrored = engine.ctx.relay.is_owner();
        let Ownership {
            stop_renewal,
            renewal,
            partitions_released,
            ..
        } = ownership;
        let queue_changes = engine.queue_changes.subscribe();
        let task = tokio::spawn(async move {
            let store = engine.store.clone();
            let fence = engine.fence.clone();
            let result = engine.run(rx).await;
            if let Some(stop_renewal) = stop_renewal {
                let _ = stop_renewal.send(());
            }
            if let Some(renewal) = renewal {
                let _ = renewal.await;
            }
            // The keeper noticed the engine stop (its channel closed) and hands the partition
            // leases back; a keeper stuck on an unreachable store does not hold the stop up.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), partitions_released).await;
            if result.is_ok()
                && let Some(fence) = &fence
            {
                crate::lease::release(&store, fence).await;
            }
            result
        });
        Ok((EngineHandle { tx, queue_changes }, task))
    }

    /// Loads the active runs of `partitions` from the store and takes them up.
    async fn recover(&mut self, partitions: &[u32]) -> Result<(), ExecError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let plans = self.plans.clone();
        // Driving every partition: read every active run, so that one whose stored partition is
        // out of range (a damaged row) is found and quarantined rather than never driven.
        let every = partitions.len() >= self.partitions as usize;
        let active = self
            .store
            .read_active_runs_checked((!every).then_some(partitions))
            .await?;
        for unreadable in active.unreadable {
            let reason = format!("quarantined at recovery: {}", unreadable.reason);
            quarantine(&self.store, &unreadable.run_id, &reason).await?;
        }
        let count = active.runs.len();
        for mut run in active.runs {
            let plan = match plans.get(&run.workflow, Some(run.workflow_version)).await {
                Ok(plan) => plan,
                Err(ExecError::Store(error)) if error.is_outage() => return Err(error.into()),
                Err(error) => {
                    let reason = format!(
                        "quarantined at recovery: workflow {} version {} cannot be run: {error}",
                        run.workflow, run.workflow_version
                    );
                    quarantine(&self.store, &run.run_id, &reason).await?;
                    continue;
                }
            };
            if run.partition >= self.partitions {
                let reason = format!(
                    "quarantined at recovery: its partition {} is outside the cluster's {} \
                     partitions",
                    run.partition, self.partitions
                );
                quarantine(&self.store, &run.run_id, &reason).await?;
                continue;
            }
            if let Err(problem) = check_recovered(&run) {
                let reason = format!("quarantined at recovery: {problem}");
                quarantine(&self.store, &run.run_id, &reason).await?;
                continue;
            }
            find_log_end(&self.store, &mut run).await?;
            let run_id = run.run_id.clone();
            let entry = match RunEntry::recover(run, plan, &mut self.ctx) {
                Ok(entry) => entry,
                Err(problem) => {
                    let reason = format!("quarantined at recovery: {problem}");
                    quarantine(&self.store, &run_id, &reason).await?;
                    continue;
                }
            };
            if let Some(key) = non_empty(&entry.run.idempotency_key) {
                self.remember_key(key.to_owned(), entry.id.clone());
            }
            self.adopt(entry);
        }
        if count > 0 {
            tracing::info!(runs = count, "recovered active runs");
        }
        self.finish_orphaned_children().await?;
        self.settle();
        self.admit_queued();
        self.dispatch();
        // Before the offers of these runs: their tasks on workers are this owner's now.
        self.declare_held(Some(partitions));
        self.flush().await
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), ExecError> {
        let mut batch = Vec::with_capacity(self.ctx.config.max_batch);
        // Set while changes wait for a lazy commit (see `LAZY_COMMIT`).
        let mut commit_due: Option<Instant> = None;
        loop {
            let deadline = match (self.ctx.timers.next_deadline(), commit_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let lost_slot = &mut self.lost;
            let lost = async {
                match lost_slot.as_mut() {
                    Some(lost) => lost.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = rx.recv_many(&mut batch, self.ctx.config.max_batch) => {
                    if received == 0 {
                        break;
                    }
                }
                () = sleep => {}
                reason = lost => {
                    let reason = reason.unwrap_or_else(|_| "the lease renewal stopped".into());
                    tracing::error!(%reason, "stopping the engine");
                    return Err(ExecError::Fenced(reason));
                }
            }
            self.ctx.now = Instant::now();
            if let Some(metrics) = crate::metrics::get()
                && !batch.is_empty()
            {
                metrics.batch(batch.len());
            }
            for command in batch.drain(..) {
                self.handle(command);
                self.settle();
            }
            while let Some(timer) = self.ctx.timers.pop_due(self.ctx.now) {
                self.fire(timer);
                self.settle();
            }
            self.admit_queued();
            self.dispatch();
            if std::mem::take(&mut self.ctx.queues_touched) {
                self.queue_changes
                    .send_modify(|changes| *changes = changes.wrapping_add(1));
            }
            // Nothing waits on this batch (no reply, no message to a worker: only Started,
            // progress or logs): let it share the next commit instead of paying for its own.
            if self.ctx.effects.is_empty() && self.drain.is_none() && self.repartitions.is_empty() {
                if self.ctx.dirty_runs.is_empty() {
                    continue; // heartbeats only
                }
                let due = *commit_due.get_or_insert(self.ctx.now + LAZY_COMMIT);
                if self.ctx.now < due {
                    continue;
                }
            }
            commit_due = None;
            if let Err(error) = self.flush().await {
                tracing::error!(%error, "commit failed; stopping the engine");
                return Err(error);
            }
            // After the commit: what a dropped partition's runs did in this batch is written
            // (its lease was handed over with the epoch unchanged) or was refused whole.
            for change in std::mem::take(&mut self.repartitions) {
                self.repartition(change).await?;
            }
            if self.drain_done() {
                break;
            }
        }
        Ok(())
    }

    fn handle(&mut self, command: Command) {
        // Nothing a command reads may lag behind what earlier transitions recorded.
        self.ctx.apply_shared();
        if matches!(
            command,
            Command::Connect { .. } | Command::Disconnect { .. }
        ) {
            self.ctx.queues_touched = true;
        }
        match command {
            Command::ChildPlan {
                parent,
                step,
                attempt,
                plan,
            } => self.start_child(parent, step, attempt, plan),
            Command::CacheAnswer {
                run,
                step,
                attempt,
                entry,
            } => {
                if let Some(entry_run) = self.runs.get_mut(&run) {
                    entry_run.cache_answer(step, attempt, entry.map(|e| *e), &mut self.ctx);
                }
            }
            Command::Partitions(change) => self.repartitions.push(change),
            Command::Submit {
                plan,
                inputs,
                idempotency_key,
                tags,
                priority,
                buckets,
                submitted_by,
                memo,
                notifications,
                traceparent,
                reply,
            } => {
                if let Some(run_id) = self.idempotency.get(&idempotency_key) {
                    let existing = Submitted::Existing(run_id.to_string());
                    self.ctx.reply(reply, existing);
                    return;
                }
                // One key always meets the same owner, which deduplicates it; a run without a
                // key gets an id that falls into a partition driven here.
                let (run_id, partition) = if idempotency_key.is_empty() {
                    match self.unkeyed_run_id() {
                        Some(drawn) => drawn,
                        None => {
                            self.ctx.reply(reply, Submitted::NotDriven(None));
                            return;
                        }
                    }
                } else {
                    let partition = partition_of(&idempotency_key, self.partitions);
                    if !self.driven.contains_key(&partition) {
                        self.ctx.reply(reply, Submitted::NotDriven(Some(partition)));
                        return;
                    }
                    (run::new_run_id(), partition)
                };
                // Straight in when nothing waits and there is room; otherwise behind the queue.
                // On an owner the dispatcher counts the limits: a run that takes buckets waits
                // for it.
                let admit = if self.ctx.relay.is_owner() {
                    buckets.is_empty()
                } else {
                    self.ctx.admission.queue_is_empty() && self.ctx.admission.fits(&buckets)
                };
                let mut entry = RunEntry::create(
                    run_id,
                    plan,
                    inputs,
                    idempotency_key.clone(),
                    tags,
                    priority,
                    admit,
                    submitted_by,
                    &mut self.ctx,
                );
                entry.buckets = buckets;
                entry.memo = memo;
                // Stored with the run's first row, written in this batch.
                let (raw, compiled) = notifications;
                entry.run.notifications = raw;
                entry.notifications = compiled;
                entry.run.traceparent = traceparent;
                entry.run.partition = partition;
                let id = entry.id.clone();
                if !idempotency_key.is_empty() {
                    self.remember_key(idempotency_key, id.clone());
                }
                if admit {
                    self.ctx.admission.acquire(&entry.buckets);
                    entry.admitted = true;
                    entry.start(&mut self.ctx);
                } else {
                    self.ctx.admission.enqueue(priority, id.clone());
                }
                self.runs.insert(id.clone(), entry);
                let entry = self.runs.get_mut(&id).expect("just inserted");
                let snapshot = entry.snapshot();
                self.ctx
                    .reply_about(Some(id), reply, Submitted::Created(Box::new(snapshot)));
            }
            Command::Cancel {
                run_id,
                reason,
                actor,
                reply,
            } => {
                let mut about = None;
                let result = self.runs.get_mut(run_id.as_str()).map(|entry| {
                    entry.cancel_by(&reason, &actor, &mut self.ctx);
                    about = Some(entry.id.clone());
                    entry.snapshot()
                });
                self.ctx.reply_about(about, reply, result);
            }
            Command::Retry {
                run,
                plan,
                from,
                actor,
                reply,
            } => {
                if !self.driven.contains_key(&run.partition) {
                    let error = ExecError::Elsewhere {
                        partition: run.partition,
                        message: format!(
                            "run {} is in partition {}, which this executor does not drive \
                             (another replica does, or it is being handed over); retry in a \
                             few seconds",
                            run.run_id, run.partition
                        ),
                    };
                    self.ctx.reply(reply, Err(error));
                    return;
                }
                if self.runs.contains_key(run.run_id.as_str()) {
                    let error = ExecError::FailedPrecondition(format!(
                        "run {} is still running; cancel it first",
                        run.run_id
                    ));
                    self.ctx.reply(reply, Err(error));
                    return;
                }
                let mut entry = match RunEntry::recover(*run, plan, &mut self.ctx) {
                    Ok(entry) => entry,
                    Err(problem) => {
                        let error = ExecError::FailedPrecondition(format!(
                            "the run cannot be retried: its stored steps are inconsistent: {problem}"
                        ));
                        self.ctx.reply(reply, Err(error));
                        return;
                    }
                };
                entry.buckets = self.buckets_of(&entry);
                entry.retry(&actor, from, &mut self.ctx);
                let id = entry.id.clone();
                self.ctx.admission.enqueue(entry.run.priority, id.clone());
                self.runs.insert(id.clone(), entry);
                self.admit_queued();
                let snapshot = self.runs[&id].snapshot();
                self.ctx.reply_about(Some(id), reply, Ok(snapshot));
            }
            Command::Approve {
                run_id,
                step_id,
                approve,
                outputs,
                comment,
                actor,
                reply,
            } => {
                let mut about = None;
                let result = self.runs.get_mut(run_id.as_str()).map(|entry| {
                    about = Some(entry.id.clone());
                    entry
                        .approve(&step_id, approve, outputs, &comment, &actor, &mut self.ctx)
                        .map(|()| entry.snapshot())
                });
                self.ctx.reply_about(about, reply, result);
            }
            Command::DeliverEvent {
                topic,
                payload,
                reply,
            } => {
                let mut resumed = Vec::new();
                for entry in self.runs.values_mut() {
                    if entry.waits_for_events() {
                        resumed.extend(entry.deliver_event(&topic, &payload, &mut self.ctx));
                    }
                }
                // Answered after the commit that records the resumed steps.
                self.ctx.reply(reply, resumed);
            }
            Command::Suspend {
                run_id,
                suspend,
                reason,
                actor,
                reply,
            } => {
                let mut about = None;
                let result = self.runs.get_mut(run_id.as_str()).map(|entry| {
                    about = Some(entry.id.clone());
                    if entry.run.state() != RunState::Running {
                        return Err(format!(
                            "run {run_id} is {}; only a RUNNING run can be suspended or resumed",
                            entry
                                .run
                                .state()
                                .as_str_name()
                                .trim_start_matches("RUN_STATE_")
                        ));
                    }
                    entry.set_suspended(suspend, &reason, &actor, &mut self.ctx);
                    Ok(entry.snapshot())
                });
                self.ctx.reply_about(about, reply, result);
            }
            Command::Watch { run_id, reply } => {
                let receiver = self.runs.get_key_value(run_id.as_str()).map(|(id, entry)| {
                    self.watchers
                        .entry(id.clone())
                        .or_insert_with(|| watch::channel(entry.run.last_seq).0)
                        .subscribe()
                });
                let _ = reply.send(receiver);
            }
            Command::AwaitRun { run_id, reply } => match self.runs.get_key_value(run_id.as_str()) {
                Some((id, _)) => self.waiters.entry(id.clone()).or_default().push(reply),
                None => {
                    let _ = reply.send(None);
                }
            },
            Command::Connect {
                hello,
                principal,
                generation,
                outbound,
            } => self.connect(hello, principal, generation, outbound),
            Command::FromWorker {
                instance,
                generation,
                message,
            } => {
                let current = self
                    .ctx
                    .workers
                    .sessions
                    .get(&instance)
                    .is_some_and(|s| s.generation == generation && s.outbound.is_some());
                if current {
                    self.on_worker_message(instance, message);
                }
            }
            Command::Disconnect {
                instance,
                generation,
                reason,
            } => {
                let grace = self.ctx.after(self.ctx.config.reconnect_grace);
                if let Some(session) = self.ctx.workers.sessions.get_mut(&instance)
                    && session.generation == generation
                {
                    session.outbound = None;
                    session.disconnected_at = Some(self.ctx.now);
                    session.disconnect_reason = reason;
                    if session.held.is_empty() {
                        self.ctx.workers.sessions.remove(&instance);
                        tracing::info!(worker = %instance, "worker disconnected");
                    } else {
                        tracing::warn!(
                            worker = %instance,
                            tasks = session.held.len(),
                            reason = %session.disconnect_reason,
                            "worker stream ended; its tasks wait for it to reconnect"
                        );
                        self.ctx.timers.schedule(grace, Timer::Lease { instance });
                    }
                }
            }
            Command::WaitingReasons { run_id, reply } => {
                let mut reasons = HashMap::new();
                if let Some(entry) = self.runs.get(run_id.as_str()) {
                    for (at, step_id) in entry.ready_steps() {
                        if let Some(reason) = self.ctx.workers.waiting_reason(entry.route(at)) {
                            reasons.insert(step_id, reason);
                        }
                    }
                }
                let _ = reply.send(reasons);
            }
            Command::Queues { reply } => {
                let snapshot = self.queue_snapshot();
                self.ctx.reply(reply, snapshot);
            }
            Command::ListWorkers { reply } => {
                let mut workers: Vec<WorkerInfo> = self
                    .ctx
                    .workers
                    .sessions
                    .values()
                    .map(Session::info)
                    .collect();
                workers.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
                let _ = reply.send(workers);
            }
            Command::QueuePositions { reply } => {
                let mut positions = HashMap::new();
                for (_, run_id) in self.ctx.admission.queued() {
                    if self
                        .runs
                        .get(&run_id)
                        .is_some_and(|e| e.run.state() == RunState::Queued)
                    {
                        let position = positions.len() as u32 + 1;
                        positions.insert(run_id.to_string(), position);
                    }
                }
                let _ = reply.send(positions);
            }
            Command::PeerAttached { peer, outbound } => self.peer_attached(peer, outbound),
            Command::FromPeer { peer, message } => self.on_peer_message(peer, message),
            Command::PeerDetached { peer } => self.peer_detached(peer),
            Command::FromDispatcher(message) => self.on_dispatcher_message(message),
            Command::DispatcherAttached => self.dispatcher_attached(),
            Command::Promote { fence, lost } => {
                self.fence = Some(fence);
                self.lost = Some(lost);
                self.become_dispatcher();
            }
            Command::Drain { reply } => {
                if self.drain.is_none() {
                    tracing::info!(
                        tasks = self.ctx.workers.total_held(),
                        "draining: no new assignments"
                    );
                    for session in self.ctx.workers.sessions.values() {
                        session.send(server_message::Message::Drain(pb::Drain {
                            reason: "executor is shutting down".into(),
                        }));
                    }
                    let deadline = self.ctx.after(self.ctx.config.drain_timeout);
                    self.ctx.timers.schedule(deadline, Timer::DrainDeadline);
                }
                self.drain.get_or_insert_with(Vec::new).push(reply);
            }
        }
    }

    /// Applies what the runs' transitions asked beyond themselves, including what that in turn
    /// asks, in this batch: a child run is created, cancelled or ended in the same commit as
    /// the parent's step that caused it. Store reads go off the engine task and come back as
    /// commands.
    fn settle(&mut self) {
        self.ctx.apply_shared();
        while !self.ctx.asked.is_empty() {
            for asked in std::mem::take(&mut self.ctx.asked) {
                match asked {
                    Asked::CacheLookup {
                        run,
                        step,
                        attempt,
                        key,
                    } => self.look_up_cache(run, step, attempt, key),
                    Asked::StartChild {
                        parent,
                        step,
                        attempt,
                        workflow,
                        version,
                    } => self.load_child_plan(parent, step, attempt, workflow, version),
                    Asked::CancelChild { child, reason } => {
                        if let Some(entry) = self.runs.get_mut(child.as_str()) {
                            entry.cancel_by(&reason, "", &mut self.ctx);
                        }
                    }
                    Asked::SuspendChild {
                        child,
                        suspend,
                        reason,
                        actor,
                    } => {
                        if let Some(entry) = self.runs.get_mut(child.as_str())
                            && entry.run.state() == RunState::Running
                        {
                            entry.set_suspended(suspend, &reason, &actor, &mut self.ctx);
                        }
                    }
                    Asked::ChildEnded { child } => {
                        let Some(entry) = self.runs.remove(&child) else {
                            continue;
                        };
                        if let Some(parent) = self.runs.get_mut(entry.run.parent_run_id.as_str()) {
                            let step_id = entry.run.parent_step_id.clone();
                            parent.child_ended(&step_id, &entry, &mut self.ctx);
                        }
                        self.runs.insert(child, entry);
                    }
                }
                self.ctx.apply_shared();
            }
        }
    }

    /// Reads a cache entry off the engine task; the answer comes back as `Command::CacheAnswer`.
    /// A store that cannot answer is a miss: the step runs.
    fn look_up_cache(&mut self, run: Arc<str>, step: StepRef, attempt: u32, key: String) {
        let store = self.store.clone();
        self.answer_later(async move {
            let entry = match store.read_cache_entry(&key).await {
                Ok(entry) => entry,
                Err(error) => {
                    tracing::warn!(%error, run_id = %run, "step cache lookup failed; the step runs");
                    None
                }
            };
            Command::CacheAnswer {
                run,
                step,
                attempt,
                entry: entry.map(Box::new),
            }
        });
    }

    /// Runs `work` (a store read) off the engine task; its command comes back to the engine.
    /// Nothing happens once the engine is stopping.
    fn answer_later(&self, work: impl Future<Output = Command> + Send + 'static) {
        let Some(commands) = self.commands.as_ref().and_then(|weak| weak.upgrade()) else {
            return;
        };
        tokio::spawn(async move {
            let _ = commands.send(work.await).await;
        });
    }

    /// Loads the plan of a child run off the engine task; it comes back as
    /// `Command::ChildPlan`. A step that would nest too deep fails at once.
    fn load_child_plan(
        &mut self,
        parent: Arc<str>,
        step: StepRef,
        attempt: u32,
        workflow: String,
        version: Option<u32>,
    ) {
        let Some(entry) = self.runs.get_mut(&parent) else {
            return;
        };
        let depth = entry.run.depth.saturating_add(1);
        let max = dagmesh_proto::limits::MAX_CHILD_DEPTH;
        if depth > max {
            let error = format!(
                "child workflow {workflow} would run at depth {depth}, over the limit of {max} \
                 nested child runs (does the workflow start itself?)"
            );
            entry.child_not_started(step, attempt, error, &mut self.ctx);
            return;
        }
        let plans = self.plans.clone();
        self.answer_later(async move {
            // A store that is briefly unreachable must not fail the step for good.
            let mut loaded = plans.get(&workflow, version).await;
            for wait in [1, 2, 4, 8] {
                match &loaded {
                    Err(ExecError::Store(error)) if error.is_outage() => {
                        tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                        loaded = plans.get(&workflow, version).await;
                    }
                    _ => break,
                }
            }
            let plan = match loaded {
                Ok(plan) => Ok(plan),
                Err(ExecError::NotFound(message)) => Err(format!("child workflow: {message}")),
                Err(error) => Err(format!("child workflow {workflow} cannot be run: {error}")),
            };
            Command::ChildPlan {
                parent,
                step,
                attempt,
                plan,
            }
        });
    }

    /// Starts the child run of (`parent`, `step`, `attempt`) with `plan`, if the step still
    /// waits for it. Its inputs are checked against what the child declares; the run is not
    /// held back by admission (its parent holds its place).
    fn start_child(
        &mut self,
        parent_id: Arc<str>,
        step: StepRef,
        attempt: u32,
        plan: Result<Arc<Plan>, String>,
    ) {
        let Some(parent) = self.runs.get_mut(&parent_id) else {
            return;
        };
        if !parent.wants_child(step, attempt) {
            return;
        }
        let step_id = parent.step_key(step);
        let plan = match plan {
            Ok(plan) => plan,
            Err(error) => {
                parent.child_not_started(step, attempt, error, &mut self.ctx);
                return;
            }
        };
        let field = format!("steps.{step_id}.inputs");
        let inputs = match plan
            .compiled
            .check_run_inputs(parent.child_inputs(step), &field)
        {
            Ok(inputs) => inputs,
            Err(errors) => {
                let error = format!(
                    "the inputs do not match what child workflow {} version {} declares:\n{errors}",
                    plan.workflow.name, plan.workflow.version
                );
                parent.child_not_started(step, attempt, error, &mut self.ctx);
                return;
            }
        };
        let key = format!("child:{parent_id}/{step_id}/{attempt}");
        let mut child = RunEntry::create(
            run::new_run_id(),
            plan,
            inputs,
            key,
            HashMap::new(),
            parent.run.priority,
            true,
            parent.run.submitted_by.clone(),
            &mut self.ctx,
        );
        child.run.parent_run_id = parent_id.to_string();
        child.run.parent_step_id = step_id;
        child.run.depth = parent.run.depth.saturating_add(1);
        // A step and the child it starts commit together, and a tree is cancelled in one place.
        child.run.partition = parent.run.partition;
        parent.child_started(step, &child.run, &mut self.ctx);
        child.start(&mut self.ctx);
        self.runs.insert(child.id.clone(), child);
    }

    /// At recovery: a step waiting for a child run that is no longer active (it ended, or was
    /// quarantined, without the parent hearing of it) ends with that child as stored.
    async fn finish_orphaned_children(&mut self) -> Result<(), ExecError> {
        let mut orphans = Vec::new();
        for (id, entry) in &self.runs {
            for child in entry.running_children() {
                if !self.runs.contains_key(child.as_str()) {
                    orphans.push((id.clone(), child));
                }
            }
        }
        for (parent_id, child_id) in orphans {
            let child = match self.store.get_run(&child_id).await {
                Ok(child) => child,
                Err(error) if error.is_outage() => return Err(error.into()),
                Err(error) => {
                    let mut lost = Run {
                        run_id: child_id.clone(),
                        state: RunState::Failed as i32,
                        error: format!("it cannot be read: {error}"),
                        ..Run::default()
                    };
                    lost.parent_run_id = parent_id.to_string();
                    lost
                }
            };
            let plan = match self
                .plans
                .get(&child.workflow, Some(child.workflow_version))
                .await
            {
                Ok(plan) => plan,
                Err(ExecError::Store(error)) if error.is_outage() => return Err(error.into()),
                Err(_) => match self.runs.get(&parent_id) {
                    // Only its state and error are read then: the parent's plan will do.
                    Some(parent) => parent.plan.clone(),
                    None => continue,
                },
            };
            let Ok(ended) = RunEntry::recover(child, plan, &mut self.ctx) else {
                continue;
            };
            if run::is_finished(ended.run.state())
                && let Some(parent) = self.runs.get_mut(&parent_id)
            {
                let step_id = ended.run.parent_step_id.clone();
                parent.child_ended(&step_id, &ended, &mut self.ctx);
            }
        }
        Ok(())
    }

    /// Admits queued runs that fit, in priority then FIFO order.
    fn admit_queued(&mut self) {
        self.ctx.apply_shared();
        if !std::mem::take(&mut self.ctx.admission.dirty) {
            return;
        }
        for (key, run_id) in self.ctx.admission.queued() {
            let Some(state) = self.runs.get(&run_id).map(|entry| entry.run.state()) else {
                // Another executor's run (the dispatcher counts every replica's), or gone.
                if !self.admit_remote(&key, &run_id) {
                    self.ctx.admission.dequeue(&key);
                }
                continue;
            };
            if state != RunState::Queued {
                self.ctx.admission.dequeue(&key); // cancelled while queued
                continue;
            }
            if self.offer_run(&run_id) {
                continue; // the dispatcher admits it
            }
            let entry = self.runs.get_mut(&run_id).expect("present");
            if !self.ctx.admission.fits(&entry.buckets) {
                continue;
            }
            self.ctx.admission.dequeue(&key);
            self.ctx.admission.acquire(&entry.buckets);
            entry.admit(&mut self.ctx);
            self.ctx.apply_shared();
        }
    }

    /// The admission buckets of a run read back from the store.
    fn buckets_of(&self, entry: &RunEntry) -> Vec<String> {
        let inputs = dagmesh_proto::json::from_struct(entry.run.inputs.as_ref());
        self.ctx
            .admission
            .limits()
            .buckets(&entry.run.workflow, &inputs, &entry.run.tags)
    }

    fn remember_key(&mut self, key: String, run_id: Arc<str>) {
        self.idempotency.insert(key.clone(), run_id);
        self.idempotency_order.push_back(key);
        if self.idempotency_order.len() > IDEMPOTENCY_MEMORY
            && let Some(oldest) = self.idempotency_order.pop_front()
        {
            self.idempotency.remove(&oldest);
        }
    }

    fn connect(&mut self, hello: Hello, principal: Arc<str>, generation: u64, outbound: Outbound) {
        let instance: Arc<str> = Arc::from(hello.instance_id.as_str());
        let now = self.ctx.now;
        if let Some(existing) = self.ctx.workers.sessions.get(&instance)
            && let Some(owner) = &existing.principal
            && *owner != principal
        {
            // The instance id is visible to anyone who may list workers; resuming it would
            // hand its tasks (and their inputs) to another principal.
            tracing::warn!(worker = %instance, %owner, intruder = %principal, "refused a stream for another principal's worker instance");
            let _ = outbound.send(Err(ExecError::PermissionDenied(format!(
                "hello.instance_id: {instance:?} belongs to a worker of another principal; \
                 {principal} may not resume its session (use a unique instance id per process)"
            ))));
            return;
        }
        if let Some(existing) = self.ctx.workers.sessions.get(&instance)
            && existing.is_live()
        {
            // Another stream is live for this instance: taking over would hand its tasks (and
            // the results it is about to send) to whoever guessed the id. The real worker's
            // reconnect succeeds once its old stream has ended.
            tracing::warn!(worker = %instance, "refused a second stream for a connected instance");
            let _ = outbound.send(Err(ExecError::AlreadyExists(format!(
                "hello.instance_id: {instance:?} is already connected on another stream; a \
                 worker may resume its session only after its old stream has ended (use a \
                 unique instance id per process)"
            ))));
            return;
        }
        let session = self
            .ctx
            .workers
            .sessions
            .entry(instance.clone())
            .or_insert_with(|| Session::new(instance.clone(), now));
        session.generation = generation;
        session.principal = Some(principal);
        session.task_types = hello
            .task_types
            .iter()
            .filter_map(|t| Some((t.name.clone(), semver::Version::parse(&t.version).ok()?)))
            .collect();
        session.outbound = Some(outbound);
        session.last_seen = now;
        session.last_seen_wall = SystemTime::now();
        session.disconnected_at = None;
        session.draining = false;

        // Reconcile what the worker says it holds with what this executor assigned to it.
        let claimed: HashSet<(String, u32)> = hello
            .in_flight
            .iter()
            .map(|t| (t.task_id.clone(), t.attempt))
            .collect();
        session.hello = hello;
        let held: Vec<(String, u32)> = session.held.keys().cloned().collect();
        let mut resumed = Vec::new();
        let mut lost = Vec::new();
        for key in held {
            if claimed.contains(&key) {
                resumed.push(key);
            } else {
                lost.push(key);
            }
        }
        let unknown: Vec<(String, u32)> = claimed
            .into_iter()
            .filter(|key| !resumed.contains(key))
            .collect();
        // Another executor's tasks a new dispatcher has not heard of yet are kept for their
        // owner to declare (see `relay`); the rest are cancelled below.
        let mut cancelled = Vec::new();
        for (task_id, attempt) in unknown {
            if self.park_unknown(&instance, &task_id, attempt) {
                resumed.push((task_id, attempt));
            } else {
                cancelled.push((task_id, attempt));
            }
        }
        let Some(session) = self.ctx.workers.sessions.get(&instance) else {
            return;
        };

        session.send(server_message::Message::Welcome(pb::Welcome {
            session_id: format!("{instance}/{generation}"),
            heartbeat_interval_ms: self.ctx.config.heartbeat_interval.as_millis() as u32,
            lease_ms: self.ctx.config.lease.as_millis() as u32,
            max_payload_bytes: self.ctx.config.max_payload_bytes as u64,
            resumed: resumed
                .iter()
                .map(|(task_id, attempt)| pb::TaskRef {
                    task_id: task_id.clone(),
                    attempt: *attempt,
                })
                .collect(),
        }));
        tracing::info!(
            worker = %instance,
            name = %session.hello.worker_name,
            slots = session.hello.slots,
            resumed = resumed.len(),
            "worker connected"
        );
        let lease_check = self.ctx.after(self.ctx.config.lease);
        self.ctx.timers.schedule(
            lease_check,
            Timer::Lease {
                instance: instance.clone(),
            },
        );

        for (task_id, attempt) in resumed {
            // Still held, but the step may have moved on (cancelled while disconnected); an
            // owner's task is its owner's to judge.
            if !self.is_current(&task_id, attempt) && !self.is_remote_hold(&task_id, attempt) {
                self.ctx.send(
                    instance.clone(),
                    cancel_message(
                        &task_id,
                        attempt,
                        "the task was cancelled while you were away",
                    ),
                );
            }
        }
        for (task_id, attempt) in lost {
            let reason = format!("worker {instance} reconnected without the task");
            if self.remote_lost(&instance, &task_id, attempt, &reason) {
                continue;
            }
            self.ctx.workers.release(&instance, &task_id, attempt);
            self.requeue_lost(&task_id, attempt, &reason);
        }
        for (task_id, attempt) in cancelled {
            self.ctx.send(
                instance.clone(),
                cancel_message(&task_id, attempt, "the task is not assigned to this worker"),
            );
        }
    }

    fn is_current(&self, task_id: &str, attempt: u32) -> bool {
        self.current(task_id, attempt).is_some()
    }

    /// (run id key, step) of a task id "<run_id>/<step key>" of an active run.
    fn locate(&self, task_id: &str) -> Option<(&Arc<str>, StepRef)> {
        let (run_id, step_id) = task_id.split_once('/')?;
        let (key, entry) = self.runs.get_key_value(run_id)?;
        Some((key, entry.resolve(step_id)?))
    }

    fn requeue_lost(&mut self, task_id: &str, attempt: u32, reason: &str) {
        let Some((run_id, step)) = self.locate(task_id).map(|(id, step)| (id.clone(), step)) else {
            return;
        };
        let entry = self.runs.get_mut(&run_id).expect("located");
        entry.attempt_lost(step, attempt, reason, &mut self.ctx);
    }

    fn on_worker_message(&mut self, instance: Arc<str>, message: worker_message::Message) {
        use worker_message::Message;
        let Some(session) = self.ctx.workers.sessions.get_mut(&instance) else {
            return;
        };
        session.last_seen = self.ctx.now;
        session.last_seen_wall = SystemTime::now();
        let mut message = Some(message);
        if self.relay_from_worker(&instance, &mut message) {
            return; // about another executor's task: relayed to its owner
        }
        let Some(message) = message else {
            return;
        };
        let Some(session) = self.ctx.workers.sessions.get_mut(&instance) else {
            return;
        };
        match message {
            Message::Hello(_) | Message::Heartbeat(_) => {}
            Message::Draining(_) => {
                session.draining = true;
                tracing::info!(worker = %instance, "worker draining");
            }
            Message::Started(started) => {
                if let Some((run_id, step)) =
                    self.held_current(&instance, &started.task_id, started.attempt)
                {
                    self.runs
                        .get_mut(&run_id)
                        .expect("current")
                        .started(step, &mut self.ctx);
                }
            }
            Message::Progress(progress) => {
                if let Some((run_id, step)) =
                    self.held_current(&instance, &progress.task_id, progress.attempt)
                {
                    let entry = self.runs.get_mut(&run_id).expect("current");
                    entry.progress(step, progress, &mut self.ctx);
                }
            }
            Message::Log(log) => {
                if let Some((run_id, step)) =
                    self.held_current(&instance, &log.task_id, log.attempt)
                {
                    let entry = self.runs.get_mut(&run_id).expect("current");
                    entry.log(step, log, &mut self.ctx);
                }
            }
            Message::Completed(completed) => {
                let outputs = completed.outputs.unwrap_or_default();
                self.result(
                    &instance,
                    &completed.task_id,
                    completed.attempt,
                    Ok(outputs),
                );
            }
            Message::Failed(mut failed) => {
                dagmesh_proto::limits::truncate_marked(
                    &mut failed.error,
                    dagmesh_proto::limits::MAX_ERROR_LEN,
                );
                let error = (failed.error, failed.retryable);
                self.result(&instance, &failed.task_id, failed.attempt, Err(error));
            }
        }
    }

    /// The run and step of a task message, if (task id, attempt) is the step's current attempt
    /// and it is assigned or running.
    fn current(&self, task_id: &str, attempt: u32) -> Option<(Arc<str>, StepRef)> {
        let (run_id, step) = self.locate(task_id)?;
        let (current, _) = self.runs[run_id].current_attempt(step)?;
        (current == attempt).then(|| (run_id.clone(), step))
    }

    /// Like `current`, and the task is held by `instance`: only the holder's reports count.
    /// The current attempt of an assigned or running step is held by exactly the worker its
    /// record names, so the step says it without a look-up in the session.
    fn held_current(
        &self,
        instance: &Arc<str>,
        task_id: &str,
        attempt: u32,
    ) -> Option<(Arc<str>, StepRef)> {
        let (run_id, step) = self.current(task_id, attempt)?;
        let (_, worker) = self.runs[&run_id].current_attempt(step)?;
        (worker == &**instance).then_some((run_id, step))
    }

    fn result(
        &mut self,
        instance: &Arc<str>,
        task_id: &str,
        attempt: u32,
        result: Result<prost_types::Struct, (String, bool)>,
    ) {
        let held = self.ctx.workers.release(instance, task_id, attempt);
        let located = self.locate(task_id).map(|(id, step)| (id.clone(), step));
        let (outcome, detail) = match located {
            None => {
                // Not active here: the run ended (or never existed). Whether this was the
                // recorded result is in the store; look it up off the engine task.
                self.answer_from_store(instance, task_id, attempt, result.is_ok());
                return;
            }
            Some((run_id, step)) => {
                let draining = self
                    .ctx
                    .workers
                    .sessions
                    .get(instance)
                    .is_some_and(|s| s.draining);
                let entry = self.runs.get_mut(&run_id).expect("located");
                let (current, state) = entry.attempt_state(step);
                // An Assign that crossed the worker's Draining is refused without Started: the
                // task was handed back, not attempted, and must not count as a failure.
                let handed_back = held
                    && draining
                    && matches!(&result, Err((_, true)))
                    && current == attempt
                    && state == pb::StepState::Assigned;
                if handed_back {
                    let reason = format!("handed back unstarted by draining worker {instance}");
                    entry.attempt_lost(step, attempt, &reason, &mut self.ctx);
                    (pb::RecordOutcome::Accepted, String::new())
                } else if held {
                    entry.record_result(step, attempt, result, &mut self.ctx)
                } else {
                    entry.unheld_result(step, attempt, instance)
                }
            }
        };
        self.ctx.send(
            instance.clone(),
            server_message::Message::Recorded(pb::Recorded {
                task_id: task_id.to_owned(),
                attempt,
                outcome: outcome as i32,
                detail,
            }),
        );
    }

    /// Answers a result for a run that is not active with what the store says: DUPLICATE when
    /// this worker's attempt ended the way the result says, else STALE.
    fn answer_from_store(&self, instance: &Arc<str>, task_id: &str, attempt: u32, succeeded: bool) {
        let Some(outbound) = self.ctx.workers.outbound(instance) else {
            return;
        };
        let store = self.store.clone();
        let instance = instance.clone();
        let task_id = task_id.to_owned();
        // Only ids that could name a run are looked up, and only so many at once; anything
        // else is STALE at once.
        let permit = task_id
            .split_once('/')
            .filter(|(run_id, _)| uuid::Uuid::parse_str(run_id).is_ok())
            .and_then(|_| self.lookups.clone().try_acquire_owned().ok());
        tokio::spawn(async move {
            let looked_up = match permit {
                Some(_permit) => {
                    stored_outcome(&*store, &instance, &task_id, attempt, succeeded).await
                }
                None => None,
            };
            let (outcome, detail) = match looked_up {
                Some(answer) => answer,
                None => (
                    pb::RecordOutcome::Stale,
                    "the run is not active (it ended or does not exist)".to_owned(),
                ),
            };
            let recorded = server_message::Message::Recorded(pb::Recorded {
                task_id,
                attempt,
                outcome: outcome as i32,
                detail,
            });
            let _ = outbound.send(Ok(pb::ServerMessage {
                message: Some(recorded),
            }));
        });
    }

    fn fire(&mut self, timer: Timer) {
        // Lease expiries drop worker sessions; the others may requeue tasks.
        self.ctx.queues_touched = true;
        match timer {
            Timer::RetryDue {
                run_id,
                step,
                attempt,
            } => {
                if let Some(entry) = self.runs.get_mut(&run_id) {
                    entry.retry_due(step, attempt, &mut self.ctx);
                }
            }
            Timer::AttemptTimeout {
                run_id,
                step,
                attempt,
            } => {
                if let Some(entry) = self.runs.get_mut(&run_id) {
                    entry.timed_out(step, attempt, &mut self.ctx);
                }
            }
            Timer::ScheduleToStart {
                run_id,
                step,
                attempt,
            } => {
                if let Some(entry) = self.runs.get_mut(&run_id)
                    && entry.has(step)
                {
                    let route = entry.route(step).clone();
                    let reason = self.ctx.workers.waiting_reason(&route);
                    entry.schedule_to_start_expired(step, attempt, reason, &mut self.ctx);
                }
            }
            Timer::ProgressFlush {
                run_id,
                step,
                attempt,
            } => {
                if let Some(entry) = self.runs.get_mut(&run_id) {
                    entry.flush_progress(step, attempt, &mut self.ctx);
                }
            }
            Timer::WaitDeadline {
                run_id,
                step,
                attempt,
            } => {
                if let Some(entry) = self.runs.get_mut(&run_id) {
                    entry.wait_deadline(step, attempt, &mut self.ctx);
                }
            }
            Timer::Lease { instance } => self.check_lease(instance),
            Timer::Parked { task_id, attempt } => self.parked_expired(task_id, attempt),
            Timer::DrainDeadline => self.drain_expired = true,
        }
    }

    fn check_lease(&mut self, instance: Arc<str>) {
        if self.ctx.relay.is_owner() {
            return; // a mirror: the dispatcher checks the worker's lease and says if it is lost
        }
        let lease = self.ctx.config.lease;
        let Some(session) = self.ctx.workers.sessions.get(&instance) else {
            return;
        };
        let silent_until = session.last_seen.checked_add(lease).unwrap_or(self.ctx.now);
        // A worker whose stream ended gets the short reconnect grace; a silent one (or one held
        // for since a restart of the executor) the whole lease.
        let expires = match session.disconnected_at {
            Some(at) if session.outbound.is_none() => at
                .checked_add(self.ctx.config.reconnect_grace)
                .unwrap_or(self.ctx.now)
                .min(silent_until),
            _ => silent_until,
        };
        if expires > self.ctx.now {
            self.ctx.timers.schedule(expires, Timer::Lease { instance });
            return;
        }
        let session = self
            .ctx
            .workers
            .sessions
            .remove(&instance)
            .expect("checked above");
        tracing::warn!(
            worker = %instance,
            tasks = session.held.len(),
            "worker lease expired; requeueing its tasks"
        );
        // Say why, then drop the session's outbound sender, which ends a stream that is open
        // but silent: the worker notices and reconnects as a new session.
        if let Some(outbound) = &session.outbound {
            let _ = outbound.send(Err(ExecError::Unavailable(format!(
                "no message from worker {instance} for {}: its session ended and its tasks went \
                 to other workers; reconnect",
                humanize(lease)
            ))));
        }
        let reason = match session.disconnected_at {
            Some(_) if session.outbound.is_none() => format!(
                "worker {instance} was lost ({}; it did not reconnect within {})",
                session.disconnect_reason,
                humanize(self.ctx.config.reconnect_grace)
            ),
            _ => format!(
                "worker {instance} was lost (no message for {})",
                humanize(lease)
            ),
        };
        for (task_id, attempt) in session.held.into_keys() {
            if !self.remote_lost(&instance, &task_id, attempt, &reason) {
                self.requeue_lost(&task_id, attempt, &reason);
            }
        }
    }

    /// Hands ready tasks to workers with free slots: highest priority first, then FIFO.
    fn dispatch(&mut self) {
        self.ctx.apply_shared();
        if self.drain.is_some() {
            return;
        }
        let mut blocked = HashSet::new();
        while self.ctx.workers.any_free() {
            let admission = &self.ctx.admission;
            let Some(route) = self.ctx.queues.best_head(|route| {
                !blocked.contains(route) && admission.resource_available(&route.concurrency_key)
            }) else {
                break;
            };
            let Some((instance, version)) = self.ctx.workers.pick(&route) else {
                blocked.insert(route);
                continue;
            };
            let Some(task) = self.ctx.queues.pop(&route) else {
                continue;
            };
            self.ctx.queues_touched = true;
            match task.origin {
                Origin::Local { run_id, step } => {
                    if let Some(entry) = self.runs.get_mut(&run_id) {
                        entry.assign(step, task.attempt, &instance, &version, &mut self.ctx);
                        self.ctx.apply_shared(); // the worker's slots are taken before the next pick
                    }
                }
                Origin::Peer { peer, task_id } => {
                    self.grant(peer, &task_id, task.attempt, &route, &instance, version);
                }
            }
        }
    }

    /// Commits what this batch changed, then performs its effects.
    ///
    /// When the store refuses the batch for a reason that is not an outage (a conflict with
    /// what is stored, a record it will not take), nothing of it was written: the runs it
    /// touched are reloaded from the store (or quarantined when that fails too), their effects
    /// are dropped and their callers get ABORTED, and the engine goes on serving everything
    /// else. An outage, or a stale lease epoch, stops the engine.
    async fn flush(&mut self) -> Result<(), ExecError> {
        let mut mutations = Vec::new();
        let dirty: Vec<Arc<str>> = self.ctx.dirty_runs.drain(..).collect();
        self.ctx.dirty_set.clear();
        let mut notified = false;
        // The executor's own lease, then the lease of each partition the batch touches.
        let mut fences: Vec<Lease> = self.fence.iter().cloned().collect();
        let mut fenced_partitions = BTreeSet::new();
        let mut refused: HashSet<Arc<str>> = HashSet::new();
        let mut strays: Vec<Arc<str>> = Vec::new();
        for run_id in &dirty {
            if let Some(entry) = self.runs.get_mut(run_id) {
                let partition = entry.run.partition;
                if !self.driven.contains_key(&partition) {
                    // Never held (see `drop_partitions` and the checks at submit and retry);
                    // were one, it is forgotten unwritten rather than written unfenced.
                    tracing::error!(run_id = %run_id, partition, "a run of a partition not driven here");
                    strays.push(run_id.clone());
                    continue;
                }
                if fenced_partitions.insert(partition) {
                    fences.extend(self.driven.get(&partition).cloned());
                }
                notified |= entry.drain_mutations(&mut mutations);
            }
        }
        refused.extend(strays.iter().cloned());
        let mut lost_partition = None;
        if !mutations.is_empty() {
            let started = std::time::Instant::now();
            let committed = self.store.commit_fenced(&fences, mutations).await;
            if let Some(metrics) = crate::metrics::get() {
                metrics.commit(started.elapsed().as_secs_f64());
                if let Err(error) = &committed {
                    // A partition's stale lease drops that partition; the engine goes on.
                    let partition_fenced = matches!(error,
                        StoreError::Fenced { name, .. } if self.is_partition_lease(name));
                    metrics.store_error(if stops_engine(error) && !partition_fenced {
                        "outage"
                    } else {
                        "refused"
                    });
                }
            }
            match committed {
                Ok(()) => {}
                // Another executor took one of the partitions: the runs of that partition are
                // its now. Nothing of the batch was written; the other runs are reloaded.
                Err(StoreError::Fenced {
                    name,
                    epoch,
                    current_epoch,
                }) if self.is_partition_lease(&name) => {
                    let partition = self
                        .driven
                        .iter()
                        .find(|(_, lease)| lease.name == name)
                        .map(|(partition, _)| *partition);
                    tracing::warn!(lease = %name, epoch, ?current_epoch, "a partition was taken over; dropping its runs");
                    lost_partition = partition;
                    refused.extend(dirty.iter().cloned());
                }
                Err(error) if stops_engine(&error) => return Err(error.into()),
                Err(error) => {
                    tracing::error!(%error, runs = dirty.len(), "the store refused a batch; reloading its runs");
                    refused.extend(dirty.iter().cloned());
                }
            }
        }
        if notified && refused.is_empty() {
            self.webhooks.notify_one(); // new deliveries in the outbox
        }
        for effect in std::mem::take(&mut self.ctx.effects) {
            if !refused.is_empty() && effect.run_id().is_some_and(|id| refused.contains(id)) {
                // Its change was not written: never act on it. A granted task that was not
                // assigned after all frees the worker's slots at the dispatcher.
                if let Effect::Send {
                    instance,
                    message: server_message::Message::Assign(assign),
                } = effect
                {
                    self.decline(assign.task_id, assign.attempt, instance);
                }
                continue;
            }
            match effect {
                Effect::Send { instance, message } => self.ctx.workers.send(&instance, message),
                Effect::Reply { reply, .. } => reply(),
            }
        }
        if let Some(partition) = lost_partition {
            self.drop_partitions(&[partition]);
        }
        for run_id in strays {
            refused.remove(&run_id);
            self.forget_run(&run_id);
        }
        self.ctx.apply_shared();
        for run_id in refused {
            self.reload(run_id).await?;
        }
        // A reloaded run holds its worker slots again before any message is read.
        self.ctx.apply_shared();
        // On an owner, what became ready goes to the dispatcher now that it is durable.
        self.send_offers(&dirty);
        for run_id in dirty {
            let Some(entry) = self.runs.get(&run_id) else {
                continue;
            };
            let finished = run::is_finished(entry.run.state());
            if let Some(watcher) = self.watchers.get(&run_id) {
                watcher.send_replace(entry.run.last_seq);
            }
            if finished {
                let entry = self.runs.remove(&run_id).expect("present");
                self.run_ended(&run_id, &entry.buckets);
                self.watchers.remove(&run_id);
                for waiter in self.waiters.remove(&run_id).unwrap_or_default() {
                    let _ = waiter.send(Some(entry.snapshot()));
                }
                tracing::info!(run_id = %run_id, state = ?entry.run.state(), "run finished");
            }
        }
        Ok(())
    }

    /// Applies a change of the partitions driven here (between batches: nothing of the
    /// dropped partitions' runs is waiting to be written).
    async fn repartition(&mut self, change: PartitionChange) -> Result<(), ExecError> {
        self.drop_partitions(&change.dropped);
        let gained: Vec<u32> = change
            .gained
            .iter()
            .map(|(partition, _)| *partition)
            .collect();
        self.driven.extend(change.gained);
        if !gained.is_empty() {
            tracing::info!(partitions = gained.len(), "taking up partitions");
        }
        self.recover(&gained).await
    }

    /// Forgets the runs of `partitions`, which another executor drives now (or will): their
    /// worker slots and admission places are freed, their watchers fall back to the store, and
    /// callers waiting for them to end are answered UNAVAILABLE (retry; see `not_driven_here`).
    fn drop_partitions(&mut self, partitions: &[u32]) {
        let mut dropped = false;
        for partition in partitions {
            dropped |= self.driven.remove(partition).is_some();
        }
        if !dropped {
            return;
        }
        let runs: Vec<Arc<str>> = self
            .runs
            .iter()
            .filter(|(_, entry)| partitions.contains(&entry.run.partition))
            .map(|(id, _)| id.clone())
            .collect();
        tracing::info!(partitions = ?partitions, runs = runs.len(), "dropped partitions");
        for run_id in runs {
            self.forget_run(&run_id);
        }
        self.ctx.apply_shared();
    }

    /// Removes a run from memory without writing anything (another executor drives it): its
    /// slots and admission places are freed once `apply_shared` runs.
    fn forget_run(&mut self, run_id: &Arc<str>) {
        let Some(entry) = self.runs.remove(run_id) else {
            return;
        };
        if let Some(key) = non_empty(&entry.run.idempotency_key)
            && self.idempotency.get(key) == Some(run_id)
        {
            self.idempotency.remove(key);
        }
        entry.abandon(&mut self.ctx);
        self.watchers.remove(run_id);
        // "Not active here": the caller reads the store, finds the run active and says why.
        for waiter in self.waiters.remove(run_id).unwrap_or_default() {
            let _ = waiter.send(None);
        }
    }

    /// Whether `name` is the lease of a partition driven here.
    fn is_partition_lease(&self, name: &str) -> bool {
        self.driven.values().any(|lease| lease.name == name)
    }

    /// A new run id whose partition is driven here, with that partition; `None` when this
    /// executor drives none. Ids are drawn until one fits: with `d` of `p` partitions driven,
    /// `p / d` draws on average (one, while a single executor drives them all).
    fn unkeyed_run_id(&self) -> Option<(String, u32)> {
        if self.driven.is_empty() {
            return None;
        }
        // Bounded, though 100,000 misses at even 1 of 4096 partitions driven is unlikely beyond
        // any practical doubt (about e^-24).
        (0..100_000).find_map(|_| {
            let run_id = run::new_run_id();
            let partition = partition_of(&run_id, self.partitions);
            self.driven
                .contains_key(&partition)
                .then_some((run_id, partition))
        })
    }

    /// Replaces a run's memory by what the store holds (after the store refused its changes);
    /// a run that cannot be read back is quarantined.
    async fn reload(&mut self, run_id: Arc<str>) -> Result<(), ExecError> {
        let Some(entry) = self.runs.remove(&run_id) else {
            return Ok(());
        };
        let plan = entry.plan.clone();
        let key = entry.run.idempotency_key.clone();
        entry.abandon(&mut self.ctx);
        self.watchers.remove(&run_id);
        let store = self.store.clone();
        let stored = match store.get_run(&run_id).await {
            Ok(mut run) => {
                find_log_end(&store, &mut run).await?;
                run
            }
            Err(error) if error.is_outage() => return Err(error.into()),
            Err(StoreError::NotFound(_)) => {
                // It never reached the store (its creation was refused): nothing to keep.
                if self.idempotency.get(&key).is_some_and(|id| *id == run_id) {
                    self.idempotency.remove(&key);
                }
                for waiter in self.waiters.remove(&run_id).unwrap_or_default() {
                    let _ = waiter.send(None);
                }
                return Ok(());
            }
            Err(error) => {
                let reason = format!("quarantined: its stored records cannot be read: {error}");
                return quarantine(&store, &run_id, &reason).await;
            }
        };
        if run::is_finished(stored.state()) {
            let snapshot = stored.clone();
            for waiter in self.waiters.remove(&run_id).unwrap_or_default() {
                let _ = waiter.send(Some(snapshot.clone()));
            }
            return Ok(());
        }
        match RunEntry::recover(stored, plan, &mut self.ctx) {
            Ok(entry) => self.adopt(entry),
            Err(problem) => {
                let reason = format!("quarantined: {problem}");
                quarantine(&store, &run_id, &reason).await?;
            }
        }
        Ok(())
    }

    /// Takes a run read back from the store into the engine: it holds its admission buckets
    /// again if it was running, or waits in the admission queue if it was queued.
    fn adopt(&mut self, mut entry: RunEntry) {
        if !entry.run.parent_run_id.is_empty() {
            // A child run holds no admission bucket (its parent does): as when it was started.
            self.runs.insert(entry.id.clone(), entry);
            return;
        }
        entry.buckets = self.buckets_of(&entry);
        match entry.run.state() {
            RunState::Running => {
                self.ctx.admission.acquire(&entry.buckets);
                entry.admitted = true;
            }
            RunState::Queued => self
                .ctx
                .admission
                .enqueue(entry.run.priority, entry.id.clone()),
            _ => {}
        }
        self.runs.insert(entry.id.clone(), entry);
    }

    fn drain_done(&mut self) -> bool {
        let Some(replies) = &mut self.drain else {
            return false;
        };
        let held = self.ctx.workers.total_held();
        if held > 0 && !self.drain_expired {
            return false;
        }
        if held > 0 {
            tracing::warn!(
                tasks = held,
                "drain timeout; tasks stay assigned for the next executor"
            );
        }
        for reply in replies.drain(..) {
            let _ = reply.send(());
        }
        true
    }
}

/// Events may have been appended after the run row's `last_seq` was written (the commit of a
/// crashed executor, or a writer behind its back): move `last_seq` to the end of the log.
async fn find_log_end(store: &Arc<dyn MetadataStore>, run: &mut Run) -> Result<(), ExecError> {
    loop {
        let events = store.read_events(&run.run_id, run.last_seq, 1000).await?;
        match events.last() {
            Some(last) => run.last_seq = last.seq,
            None => return Ok(()),
        }
    }
}

/// Ends a run that cannot be recovered FAILED with `reason` in the store, so that the executor
/// serves everything else (recovery never bricks).
async fn quarantine(
    store: &Arc<dyn MetadataStore>,
    run_id: &str,
    reason: &str,
) -> Result<(), ExecError> {
    tracing::error!(
        run_id,
        reason,
        "quarantining a run that cannot be recovered"
    );
    match store.quarantine_run(run_id, reason).await {
        Ok(_) => Ok(()),
        Err(error) if error.is_outage() => Err(error.into()),
        Err(error) => {
            tracing::error!(run_id, %error, "could not quarantine the run; skipping it");
            Ok(())
        }
    }
}

/// Store errors after which the engine must not go on: the store is down, or another executor
/// took over (our epoch is stale). Anything else is the fault of the batch.
fn stops_engine(error: &StoreError) -> bool {
    error.is_outage() || matches!(error, StoreError::Fenced { .. })
}

/// Checks a run read back from the store against the limits the engine relies on.
fn check_recovered(run: &Run) -> Result<(), String> {
    // Depth only: a payload that was under the size limit when it was accepted stays valid if
    // the limit is lowered later.
    use dagmesh_proto::limits::check_depth;
    if let Some(inputs) = &run.inputs {
        check_depth("run.inputs", inputs).map_err(|e| e.to_string())?;
    }
    for step in &run.steps {
        if step.state() == pb::StepState::Unspecified {
            return Err(format!(
                "step {:?} has no readable state: {}",
                step.step_id, step.error
            ));
        }
        for (what, payload) in [("inputs", &step.inputs), ("outputs", &step.outputs)] {
            if let Some(payload) = payload {
                let field = format!("steps.{}.{what}", step.step_id);
                check_depth(&field, payload).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// DUPLICATE when the stored step shows that `instance` ran `attempt` and it ended as the
/// result says (succeeded for Completed, failed for Failed), else STALE with the reason; None
/// when the store cannot tell.
async fn stored_outcome(
    store: &dyn MetadataStore,
    instance: &str,
    task_id: &str,
    attempt: u32,
    succeeded: bool,
) -> Option<(pb::RecordOutcome, String)> {
    let (run_id, step_id) = task_id.split_once('/')?;
    if run_id.len() > dagmesh_proto::limits::MAX_VALUE_LEN {
        return None;
    }
    let run = store.get_run(run_id).await.ok()?;
    let step = run.steps.iter().find(|s| s.step_id == step_id)?;
    let ended_as_said = if succeeded {
        step.state() == pb::StepState::Succeeded
    } else {
        step.state() == pb::StepState::Failed
    };
    if step.attempt == attempt && step.worker == instance && ended_as_said {
        return Some((pb::RecordOutcome::Duplicate, String::new()));
    }
    let detail = format!(
        "the run has ended ({}); attempt {attempt} of step {step_id:?} is not its recorded result \
         from worker {instance} (the step ended at attempt {}, {})",
        run.state().as_str_name().trim_start_matches("RUN_STATE_"),
        step.attempt,
        step.state().as_str_name().trim_start_matches("STEP_STATE_")
    );
    Some((pb::RecordOutcome::Stale, detail))
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn cancel_message(task_id: &str, attempt: u32, reason: &str) -> server_message::Message {
    server_message::Message::Cancel(pb::Cancel {
        task_id: task_id.to_owned(),
        attempt,
        reason: reason.to_owned(),
    })
}

pub(crate) fn humanize(duration: std::time::Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

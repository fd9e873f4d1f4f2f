//! The run-executor: advances runs and hands their steps to workers.
//!
//! It owns the run lifecycle: it validates and compiles workflows ([`dagmesh_spec`]), resolves
//! step inputs from upstream outputs, dispatches ready steps to connected workers over their
//! `WorkerService.Connect` streams, and handles leases, retries, timeouts and cancellation. All of
//! that happens in one engine task (see [`engine`]) that writes every transition to the
//! [`MetadataStore`] before it acts on it, so a killed executor loses nothing: on start it reloads
//! every active run and carries on. Workers that held tasks get the lease to reconnect and keep
//! them.
//!
//! It is push-driven: a result arriving moves its run on in the same batch; timers exist only for
//! backoffs, step timeouts and worker leases, never as a polling tick.
//!
//! [`Executor`] implements the run API, [`dagmesh_api::ExecutorApi`] (the checks and the watch
//! algorithm are in `api`). The gRPC services (`RunService`, `WorkflowService`, `WorkerService`,
//! `ClusterService`) are thin adapters in [`grpc`] over it.

mod api;
mod config;
mod engine;
mod error;
pub mod grpc;
mod lease;
mod limits;
mod metrics;
mod partitions;
mod plans;
pub mod queues;
pub mod scaler;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dagmesh_metastore::{Lease, MetadataStore};
use dagmesh_proto::v1::{
    Run, SubmitRunRequest, WorkerInfo, Workflow, WorkflowSpec, submit_run_request,
};
use tokio::task::JoinHandle;

pub use config::{DEFAULT_PARTITIONS, ExecutorConfig};
use engine::{Command, Engine, EngineHandle, Submitted};
pub use error::ExecError;
pub use limits::Limits;
use plans::PlanCache;

/// A running executor. Cheap to clone; all clones talk to the same engine task.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    engine: EngineHandle,
    store: Arc<dyn MetadataStore>,
    plans: Arc<PlanCache>,
    config: ExecutorConfig,
    /// Whether this executor holds the executor lease and dispatches to workers (always, unless
    /// it shares the partitions and another replica dispatches).
    dispatching: Arc<AtomicBool>,
    /// Clients of the other replicas, by advertised address, for calls about runs they drive.
    owners: std::sync::Mutex<std::collections::HashMap<String, Arc<dagmesh_api::GrpcExecutor>>>,
}

impl Executor {
    /// Recovers active runs from `store` and starts the engine. The returned task ends when the
    /// engine stops: after [`Executor::drain`], or with an error if a commit failed.
    pub async fn start(
        store: Arc<dyn MetadataStore>,
        config: ExecutorConfig,
    ) -> Result<(Self, JoinHandle<Result<(), ExecError>>), ExecError> {
        config.validate().map_err(ExecError::InvalidArgument)?;
        // Unique to this process: a restart takes the lease anew (a new epoch).
        let holder = match &config.advertise_url {
            Some(url) => dagmesh_metastore::ownership::holder_at(url),
            None => dagmesh_metastore::ownership::unique_holder(),
        };
        let ttl = config.executor_lease_ttl;
        let share = config.share_partitions;
        // Sharing, the executor lease says who dispatches to workers, and is not waited for;
        // alone, it says who drives the runs, and a standby waits for it.
        let fence = if share {
            lease::try_acquire(&store, &holder, ttl).await?
        } else {
            Some(lease::acquire(&store, &holder, ttl, config.standby).await?)
        };
        // Fixed when the database was first used; a different --partitions does not change it.
        let partitions = store.init_cluster(config.partitions).await?;
        if partitions != config.partitions {
            tracing::info!(
                partitions,
                asked = config.partitions,
                "the database's partition count is fixed; using it"
            );
        }
        let (partition_leases, driven) =
            partitions::Partitions::take(store.clone(), &holder, partitions, ttl, share).await?;
        let (released_tx, partitions_released) = tokio::sync::oneshot::channel();
        let (to_dispatcher, outbox) = tokio::sync::mpsc::unbounded_channel();
        let dispatching = Arc::new(AtomicBool::new(fence.is_some()));
        let relay = if fence.is_some() {
            engine::Relay::Dispatcher(Default::default())
        } else {
            engine::Relay::owner(to_dispatcher)
        };
        let (lost, stop_renewal, renewal) = match &fence {
            Some(fence) => {
                let (lost_tx, lost) = tokio::sync::oneshot::channel();
                let (stop_renewal, stop_rx) = tokio::sync::oneshot::channel();
                let renewal =
                    lease::spawn_renewal(store.clone(), fence.clone(), ttl, lost_tx, stop_rx);
                (Some(lost), Some(stop_renewal), Some(renewal))
            }
            None => (None, None, None),
        };
        let plans = Arc::new(PlanCache::new(store.clone()));
        let webhook_wake = Arc::new(tokio::sync::Notify::new());
        let ownership = engine::Ownership {
            webhooks: webhook_wake.clone(),
            fence: fence.clone(),
            relay,
            partitions,
            driven,
            partitions_released,
            lost,
            stop_renewal,
            renewal,
        };
        let (engine, task) =
            Engine::start(store.clone(), plans.clone(), config.clone(), ownership).await?;
        partition_leases.spawn_keeper(engine.clone(), released_tx);
        let inner = Arc::new(Inner {
            engine,
            store,
            plans,
            config,
            dispatching,
            owners: Default::default(),
        });
        metrics::register_all();
        webhooks::register_metrics();
        match fence {
            Some(fence) => spawn_webhooks(
                &inner.store,
                &inner.engine,
                &inner.config,
                fence,
                webhook_wake,
            ),
            None => {
                tokio::spawn(grpc::peers::link(
                    inner.store.clone(),
                    inner.engine.clone(),
                    outbox,
                    inner.config.peers.clone(),
                    inner.config.advertise_url.clone().unwrap_or_default(),
                    inner.dispatching.clone(),
                ));
                spawn_dispatch_when_free(&inner, holder, webhook_wake);
            }
        }
        let weak = Arc::downgrade(&inner);
        dagmesh_runtime::metrics::on_scrape(move || {
            let inner = weak.upgrade();
            async move {
                let Some(inner) = inner else {
                    return; // this executor stopped (another may run in the same process)
                };
                if let Ok(snapshot) = inner.engine.call(|reply| Command::Queues { reply }).await {
                    metrics::refresh(&snapshot);
                }
            }
        });
        Ok((Self { inner }, task))
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.inner.config
    }

    /// Whether this executor dispatches to workers: worker streams end here (on a replica
    /// that shares the partitions and does not dispatch, they are forwarded to the one that
    /// does).
    pub fn is_dispatcher(&self) -> bool {
        self.inner.dispatching.load(Ordering::Acquire)
    }

    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.inner.store
    }

    /// Validates and registers a workflow version (a no-op when the content is unchanged).
    pub async fn apply_workflow(&self, spec: WorkflowSpec) -> Result<(Workflow, bool), ExecError> {
        let (plan, created) = self.inner.plans.apply(spec).await?;
        Ok((plan.workflow.clone(), created))
    }

    /// Starts a run, or returns the run an earlier submit with the same idempotency key made.
    /// Starts a run as "anonymous" (in-process callers without a principal).
    pub async fn submit(&self, request: SubmitRunRequest) -> Result<(Run, bool), ExecError> {
        self.submit_as(request, "anonymous").await
    }

    /// Starts a run on behalf of `actor` (recorded as Run.submitted_by).
    pub async fn submit_as(
        &self,
        request: SubmitRunRequest,
        actor: &str,
    ) -> Result<(Run, bool), ExecError> {
        self.submit_traced(request, actor, None).await
    }

    /// Starts a run on behalf of `actor`, continuing the caller's trace when `traceparent`
    /// (W3C, from the call's metadata) is given and valid (an invalid one is ignored, as the
    /// W3C spec asks).
    pub async fn submit_traced(
        &self,
        request: SubmitRunRequest,
        actor: &str,
        traceparent: Option<&str>,
    ) -> Result<(Run, bool), ExecError> {
        let traceparent = traceparent
            .and_then(engine::valid_traceparent)
            .unwrap_or_default();
        let notifications = dagmesh_spec::notify::compile_run_notifications(&request.notifications)
            .map_err(|errors| {
                ExecError::InvalidArgument(format!(
                    "the run's notifications do not check:\n{errors}"
                ))
            })?;
        let plan = match request.workflow_ref {
            Some(submit_run_request::WorkflowRef::Workflow(reference)) => {
                if reference.name.is_empty() {
                    return Err(ExecError::InvalidArgument("workflow.name: required".into()));
                }
                dagmesh_proto::limits::check_len(
                    "workflow.name",
                    &reference.name,
                    dagmesh_proto::limits::MAX_NAME_LEN,
                )
                .map_err(ExecError::InvalidArgument)?;
                let version = (reference.version != 0).then_some(reference.version);
                self.inner.plans.get(&reference.name, version).await?
            }
            Some(submit_run_request::WorkflowRef::Spec(spec)) => {
                self.inner.plans.apply(spec).await?.0
            }
            None => {
                return Err(ExecError::InvalidArgument(
                    "workflow_ref: set `workflow` (a registered name) or `spec` (inline)".into(),
                ));
            }
        };
        let inputs = request.inputs.unwrap_or_default();
        dagmesh_proto::limits::check_payload(
            "inputs",
            &inputs,
            self.inner.config.max_payload_bytes,
        )
        .map_err(|error| ExecError::InvalidArgument(error.to_string()))?;
        validate_submit_fields(&request.idempotency_key, &request.tags)?;
        let key = request.idempotency_key;
        if !key.is_empty()
            && let Some(run_id) = self.inner.store.find_run_by_idempotency_key(&key).await?
        {
            return Ok((self.inner.store.get_run(&run_id).await?, false));
        }
        let memo = match request.memoize_from.as_str() {
            "" => None,
            source => Some(Arc::new(self.memo_of(source, &plan).await?)),
        };
        let inputs = dagmesh_proto::json::from_struct(Some(&inputs));
        // Declared inputs: refused here, naming each field, rather than by the first step that
        // reads one; defaults are filled in before the run is stored.
        let inputs = plan
            .compiled
            .check_run_inputs(inputs, "inputs")
            .map_err(|errors| {
                ExecError::InvalidArgument(format!(
                    "the inputs do not match what workflow {} version {} declares:\n{errors}",
                    plan.workflow.name, plan.workflow.version
                ))
            })?;
        let buckets = self
            .inner
            .config
            .limits
            .buckets(&plan.workflow.name, &inputs, &request.tags);
        let submitted = self
            .inner
            .engine
            .call(|reply| Command::Submit {
                plan,
                inputs,
                idempotency_key: key,
                tags: request.tags,
                priority: request.priority,
                buckets,
                submitted_by: actor.to_owned(),
                memo,
                notifications: (request.notifications, notifications),
                traceparent,
                reply,
            })
            .await?;
        match submitted {
            Submitted::Created(run) => Ok((*run, true)),
            Submitted::Existing(run_id) => Ok((self.inner.store.get_run(&run_id).await?, false)),
            Submitted::NotDriven(Some(partition)) => Err(ExecError::Elsewhere {
                partition,
                message: format!(
                    "partition {partition}, where this run belongs, is not driven by this \
                     executor (another replica drives it, or it is being handed over); retry in \
                     a few seconds"
                ),
            }),
            // Any replica that drives a partition may take a run without a key.
            Submitted::NotDriven(None) => Err(ExecError::Elsewhere {
                partition: 0,
                message: "this executor drives no partition right now (they are being handed \
                          over between executors); retry in a few seconds"
                    .into(),
            }),
        }
    }

    /// The steps of run `source` a memoized resubmit with `plan` reuses: those that succeeded.
    async fn memo_of(&self, source: &str, plan: &plans::Plan) -> Result<engine::Memo, ExecError> {
        dagmesh_proto::limits::check_len(
            "memoize_from",
            source,
            dagmesh_proto::limits::MAX_NAME_LEN,
        )
        .map_err(ExecError::InvalidArgument)?;
        let run = match self.inner.store.get_run(source).await {
            Ok(run) => run,
            Err(dagmesh_metastore::StoreError::NotFound(_)) => {
                return Err(ExecError::NotFound(format!(
                    "memoize_from: run {source:?} not found"
                )));
            }
            Err(error) => return Err(error.into()),
        };
        if run.workflow != plan.workflow.name || run.workflow_version != plan.workflow.version {
            return Err(ExecError::InvalidArgument(format!(
                "memoize_from: run {source} ran workflow {} version {}, not {} version {}; a \
                 memoized resubmit runs the same workflow version",
                run.workflow, run.workflow_version, plan.workflow.name, plan.workflow.version
            )));
        }
        let steps = run
            .steps
            .into_iter()
            .filter(|step| step.state() == dagmesh_proto::v1::StepState::Succeeded)
            // Rows read back are checked like any input: a damaged one is not reused.
            .filter(|step| {
                let outputs = step.outputs.clone().unwrap_or_default();
                let max = self.inner.config.max_payload_bytes;
                dagmesh_proto::limits::check_payload("outputs", &outputs, max).is_ok()
                    && step.cached_from.len() <= dagmesh_proto::limits::MAX_NAME_LEN
            })
            .map(|step| {
                let origin = if step.cached_from.is_empty() {
                    source.to_owned()
                } else {
                    step.cached_from
                };
                let memoized = engine::Memoized {
                    task: step.task,
                    inputs: step.inputs,
                    outputs: step.outputs,
                    origin,
                };
                (step.step_id, memoized)
            })
            .collect();
        Ok(engine::Memo { steps })
    }

    /// Cancels a run that has not ended, as "anonymous".
    pub async fn cancel(&self, run_id: &str, reason: &str) -> Result<Run, ExecError> {
        self.cancel_as(run_id, reason, "anonymous").await
    }

    /// Cancels a run that has not ended, on behalf of `actor`.
    pub async fn cancel_as(
        &self,
        run_id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<Run, ExecError> {
        use dagmesh_proto::limits::{MAX_MESSAGE_LEN, MAX_VALUE_LEN, check_len};
        check_len("run_id", run_id, MAX_VALUE_LEN).map_err(ExecError::InvalidArgument)?;
        check_len("reason", reason, MAX_MESSAGE_LEN).map_err(ExecError::InvalidArgument)?;
        let cancelled = self
            .inner
            .engine
            .call(|reply| Command::Cancel {
                run_id: run_id.to_owned(),
                reason: reason.to_owned(),
                actor: actor.to_owned(),
                reply,
            })
            .await?;
        match cancelled {
            Some(run) => Ok(run),
            None => {
                let run = self.inner.store.get_run(run_id).await?;
                not_driven_here(&run)?;
                Err(ExecError::FailedPrecondition(format!(
                    "run {run_id} already ended ({})",
                    run.state().as_str_name().trim_start_matches("RUN_STATE_")
                )))
            }
        }
    }

    /// ApproveStep on behalf of `actor`.
    pub async fn approve_step_as(
        &self,
        request: dagmesh_proto::v1::ApproveStepRequest,
        actor: &str,
    ) -> Result<Run, ExecError> {
        use dagmesh_proto::limits::{MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_VALUE_LEN, check_len};
        let invalid = ExecError::InvalidArgument;
        check_len("run_id", &request.run_id, MAX_VALUE_LEN).map_err(invalid)?;
        if request.step_id.is_empty() {
            return Err(ExecError::InvalidArgument("step_id: required".into()));
        }
        check_len("step_id", &request.step_id, MAX_NAME_LEN).map_err(invalid)?;
        check_len("comment", &request.comment, MAX_MESSAGE_LEN).map_err(invalid)?;
        let outputs = request.outputs.unwrap_or_default();
        dagmesh_proto::limits::check_payload(
            "outputs",
            &outputs,
            self.inner.config.max_payload_bytes,
        )
        .map_err(|error| ExecError::InvalidArgument(error.to_string()))?;
        let run_id = request.run_id.clone();
        let answer = self
            .inner
            .engine
            .call(|reply| Command::Approve {
                run_id: request.run_id,
                step_id: request.step_id,
                approve: request.approve,
                outputs: dagmesh_proto::json::from_struct(Some(&outputs)),
                comment: request.comment,
                actor: actor.to_owned(),
                reply,
            })
            .await?;
        self.answer_about_active_run(&run_id, answer).await
    }

    /// DeliverEvent: resumes the steps waiting for an event on `topic` whose filter accepts
    /// `payload`; returns their task ids.
    pub async fn deliver_event(
        &self,
        topic: &str,
        payload: prost_types::Struct,
    ) -> Result<Vec<String>, ExecError> {
        use dagmesh_proto::limits::{MAX_NAME_LEN, check_len};
        if topic.is_empty() {
            return Err(ExecError::InvalidArgument("topic: required".into()));
        }
        check_len("topic", topic, MAX_NAME_LEN).map_err(ExecError::InvalidArgument)?;
        dagmesh_proto::limits::check_payload(
            "payload",
            &payload,
            self.inner.config.max_payload_bytes,
        )
        .map_err(|error| ExecError::InvalidArgument(error.to_string()))?;
        self.inner
            .engine
            .call(|reply| Command::DeliverEvent {
                topic: topic.to_owned(),
                payload: dagmesh_proto::json::from_struct(Some(&payload)),
                reply,
            })
            .await
    }

    /// SuspendRun (`suspend`) or ResumeRun on behalf of `actor`.
    pub async fn suspend_as(
        &self,
        run_id: &str,
        suspend: bool,
        reason: &str,
        actor: &str,
    ) -> Result<Run, ExecError> {
        use dagmesh_proto::limits::{MAX_MESSAGE_LEN, MAX_VALUE_LEN, check_len};
        check_len("run_id", run_id, MAX_VALUE_LEN).map_err(ExecError::InvalidArgument)?;
        check_len("reason", reason, MAX_MESSAGE_LEN).map_err(ExecError::InvalidArgument)?;
        let answer = self
            .inner
            .engine
            .call(|reply| Command::Suspend {
                run_id: run_id.to_owned(),
                suspend,
                reason: reason.to_owned(),
                actor: actor.to_owned(),
                reply,
            })
            .await?;
        self.answer_about_active_run(run_id, answer).await
    }

    /// The engine's answer to a call about an active run: the run, FAILED_PRECONDITION with the
    /// engine's reason, or (not active) NOT_FOUND or FAILED_PRECONDITION naming its end.
    async fn answer_about_active_run(
        &self,
        run_id: &str,
        answer: Option<Result<Run, String>>,
    ) -> Result<Run, ExecError> {
        match answer {
            Some(Ok(run)) => Ok(run),
            Some(Err(reason)) => Err(ExecError::FailedPrecondition(reason)),
            None => {
                let run = self.inner.store.get_run(run_id).await?;
                not_driven_here(&run)?;
                Err(ExecError::FailedPrecondition(format!(
                    "run {run_id} is not active ({})",
                    run.state().as_str_name().trim_start_matches("RUN_STATE_")
                )))
            }
        }
    }

    /// Re-runs the steps of a failed or cancelled run that did not succeed.
    pub async fn retry(&self, run_id: &str) -> Result<Run, ExecError> {
        self.retry_as(run_id, "", "anonymous").await
    }

    /// Re-runs a failed or cancelled run on behalf of `actor`.
    ///
    /// With `from_step` (not empty), that step and everything downstream of it run again too,
    /// and a SUCCEEDED run may be retried.
    pub async fn retry_as(
        &self,
        run_id: &str,
        from_step: &str,
        actor: &str,
    ) -> Result<Run, ExecError> {
        dagmesh_proto::limits::check_len(
            "from_step",
            from_step,
            dagmesh_proto::limits::MAX_NAME_LEN,
        )
        .map_err(ExecError::InvalidArgument)?;
        let run = self.inner.store.get_run(run_id).await?;
        if !run.parent_run_id.is_empty() {
            return Err(ExecError::FailedPrecondition(format!(
                "run {run_id} is a child run of run {} (step {:?}), which would not hear of a \
                 retry: retry the parent (`--from {}` re-runs just that step)",
                run.parent_run_id, run.parent_step_id, run.parent_step_id
            )));
        }
        use dagmesh_proto::v1::RunState;
        let retryable = if from_step.is_empty() {
            matches!(run.state(), RunState::Failed | RunState::Cancelled)
        } else {
            matches!(
                run.state(),
                RunState::Succeeded | RunState::Failed | RunState::Cancelled
            )
        };
        if !retryable {
            let only = if from_step.is_empty() {
                "only FAILED or CANCELLED runs can be retried (or any ended run with from_step)"
            } else {
                "it has not ended yet; cancel it first"
            };
            return Err(ExecError::FailedPrecondition(format!(
                "run {run_id} is {}; {only}",
                run.state().as_str_name().trim_start_matches("RUN_STATE_")
            )));
        }
        if let Some(step) = run
            .steps
            .iter()
            .find(|s| s.state() == dagmesh_proto::v1::StepState::Unspecified)
        {
            // A placeholder for a record that does not decode: writing it back would lose it.
            return Err(ExecError::FailedPrecondition(format!(
                "run {run_id} cannot be retried: the stored record of step {:?} cannot be read",
                step.step_id
            )));
        }
        let plan = self
            .inner
            .plans
            .get(&run.workflow, Some(run.workflow_version))
            .await?;
        let from = if from_step.is_empty() {
            None
        } else {
            match plan.index.get(from_step) {
                Some(&index) if plan.compiled.steps[index].hook.is_none() => Some(index),
                _ => {
                    return Err(ExecError::InvalidArgument(format!(
                        "from_step: workflow {} version {} has no step {from_step:?} (give a \
                         step of `steps`, not an item or an exit hook)",
                        run.workflow, run.workflow_version
                    )));
                }
            }
        };
        self.inner
            .engine
            .call(|reply| Command::Retry {
                run: Box::new(run),
                plan,
                from,
                actor: actor.to_owned(),
                reply,
            })
            .await?
    }

    /// Waits until the run has ended and returns it.
    pub async fn wait_for_run(&self, run_id: &str) -> Result<Run, ExecError> {
        let finished = self
            .inner
            .engine
            .call(|reply| Command::AwaitRun {
                run_id: run_id.to_owned(),
                reply,
            })
            .await?;
        match finished {
            Some(run) => Ok(run),
            // Not active here: it has ended (or never existed; the store says which).
            None => {
                let run = self.inner.store.get_run(run_id).await?;
                not_driven_here(&run)?;
                Ok(run)
            }
        }
    }

    /// Fills `queue_position` of the QUEUED runs among `runs`.
    pub async fn fill_queue_positions(&self, runs: &mut [Run]) -> Result<(), ExecError> {
        use dagmesh_proto::v1::RunState;
        let queued: Vec<String> = runs
            .iter()
            .filter(|run| run.state() == RunState::Queued)
            .map(|run| run.run_id.clone())
            .collect();
        if queued.is_empty() {
            return Ok(());
        }
        let positions = self
            .inner
            .engine
            .call(|reply| Command::QueuePositions { reply })
            .await?;
        for run in runs.iter_mut() {
            run.queue_position = positions.get(run.run_id.as_str()).copied().unwrap_or(0);
        }
        Ok(())
    }

    /// Fills `waiting_reason` of the READY steps of `run` that no connected worker can take.
    pub async fn fill_waiting_reasons(&self, run: &mut Run) -> Result<(), ExecError> {
        use dagmesh_proto::v1::StepState;
        if !run.steps.iter().any(|s| s.state() == StepState::Ready) {
            return Ok(());
        }
        let reasons = self
            .inner
            .engine
            .call(|reply| Command::WaitingReasons {
                run_id: run.run_id.clone(),
                reply,
            })
            .await?;
        for step in &mut run.steps {
            if step.state() == StepState::Ready {
                step.waiting_reason = reasons.get(&step.step_id).cloned().unwrap_or_default();
            }
        }
        Ok(())
    }

    /// The ready queues and the workers that could take them (see [`queues`]).
    pub async fn queues(&self) -> Result<queues::QueueSnapshot, ExecError> {
        self.inner
            .engine
            .call(|reply| Command::Queues { reply })
            .await
    }

    /// A receiver that changes after every batch that touched the ready queues or the worker
    /// sessions: a hint to take a new [`Executor::queues`] snapshot.
    pub fn queue_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.engine.queue_changes.clone()
    }

    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>, ExecError> {
        self.inner
            .engine
            .call(|reply| Command::ListWorkers { reply })
            .await
    }

    /// Stops taking work: workers get Drain, and this returns once in-flight tasks have finished
    /// or the drain timeout passed (unfinished tasks stay assigned for the next executor).
    pub async fn drain(&self) {
        let _ = self
            .inner
            .engine
            .call(|reply| Command::Drain { reply })
            .await;
    }
}

/// Delivers webhooks while this executor holds the executor lease `fence` (one deliverer per
/// database).
fn spawn_webhooks(
    store: &Arc<dyn MetadataStore>,
    engine: &EngineHandle,
    config: &ExecutorConfig,
    fence: Lease,
    wake: Arc<tokio::sync::Notify>,
) {
    let engine = engine.clone();
    tokio::spawn(webhooks::deliver(
        store.clone(),
        fence,
        config.webhooks.clone(),
        wake,
        async move { engine.closed().await },
    ));
}

/// On a replica that shares the partitions and does not dispatch: takes the executor lease
/// when it comes free (its holder died or stopped) and dispatches from then on; hands it back
/// when the engine stops.
fn spawn_dispatch_when_free(inner: &Inner, holder: String, wake: Arc<tokio::sync::Notify>) {
    let store = inner.store.clone();
    let engine = inner.engine.clone();
    let config = inner.config.clone();
    let dispatching = inner.dispatching.clone();
    tokio::spawn(async move {
        let ttl = config.executor_lease_ttl;
        let fence = loop {
            tokio::select! {
                () = engine.closed() => return,
                () = tokio::time::sleep(ttl / 3) => {}
            }
            match lease::try_acquire(&store, &holder, ttl).await {
                Ok(Some(fence)) => break fence,
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot read the executor lease; retrying"),
            }
        };
        let (lost_tx, lost) = tokio::sync::oneshot::channel();
        let (stop_renewal, stop_rx) = tokio::sync::oneshot::channel();
        let renewal = lease::spawn_renewal(store.clone(), fence.clone(), ttl, lost_tx, stop_rx);
        let promoted = engine
            .send(Command::Promote {
                fence: fence.clone(),
                lost,
            })
            .await;
        if promoted.is_ok() {
            dispatching.store(true, Ordering::Release);
            spawn_webhooks(&store, &engine, &config, fence.clone(), wake);
            engine.closed().await;
        }
        let _ = stop_renewal.send(());
        let _ = renewal.await;
        lease::release(&store, &fence).await;
    });
}

fn validate_submit_fields(
    idempotency_key: &str,
    tags: &std::collections::HashMap<String, String>,
) -> Result<(), ExecError> {
    use dagmesh_proto::limits::{MAX_ENTRIES, MAX_NAME_LEN, MAX_VALUE_LEN, check_len};
    check_len("idempotency_key", idempotency_key, MAX_VALUE_LEN)
        .map_err(ExecError::InvalidArgument)?;
    if tags.len() > MAX_ENTRIES {
        return Err(ExecError::InvalidArgument(format!(
            "tags: {} entries, over the limit of {MAX_ENTRIES}",
            tags.len()
        )));
    }
    for (key, value) in tags {
        check_len("tags key", key, MAX_NAME_LEN).map_err(ExecError::InvalidArgument)?;
        check_len(&format!("tags.{key}"), value, MAX_VALUE_LEN)
            .map_err(ExecError::InvalidArgument)?;
    }
    Ok(())
}

/// The engine said a run is not active, but the store says it is: its partition is not driven
/// here right now (it is being handed over), so the caller should retry.
fn not_driven_here(run: &Run) -> Result<(), ExecError> {
    use dagmesh_proto::v1::RunState;
    if matches!(run.state(), RunState::Queued | RunState::Running) {
        return Err(ExecError::Elsewhere {
            partition: run.partition,
            message: format!(
                "run {} is in partition {}, which this executor does not drive (another replica \
                 does, or it is being handed over); retry in a few seconds",
                run.run_id, run.partition
            ),
        });
    }
    Ok(())
}

//! The run machine driven directly: no gRPC, no store server, virtual time. A simulated
//! worker takes, starts, completes, fails and loses tasks in random orders over random DAGs
//! (plain steps, maps, waits, child workflows); the run is cancelled, retried and "restarted"
//! (rebuilt from the rows it committed) at random points, and child runs end in random orders.
//! After every input the committed rows must equal the machine's memory, and the invariants of
//! ARCHITECTURE.md must hold.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use dagmesh_proto::json::from_struct;
use dagmesh_proto::v1::{
    self as pb, RecordOutcome, Run, RunEvent, RunState, Step, StepState, Workflow, WorkflowSpec,
    mutation,
};
use proptest::prelude::*;
use serde_json::{Map, Value as Json, json};
use tokio::time::Instant;

use super::run::{RunEntry, StepRef};
use super::timers::Timer;
use super::{Admission, Asked, Ctx, Origin, ReadyQueues, Relay, Session, Timers, Workers};
use crate::ExecutorConfig;
use crate::plans::Plan;

const WORKER: &str = "sim-worker";

fn new_ctx(now: Instant) -> Ctx {
    let config = ExecutorConfig {
        max_lost_attempts: 3,
        ..ExecutorConfig::default()
    };
    let mut workers = Workers::default();
    workers
        .sessions
        .insert(Arc::from(WORKER), Session::new(Arc::from(WORKER), now));
    Ctx {
        admission: Admission::new(config.limits.clone()),
        config,
        queues: ReadyQueues::default(),
        workers,
        timers: Timers::default(),
        effects: Vec::new(),
        asked: Vec::new(),
        shared: Vec::new(),
        dirty_runs: Vec::new(),
        dirty_set: HashSet::new(),
        now,
        queues_touched: false,
        relay: Relay::Dispatcher(Default::default()),
    }
}

fn plan(spec: WorkflowSpec) -> Arc<Plan> {
    let compiled = dagmesh_spec::compile(&spec).expect("the generated workflow compiles");
    let workflow = Workflow {
        name: spec.name.clone(),
        version: 1,
        spec: Some(spec),
        ..Workflow::default()
    };
    Arc::new(Plan::from_compiled(workflow, compiled))
}

/// What the store holds: the rows and events the machine committed.
#[derive(Default)]
struct Stored {
    run: Run,
    steps: BTreeMap<String, Step>,
    events: Vec<RunEvent>,
}

impl Stored {
    fn read(&self) -> Run {
        Run {
            steps: self.steps.values().cloned().collect(),
            ..self.run.clone()
        }
    }
}

struct Sim {
    ctx: Ctx,
    plan: Arc<Plan>,
    entry: RunEntry,
    stored: Stored,
    /// Tasks the simulated worker holds: (task id, attempt).
    held: Vec<(String, u32)>,
    /// Accepted successful results per step id.
    successes: HashMap<String, u32>,
    /// The child runs the engine would have started, by run id: what the other runs are.
    children: BTreeMap<String, SimChild>,
    /// (step id, attempt) of every child started: one child per attempt.
    child_attempts: HashSet<(String, u32)>,
    child_plan: Arc<Plan>,
}

/// A child run as the engine holds it: its entry (the parent reads its state and outputs).
struct SimChild {
    entry: RunEntry,
    parent_step: String,
}

#[derive(Debug, Clone)]
enum Action {
    /// Hand every queued task the worker has room for to it.
    Dispatch,
    Start(usize),
    Complete(usize),
    Fail(usize, bool),
    Lose(usize),
    /// A result for an attempt the worker does not hold (a made-up attempt number).
    Stale(usize),
    /// Virtual time moves to the next timer, which fires.
    Tick,
    Cancel,
    Restart,
    /// RetryRun, when the run has ended; with a step to re-run from (any ended run then).
    Retry(Option<usize>),
    /// ApproveStep on every approval step (approve or deny); refused ones change nothing.
    Approve(bool),
    /// SuspendRun (true) or ResumeRun.
    Suspend(bool),
    /// A running child run ends: 0 succeeded, 1 failed, 2 cancelled (by someone else).
    ChildEnds(usize, u8),
}

impl Sim {
    fn new(spec: WorkflowSpec, inputs: Map<String, Json>) -> Self {
        let plan = plan(spec);
        let mut ctx = new_ctx(Instant::now());
        let mut entry = RunEntry::create(
            super::run::new_run_id(),
            plan.clone(),
            inputs,
            String::new(),
            HashMap::new(),
            0,
            true,
            "sim".into(),
            &mut ctx,
        );
        entry.admitted = true;
        entry.start(&mut ctx);
        let child_plan = self::plan(WorkflowSpec {
            name: "child".into(),
            steps: vec![pb::StepSpec {
                id: "c".into(),
                task: "t@^1".into(),
                ..pb::StepSpec::default()
            }],
            ..WorkflowSpec::default()
        });
        let mut sim = Sim {
            ctx,
            plan,
            entry,
            stored: Stored::default(),
            held: Vec::new(),
            successes: HashMap::new(),
            children: BTreeMap::new(),
            child_attempts: HashSet::new(),
            child_plan,
        };
        sim.settle();
        sim.commit();
        sim
    }

    /// What the engine does with what the run asked beyond itself (`Engine::settle`): child
    /// runs started (at once here: the plan load is not simulated), cancelled, suspended.
    fn settle(&mut self) {
        self.ctx.apply_shared();
        while !self.ctx.asked.is_empty() {
            for asked in std::mem::take(&mut self.ctx.asked) {
                match asked {
                    Asked::StartChild { step, attempt, .. } => {
                        if !self.entry.wants_child(step, attempt) {
                            continue;
                        }
                        let step_id = self.entry.step_key(step);
                        assert!(
                            self.child_attempts.insert((step_id.clone(), attempt)),
                            "a second child for attempt {attempt} of {step_id}"
                        );
                        // The child lives in the engine, not in this run: a scratch context.
                        let mut scratch = new_ctx(self.ctx.now);
                        let child = RunEntry::create(
                            super::run::new_run_id(),
                            self.child_plan.clone(),
                            Map::new(),
                            String::new(),
                            HashMap::new(),
                            0,
                            true,
                            "sim".into(),
                            &mut scratch,
                        );
                        self.entry.child_started(step, &child.run, &mut self.ctx);
                        let sim_child = SimChild {
                            entry: child,
                            parent_step: step_id,
                        };
                        self.children
                            .insert(sim_child.entry.run.run_id.clone(), sim_child);
                    }
                    Asked::CancelChild { child, reason } => {
                        let known = self.children.contains_key(&child);
                        assert!(known, "cancel of a child that is not running: {child}");
                        self.end_child(&child, RunState::Cancelled, &reason);
                    }
                    Asked::SuspendChild { child, .. } => {
                        assert!(self.children.contains_key(&child), "{child}");
                    }
                    Asked::ChildEnded { .. } | Asked::CacheLookup { .. } => {
                        panic!("the simulated run is no child and caches nothing")
                    }
                }
            }
            self.ctx.apply_shared();
        }
    }

    /// Child run `child` ends `state`: the parent's step hears of it.
    fn end_child(&mut self, child: &str, state: RunState, error: &str) {
        let Some(mut ended) = self.children.remove(child) else {
            return;
        };
        ended.entry.run.state = state as i32;
        ended.entry.run.error = error.to_owned();
        self.entry
            .child_ended(&ended.parent_step, &ended.entry, &mut self.ctx);
    }

    /// Applies what the machine marked to the stored rows (the engine's commit).
    fn commit(&mut self) {
        let mut mutations = Vec::new();
        let _ = self.entry.drain_mutations(&mut mutations);
        for m in mutations {
            match m.mutation.expect("a mutation") {
                mutation::Mutation::PutRun(run) => self.stored.run = run,
                mutation::Mutation::PutStep(step) => {
                    self.stored.steps.insert(step.step_id.clone(), step);
                }
                mutation::Mutation::AppendEvent(event) => {
                    assert_eq!(
                        event.seq,
                        self.stored.events.len() as u64 + 1,
                        "events are gap-free"
                    );
                    self.stored.events.push(event);
                }
                mutation::Mutation::PutCacheEntry(_) => unreachable!("no step here is memoized"),
                mutation::Mutation::PutWebhookDelivery(_) => unreachable!("no webhooks here"),
            }
        }
        self.ctx.effects.clear();
        self.ctx.dirty_runs.clear();
        self.ctx.dirty_set.clear();
    }

    fn finished(&self) -> bool {
        super::run::is_finished(self.entry.run.state())
    }

    fn locate(&self, task_id: &str) -> Option<StepRef> {
        let (_, step_id) = task_id.split_once('/')?;
        self.entry.resolve(step_id)
    }

    fn apply(&mut self, action: Action) {
        let picked = match action {
            Action::Start(i)
            | Action::Complete(i)
            | Action::Fail(i, _)
            | Action::Lose(i)
            | Action::Stale(i) => self.pick(i).map(|(task_id, attempt)| {
                let at = self.locate(&task_id);
                (task_id, attempt, at)
            }),
            _ => None,
        };
        let ctx = &mut self.ctx;
        match action {
            Action::Dispatch => {
                while let Some(route) = ctx.queues.best_head(|_| true) {
                    let task = ctx.queues.pop(&route).expect("a head");
                    let Origin::Local { step, .. } = task.origin else {
                        unreachable!("no other executor offers tasks here");
                    };
                    let before = self.entry.has(step).then(|| self.entry.attempt_state(step));
                    let worker: Arc<str> = Arc::from(WORKER);
                    self.entry.assign(step, task.attempt, &worker, "1.0.0", ctx);
                    ctx.apply_shared();
                    if let Some((attempt, StepState::Ready)) = before
                        && attempt == task.attempt
                    {
                        let (now_attempt, state) = self.entry.attempt_state(step);
                        if self.entry.run.suspended {
                            assert_eq!(
                                state,
                                StepState::Ready,
                                "a suspended run handed out a task"
                            );
                            continue;
                        }
                        assert_eq!((now_attempt, state), (task.attempt, StepState::Assigned));
                        let task_id = self.entry.task_id(step).to_owned();
                        self.held.push((task_id, task.attempt));
                    }
                }
            }
            Action::Start(_) => {
                if let Some((_, attempt, Some(at))) = picked
                    && self.entry.current_attempt(at).map(|(a, _)| a) == Some(attempt)
                {
                    self.entry.started(at, ctx);
                }
            }
            Action::Complete(_) | Action::Fail(_, _) => {
                let Some((task_id, attempt, located)) = picked else {
                    return;
                };
                self.held.retain(|held| *held != (task_id.clone(), attempt));
                let held = ctx.workers.release(WORKER, &task_id, attempt);
                let Some(at) = located else {
                    return;
                };
                let result = match action {
                    Action::Fail(_, retryable) => Err(("sim failure".to_owned(), retryable)),
                    _ => Ok(dagmesh_proto::json::to_struct(&json!({ "from": task_id }))),
                };
                let ok = result.is_ok();
                let (outcome, _) = if held {
                    self.entry.record_result(at, attempt, result, ctx)
                } else {
                    self.entry.unheld_result(at, attempt, WORKER)
                };
                if ok && outcome == RecordOutcome::Accepted {
                    let step_id = task_id.split_once('/').expect("task id").1.to_owned();
                    *self.successes.entry(step_id).or_default() += 1;
                }
            }
            Action::Lose(_) => {
                if let Some((task_id, attempt, located)) = picked {
                    self.held.retain(|held| *held != (task_id.clone(), attempt));
                    ctx.workers.release(WORKER, &task_id, attempt);
                    if let Some(at) = located {
                        self.entry
                            .attempt_lost(at, attempt, "the simulated worker vanished", ctx);
                    }
                }
            }
            Action::Stale(_) => {
                if let Some((_, attempt, Some(at))) = picked {
                    let result = Ok(prost_types::Struct::default());
                    let (outcome, _) = self.entry.record_result(at, attempt + 1000, result, ctx);
                    assert_ne!(
                        outcome,
                        RecordOutcome::Accepted,
                        "a made-up attempt was recorded"
                    );
                }
            }
            Action::Tick => {
                let Some(at) = ctx.timers.next_deadline() else {
                    return;
                };
                ctx.now = ctx.now.max(at);
                while let Some(timer) = ctx.timers.pop_due(ctx.now) {
                    match timer {
                        Timer::RetryDue { step, attempt, .. } => {
                            self.entry.retry_due(step, attempt, ctx);
                        }
                        Timer::AttemptTimeout { step, attempt, .. } => {
                            self.entry.timed_out(step, attempt, ctx);
                        }
                        Timer::ScheduleToStart { step, attempt, .. } => {
                            self.entry
                                .schedule_to_start_expired(step, attempt, None, ctx);
                        }
                        Timer::ProgressFlush { step, attempt, .. } => {
                            self.entry.flush_progress(step, attempt, ctx);
                        }
                        Timer::WaitDeadline { step, attempt, .. } => {
                            self.entry.wait_deadline(step, attempt, ctx);
                        }
                        Timer::Lease { .. } | Timer::Parked { .. } | Timer::DrainDeadline => {}
                    }
                    ctx.apply_shared(); // as the engine does after each timer
                }
            }
            Action::Cancel => {
                if !super::run::is_finished(self.entry.run.state()) {
                    self.entry.cancel_by("", "sim", ctx);
                }
            }
            Action::Restart => {
                self.settle();
                self.commit();
                // Memory is gone; the worker keeps what it holds and reconnects.
                self.ctx = new_ctx(self.ctx.now);
                self.entry =
                    RunEntry::recover(self.stored.read(), self.plan.clone(), &mut self.ctx)
                        .expect("a committed run recovers");
                if self.entry.run.state() == RunState::Running {
                    self.entry.admitted = true;
                }
                self.reconcile_held();
            }
            Action::Approve(approve) => {
                for spec in &self.plan.compiled.steps {
                    if matches!(spec.kind, dagmesh_spec::StepKind::Approval { .. }) {
                        let before = self.entry.snapshot();
                        let result =
                            self.entry
                                .approve(&spec.id, approve, Map::new(), "", "sim", ctx);
                        if result.is_err() {
                            let after = self.entry.snapshot();
                            assert_eq!(before, after, "a refused approval changed the run");
                        }
                    }
                }
            }
            Action::Suspend(suspend) => {
                if self.entry.run.state() == RunState::Running {
                    self.entry.set_suspended(suspend, "sim", "sim", ctx);
                }
            }
            Action::ChildEnds(i, outcome) => {
                let count = self.children.len().max(1);
                let Some(child) = self.children.keys().nth(i % count).cloned() else {
                    self.settle();
                    self.commit();
                    self.check();
                    return;
                };
                let (state, error) = match outcome {
                    0 => (RunState::Succeeded, ""),
                    1 => (RunState::Failed, "step \"c\" failed: sim"),
                    _ => (RunState::Cancelled, "cancelled: by someone"),
                };
                let before = self.entry.snapshot();
                let waited = before
                    .steps
                    .iter()
                    .any(|s| s.child_run_id == child && s.state() == StepState::Running);
                self.end_child(&child, state, error);
                if !waited {
                    assert_eq!(
                        before,
                        self.entry.snapshot(),
                        "an unheard-of child changed the run"
                    );
                }
            }
            Action::Retry(from) => {
                // RetryRun takes failed and cancelled runs, or any ended run with a step to
                // re-run from (a step of the DAG).
                let dag = self
                    .plan
                    .compiled
                    .steps
                    .iter()
                    .filter(|s| s.hook.is_none())
                    .count();
                let from = from.map(|i| i % dag);
                let allowed = match from {
                    None => matches!(
                        self.entry.run.state(),
                        RunState::Failed | RunState::Cancelled
                    ),
                    Some(_) => self.finished(),
                };
                if !allowed {
                    return;
                }
                // Steps that run again: their earlier successes are no repeat.
                if let Some(from) = from {
                    let mut work = vec![from];
                    while let Some(i) = work.pop() {
                        let id = self.plan.compiled.steps[i].id.clone();
                        let item = format!("{id}[");
                        self.successes
                            .retain(|step, _| step != &id && !step.starts_with(&item));
                        work.extend(self.plan.compiled.steps[i].dependants.iter().copied());
                    }
                }
                self.commit();
                self.ctx = new_ctx(self.ctx.now);
                self.entry =
                    RunEntry::recover(self.stored.read(), self.plan.clone(), &mut self.ctx)
                        .expect("an ended run recovers");
                self.entry.retry("sim", from, &mut self.ctx);
                self.entry.admit(&mut self.ctx);
                self.held.clear();
                // Exit hooks run again after a retry: a new success of theirs is no repeat.
                for spec in &self.plan.compiled.steps {
                    if spec.hook.is_some() {
                        self.successes.remove(&spec.id);
                    }
                }
            }
        }
        self.settle();
        self.commit();
        self.check();
    }

    /// After a restart the worker still holds what the store says it was assigned; what it
    /// holds beyond that (answered but lost with memory) it drops.
    fn reconcile_held(&mut self) {
        let stored: HashSet<(String, u32)> = self
            .stored
            .steps
            .values()
            .filter(|s| super::run::is_active(s.state()))
            .map(|s| (s.task_id.clone(), s.attempt))
            .collect();
        self.held.retain(|held| stored.contains(held));
    }

    fn pick(&self, i: usize) -> Option<(String, u32)> {
        (!self.held.is_empty()).then(|| self.held[i % self.held.len()].clone())
    }

    fn check(&self) {
        let snapshot = self.entry.snapshot();
        // Everything the machine changed was marked and committed.
        let stored: Vec<&Step> = self.stored.steps.values().collect();
        let mut memory: Vec<&Step> = snapshot.steps.iter().collect();
        memory.sort_by(|a, b| a.step_id.cmp(&b.step_id));
        assert_eq!(memory, stored, "memory and the committed rows differ");
        assert_eq!(
            Run {
                steps: Vec::new(),
                ..snapshot.clone()
            },
            self.stored.run,
            "run row"
        );
        // A result is recorded at most once.
        for (step_id, count) in &self.successes {
            assert!(*count <= 1, "step {step_id} succeeded {count} times");
        }
        // Every assigned or running attempt is held by the worker's session, which holds
        // nothing the worker does not (a cancelled task keeps its slot until it is answered).
        let active: HashSet<(String, u32)> = snapshot
            .steps
            .iter()
            .filter(|s| super::run::is_active(s.state()))
            .filter(|s| self.is_task_row(s))
            .map(|s| (s.task_id.clone(), s.attempt))
            .collect();
        let session: HashSet<(String, u32)> = self.ctx.workers.sessions[WORKER]
            .held
            .keys()
            .cloned()
            .collect();
        assert!(
            active.is_subset(&session),
            "active {active:?} not all held: {session:?}"
        );
        let worker: HashSet<(String, u32)> = self.held.iter().cloned().collect();
        assert_eq!(session, worker, "the session holds what the worker holds");
        for step in &snapshot.steps {
            if self.is_task_row(step) && super::run::is_active(step.state()) {
                assert_eq!(step.worker, WORKER);
            }
        }
        // The children running are exactly those that RUNNING steps wait for, each started by
        // the step that waits for it.
        let waited: BTreeMap<&str, &str> = snapshot
            .steps
            .iter()
            .filter(|s| s.state() == StepState::Running && !s.child_run_id.is_empty())
            .map(|s| (s.child_run_id.as_str(), s.step_id.as_str()))
            .collect();
        let running: BTreeMap<&str, &str> = self
            .children
            .iter()
            .map(|(id, child)| (id.as_str(), child.parent_step.as_str()))
            .collect();
        assert_eq!(
            waited, running,
            "steps waiting for children vs children running"
        );
        let by_id: HashMap<&str, &Step> = snapshot
            .steps
            .iter()
            .map(|s| (s.step_id.as_str(), s))
            .collect();
        for spec in &self.plan.compiled.steps {
            if spec.for_each.is_none() {
                continue;
            }
            let map = by_id[spec.id.as_str()];
            let items: Vec<&Step> = (0..map.item_count)
                .map(|i| by_id[format!("{}[{i}]", spec.id).as_str()])
                .collect();
            let started = items
                .iter()
                .filter(|s| {
                    matches!(
                        s.state(),
                        StepState::Ready
                            | StepState::Assigned
                            | StepState::Running
                            | StepState::RetryWait
                    )
                })
                .count();
            if spec.max_parallel > 0 {
                assert!(
                    started <= spec.max_parallel as usize,
                    "{started} items of {} started, max_parallel {}",
                    spec.id,
                    spec.max_parallel
                );
            }
            if map.state() == StepState::Succeeded {
                let outputs = from_struct(map.outputs.as_ref());
                let list = outputs["items"].as_array().expect("a list");
                assert_eq!(list.len(), map.item_count as usize);
                let children = spec.kind != dagmesh_spec::StepKind::Task;
                for (item, entry) in items.iter().zip(list) {
                    match item.state() {
                        StepState::Succeeded if children => {
                            assert_eq!(entry, &json!({}), "a child's outputs: its steps");
                        }
                        StepState::Succeeded => {
                            assert_eq!(entry["from"], json!(item.task_id));
                        }
                        _ => {
                            assert!(spec.continue_on_item_failure, "{} failed", item.step_id);
                            assert!(entry["error"].is_string());
                        }
                    }
                }
            }
            assert!(
                !matches!(
                    map.state(),
                    StepState::Ready | StepState::Assigned | StepState::RetryWait
                ),
                "map step {} is {:?}: a map is never a task",
                spec.id,
                map.state()
            );
        }
        let dag_open = self.plan.compiled.steps.iter().any(|spec| {
            spec.hook.is_none()
                && !matches!(
                    by_id[spec.id.as_str()].state(),
                    StepState::Succeeded
                        | StepState::Failed
                        | StepState::Skipped
                        | StepState::Cancelled
                )
        });
        for spec in &self.plan.compiled.steps {
            if spec.hook.is_some() && dag_open {
                assert_eq!(
                    by_id[spec.id.as_str()].state(),
                    StepState::Pending,
                    "hook {} started before the DAG ended",
                    spec.id
                );
            }
        }
        if self.finished() {
            for step in &snapshot.steps {
                assert!(
                    matches!(
                        step.state(),
                        StepState::Succeeded
                            | StepState::Failed
                            | StepState::Skipped
                            | StepState::Cancelled
                    ),
                    "run ended with step {} {:?}",
                    step.step_id,
                    step.state()
                );
            }
        }
    }

    /// Whether a row is a task handed to workers: a plain task step, or an item of a task map.
    fn is_task_row(&self, step: &Step) -> bool {
        if step.map_step.is_empty() {
            self.is_plain(&step.step_id)
        } else {
            self.plan
                .index
                .get(&step.map_step)
                .is_some_and(|&i| self.plan.compiled.steps[i].kind == dagmesh_spec::StepKind::Task)
        }
    }

    fn is_plain(&self, step_id: &str) -> bool {
        self.plan.index.get(step_id).is_some_and(|&i| {
            let spec = &self.plan.compiled.steps[i];
            spec.for_each.is_none() && spec.kind == dagmesh_spec::StepKind::Task
        })
    }

    /// Lets the worker succeed at everything until the run ends.
    fn finish_well(&mut self) {
        for _ in 0..500 {
            if self.finished() {
                return;
            }
            self.apply(Action::Suspend(false));
            self.apply(Action::Approve(true));
            while !self.children.is_empty() {
                self.apply(Action::ChildEnds(0, 0));
            }
            self.apply(Action::Dispatch);
            while !self.held.is_empty() {
                self.apply(Action::Complete(0));
            }
            self.apply(Action::Tick);
        }
        panic!(
            "the run never ended: {:#?}",
            self.entry
                .snapshot()
                .steps
                .iter()
                .map(|s| (s.step_id.clone(), s.state()))
                .collect::<Vec<_>>()
        );
    }
}

/// A step of a generated DAG: which earlier steps it needs, and whether it is a map.
#[derive(Debug, Clone)]
struct GenStep {
    needs: Vec<usize>,
    map: Option<(u32, bool)>,
    retries: u32,
    /// A sleep (true) or an approval with a timeout (false) instead of a task.
    wait: Option<bool>,
    /// A child workflow instead of a task (a map of them with `map`).
    child: bool,
}

fn spec_of(steps: &[GenStep], continue_on_failure: bool) -> WorkflowSpec {
    spec_with_hook(steps, continue_on_failure, 0)
}

/// With `hook` 1, 2 or 3: an `on_exit`, `on_success` or `on_failure` task reading `run`.
fn spec_with_hook(steps: &[GenStep], continue_on_failure: bool, hook: u8) -> WorkflowSpec {
    let steps = steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let needs: Vec<String> = step.needs.iter().map(|n| format!("s{n}")).collect();
            let mut inputs: HashMap<String, String> = HashMap::new();
            if !needs.is_empty() {
                inputs.insert("up".into(), format!("[{}]", needs.join(", ")));
            }
            let (for_each, max_parallel, tolerate) = match step.map {
                Some((max_parallel, tolerate)) => {
                    inputs.insert("x".into(), "item".into());
                    ("inputs.xs".to_owned(), max_parallel, tolerate)
                }
                None => (String::new(), 0, false),
            };
            let wait = step.wait.filter(|_| step.map.is_none() && !step.child);
            if step.child {
                return pb::StepSpec {
                    id: format!("s{i}"),
                    workflow: "child".into(),
                    needs,
                    inputs,
                    for_each,
                    max_parallel,
                    continue_on_failure: tolerate,
                    ..pb::StepSpec::default()
                };
            }
            match wait {
                Some(true) => pb::StepSpec {
                    id: format!("s{i}"),
                    needs,
                    inputs,
                    sleep: "1s".into(),
                    ..pb::StepSpec::default()
                },
                Some(false) => pb::StepSpec {
                    id: format!("s{i}"),
                    needs,
                    inputs,
                    approval: Some(pb::ApprovalSpec {
                        message: "ok?".into(),
                        timeout: "1h".into(),
                    }),
                    ..pb::StepSpec::default()
                },
                None => pb::StepSpec {
                    id: format!("s{i}"),
                    task: "t@^1".into(),
                    needs,
                    inputs,
                    retry: (step.retries > 1).then(|| pb::RetryPolicy {
                        max_attempts: step.retries,
                        initial_backoff: "1s".into(),
                        ..pb::RetryPolicy::default()
                    }),
                    for_each,
                    max_parallel,
                    continue_on_failure: tolerate,
                    ..pb::StepSpec::default()
                },
            }
        })
        .collect();
    let hook_step = || {
        vec![pb::StepSpec {
            id: "hook".into(),
            task: "t@^1".into(),
            inputs: [("state".to_owned(), "run.state".to_owned())].into(),
            ..pb::StepSpec::default()
        }]
    };
    let mut spec = WorkflowSpec {
        name: "sim".into(),
        steps,
        continue_on_failure,
        ..WorkflowSpec::default()
    };
    match hook {
        1 => spec.on_exit = hook_step(),
        2 => spec.on_success = hook_step(),
        3 => spec.on_failure = hook_step(),
        _ => {}
    }
    spec
}

fn any_dag() -> impl Strategy<Value = Vec<GenStep>> {
    prop::collection::vec(
        (
            any::<u8>(),
            prop::option::weighted(0.35, (0u32..4, any::<bool>())),
            1u32..3,
            prop::option::weighted(0.2, any::<bool>()),
            prop::bool::weighted(0.2),
        ),
        1..6,
    )
    .prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(i, (mask, map, retries, wait, child))| GenStep {
                needs: (0..i).filter(|k| mask & (1 << k) != 0).collect(),
                map,
                retries,
                wait,
                child,
            })
            .collect()
    })
}

fn any_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => Just(Action::Dispatch),
        3 => (0usize..8).prop_map(Action::Start),
        8 => (0usize..8).prop_map(Action::Complete),
        3 => (0usize..8, any::<bool>()).prop_map(|(i, r)| Action::Fail(i, r)),
        2 => (0usize..8).prop_map(Action::Lose),
        1 => (0usize..8).prop_map(Action::Stale),
        3 => Just(Action::Tick),
        1 => Just(Action::Cancel),
        2 => Just(Action::Restart),
        1 => prop::option::of(0usize..8).prop_map(Action::Retry),
        1 => any::<bool>().prop_map(Action::Approve),
        1 => any::<bool>().prop_map(Action::Suspend),
        3 => (0usize..8, 0u8..3).prop_map(|(i, outcome)| Action::ChildEnds(i, outcome)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Random DAGs with maps under random worker behaviour, cancels, restarts and retries:
    /// memory always equals what was committed, every invariant holds, and a run whose worker
    /// then succeeds at everything ends.
    #[test]
    fn the_run_machine_keeps_its_invariants(
        dag in any_dag(),
        continue_on_failure in any::<bool>(),
        hook in 0u8..4,
        items in 0usize..5,
        actions in prop::collection::vec(any_action(), 0..80),
    ) {
        let spec = spec_with_hook(&dag, continue_on_failure, hook);
        let inputs = json!({ "xs": (0..items).collect::<Vec<_>>() });
        let mut sim = Sim::new(spec, inputs.as_object().expect("object").clone());
        sim.check();
        for action in actions {
            sim.apply(action);
        }
        sim.finish_well();
        // A fresh machine from the stored rows agrees with the one that ran.
        let rebuilt = RunEntry::recover(sim.stored.read(), sim.plan.clone(), &mut new_ctx(sim.ctx.now))
            .expect("recovers");
        prop_assert_eq!(rebuilt.snapshot().steps.len(), sim.entry.snapshot().steps.len());
    }
}

#[test]
fn a_clean_run_of_a_map_succeeds_with_every_item_once() {
    let dag = vec![
        GenStep {
            needs: vec![],
            map: None,
            retries: 1,
            wait: None,
            child: false,
        },
        GenStep {
            needs: vec![0],
            map: Some((2, false)),
            retries: 1,
            wait: None,
            child: false,
        },
        GenStep {
            needs: vec![1],
            map: None,
            retries: 1,
            wait: None,
            child: false,
        },
    ];
    let inputs = json!({ "xs": [1, 2, 3, 4, 5] });
    let mut sim = Sim::new(
        spec_of(&dag, false),
        inputs.as_object().expect("object").clone(),
    );
    sim.finish_well();
    assert_eq!(sim.entry.run.state(), RunState::Succeeded);
    let snapshot = sim.entry.snapshot();
    assert_eq!(snapshot.steps.len(), 3 + 5);
    for i in 0..5 {
        assert_eq!(sim.successes[&format!("s1[{i}]")], 1);
    }
    let inputs = snapshot
        .steps
        .iter()
        .find(|s| s.step_id == "s2")
        .and_then(|s| s.inputs.clone());
    let up = from_struct(inputs.as_ref());
    assert_eq!(up["up"][0].as_array().map(Vec::len), Some(5), "{up:?}");
}

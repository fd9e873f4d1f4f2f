//! One active run in memory: its steps, the outputs that feed later steps, and what changed in
//! the current batch. Every change marks the step or run dirty and appends an event; the engine
//! turns those into one commit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use dagmesh_proto::json::{from_struct, map_to_struct};
use dagmesh_proto::v1::{
    self as pb, Mutation, RecordOutcome, Run, RunEvent, RunState, Step, StepState, mutation,
    run_event, server_message,
};

use serde_json::{Map, Value as Json};

use dagmesh_proto::limits::{
    self, MAX_ENTRIES, MAX_LOG_BYTES_PER_ATTEMPT, MAX_LOG_LINE_BYTES, MAX_LOG_LINES_PER_MESSAGE,
    MAX_MESSAGE_LEN, check_payload, truncate_marked,
};
use tokio::time::Instant;

use super::timers::Timer;
use super::traces::{self, AttemptEnd, Timeline};
use super::{Ctx, QueuedTask, cancel_message, humanize};
use crate::plans::Plan;

pub(crate) fn is_active(state: StepState) -> bool {
    matches!(state, StepState::Assigned | StepState::Running)
}

fn is_terminal(state: StepState) -> bool {
    matches!(
        state,
        StepState::Succeeded | StepState::Failed | StepState::Skipped | StepState::Cancelled
    )
}

pub(crate) fn is_finished(state: RunState) -> bool {
    matches!(
        state,
        RunState::Succeeded | RunState::Failed | RunState::Cancelled
    )
}

fn now() -> prost_types::Timestamp {
    SystemTime::now().into()
}

/// Progress events of one step are kept at most this often; in between only the latest value
/// is remembered and written when the interval is over, so a flood of Progress messages costs
/// a handful of rows and the live view still shows the newest value.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Log lines one attempt may still write before its cap (see `limits::MAX_LOG_BYTES_PER_ATTEMPT`).
#[derive(Default)]
struct LogBudget {
    attempt: u32,
    bytes: usize,
    /// Lines dropped after the cap; the marker line is written once.
    dropped: usize,
}

#[derive(Default)]
struct ProgressThrottle {
    attempt: u32,
    last_emit: Option<Instant>,
    pending: Option<pb::StepProgress>,
    flush_scheduled: bool,
}

pub(crate) struct RunEntry {
    pub id: Arc<str>,
    /// The run row; its `steps` field stays empty (steps live in `steps`).
    pub run: Run,
    pub plan: Arc<Plan>,
    pub steps: Vec<Step>,
    inputs: Map<String, Json>,
    /// Outputs of succeeded steps as JSON, the variables of downstream expressions.
    outputs: Vec<Option<Map<String, Json>>>,
    /// Per step: how many of its needs have not finished yet.
    waiting_on: Vec<u32>,
    /// Per step: the attempt whose result was recorded, to tell a duplicate from a stale result.
    recorded_attempt: Vec<u32>,
    /// Steps not in a terminal state; the run is done when it reaches 0.
    unfinished: usize,
    /// Admission buckets this run occupies while admitted (see `Limits::buckets`).
    pub buckets: Vec<String>,
    /// Whether it holds its buckets (admitted and not yet ended).
    pub admitted: bool,
    dirty_steps: Vec<usize>,
    step_dirty: Vec<bool>,
    run_dirty: bool,
    events: Vec<RunEvent>,
    trace: Timeline,
    /// Per step (only steps that reported): progress rate limiting, log caps, and why recent
    /// attempts were lost (the history a step fails with at the lost-attempt cap).
    progress: HashMap<usize, ProgressThrottle>,
    logs: HashMap<usize, LogBudget>,
    losses: HashMap<usize, Vec<String>>,
}

impl RunEntry {
    /// A new run, RUNNING when `admitted` (the caller then starts it), else QUEUED.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a SubmitRun, each used once to build the run"
    )]
    pub fn create(
        plan: Arc<Plan>,
        inputs: Map<String, Json>,
        idempotency_key: String,
        tags: HashMap<String, String>,
        priority: i32,
        admitted: bool,
        submitted_by: String,
        ctx: &mut Ctx,
    ) -> Self {
        let state = if admitted {
            RunState::Running
        } else {
            RunState::Queued
        };
        let run_id = uuid::Uuid::now_v7().to_string();
        let steps = plan
            .compiled
            .steps
            .iter()
            .map(|step| Step {
                run_id: run_id.clone(),
                step_id: step.id.clone(),
                task_id: format!("{run_id}/{}", step.id),
                state: StepState::Pending as i32,
                task: step.task.clone(),
                ..Step::default()
            })
            .collect();
        let run = Run {
            run_id: run_id.clone(),
            workflow: plan.workflow.name.clone(),
            workflow_version: plan.workflow.version,
            state: state as i32,
            priority,
            inputs: Some(map_to_struct(&inputs)),
            tags,
            idempotency_key,
            created_at: Some(now()),
            submitted_by: submitted_by.clone(),
            ..Run::default()
        };
        let mut entry = Self::new(run, plan, steps, inputs);
        for step in 0..entry.steps.len() {
            entry.mark(step, ctx);
        }
        entry.emit(
            run_event::Event::RunState(pb::RunStateChanged {
                state: state as i32,
                error: String::new(),
                actor: submitted_by,
            }),
            ctx,
        );
        entry
    }

    /// Admission: QUEUED -> RUNNING, and the first steps become ready.
    pub fn admit(&mut self, ctx: &mut Ctx) {
        self.admitted = true;
        self.set_run_state(RunState::Running, String::new(), ctx);
        self.start(ctx);
    }

    /// Rebuilds a run read from the store. Assigned tasks are held for their worker, which
    /// keeps them if it reconnects within the lease.
    pub fn recover(mut run: Run, plan: Arc<Plan>, ctx: &mut Ctx) -> Self {
        let mut stored: HashMap<String, Step> = std::mem::take(&mut run.steps)
            .into_iter()
            .map(|step| (step.step_id.clone(), step))
            .collect();
        let steps: Vec<Step> = plan
            .compiled
            .steps
            .iter()
            .map(|step| {
                stored.remove(&step.id).unwrap_or_else(|| Step {
                    run_id: run.run_id.clone(),
                    step_id: step.id.clone(),
                    task_id: format!("{}/{}", run.run_id, step.id),
                    state: StepState::Pending as i32,
                    task: step.task.clone(),
                    ..Step::default()
                })
            })
            .collect();
        let inputs = from_struct(run.inputs.as_ref());
        let mut entry = Self::new(run, plan, steps, inputs);
        let running = entry.run.state() == RunState::Running;
        let mut pending = Vec::new();
        for index in 0..entry.steps.len() {
            let step = &entry.steps[index];
            if step.state() == StepState::Succeeded {
                entry.outputs[index] = Some(from_struct(step.outputs.as_ref()));
                entry.recorded_attempt[index] = step.attempt;
            }
            if !running {
                continue;
            }
            match step.state() {
                StepState::Ready => entry.enqueue(index, ctx),
                StepState::RetryWait => ctx.timers.schedule(
                    ctx.now,
                    Timer::RetryDue {
                        run_id: entry.id.clone(),
                        step: index,
                        attempt: step.attempt,
                    },
                ),
                StepState::Assigned | StepState::Running => {
                    let instance: Arc<str> = Arc::from(step.worker.as_str());
                    let slots = entry.plan.compiled.steps[index].slots;
                    let (task_id, attempt) = (step.task_id.clone(), step.attempt);
                    let now = ctx.now;
                    let session = ctx
                        .workers
                        .sessions
                        .entry(instance.clone())
                        .or_insert_with(|| super::Session::new(instance.clone(), now));
                    // Only the principal that held the attempt may resume the session.
                    if session.principal.is_none() && !step.worker_principal.is_empty() {
                        session.principal = Some(Arc::from(step.worker_principal.as_str()));
                    }
                    ctx.workers.hold(&instance, task_id, attempt, slots);
                    let resource = &entry.plan.compiled.steps[index].concurrency_key;
                    ctx.admission.hold_resource(resource);
                    ctx.timers
                        .schedule(ctx.after(ctx.config.lease), Timer::Lease { instance });
                }
                StepState::Pending => pending.push(index),
                _ => {}
            }
        }
        entry.recount_waiting();
        if running {
            entry.advance(pending, ctx);
        }
        entry
    }

    fn new(run: Run, plan: Arc<Plan>, steps: Vec<Step>, inputs: Map<String, Json>) -> Self {
        let count = steps.len();
        let waiting_on = plan
            .compiled
            .steps
            .iter()
            .map(|step| step.needs.len() as u32)
            .collect();
        let unfinished = steps_unfinished(&steps);
        Self {
            id: Arc::from(run.run_id.as_str()),
            run,
            plan,
            steps,
            inputs,
            outputs: vec![None; count],
            waiting_on,
            recorded_attempt: vec![0; count],
            unfinished,
            buckets: Vec::new(),
            admitted: false,
            dirty_steps: Vec::new(),
            step_dirty: vec![false; count],
            run_dirty: false,
            events: Vec::new(),
            trace: Timeline::default(),
            progress: HashMap::new(),
            logs: HashMap::new(),
            losses: HashMap::new(),
        }
    }

    fn recount_waiting(&mut self) {
        for (index, step) in self.plan.compiled.steps.iter().enumerate() {
            self.waiting_on[index] = step
                .needs
                .iter()
                .filter(|&&need| {
                    !matches!(
                        self.steps[need].state(),
                        StepState::Succeeded | StepState::Skipped
                    )
                })
                .count() as u32;
        }
    }

    pub fn snapshot(&self) -> Run {
        Run {
            steps: self.steps.clone(),
            ..self.run.clone()
        }
    }

    /// Makes the steps without needs ready.
    pub fn start(&mut self, ctx: &mut Ctx) {
        let roots = (0..self.steps.len())
            .filter(|&step| self.waiting_on[step] == 0)
            .collect();
        self.advance(roots, ctx);
    }

    /// RetryRun: every step that did not succeed starts over; earlier attempts no longer count
    /// against the retry policy. The run goes back to QUEUED for admission.
    pub fn retry(&mut self, actor: &str, ctx: &mut Ctx) {
        for index in 0..self.steps.len() {
            let step = &mut self.steps[index];
            if step.state() == StepState::Succeeded {
                continue;
            }
            step.state = StepState::Pending as i32;
            step.lost_attempts = step.attempt;
            step.lost_in_a_row = 0;
            step.error.clear();
            step.worker.clear();
            step.worker_principal.clear();
            step.outputs = None;
            step.progress = 0.0;
            step.progress_message.clear();
            step.finished_at = None;
            self.mark(index, ctx);
        }
        self.recount_waiting();
        self.unfinished = steps_unfinished(&self.steps);
        self.run.retried_by = actor.to_owned();
        self.run.cancelled_by.clear();
        // Back through admission like a new run; the engine queues it.
        self.set_run_state_by(RunState::Queued, String::new(), actor, ctx);
        self.run.finished_at = None;
    }

    /// Takes the steps in `work` whose needs are all done and decides: skip, fail or ready.
    fn advance(&mut self, work: Vec<usize>, ctx: &mut Ctx) {
        let mut work: VecDeque<usize> = work.into();
        while let Some(index) = work.pop_front() {
            if self.run.state() != RunState::Running
                || self.steps[index].state() != StepState::Pending
                || self.waiting_on[index] != 0
            {
                continue;
            }
            let plan = self.plan.clone();
            let spec = &plan.compiled.steps[index];
            if let Some(&skipped) = spec
                .needs
                .iter()
                .find(|&&need| self.steps[need].state() == StepState::Skipped)
            {
                let reason = format!("needs skipped step \"{}\"", self.steps[skipped].step_id);
                self.finish(index, StepState::Skipped, reason, ctx);
                work.extend(self.release_dependants(index));
                continue;
            }
            let upstream = if spec.when.is_some() || !spec.inputs.is_empty() {
                self.upstream_outputs(index)
            } else {
                HashMap::new()
            };
            // The payload limit bounds what an expression may build, and its cost estimate what
            // it may do, before it runs inside this (the only) engine task.
            let budget = dagmesh_spec::EvalBudget {
                max_payload_bytes: ctx.config.max_payload_bytes,
                ..dagmesh_spec::EvalBudget::default()
            };
            if spec.when.is_some() {
                match spec.evaluate_when_with(&self.inputs, &upstream, &budget) {
                    Ok(true) => {}
                    Ok(false) => {
                        let reason = "`when` condition is false".to_owned();
                        self.finish(index, StepState::Skipped, reason, ctx);
                        work.extend(self.release_dependants(index));
                        continue;
                    }
                    Err(error) => {
                        self.fail_step(index, error.to_string(), ctx);
                        continue;
                    }
                }
            }
            let inputs = match spec.evaluate_inputs_with(&self.inputs, &upstream, &budget) {
                Ok(inputs) => map_to_struct(&inputs),
                Err(error) => {
                    self.fail_step(index, error.to_string(), ctx);
                    continue;
                }
            };
            let field = format!("steps.{}.inputs", spec.id);
            if let Err(error) = check_payload(&field, &inputs, ctx.config.max_payload_bytes) {
                self.fail_step(index, error.to_string(), ctx);
                continue;
            }
            self.steps[index].inputs = Some(inputs);
            self.make_ready(index, ctx);
        }
        self.check_done(ctx);
    }

    /// Outputs of the upstream steps this step's expressions read (not every ancestor's: a
    /// join after a wide fan-out would clone them all for each evaluation).
    fn upstream_outputs(&self, index: usize) -> HashMap<String, Map<String, Json>> {
        self.plan.compiled.steps[index]
            .variables
            .iter()
            .filter(|name| name.as_str() != dagmesh_spec::INPUTS_VAR)
            .map(|id| {
                let outputs = self
                    .plan
                    .index
                    .get(id)
                    .and_then(|&i| self.outputs[i].clone());
                (id.clone(), outputs.unwrap_or_default())
            })
            .collect()
    }

    /// Dependants of `index` whose needs are now all finished.
    fn release_dependants(&mut self, index: usize) -> Vec<usize> {
        let mut released = Vec::new();
        for &dependant in &self.plan.compiled.steps[index].dependants {
            self.waiting_on[dependant] = self.waiting_on[dependant].saturating_sub(1);
            if self.waiting_on[dependant] == 0 {
                released.push(dependant);
            }
        }
        released
    }

    /// A new attempt: READY and queued for a worker.
    fn make_ready(&mut self, index: usize, ctx: &mut Ctx) {
        self.trace.step_ready(index);
        let step = &mut self.steps[index];
        step.attempt += 1;
        step.worker.clear();
        step.worker_principal.clear();
        step.progress = 0.0;
        step.progress_message.clear();
        let attempt = step.attempt;
        // Say at once when no connected worker can take it (GetRun recomputes it live).
        let route = &self.plan.routes[index];
        step.waiting_reason = ctx.workers.waiting_reason(route).unwrap_or_default();
        self.set_step_state(index, StepState::Ready, ctx);
        self.enqueue(index, ctx);
        if let Some(timeout) = self.plan.compiled.steps[index].schedule_to_start_timeout {
            ctx.timers.schedule(
                ctx.after(timeout),
                Timer::ScheduleToStart {
                    run_id: self.id.clone(),
                    step: index,
                    attempt,
                },
            );
        }
    }

    /// The schedule-to-start timeout of (step, attempt) passed: fail the step if it still
    /// waits for a worker, naming what no worker offered.
    pub fn schedule_to_start_expired(
        &mut self,
        index: usize,
        attempt: u32,
        waiting_reason: Option<String>,
        ctx: &mut Ctx,
    ) {
        let step = &self.steps[index];
        if step.state() != StepState::Ready || step.attempt != attempt {
            return;
        }
        let timeout = self.plan.compiled.steps[index]
            .schedule_to_start_timeout
            .unwrap_or_default();
        let mut error = format!(
            "no worker took the step within its schedule_to_start_timeout of {}",
            humanize(timeout)
        );
        if let Some(reason) = waiting_reason {
            error.push_str(&format!(" ({reason})"));
        }
        self.fail_step(index, error, ctx);
    }

    fn enqueue(&mut self, index: usize, ctx: &mut Ctx) {
        let task = QueuedTask {
            run_id: self.id.clone(),
            step: index,
            attempt: self.steps[index].attempt,
        };
        let priority = self.plan.compiled.steps[index].priority;
        ctx.queues.push(&self.plan.routes[index], priority, task);
    }

    pub fn assign(
        &mut self,
        index: usize,
        attempt: u32,
        instance: &Arc<str>,
        version: &str,
        ctx: &mut Ctx,
    ) {
        let step = &mut self.steps[index];
        if step.state() != StepState::Ready || step.attempt != attempt {
            return; // a stale queue entry: the step was cancelled or requeued meanwhile
        }
        self.trace.attempt_assigned(index);
        step.worker = instance.to_string();
        step.worker_principal = ctx
            .workers
            .sessions
            .get(instance)
            .and_then(|session| session.principal.as_deref())
            .unwrap_or_default()
            .to_owned();
        step.task_version = version.to_owned();
        step.waiting_reason.clear();
        self.set_step_state(index, StepState::Assigned, ctx);
        let spec = &self.plan.compiled.steps[index];
        let step = &self.steps[index];
        ctx.workers
            .hold(instance, step.task_id.clone(), attempt, spec.slots);
        let deadline = spec.timeout.and_then(|timeout| {
            ctx.timers.schedule(
                ctx.after(timeout),
                Timer::AttemptTimeout {
                    run_id: self.id.clone(),
                    step: index,
                    attempt,
                },
            );
            SystemTime::now().checked_add(timeout).map(Into::into)
        });
        let assign = pb::Assign {
            task_id: step.task_id.clone(),
            attempt,
            run_id: self.run.run_id.clone(),
            step_id: step.step_id.clone(),
            task_type: Some(pb::TaskTypeVersion {
                name: spec.task_name.clone(),
                version: version.to_owned(),
            }),
            inputs: step.inputs.clone(),
            deadline,
            traceparent: traces::traceparent(&self.run.run_id, &step.step_id, attempt),
            slots: spec.slots,
        };
        ctx.send(instance.clone(), server_message::Message::Assign(assign));
    }

    pub fn started(&mut self, index: usize, ctx: &mut Ctx) {
        if self.steps[index].state() == StepState::Assigned {
            self.steps[index].started_at = Some(now());
            self.set_step_state(index, StepState::Running, ctx);
        }
    }

    pub fn progress(&mut self, index: usize, progress: pb::TaskProgress, ctx: &mut Ctx) {
        let fraction = if progress.fraction.is_nan() {
            0.0
        } else {
            progress.fraction.clamp(0.0, 1.0)
        };
        let mut message = progress.message;
        truncate_marked(&mut message, MAX_MESSAGE_LEN);
        // Bounded: the first metrics by name, and only their finite values.
        let mut names: Vec<&String> = progress.metrics.keys().collect();
        names.sort();
        let metrics = names
            .into_iter()
            .filter(|name| name.len() <= limits::MAX_NAME_LEN)
            .take(MAX_ENTRIES)
            .filter_map(|name| {
                let value = progress.metrics[name];
                value.is_finite().then(|| (name.clone(), value))
            })
            .collect();
        let step = &self.steps[index];
        let update = pb::StepProgress {
            step_id: step.step_id.clone(),
            attempt: step.attempt,
            fraction,
            message,
            metrics,
        };
        let throttle = self.progress.entry(index).or_default();
        if throttle.attempt != step.attempt {
            *throttle = ProgressThrottle {
                attempt: step.attempt,
                ..ProgressThrottle::default()
            };
        }
        let due = throttle
            .last_emit
            .and_then(|at| at.checked_add(PROGRESS_INTERVAL))
            .filter(|&next| next > ctx.now);
        match due {
            None => {
                throttle.last_emit = Some(ctx.now);
                throttle.pending = None;
                self.emit_progress(index, update, ctx);
            }
            Some(next) => {
                throttle.pending = Some(update);
                if !std::mem::replace(&mut throttle.flush_scheduled, true) {
                    ctx.timers.schedule(
                        next,
                        Timer::ProgressFlush {
                            run_id: self.id.clone(),
                            step: index,
                            attempt: step.attempt,
                        },
                    );
                }
            }
        }
    }

    /// Writes the latest progress held back by the rate limit, if the attempt is still on.
    pub fn flush_progress(&mut self, index: usize, attempt: u32, ctx: &mut Ctx) {
        let Some(throttle) = self.progress.get_mut(&index) else {
            return;
        };
        if throttle.attempt != attempt {
            return;
        }
        throttle.flush_scheduled = false;
        let Some(update) = throttle.pending.take() else {
            return;
        };
        let step = &self.steps[index];
        if step.attempt != attempt || !is_active(step.state()) {
            return;
        }
        throttle.last_emit = Some(ctx.now);
        self.emit_progress(index, update, ctx);
    }

    fn emit_progress(&mut self, index: usize, update: pb::StepProgress, ctx: &mut Ctx) {
        let step = &mut self.steps[index];
        step.progress = update.fraction;
        step.progress_message = update.message.clone();
        self.mark(index, ctx);
        self.emit(run_event::Event::StepProgress(update), ctx);
    }

    /// Task log lines, capped per line, per message and per attempt; every cut is marked.
    pub fn log(&mut self, index: usize, log: pb::TaskLog, ctx: &mut Ctx) {
        let step = &self.steps[index];
        let attempt = step.attempt;
        let budget = self.logs.entry(index).or_default();
        if budget.attempt != attempt {
            *budget = LogBudget {
                attempt,
                ..LogBudget::default()
            };
        }
        let offered = log.lines.len();
        let mut lines = Vec::new();
        for mut line in log.lines.into_iter().take(MAX_LOG_LINES_PER_MESSAGE) {
            if budget.dropped > 0 {
                budget.dropped += 1;
                continue;
            }
            truncate_marked(&mut line.text, MAX_LOG_LINE_BYTES);
            truncate_marked(&mut line.level, 16);
            let size = line.text.len() + line.level.len();
            if budget.bytes + size > MAX_LOG_BYTES_PER_ATTEMPT {
                budget.dropped = 1;
                lines.push(marker_line(format!(
                    "log limit reached: attempt {attempt} wrote {} bytes, the limit is \
                     {MAX_LOG_BYTES_PER_ATTEMPT}; further lines of this attempt are dropped",
                    budget.bytes
                )));
                continue;
            }
            budget.bytes += size;
            lines.push(line);
        }
        if offered > MAX_LOG_LINES_PER_MESSAGE && budget.dropped == 0 {
            lines.push(marker_line(format!(
                "{} lines dropped: one log message may carry at most {MAX_LOG_LINES_PER_MESSAGE}",
                offered - MAX_LOG_LINES_PER_MESSAGE
            )));
        }
        if lines.is_empty() {
            return;
        }
        // Lines of the same step and attempt in this batch share one event.
        if let Some(RunEvent {
            event: Some(run_event::Event::StepLog(last)),
            ..
        }) = self.events.last_mut()
            && last.step_id == step.step_id
            && last.attempt == attempt
        {
            last.lines.extend(lines);
            return;
        }
        let event = run_event::Event::StepLog(pb::StepLog {
            step_id: step.step_id.clone(),
            attempt,
            lines,
        });
        self.emit(event, ctx);
    }

    /// A result from a worker that does not hold (task, attempt): never recorded. DUPLICATE
    /// when it is the same worker repeating the result that was recorded for it.
    pub fn unheld_result(
        &self,
        index: usize,
        attempt: u32,
        instance: &str,
    ) -> (RecordOutcome, String) {
        let step = &self.steps[index];
        if self.recorded_attempt[index] == attempt
            && step.attempt == attempt
            && step.worker == instance
        {
            return (RecordOutcome::Duplicate, String::new());
        }
        let detail = format!(
            "attempt {attempt} of step \"{}\" is not held by worker {instance} (the step is at \
             attempt {}, {})",
            step.step_id,
            step.attempt,
            state_name(step.state())
        );
        (RecordOutcome::Stale, detail)
    }

    /// A worker's Completed or Failed for (step, attempt).
    pub fn record_result(
        &mut self,
        index: usize,
        attempt: u32,
        result: Result<prost_types::Struct, (String, bool)>,
        ctx: &mut Ctx,
    ) -> (RecordOutcome, String) {
        let step = &self.steps[index];
        if step.attempt != attempt || !is_active(step.state()) {
            if self.recorded_attempt[index] == attempt {
                return (RecordOutcome::Duplicate, String::new());
            }
            let detail = format!(
                "attempt {attempt} of step \"{}\" is not current (the step is at attempt {}, {})",
                step.step_id,
                step.attempt,
                state_name(step.state())
            );
            return (RecordOutcome::Stale, detail);
        }
        self.recorded_attempt[index] = attempt;
        self.steps[index].lost_in_a_row = 0;
        // The last progress held back by the rate limit goes out before the result, so the
        // log ends with what the worker last said.
        if let Some(throttle) = self.progress.get_mut(&index)
            && throttle.attempt == attempt
            && let Some(update) = throttle.pending.take()
        {
            self.emit_progress(index, update, ctx);
        }
        match result {
            Ok(outputs) => {
                let field = format!("steps.{}.outputs", self.steps[index].step_id);
                match check_payload(&field, &outputs, ctx.config.max_payload_bytes) {
                    Err(error) => self.attempt_failed(index, error.to_string(), false, ctx),
                    Ok(()) => self.succeed(index, outputs, ctx),
                }
            }
            Err((error, retryable)) => self.attempt_failed(index, error, retryable, ctx),
        }
        (RecordOutcome::Accepted, String::new())
    }

    fn succeed(&mut self, index: usize, outputs: prost_types::Struct, ctx: &mut Ctx) {
        self.outputs[index] = Some(from_struct(Some(&outputs)));
        let step = &mut self.steps[index];
        step.outputs = Some(outputs);
        step.progress = 1.0;
        self.trace
            .attempt_ended(&self.run, &self.steps[index], index, AttemptEnd::Succeeded);
        self.finish(index, StepState::Succeeded, String::new(), ctx);
        let released = self.release_dependants(index);
        self.advance(released, ctx);
    }

    /// A failed attempt that counts against the retry policy.
    fn attempt_failed(&mut self, index: usize, error: String, retryable: bool, ctx: &mut Ctx) {
        let failed = AttemptEnd::Failed(&error);
        self.trace
            .attempt_ended(&self.run, &self.steps[index], index, failed);
        let spec = &self.plan.compiled.steps[index];
        let step = &self.steps[index];
        let counted = step.attempt.saturating_sub(step.lost_attempts);
        if !spec.retry.should_retry(counted, retryable) {
            self.fail_step(index, error, ctx);
            return;
        }
        let delay = spec.retry.backoff(counted, rand::random::<f64>());
        let attempt = step.attempt;
        let due = ctx.after(delay);
        self.steps[index].error = format!(
            "attempt {attempt} failed: {error} (next attempt in {})",
            humanize(delay)
        );
        self.set_step_state(index, StepState::RetryWait, ctx);
        ctx.timers.schedule(
            due,
            Timer::RetryDue {
                run_id: self.id.clone(),
                step: index,
                attempt,
            },
        );
    }

    /// The worker of (step, attempt) was lost: a new attempt, not counted against the policy.
    pub fn attempt_lost(&mut self, index: usize, attempt: u32, reason: &str, ctx: &mut Ctx) {
        let step = &mut self.steps[index];
        if step.attempt != attempt || !is_active(step.state()) {
            return;
        }
        step.lost_attempts += 1;
        step.lost_in_a_row += 1;
        step.error = format!("attempt {attempt}: {reason}");
        let lost_in_a_row = step.lost_in_a_row;
        let lost = AttemptEnd::Lost(reason);
        self.trace
            .attempt_ended(&self.run, &self.steps[index], index, lost);
        let history = self.losses.entry(index).or_default();
        history.push(format!("attempt {attempt}: {reason}"));
        if history.len() > 5 {
            history.remove(0);
        }
        let cap = ctx.config.max_lost_attempts;
        if lost_in_a_row >= cap {
            // A task that takes its worker down every time (or a result that can never be
            // delivered) must not go round forever.
            let history = self.losses.remove(&index).unwrap_or_default();
            let error = format!(
                "lost {lost_in_a_row} attempts in a row (the limit is {cap}, \
                 --max-lost-attempts): {}",
                history.join("; ")
            );
            self.fail_step(index, error, ctx);
            return;
        }
        self.make_ready(index, ctx);
    }

    pub fn retry_due(&mut self, index: usize, attempt: u32, ctx: &mut Ctx) {
        let step = &self.steps[index];
        if step.state() == StepState::RetryWait && step.attempt == attempt {
            self.make_ready(index, ctx);
        }
    }

    pub fn timed_out(&mut self, index: usize, attempt: u32, ctx: &mut Ctx) {
        let step = &mut self.steps[index];
        if step.attempt != attempt || !is_active(step.state()) {
            return;
        }
        step.lost_in_a_row = 0;
        let step = &self.steps[index];
        let timeout = self.plan.compiled.steps[index].timeout.unwrap_or_default();
        let reason = format!("timed out after {}", humanize(timeout));
        // The worker keeps the slot until it answers the Cancel with a (stale) result.
        ctx.send(
            Arc::from(step.worker.as_str()),
            cancel_message(&step.task_id, attempt, &reason),
        );
        self.attempt_failed(index, reason, true, ctx);
    }

    fn fail_step(&mut self, index: usize, error: String, ctx: &mut Ctx) {
        self.finish(index, StepState::Failed, error.clone(), ctx);
        let step_id = self.steps[index].step_id.clone();
        if self.plan.compiled.spec.continue_on_failure {
            // Only what depends on the failed step is given up; other branches go on.
            let plan = self.plan.clone();
            let mut work = vec![index];
            while let Some(failed) = work.pop() {
                for &dependant in &plan.compiled.steps[failed].dependants {
                    if !is_terminal(self.steps[dependant].state()) {
                        let reason = format!("upstream step \"{step_id}\" failed");
                        self.finish(dependant, StepState::Cancelled, reason, ctx);
                        work.push(dependant);
                    }
                }
            }
            self.check_done(ctx);
        } else {
            let reason = format!("step \"{step_id}\" failed: {error}");
            self.stop(RunState::Failed, &reason, "", ctx);
        }
    }

    /// CancelRun, by `actor` (recorded on the CANCELLED event).
    pub fn cancel_by(&mut self, reason: &str, actor: &str, ctx: &mut Ctx) {
        let reason = if reason.is_empty() {
            "cancelled".to_owned()
        } else {
            format!("cancelled: {reason}")
        };
        self.run.cancelled_by = actor.to_owned();
        self.stop(RunState::Cancelled, &reason, actor, ctx);
    }

    /// Ends the run now: every unfinished step is cancelled, running ones get Cancel.
    fn stop(&mut self, state: RunState, reason: &str, actor: &str, ctx: &mut Ctx) {
        for index in 0..self.steps.len() {
            let step = &self.steps[index];
            if is_terminal(step.state()) {
                continue;
            }
            if is_active(step.state()) {
                ctx.send(
                    Arc::from(step.worker.as_str()),
                    cancel_message(&step.task_id, step.attempt, reason),
                );
                let cancelled = AttemptEnd::Cancelled(reason);
                self.trace.attempt_ended(&self.run, step, index, cancelled);
            }
            self.finish(index, StepState::Cancelled, reason.to_owned(), ctx);
        }
        self.set_run_state_by(state, reason.to_owned(), actor, ctx);
    }

    fn check_done(&mut self, ctx: &mut Ctx) {
        if self.run.state() != RunState::Running || self.unfinished > 0 {
            return;
        }
        let failed = self
            .steps
            .iter()
            .find(|step| matches!(step.state(), StepState::Failed | StepState::Cancelled));
        match failed {
            Some(step) => {
                let error = format!("step \"{}\" failed: {}", step.step_id, step.error);
                self.set_run_state(RunState::Failed, error, ctx);
            }
            None => self.set_run_state(RunState::Succeeded, String::new(), ctx),
        }
    }

    fn finish(&mut self, index: usize, state: StepState, error: String, ctx: &mut Ctx) {
        let step = &mut self.steps[index];
        step.error = error;
        step.finished_at = Some(now());
        self.set_step_state(index, state, ctx);
        self.trace.step_ended(&self.run, &self.steps[index], index);
    }

    fn set_step_state(&mut self, index: usize, state: StepState, ctx: &mut Ctx) {
        let step = &mut self.steps[index];
        match (is_terminal(step.state()), is_terminal(state)) {
            (false, true) => self.unfinished -= 1,
            (true, false) => self.unfinished += 1,
            _ => {}
        }
        // A step holds its shared resource while an attempt is assigned or running.
        if is_active(step.state()) != is_active(state) {
            let resource = &self.plan.compiled.steps[index].concurrency_key;
            if is_active(state) {
                ctx.admission.hold_resource(resource);
            } else {
                ctx.admission.release_resource(resource);
            }
        }
        step.state = state as i32;
        let event = run_event::Event::StepState(pb::StepStateChanged {
            step_id: step.step_id.clone(),
            state: state as i32,
            attempt: step.attempt,
            worker: if is_active(state) {
                step.worker.clone()
            } else {
                String::new()
            },
            // A READY step says why it waits (if no worker can take it), so a watcher sees it live.
            error: if state == StepState::Ready {
                step.waiting_reason.clone()
            } else {
                step.error.clone()
            },
        });
        self.mark(index, ctx);
        self.emit(event, ctx);
    }

    fn set_run_state(&mut self, state: RunState, error: String, ctx: &mut Ctx) {
        self.set_run_state_by(state, error, "", ctx);
    }

    /// A run-state change made by a principal's call (`actor`), or by the engine ("").
    fn set_run_state_by(&mut self, state: RunState, error: String, actor: &str, ctx: &mut Ctx) {
        self.run.state = state as i32;
        self.run.error = error.clone();
        if is_finished(state) {
            self.run.finished_at = Some(now());
            traces::run_ended(&self.run);
            if std::mem::take(&mut self.admitted) {
                ctx.admission.release(&self.buckets);
            }
        }
        self.emit(
            run_event::Event::RunState(pb::RunStateChanged {
                state: state as i32,
                error,
                actor: actor.to_owned(),
            }),
            ctx,
        );
    }

    fn mark(&mut self, index: usize, ctx: &mut Ctx) {
        if !self.step_dirty[index] {
            self.step_dirty[index] = true;
            self.dirty_steps.push(index);
        }
        ctx.touch(&self.id);
    }

    fn emit(&mut self, event: run_event::Event, ctx: &mut Ctx) {
        self.run.last_seq += 1;
        self.events.push(RunEvent {
            run_id: self.run.run_id.clone(),
            seq: self.run.last_seq,
            at: Some(now()),
            event: Some(event),
        });
        self.run_dirty = true;
        ctx.touch(&self.id);
    }

    /// Lets go of what this run holds in the engine (worker slots, resources, admission),
    /// without writing anything: its memory is about to be replaced by what the store holds.
    pub fn abandon(self, ctx: &mut Ctx) {
        for (index, step) in self.steps.iter().enumerate() {
            if is_active(step.state()) {
                ctx.workers
                    .release(&step.worker, &step.task_id, step.attempt);
                let resource = &self.plan.compiled.steps[index].concurrency_key;
                ctx.admission.release_resource(resource);
            }
        }
        if self.admitted {
            ctx.admission.release(&self.buckets);
        }
    }

    /// Moves this batch's changes into `out`: run row, then steps, then events.
    pub fn drain_mutations(&mut self, out: &mut Vec<Mutation>) {
        let put = |mutation| Mutation {
            mutation: Some(mutation),
        };
        if std::mem::take(&mut self.run_dirty) {
            out.push(put(mutation::Mutation::PutRun(self.run.clone())));
        }
        for index in self.dirty_steps.drain(..) {
            self.step_dirty[index] = false;
            out.push(put(mutation::Mutation::PutStep(self.steps[index].clone())));
        }
        out.extend(
            self.events
                .drain(..)
                .map(|event| put(mutation::Mutation::AppendEvent(event))),
        );
    }
}

fn marker_line(text: String) -> pb::LogLine {
    pb::LogLine {
        at: Some(now()),
        level: "warn".into(),
        text,
    }
}

fn steps_unfinished(steps: &[Step]) -> usize {
    steps
        .iter()
        .filter(|step| !is_terminal(step.state()))
        .count()
}

fn state_name(state: StepState) -> &'static str {
    state.as_str_name().trim_start_matches("STEP_STATE_")
}

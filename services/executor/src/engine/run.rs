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
use prost::Message as _;
use serde_json::{Map, Value as Json};

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
}

impl RunEntry {
    /// A new run, RUNNING when `admitted` (the caller then starts it), else QUEUED.
    pub fn create(
        plan: Arc<Plan>,
        inputs: Map<String, Json>,
        idempotency_key: String,
        tags: HashMap<String, String>,
        priority: i32,
        admitted: bool,
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
                    ctx.workers
                        .sessions
                        .entry(instance.clone())
                        .or_insert_with(|| super::Session::new(instance.clone(), now));
                    ctx.workers.hold(&instance, task_id, attempt, slots);
                    let resource = &entry.plan.compiled.steps[index].concurrency_key;
                    ctx.admission.hold_resource(resource);
                    ctx.timers
                        .schedule(now + ctx.config.lease, Timer::Lease { instance });
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
    pub fn retry(&mut self, ctx: &mut Ctx) {
        for index in 0..self.steps.len() {
            let step = &mut self.steps[index];
            if step.state() == StepState::Succeeded {
                continue;
            }
            step.state = StepState::Pending as i32;
            step.lost_attempts = step.attempt;
            step.error.clear();
            step.worker.clear();
            step.outputs = None;
            step.progress = 0.0;
            step.progress_message.clear();
            step.finished_at = None;
            self.mark(index, ctx);
        }
        self.recount_waiting();
        self.unfinished = steps_unfinished(&self.steps);
        // Back through admission like a new run; the engine queues it.
        self.set_run_state(RunState::Queued, String::new(), ctx);
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
            if spec.when.is_some() {
                match spec.evaluate_when(&self.inputs, &upstream) {
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
            let inputs = match spec.evaluate_inputs(&self.inputs, &upstream) {
                Ok(inputs) => map_to_struct(&inputs),
                Err(error) => {
                    self.fail_step(index, error.to_string(), ctx);
                    continue;
                }
            };
            let size = inputs.encoded_len();
            if size > ctx.config.max_payload_bytes {
                let error = format!(
                    "inputs of step \"{}\" are {size} bytes, over the {}-byte payload limit",
                    spec.id, ctx.config.max_payload_bytes
                );
                self.fail_step(index, error, ctx);
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
        step.progress = 0.0;
        step.progress_message.clear();
        self.set_step_state(index, StepState::Ready, ctx);
        self.enqueue(index, ctx);
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
        step.task_version = version.to_owned();
        self.set_step_state(index, StepState::Assigned, ctx);
        let spec = &self.plan.compiled.steps[index];
        let step = &self.steps[index];
        ctx.workers
            .hold(instance, step.task_id.clone(), attempt, spec.slots);
        let deadline = spec.timeout.map(|timeout| {
            ctx.timers.schedule(
                ctx.now + timeout,
                Timer::AttemptTimeout {
                    run_id: self.id.clone(),
                    step: index,
                    attempt,
                },
            );
            (SystemTime::now() + timeout).into()
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
        let step = &mut self.steps[index];
        step.progress = fraction;
        step.progress_message = progress.message.clone();
        let event = run_event::Event::StepProgress(pb::StepProgress {
            step_id: step.step_id.clone(),
            attempt: step.attempt,
            fraction,
            message: progress.message,
            metrics: progress.metrics,
        });
        self.mark(index, ctx);
        self.emit(event, ctx);
    }

    pub fn log(&mut self, index: usize, log: pb::TaskLog, ctx: &mut Ctx) {
        let step = &self.steps[index];
        let event = run_event::Event::StepLog(pb::StepLog {
            step_id: step.step_id.clone(),
            attempt: step.attempt,
            lines: log.lines,
        });
        self.emit(event, ctx);
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
        match result {
            Ok(outputs) => {
                let size = outputs.encoded_len();
                if size > ctx.config.max_payload_bytes {
                    let error = format!(
                        "output of step \"{}\" is {size} bytes, over the {}-byte payload limit",
                        step.step_id, ctx.config.max_payload_bytes
                    );
                    self.attempt_failed(index, error, false, ctx);
                } else {
                    self.succeed(index, outputs, ctx);
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
        self.steps[index].error = format!(
            "attempt {attempt} failed: {error} (next attempt in {})",
            humanize(delay)
        );
        self.set_step_state(index, StepState::RetryWait, ctx);
        ctx.timers.schedule(
            ctx.now + delay,
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
        step.error = format!("attempt {attempt}: {reason}");
        let lost = AttemptEnd::Lost(reason);
        self.trace
            .attempt_ended(&self.run, &self.steps[index], index, lost);
        self.make_ready(index, ctx);
    }

    pub fn retry_due(&mut self, index: usize, attempt: u32, ctx: &mut Ctx) {
        let step = &self.steps[index];
        if step.state() == StepState::RetryWait && step.attempt == attempt {
            self.make_ready(index, ctx);
        }
    }

    pub fn timed_out(&mut self, index: usize, attempt: u32, ctx: &mut Ctx) {
        let step = &self.steps[index];
        if step.attempt != attempt || !is_active(step.state()) {
            return;
        }
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
            self.stop(RunState::Failed, &reason, ctx);
        }
    }

    /// CancelRun.
    pub fn cancel(&mut self, reason: &str, ctx: &mut Ctx) {
        let reason = if reason.is_empty() {
            "cancelled".to_owned()
        } else {
            format!("cancelled: {reason}")
        };
        self.stop(RunState::Cancelled, &reason, ctx);
    }

    /// Ends the run now: every unfinished step is cancelled, running ones get Cancel.
    fn stop(&mut self, state: RunState, reason: &str, ctx: &mut Ctx) {
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
        self.set_run_state(state, reason.to_owned(), ctx);
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
            error: step.error.clone(),
        });
        self.mark(index, ctx);
        self.emit(event, ctx);
    }

    fn set_run_state(&mut self, state: RunState, error: String, ctx: &mut Ctx) {
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

fn steps_unfinished(steps: &[Step]) -> usize {
    steps
        .iter()
        .filter(|step| !is_terminal(step.state()))
        .count()
}

fn state_name(state: StepState) -> &'static str {
    state.as_str_name().trim_start_matches("STEP_STATE_")
}

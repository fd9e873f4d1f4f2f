//! OpenTelemetry spans of the run lifecycle: one span per run, per step and per attempt.
//!
//! The engine is one task that advances thousands of runs at once, so these spans are not tied
//! to tokio tasks or to `tracing` spans: each is built when it ends, with the start and end
//! times the engine saw. Their ids are derived, not random, so every piece can be named
//! without remembering it, across executor restarts too:
//!
//! - trace id: the run id (a UUID is 16 bytes, as a trace id is), so a run is one trace — or,
//!   when SubmitRun's caller sent a W3C `traceparent` (`Run.traceparent`), the caller's trace
//!   id, so the run continues the backend's request;
//! - run span: derived from the run id; the root, or a child of the caller's span;
//! - step span: derived from (run id, step id); its parent is the run span;
//! - attempt span: derived from (run id, step id, attempt); its parent is the step span. It is
//!   the span id of the attempt's `Assign.traceparent`, so the spans that step code makes on
//!   the worker are its children.
//!
//! An attempt spans Assign to result (or loss, timeout, cancel); a step spans its first READY
//! to its end, retries and backoffs included; a run spans creation to its end. Those end late,
//! so work in flight shows as phase spans, each exported the moment its phase ends: `queued`
//! (READY to Assign, child of the step span) and `dispatched` (Assign to the worker's Started,
//! child of the attempt span). A step stuck running shows both; one stuck in its queue shows
//! the `queued` spans of its earlier attempts, if any. All of it is
//! derived from the run events a batch committed (`RunEntry::drain_mutations` feeds them to
//! [`Timeline::observe`]); no transition calls in here. Nothing runs unless [`traces_enabled`]:
//! without an exporter it costs an atomic load per batch of a run.
//!
//! After an executor restart the start of steps and attempts in flight is not known any more;
//! their spans then start when the current attempt started. A run retried with RetryRun emits
//! its run span (and the spans of re-run steps) again with the same ids.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::SystemTime;

use dagmesh_proto::v1::{Run, RunState, Step, StepState, StepStateChanged};
use dagmesh_runtime::telemetry::{traces_enabled, with_span_ids};
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _,
    TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};

use super::run::StepRef;

/// The W3C `traceparent` of an attempt: the run's trace, the attempt's span, sampled.
pub(crate) fn traceparent(run: &Run, step_id: &str, attempt: u32) -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        u128::from_be_bytes(run_trace_id(run)),
        attempt_span_id(&run.run_id, step_id, attempt)
    )
}

/// `text` if it is a valid W3C traceparent (version 00, lowercase hex, ids not all zero),
/// trimmed; None otherwise (an invalid one is ignored, as the W3C spec asks).
pub(crate) fn valid_traceparent(text: &str) -> Option<String> {
    parse_traceparent(text.trim()).map(|_| text.trim().to_owned())
}

/// (trace id, parent span id) of a valid traceparent.
fn parse_traceparent(text: &str) -> Option<([u8; 16], u64)> {
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if parts.next().is_some()
        || version != "00"
        || !hex(trace, 32)
        || !hex(span, 16)
        || !hex(flags, 2)
    {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let span = u64::from_str_radix(span, 16).ok()?;
    (trace != 0 && span != 0).then_some((trace.to_be_bytes(), span))
}

/// The trace a run's spans belong to: its caller's, or its own (the run id).
fn run_trace_id(run: &Run) -> [u8; 16] {
    parse_traceparent(&run.traceparent)
        .map_or_else(|| trace_id_bytes(&run.run_id), |(trace, _)| trace)
}

/// Whether spans are made at all (an exporter is set up).
pub(crate) fn enabled() -> bool {
    traces_enabled()
}

/// How an attempt ended.
enum AttemptEnd<'a> {
    Succeeded,
    Failed(&'a str),
    /// Its worker was lost; the step goes on with a new attempt.
    Lost(&'a str),
    Cancelled(&'a str),
}

/// The spans of one run, derived from the events its transitions emitted (see
/// [`Timeline::observe`]), never called from inside a transition. It keeps what the spans need
/// that the step rows do not: when each step became ready, when its attempt was assigned and to
/// whom, and the state each step was last seen in. Empty (no allocation) while traces are off.
#[derive(Default)]
pub(crate) struct Timeline {
    step_start: HashMap<StepRef, SystemTime>,
    /// When the current attempt was queued (READY), for its `queued` phase span.
    queued_at: HashMap<StepRef, SystemTime>,
    attempt_start: HashMap<StepRef, SystemTime>,
    seen: HashMap<StepRef, Seen>,
}

/// The state, attempt and worker a step was last seen in.
struct Seen {
    state: StepState,
    attempt: u32,
    worker: String,
}

fn is_active(state: StepState) -> bool {
    matches!(state, StepState::Assigned | StepState::Running)
}

impl Timeline {
    /// A task read back from the store ASSIGNED or RUNNING (its attempt span starts then).
    pub fn recovered(&mut self, at: StepRef, step: &Step) {
        if traces_enabled() {
            self.seen.insert(
                at,
                Seen {
                    state: step.state(),
                    attempt: step.attempt,
                    worker: step.worker.clone(),
                },
            );
        }
    }

    /// Step `at` (`step`: its row as the batch left it) changed state, at `when`. Ends the
    /// attempt span of a task that stops being assigned or running in its attempt, starts one
    /// at ASSIGNED, starts the step span at its first READY, and ends the step span when the
    /// step ends.
    pub fn observe(
        &mut self,
        run: &Run,
        step: &Step,
        at: StepRef,
        is_task: bool,
        change: &StepStateChanged,
        when: SystemTime,
    ) {
        let state = change.state();
        let before = self.seen.insert(
            at,
            Seen {
                state,
                attempt: change.attempt,
                worker: change.worker.clone(),
            },
        );
        if is_task
            && let Some(before) = before
            && is_active(before.state)
            && (!is_active(state) || change.attempt != before.attempt)
        {
            let end = match state {
                _ if change.attempt != before.attempt => AttemptEnd::Lost(&step.error),
                StepState::Succeeded => AttemptEnd::Succeeded,
                StepState::Failed | StepState::RetryWait => AttemptEnd::Failed(&change.error),
                StepState::Cancelled => AttemptEnd::Cancelled(&change.error),
                _ => AttemptEnd::Lost(&step.error),
            };
            self.attempt_ended(run, step, at, (before.attempt, &before.worker), end, when);
        }
        match state {
            StepState::Ready => {
                self.step_start.entry(at).or_insert(when);
                self.queued_at.insert(at, when);
            }
            StepState::Assigned => {
                self.attempt_start.insert(at, when);
                if let Some(queued) = self.queued_at.remove(&at) {
                    let name = format!("queued {}", step.step_id);
                    let mut attributes = common(run, step);
                    attributes.push(KeyValue::new("dagmesh.attempt", i64::from(change.attempt)));
                    attributes.push(KeyValue::new("dagmesh.worker", change.worker.clone()));
                    emit(Emit {
                        name,
                        kind: SpanKind::Internal,
                        run,
                        span_id: phase_span_id(
                            &run.run_id,
                            &step.step_id,
                            change.attempt,
                            "queued",
                        ),
                        parent: Some(step_span_id(&run.run_id, &step.step_id)),
                        start: queued,
                        end: when,
                        attributes,
                        status: Status::Unset,
                    });
                }
            }
            StepState::Running if is_task => {
                if let Some(&assigned) = self.attempt_start.get(&at) {
                    let mut attributes = common(run, step);
                    attributes.push(KeyValue::new("dagmesh.attempt", i64::from(change.attempt)));
                    attributes.push(KeyValue::new("dagmesh.worker", change.worker.clone()));
                    emit(Emit {
                        name: format!("dispatched {}", step.step_id),
                        kind: SpanKind::Internal,
                        run,
                        span_id: phase_span_id(
                            &run.run_id,
                            &step.step_id,
                            change.attempt,
                            "dispatched",
                        ),
                        parent: Some(attempt_span_id(&run.run_id, &step.step_id, change.attempt)),
                        start: assigned,
                        end: when,
                        attributes,
                        status: Status::Unset,
                    });
                }
            }
            StepState::Succeeded
            | StepState::Failed
            | StepState::Skipped
            | StepState::Cancelled => {
                self.seen.remove(&at);
                self.queued_at.remove(&at);
                self.step_ended(run, step, at, when);
            }
            _ => {}
        }
    }

    /// Attempt `attempt` of `step`, held by `worker`, ended.
    fn attempt_ended(
        &mut self,
        run: &Run,
        step: &Step,
        at: StepRef,
        (attempt, worker): (u32, &str),
        end: AttemptEnd<'_>,
        now: SystemTime,
    ) {
        let start = self
            .attempt_start
            .remove(&at)
            .or_else(|| started_at(step))
            .unwrap_or(now);
        let (state, status) = match end {
            AttemptEnd::Succeeded => ("succeeded", Status::Unset),
            AttemptEnd::Failed(error) => ("failed", Status::error(error.to_owned())),
            AttemptEnd::Lost(error) => ("lost", Status::error(error.to_owned())),
            AttemptEnd::Cancelled(_) => ("cancelled", Status::Unset),
        };
        let mut attributes = common(run, step);
        let task_name = step
            .task
            .split_once('@')
            .map_or(step.task.as_str(), |t| t.0);
        attributes.extend([
            KeyValue::new("dagmesh.attempt", i64::from(attempt)),
            KeyValue::new("dagmesh.worker", worker.to_owned()),
            KeyValue::new("dagmesh.task", format!("{task_name}@{}", step.task_version)),
            KeyValue::new("dagmesh.state", state),
        ]);
        if let AttemptEnd::Cancelled(reason) = end {
            attributes.push(KeyValue::new("dagmesh.error", reason.to_owned()));
        }
        emit(Emit {
            name: format!("attempt {} #{attempt}", step.step_id),
            kind: SpanKind::Client,
            run,
            span_id: attempt_span_id(&run.run_id, &step.step_id, attempt),
            parent: Some(step_span_id(&run.run_id, &step.step_id)),
            start,
            end: now,
            attributes,
            status,
        });
    }

    /// Step `at` reached a terminal state (its attempts, if any, ended before).
    fn step_ended(&mut self, run: &Run, step: &Step, at: StepRef, now: SystemTime) {
        let start = self
            .step_start
            .remove(&at)
            .or_else(|| started_at(step))
            .unwrap_or(now);
        let state = step.state();
        let mut attributes = common(run, step);
        attributes.extend([
            KeyValue::new("dagmesh.task", step.task.clone()),
            KeyValue::new("dagmesh.attempts", i64::from(step.attempt)),
            KeyValue::new(
                "dagmesh.state",
                state_name(state.as_str_name(), "STEP_STATE_"),
            ),
        ]);
        if !step.worker.is_empty() {
            attributes.push(KeyValue::new("dagmesh.worker", step.worker.clone()));
        }
        let status = if state == StepState::Failed {
            Status::error(step.error.clone())
        } else {
            if !step.error.is_empty() {
                attributes.push(KeyValue::new("dagmesh.error", step.error.clone()));
            }
            Status::Unset
        };
        emit(Emit {
            name: format!("step {}", step.step_id),
            kind: SpanKind::Internal,
            run,
            span_id: step_span_id(&run.run_id, &step.step_id),
            parent: Some(run_span_id(&run.run_id)),
            start,
            end: now,
            attributes,
            status,
        });
    }
}

/// `run` reached a terminal state, at `now`.
pub(crate) fn run_ended(run: &Run, now: SystemTime) {
    let start = run
        .created_at
        .and_then(|at| SystemTime::try_from(at).ok())
        .unwrap_or(now);
    let state = run.state();
    let mut attributes = vec![
        KeyValue::new("dagmesh.run_id", run.run_id.clone()),
        KeyValue::new("dagmesh.workflow", run.workflow.clone()),
        KeyValue::new("dagmesh.workflow_version", i64::from(run.workflow_version)),
        KeyValue::new(
            "dagmesh.state",
            state_name(state.as_str_name(), "RUN_STATE_"),
        ),
    ];
    let status = if state == RunState::Failed {
        Status::error(run.error.clone())
    } else {
        if !run.error.is_empty() {
            attributes.push(KeyValue::new("dagmesh.error", run.error.clone()));
        }
        Status::Unset
    };
    emit(Emit {
        name: format!("run {}", run.workflow),
        kind: SpanKind::Internal,
        run,
        span_id: run_span_id(&run.run_id),
        // A run submitted with the caller's traceparent is a child of the caller's span.
        parent: parse_traceparent(&run.traceparent).map(|(_, caller)| caller),
        start,
        end: now,
        attributes,
        status,
    });
}

struct Emit<'a> {
    name: String,
    kind: SpanKind,
    run: &'a Run,
    span_id: u64,
    parent: Option<u64>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
}

fn emit(span: Emit<'_>) {
    static TRACER: OnceLock<BoxedTracer> = OnceLock::new();
    let tracer = TRACER.get_or_init(|| {
        global::tracer_with_scope(
            InstrumentationScope::builder("dagmesh-executor")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
    });
    let trace_id = TraceId::from_bytes(run_trace_id(span.run));
    let parent = match span.parent {
        Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            SpanId::from(parent),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    let builder = SpanBuilder::from_name(span.name)
        .with_kind(span.kind)
        .with_start_time(span.start.min(span.end))
        .with_attributes(span.attributes);
    let mut otel = with_span_ids(trace_id, SpanId::from(span.span_id), || {
        tracer.build_with_context(builder, &parent)
    });
    otel.set_status(span.status);
    otel.end_with_timestamp(span.end);
}

fn common(run: &Run, step: &Step) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(10);
    attributes.extend([
        KeyValue::new("dagmesh.run_id", run.run_id.clone()),
        KeyValue::new("dagmesh.workflow", run.workflow.clone()),
        KeyValue::new("dagmesh.step_id", step.step_id.clone()),
    ]);
    attributes
}

fn started_at(step: &Step) -> Option<SystemTime> {
    step.started_at.and_then(|at| SystemTime::try_from(at).ok())
}

fn state_name(name: &'static str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

/// The run id's 16 UUID bytes (run ids are UUIDv7); any other id is hashed to 16 bytes.
fn trace_id_bytes(run_id: &str) -> [u8; 16] {
    match uuid::Uuid::parse_str(run_id) {
        Ok(uuid) if !uuid.is_nil() => *uuid.as_bytes(),
        _ => {
            let high = hash(&[b"trace-high", run_id.as_bytes()]);
            let low = hash(&[b"trace-low", run_id.as_bytes()]);
            ((u128::from(high) << 64) | u128::from(low)).to_be_bytes()
        }
    }
}

fn run_span_id(run_id: &str) -> u64 {
    hash(&[b"run", run_id.as_bytes()])
}

fn step_span_id(run_id: &str, step_id: &str) -> u64 {
    hash(&[b"step", run_id.as_bytes(), step_id.as_bytes()])
}

/// A phase span (`queued`, `dispatched`) of an attempt.
fn phase_span_id(run_id: &str, step_id: &str, attempt: u32, phase: &str) -> u64 {
    hash(&[
        phase.as_bytes(),
        run_id.as_bytes(),
        step_id.as_bytes(),
        &attempt.to_be_bytes(),
    ])
}

fn attempt_span_id(run_id: &str, step_id: &str, attempt: u32) -> u64 {
    hash(&[
        b"attempt",
        run_id.as_bytes(),
        step_id.as_bytes(),
        &attempt.to_be_bytes(),
    ])
}

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finish to spread it), never 0: span ids
/// must stay the same across builds and restarts, which `std`'s hasher does not promise.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        // The length keeps ("ab", "c") apart from ("a", "bc").
        for byte in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= u64::from(*byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_names_the_run_trace_and_the_attempt_span() {
        let run_id = "01890a5d-ac96-774b-bcce-b302099a8057";
        let run = Run {
            run_id: run_id.into(),
            ..Run::default()
        };
        let parent = traceparent(&run, "mesh", 2);
        let parts: Vec<&str> = parent.split('-').collect();
        assert_eq!(parts.len(), 4, "{parent}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], "01890a5dac96774bbcceb302099a8057");
        assert_eq!(
            parts[2],
            format!("{:016x}", attempt_span_id(run_id, "mesh", 2))
        );
        assert_eq!(parts[3], "01");
        // Deterministic, and distinct per attempt, step and kind of span.
        assert_eq!(parent, traceparent(&run, "mesh", 2));
        // A caller's traceparent puts the run in the caller's trace.
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = Run {
            traceparent: caller.into(),
            ..run.clone()
        };
        assert!(
            traceparent(&traced, "mesh", 2).starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(valid_traceparent(bad), None, "{bad}");
        }
        assert_eq!(valid_traceparent(caller).as_deref(), Some(caller));
        let ids = [
            attempt_span_id(run_id, "mesh", 1),
            attempt_span_id(run_id, "mesh", 2),
            attempt_span_id(run_id, "mesh2", 1),
            step_span_id(run_id, "mesh"),
            run_span_id(run_id),
        ];
        for (i, a) in ids.iter().enumerate() {
            assert_ne!(*a, 0);
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}

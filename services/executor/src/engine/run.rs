//! One active run in memory: its step table, the outputs that feed later steps, and what
//! changed in the current batch. Every change marks the step or run dirty and appends an event;
//! the engine turns those into one commit.
//!
//! The step table holds one slot per step of the plan and, under a map step, one slot per item
//! of its `for_each` list; a [`StepRef`] names a slot the same way across reloads (see "The run
//! machine" in ARCHITECTURE.md).

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
use super::traces::{self, Timeline};
use super::{Asked, Ctx, Origin, QueuedTask, Shared, cancel_message, humanize};
use crate::plans::Plan;
use dagmesh_spec::StepKind;

pub(crate) fn is_active(state: StepState) -> bool {
    matches!(state, StepState::Assigned | StepState::Running)
}

fn is_terminal(state: StepState) -> bool {
    matches!(
        state,
        StepState::Succeeded | StepState::Failed | StepState::Skipped | StepState::Cancelled
    )
}

/// An item that has been started and has not ended: it counts against `max_parallel`.
fn is_started(state: StepState) -> bool {
    matches!(
        state,
        StepState::Ready | StepState::Assigned | StepState::Running | StepState::RetryWait
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

/// A step of a run: step `spec` of the plan, or item `item` of the map step `spec`. Stable for
/// the life of the run (items are never removed), so timers and queued tasks carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StepRef {
    spec: u32,
    item: u32,
}

impl StepRef {
    const NO_ITEM: u32 = u32::MAX;

    pub fn step(spec: usize) -> Self {
        StepRef {
            spec: spec as u32,
            item: Self::NO_ITEM,
        }
    }

    pub fn item(spec: usize, item: usize) -> Self {
        StepRef {
            spec: spec as u32,
            item: item as u32,
        }
    }

    /// The plan step: the step itself, or the map step of an item.
    pub fn spec(self) -> usize {
        self.spec as usize
    }

    fn item_index(self) -> Option<usize> {
        (self.item != Self::NO_ITEM).then_some(self.item as usize)
    }
}

/// Splits an item's step id `extract[17]` into `("extract", 17)`.
pub(crate) fn parse_item_key(step_id: &str) -> Option<(&str, usize)> {
    let (base, rest) = step_id.split_once('[')?;
    let digits = rest.strip_suffix(']')?;
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None; // one spelling per item
    }
    Some((base, digits.parse().ok()?))
}

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

/// One step of the table.
struct Slot {
    row: Step,
    /// Outputs as JSON once it succeeded, the variable downstream expressions read: an object
    /// for a task, the list of its items' outputs for a map.
    output: Option<Json>,
    /// The attempt whose result was recorded, to tell a duplicate from a stale result.
    recorded_attempt: u32,
    dirty: bool,
    /// A map step once expanded.
    map: Option<Box<MapState>>,
}

impl Slot {
    fn new(row: Step) -> Self {
        Slot {
            row,
            output: None,
            recorded_attempt: 0,
            dirty: false,
            map: None,
        }
    }
}

/// The items of an expanded map step.
#[derive(Default)]
struct MapState {
    items: Vec<Slot>,
    /// Items waiting for room under `max_parallel`, in item order.
    pending: VecDeque<u32>,
    /// Items started and not ended (READY, ASSIGNED, RUNNING, RETRY_WAIT).
    started: u32,
    /// Items not ended.
    unfinished: u32,
}

impl MapState {
    /// Recounts from the items' states (after recovery or a retry).
    fn recount(&mut self) {
        self.pending = self
            .items
            .iter()
            .enumerate()
            .filter(|(_, item)| item.row.state() == StepState::Pending)
            .map(|(i, _)| i as u32)
            .collect();
        self.started = self
            .items
            .iter()
            .filter(|item| is_started(item.row.state()))
            .count() as u32;
        self.unfinished = self
            .items
            .iter()
            .filter(|item| !is_terminal(item.row.state()))
            .count() as u32;
    }
}

pub(crate) struct RunEntry {
    pub id: Arc<str>,
    /// The run row; its `steps` field stays empty (steps live in `steps`).
    pub run: Run,
    pub plan: Arc<Plan>,
    /// One slot per plan step, in plan order; items live under their map step.
    steps: Vec<Slot>,
    inputs: Map<String, Json>,
    /// Per plan step: how many of its needs have not finished yet.
    waiting_on: Vec<u32>,
    /// Plan steps not in a terminal state; the run is done when it reaches 0.
    unfinished: usize,
    /// Steps of the DAG (plan steps but the exit hooks) not in a terminal state; the hooks are
    /// released when it reaches 0.
    dag_unfinished: usize,
    /// Admission buckets this run occupies while admitted (see `Limits::buckets`).
    pub buckets: Vec<String>,
    /// Whether it holds its buckets (admitted and not yet ended).
    pub admitted: bool,
    dirty_steps: Vec<StepRef>,
    run_dirty: bool,
    events: Vec<RunEvent>,
    trace: Timeline,
    /// What the step metrics need beyond the rows (see [`crate::metrics::Meter`]).
    meter: crate::metrics::Meter<StepRef>,
    /// The webhooks given at submit (`Run.notifications`), checked; the workflow's are in the
    /// plan.
    pub notifications: Vec<dagmesh_spec::notify::CompiledNotification>,
    /// Per step (only steps that reported): progress rate limiting, log caps, and why recent
    /// attempts were lost (the history a step fails with at the lost-attempt cap).
    progress: HashMap<StepRef, ProgressThrottle>,
    logs: HashMap<StepRef, LogBudget>,
    losses: HashMap<StepRef, Vec<String>>,
    /// A memoized resubmit: what the steps of the earlier run gave (not stored: a restart
    /// runs the rest of the steps instead of reusing them, which is always safe).
    pub memo: Option<Arc<Memo>>,
    /// Outputs of memoized steps that succeeded in this batch, stored with its commit.
    cache_writes: Vec<pb::CacheEntry>,
}

/// The steps that succeeded in the run a memoized resubmit reuses (`memoize_from`).
pub(crate) struct Memo {
    /// Step id -> what it ran with and gave.
    pub steps: HashMap<String, Memoized>,
}

pub(crate) struct Memoized {
    pub task: String,
    pub inputs: Option<prost_types::Struct>,
    pub outputs: Option<prost_types::Struct>,
    /// The run the outputs come from (the earlier run, or the one it reused them from).
    pub origin: String,
}

/// A new run id: a UUIDv7, so ids sort by creation time (and `created_after` filters by id).
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl RunEntry {
    /// A new run, RUNNING when `admitted` (the caller then starts it), else QUEUED.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a SubmitRun, each used once to build the run"
    )]
    pub fn create(
        run_id: String,
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
        let steps = plan
            .compiled
            .steps
            .iter()
            .map(|step| Slot::new(new_row(&run_id, &step.id, &step.task)))
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
        for index in 0..entry.steps.len() {
            entry.mark(StepRef::step(index), ctx);
        }
        entry.emit(
            run_event::Event::RunState(pb::RunStateChanged {
                state: state as i32,
                error: String::new(),
                actor: submitted_by,
                suspended: false,
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

    /// Rebuilds a run read from the store: the plan's steps, and the items of expanded map
    /// steps from their own rows. Assigned tasks are held for their worker, which keeps them if
    /// it reconnects within the lease. Fails (the caller quarantines the run) when the stored
    /// items of a map do not match its expansion.
    pub fn recover(mut run: Run, plan: Arc<Plan>, ctx: &mut Ctx) -> Result<Self, String> {
        let mut stored: HashMap<String, Step> = HashMap::new();
        let mut items: HashMap<usize, Vec<(usize, Step)>> = HashMap::new();
        for step in std::mem::take(&mut run.steps) {
            if let Some((base, item)) = parse_item_key(&step.step_id) {
                match plan.index.get(base) {
                    Some(&spec) if plan.compiled.steps[spec].for_each.is_some() => {
                        items.entry(spec).or_default().push((item, step));
                    }
                    _ => {
                        tracing::warn!(run_id = %run.run_id, step_id = %step.step_id, "ignoring a stored item of no map step of the plan");
                    }
                }
            } else {
                stored.insert(step.step_id.clone(), step);
            }
        }
        let mut steps: Vec<Slot> = plan
            .compiled
            .steps
            .iter()
            .map(|step| {
                Slot::new(
                    stored
                        .remove(&step.id)
                        .unwrap_or_else(|| new_row(&run.run_id, &step.id, &step.task)),
                )
            })
            .collect();
        for (spec, mut rows) in items {
            rows.sort_by_key(|(item, _)| *item);
            let slot = &mut steps[spec];
            let expected = slot.row.item_count as usize;
            let contiguous = rows.iter().enumerate().all(|(i, (item, _))| i == *item);
            if rows.len() != expected || !contiguous {
                return Err(format!(
                    "map step {:?} has {} stored items, expected items 0..{expected}",
                    slot.row.step_id,
                    rows.len()
                ));
            }
            let mut map = MapState {
                items: rows.into_iter().map(|(_, row)| Slot::new(row)).collect(),
                ..MapState::default()
            };
            map.recount();
            slot.map = Some(Box::new(map));
        }
        for (spec, slot) in steps.iter().enumerate() {
            if plan.compiled.steps[spec].for_each.is_some()
                && slot.row.item_count > 0
                && slot.map.is_none()
            {
                return Err(format!(
                    "map step {:?} has none of its {} stored items",
                    slot.row.step_id, slot.row.item_count
                ));
            }
        }
        let inputs = from_struct(run.inputs.as_ref());
        let mut entry = Self::new(run, plan, steps, inputs);
        let running = entry.run.state() == RunState::Running;
        let mut pending = Vec::new();
        for at in entry.all_refs() {
            let is_map = at.item_index().is_none()
                && entry.plan.compiled.steps[at.spec()].for_each.is_some();
            let slot = entry.slot_mut(at);
            if slot.row.state() == StepState::Succeeded {
                slot.output = Some(stored_output(&slot.row, is_map));
                slot.recorded_attempt = slot.row.attempt;
            }
            if !running {
                continue;
            }
            let state = entry.row(at).state();
            let child = matches!(
                entry.plan.compiled.steps[at.spec()].kind,
                StepKind::Child { .. }
            );
            match state {
                StepState::Pending if at.item_index().is_none() => pending.push(at.spec()),
                // Stopped before its child run was created: ask again (a child created is
                // committed with the step's `child_run_id`).
                StepState::Running if child && !is_map && entry.row(at).child_run_id.is_empty() => {
                    entry.request_child(at, ctx);
                }
                StepState::Running if child && !is_map => {}
                StepState::Running
                    if !entry.is_task(at) && entry.steps[at.spec()].map.is_none() =>
                {
                    // A sleep or approval: its deadline, if any, from the stored wall-clock time.
                    let row = entry.row(at);
                    if let Some(wake_at) = row.wake_at {
                        let delay = SystemTime::try_from(wake_at)
                            .ok()
                            .and_then(|at| at.duration_since(SystemTime::now()).ok())
                            .unwrap_or_default();
                        entry.schedule_wake(at, row.attempt, delay, ctx);
                    }
                }
                _ if !entry.is_task(at) => {}
                StepState::Ready => entry.enqueue(at, ctx),
                StepState::RetryWait => ctx.schedule(
                    ctx.now,
                    Timer::RetryDue {
                        run_id: entry.id.clone(),
                        step: at,
                        attempt: entry.row(at).attempt,
                    },
                ),
                StepState::Assigned | StepState::Running => entry.hold_recovered(at, ctx),
                _ => {}
            }
        }
        entry.recount_waiting();
        if running {
            for spec in 0..entry.steps.len() {
                if entry.steps[spec].row.state() == StepState::Running
                    && entry.steps[spec].map.is_some()
                {
                    entry.start_items(spec, ctx);
                }
            }
            entry.advance(pending, ctx);
        }
        Ok(entry)
    }

    /// An ASSIGNED/RUNNING task read back from the store: held for its worker's instance in a
    /// (possibly disconnected) session.
    fn hold_recovered(&mut self, at: StepRef, ctx: &mut Ctx) {
        self.trace.recovered(at, &slot_of(&self.steps, at).row);
        let spec = &self.plan.compiled.steps[at.spec()];
        let step = &self.slot(at).row;
        let instance: Arc<str> = Arc::from(step.worker.as_str());
        // Only the principal that held the attempt may resume the session.
        let principal =
            (!step.worker_principal.is_empty()).then(|| Arc::from(step.worker_principal.as_str()));
        ctx.shared.push(Shared::Hold {
            instance: instance.clone(),
            principal,
            task_id: step.task_id.clone(),
            attempt: step.attempt,
            slots: spec.slots,
        });
        ctx.hold_resource(&spec.concurrency_key);
        ctx.schedule(ctx.after(ctx.config.lease), Timer::Lease { instance });
    }

    fn new(run: Run, plan: Arc<Plan>, steps: Vec<Slot>, inputs: Map<String, Json>) -> Self {
        let waiting_on = plan
            .compiled
            .steps
            .iter()
            .map(|step| step.needs.len() as u32)
            .collect();
        let unfinished = steps
            .iter()
            .filter(|slot| !is_terminal(slot.row.state()))
            .count();
        let dag_unfinished = steps
            .iter()
            .zip(&plan.compiled.steps)
            .filter(|(slot, spec)| spec.hook.is_none() && !is_terminal(slot.row.state()))
            .count();
        let notifications = Self::checked_notifications(&run);
        Self {
            id: Arc::from(run.run_id.as_str()),
            run,
            plan,
            steps,
            inputs,
            waiting_on,
            unfinished,
            dag_unfinished,
            buckets: Vec::new(),
            admitted: false,
            dirty_steps: Vec::new(),
            run_dirty: false,
            events: Vec::new(),
            trace: Timeline::default(),
            meter: Default::default(),
            notifications,
            progress: HashMap::new(),
            logs: HashMap::new(),
            losses: HashMap::new(),
            memo: None,
            cache_writes: Vec::new(),
        }
    }

    /// The cache key of a memoized step (or item) whose inputs are `row.inputs`: from its
    /// `cache.key` when it has one, else from its inputs. `None` when the step is not memoized.
    fn cache_key(
        &self,
        spec: &dagmesh_spec::CompiledStep,
        row: &Step,
        upstream: &HashMap<String, Json>,
        item: Option<(&Json, usize)>,
        budget: &dagmesh_spec::EvalBudget,
    ) -> Result<Option<String>, String> {
        if spec.cache.is_none() {
            return Ok(None);
        }
        let value = spec
            .evaluate_cache_key_with(&self.inputs, upstream, item, budget)
            .map_err(|error| error.to_string())?
            .unwrap_or_else(|| Json::Object(from_struct(row.inputs.as_ref())));
        Ok(Some(dagmesh_spec::cache_key(&spec.task, &value)))
    }

    /// What a memoized resubmit reuses for `row` (same step id, task and evaluated inputs).
    fn memoized(&self, row: &Step) -> Option<&Memoized> {
        let memoized = self.memo.as_ref()?.steps.get(&row.step_id)?;
        (memoized.task == row.task && memoized.inputs == row.inputs).then_some(memoized)
    }

    fn recount_waiting(&mut self) {
        for (index, step) in self.plan.compiled.steps.iter().enumerate() {
            self.waiting_on[index] = step
                .needs
                .iter()
                .filter(|&&need| {
                    !matches!(
                        self.steps[need].row.state(),
                        StepState::Succeeded | StepState::Skipped
                    )
                })
                .count() as u32;
        }
    }

    // ---- the table ----

    fn slot(&self, at: StepRef) -> &Slot {
        slot_of(&self.steps, at)
    }

    fn slot_mut(&mut self, at: StepRef) -> &mut Slot {
        let slot = &mut self.steps[at.spec()];
        match at.item_index() {
            None => slot,
            Some(item) => &mut slot.map.as_mut().expect("an item's map is expanded").items[item],
        }
    }

    fn row(&self, at: StepRef) -> &Step {
        &self.slot(at).row
    }

    fn row_mut(&mut self, at: StepRef) -> &mut Step {
        &mut self.slot_mut(at).row
    }

    /// Whether task `at` still waits in a ready queue in `attempt` (queue entries of a
    /// cancelled run or an older attempt are stale).
    pub fn is_queued(&self, at: StepRef, attempt: u32) -> bool {
        self.has(at) && {
            let row = self.row(at);
            row.state() == StepState::Ready && row.attempt == attempt
        }
    }

    /// The step `step_id` names (a task id's second half), if this run has it.
    pub fn step_ref(&self, step_id: &str) -> Option<StepRef> {
        self.find(step_id)
    }

    /// Whether `at` names a slot of this run (a timer or queued task may outlive a reload
    /// that lost an expansion).
    pub fn has(&self, at: StepRef) -> bool {
        match (self.steps.get(at.spec()), at.item_index()) {
            (Some(_), None) => true,
            (Some(slot), Some(item)) => slot.map.as_ref().is_some_and(|m| item < m.items.len()),
            (None, _) => false,
        }
    }

    /// Whether `at` is handed to workers (a plain task step or an item), not a map, a sleep or
    /// an approval.
    fn is_task(&self, at: StepRef) -> bool {
        let spec = &self.plan.compiled.steps[at.spec()];
        spec.kind == StepKind::Task && (at.item_index().is_some() || spec.for_each.is_none())
    }

    /// Every slot: each plan step, then (for a map) its items.
    fn all_refs(&self) -> Vec<StepRef> {
        let mut refs = Vec::with_capacity(self.steps.len());
        for (spec, slot) in self.steps.iter().enumerate() {
            refs.push(StepRef::step(spec));
            if let Some(map) = &slot.map {
                refs.extend((0..map.items.len()).map(|item| StepRef::item(spec, item)));
            }
        }
        refs
    }

    /// The task step a worker message names by its step id (`thumbs`, `extract[3]`); `None`
    /// for a map step itself (it is no task) or a step this run does not have.
    pub fn resolve(&self, step_id: &str) -> Option<StepRef> {
        self.find(step_id).filter(|&at| self.is_task(at))
    }

    /// The slot of step id `step_id` (a step or an item), of any kind.
    fn find(&self, step_id: &str) -> Option<StepRef> {
        let at = match self.plan.index.get(step_id) {
            Some(&spec) => StepRef::step(spec),
            None => {
                let (base, item) = parse_item_key(step_id)?;
                StepRef::item(*self.plan.index.get(base)?, item)
            }
        };
        self.has(at).then_some(at)
    }

    /// The current attempt of task `at`, if it is assigned or running, and who holds it.
    pub fn current_attempt(&self, at: StepRef) -> Option<(u32, &str)> {
        let row = self.row(at);
        is_active(row.state()).then_some((row.attempt, row.worker.as_str()))
    }

    /// The task id of a step (`<run_id>/<step key>`).
    pub fn task_id(&self, at: StepRef) -> &str {
        &self.row(at).task_id
    }

    /// (attempt, state) of a step.
    pub fn attempt_state(&self, at: StepRef) -> (u32, StepState) {
        let row = self.row(at);
        (row.attempt, row.state())
    }

    /// The route of a task step (shared by a map's items).
    pub fn route(&self, at: StepRef) -> &Arc<super::Route> {
        &self.plan.routes[at.spec()]
    }

    /// The READY task steps, with their step ids.
    pub fn ready_steps(&self) -> Vec<(StepRef, String)> {
        self.all_refs()
            .into_iter()
            .filter(|&at| self.is_task(at) && self.row(at).state() == StepState::Ready)
            .map(|at| (at, self.row(at).step_id.clone()))
            .collect()
    }

    pub fn snapshot(&self) -> Run {
        let mut steps = Vec::with_capacity(self.steps.len());
        for slot in &self.steps {
            steps.push(slot.row.clone());
            if let Some(map) = &slot.map {
                steps.extend(map.items.iter().map(|item| item.row.clone()));
            }
        }
        Run {
            steps,
            ..self.run.clone()
        }
    }

    // ---- moving the DAG ----

    /// Makes the steps without needs ready.
    pub fn start(&mut self, ctx: &mut Ctx) {
        let roots = (0..self.steps.len())
            .filter(|&step| self.waiting_on[step] == 0)
            .collect();
        self.advance(roots, ctx);
    }

    /// RetryRun: every step that did not succeed starts over; earlier attempts no longer count
    /// against the retry policy. A map keeps its expansion: its items that succeeded keep their
    /// outputs, the others start over. The run goes back to QUEUED for admission.
    pub fn retry(&mut self, actor: &str, from: Option<usize>, ctx: &mut Ctx) {
        // `from` and everything downstream of it run again, even what succeeded.
        let mut again = vec![false; self.steps.len()];
        let mut work: Vec<usize> = from.into_iter().collect();
        while let Some(index) = work.pop() {
            if std::mem::replace(&mut again[index], true) {
                continue;
            }
            work.extend(self.plan.compiled.steps[index].dependants.iter().copied());
        }
        for at in self.all_refs() {
            if again[at.spec()] {
                let step = self.row_mut(at);
                if step.state() == StepState::Succeeded {
                    step.lost_attempts = step.attempt; // the new attempt starts a fresh count
                    step.state = StepState::Failed as i32; // reset below like a failed step
                }
                if at.item_index().is_none()
                    && let Some(slot) = self.steps.get_mut(at.spec())
                {
                    slot.output = None;
                    slot.recorded_attempt = 0;
                }
            }
            // A map that succeeded stands with its list, tolerated failures included.
            let map_succeeded = at.item_index().is_some()
                && !again[at.spec()]
                && self.steps[at.spec()].row.state() == StepState::Succeeded;
            // Exit hooks run again after the retried run, whatever they did last time.
            let hook = self.plan.compiled.steps[at.spec()].hook.is_some();
            if (self.row(at).state() == StepState::Succeeded || map_succeeded) && !hook {
                continue;
            }
            let step = self.row_mut(at);
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
            step.waiting_for.clear();
            step.wake_at = None;
            step.child_run_id.clear();
            step.cached_from.clear();
            self.mark(at, ctx);
        }
        for slot in &mut self.steps {
            if let Some(map) = &mut slot.map {
                map.recount();
            }
        }
        self.recount_waiting();
        self.unfinished = self
            .steps
            .iter()
            .filter(|slot| !is_terminal(slot.row.state()))
            .count();
        self.dag_unfinished = self
            .steps
            .iter()
            .zip(&self.plan.compiled.steps)
            .filter(|(slot, spec)| spec.hook.is_none() && !is_terminal(slot.row.state()))
            .count();
        self.run.retried_by = actor.to_owned();
        self.run.cancelled_by.clear();
        // Back through admission like a new run; the engine queues it.
        self.set_run_state_by(RunState::Queued, String::new(), actor, ctx);
        self.run.finished_at = None;
    }

    /// Takes the plan steps in `work` whose needs are all done and decides: skip, fail, expand
    /// (a map) or ready.
    fn advance(&mut self, work: Vec<usize>, ctx: &mut Ctx) {
        let mut work: VecDeque<usize> = work.into();
        while let Some(index) = work.pop_front() {
            if self.run.state() != RunState::Running
                || self.steps[index].row.state() != StepState::Pending
                || self.waiting_on[index] != 0
            {
                continue;
            }
            let at = StepRef::step(index);
            let plan = self.plan.clone();
            let spec = &plan.compiled.steps[index];
            if let Some(hook) = spec.hook {
                if self.dag_unfinished > 0 {
                    continue; // released by `check_done` once the DAG has ended
                }
                let failed = self.dag_failed().is_some();
                if !hook.runs_after(failed) {
                    let reason = format!(
                        "the DAG {}; {} hooks run only when it {}",
                        if failed { "failed" } else { "succeeded" },
                        hook.field(),
                        if failed { "succeeds" } else { "fails" }
                    );
                    self.finish(at, StepState::Skipped, reason, ctx);
                    continue;
                }
            }
            if let Some(&skipped) = spec
                .needs
                .iter()
                .find(|&&need| self.steps[need].row.state() == StepState::Skipped)
            {
                let reason = format!("needs skipped step \"{}\"", self.steps[skipped].row.step_id);
                self.finish(at, StepState::Skipped, reason, ctx);
                work.extend(self.release_dependants(index));
                continue;
            }
            let upstream = if spec.when.is_some() || !spec.variables.is_empty() {
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
                        self.finish(at, StepState::Skipped, reason, ctx);
                        work.extend(self.release_dependants(index));
                        continue;
                    }
                    Err(error) => {
                        self.fail_step(at, error.to_string(), ctx);
                        continue;
                    }
                }
            }
            if spec.for_each.is_some() {
                if let Some(released) = self.expand(index, &upstream, &budget, ctx) {
                    work.extend(released);
                }
                continue;
            }
            let inputs = match spec.evaluate_inputs_with(&self.inputs, &upstream, &budget) {
                Ok(inputs) => map_to_struct(&inputs),
                Err(error) => {
                    self.fail_step(at, error.to_string(), ctx);
                    continue;
                }
            };
            let field = format!("steps.{}.inputs", spec.id);
            if let Err(error) = check_payload(&field, &inputs, ctx.config.max_payload_bytes) {
                self.fail_step(at, error.to_string(), ctx);
                continue;
            }
            self.steps[index].row.inputs = Some(inputs);
            // Exit hooks always run: they are about this run.
            if matches!(spec.kind, StepKind::Task | StepKind::Child { .. })
                && spec.hook.is_none()
                && let Some(memoized) = self.memoized(self.row(at))
            {
                let (outputs, origin) = (memoized.outputs.clone(), memoized.origin.clone());
                let step = self.row_mut(at);
                step.attempt += 1;
                step.started_at = Some(now());
                step.cached_from = origin;
                self.wait_succeeded(at, from_struct(outputs.as_ref()), ctx);
                continue;
            }
            match &spec.kind {
                StepKind::Task => {
                    let key = self.cache_key(spec, self.row(at), &upstream, None, &budget);
                    match key {
                        Ok(key) => self.row_mut(at).cache_key = key.unwrap_or_default(),
                        Err(error) => {
                            self.fail_step(at, error, ctx);
                            continue;
                        }
                    }
                    self.make_ready(at, ctx)
                }
                StepKind::Sleep(duration) => {
                    let until = SystemTime::now().checked_add(*duration);
                    let text = match until {
                        Some(until) => {
                            format!("sleep until {}", humantime::format_rfc3339_seconds(until))
                        }
                        None => "sleep".to_owned(),
                    };
                    self.start_wait(at, Some(*duration), text, ctx);
                }
                StepKind::Approval { message, timeout } => {
                    let text = if message.is_empty() {
                        "approval".to_owned()
                    } else {
                        format!("approval: {message}")
                    };
                    self.start_wait(at, *timeout, text, ctx);
                }
                StepKind::WaitFor { topic, timeout } => {
                    let text = format!("an event on topic {topic}");
                    self.start_wait(at, *timeout, text, ctx);
                }
                StepKind::Child { .. } => self.start_child(at, ctx),
            }
        }
        self.check_done(ctx);
    }

    /// A sleep or an approval starts waiting: RUNNING, with what it waits for and (with a
    /// deadline) when it wakes up, both stored so that the wait survives a restart.
    fn start_wait(
        &mut self,
        at: StepRef,
        deadline: Option<std::time::Duration>,
        waiting_for: String,
        ctx: &mut Ctx,
    ) {
        let step = self.row_mut(at);
        step.attempt += 1;
        step.started_at = Some(now());
        step.waiting_for = waiting_for.clone();
        step.progress_message = waiting_for.clone();
        step.wake_at = deadline
            .and_then(|d| SystemTime::now().checked_add(d))
            .map(Into::into);
        let attempt = step.attempt;
        self.set_step_state(at, StepState::Running, ctx);
        let update = pb::StepProgress {
            step_id: self.row(at).step_id.clone(),
            attempt,
            fraction: 0.0,
            message: waiting_for,
            metrics: HashMap::new(),
        };
        self.emit(run_event::Event::StepProgress(update), ctx);
        if let Some(delay) = deadline {
            self.schedule_wake(at, attempt, delay, ctx);
        }
    }

    fn schedule_wake(&self, at: StepRef, attempt: u32, delay: std::time::Duration, ctx: &mut Ctx) {
        ctx.schedule(
            ctx.after(delay),
            Timer::WaitDeadline {
                run_id: self.id.clone(),
                step: at,
                attempt,
            },
        );
    }

    /// A waiting step's deadline passed: a sleep is over, an approval gave up.
    pub fn wait_deadline(&mut self, at: StepRef, attempt: u32, ctx: &mut Ctx) {
        if !self.has(at) {
            return;
        }
        let step = self.row(at);
        if step.state() != StepState::Running || step.attempt != attempt || self.is_task(at) {
            return;
        }
        match &self.plan.compiled.steps[at.spec()].kind {
            StepKind::Sleep(duration) => {
                let mut outputs = Map::new();
                outputs.insert(
                    "slept".to_owned(),
                    Json::String(humantime::format_duration(*duration).to_string()),
                );
                self.wait_succeeded(at, outputs, ctx);
            }
            StepKind::Approval { timeout, .. } => {
                let after = timeout.map(humanize).unwrap_or_default();
                let error = format!("no approval within its timeout of {after}");
                self.row_mut(at).waiting_for.clear();
                self.fail_step(at, error, ctx);
            }
            StepKind::WaitFor { topic, timeout } => {
                let after = timeout.map(humanize).unwrap_or_default();
                let error = format!("no event on topic {topic} within its timeout of {after}");
                self.row_mut(at).waiting_for.clear();
                self.fail_step(at, error, ctx);
            }
            StepKind::Task | StepKind::Child { .. } => {}
        }
    }

    /// A step (or item) that ran no task succeeds with `outputs`.
    fn wait_succeeded(&mut self, at: StepRef, outputs: Map<String, Json>, ctx: &mut Ctx) {
        let slot = self.slot_mut(at);
        slot.row.outputs = Some(map_to_struct(&outputs));
        slot.row.waiting_for.clear();
        slot.row.progress = 1.0;
        slot.output = Some(Json::Object(outputs));
        self.finish(at, StepState::Succeeded, String::new(), ctx);
        if at.item_index().is_none() {
            let released = self.release_dependants(at.spec());
            self.advance(released, ctx);
        }
    }

    // ---- child workflows ----

    /// A child workflow step (or item) starts an attempt: RUNNING, and the engine is asked to
    /// start the child run (see `Asked::StartChild`); until it has, `child_run_id` is empty.
    fn start_child(&mut self, at: StepRef, ctx: &mut Ctx) {
        let StepKind::Child { workflow, version } = &self.plan.compiled.steps[at.spec()].kind
        else {
            return;
        };
        let (workflow, version) = (workflow.clone(), *version);
        let text = match version {
            Some(version) => format!("starting child workflow {workflow} version {version}"),
            None => format!("starting child workflow {workflow}"),
        };
        let step = self.row_mut(at);
        step.attempt += 1;
        step.started_at = Some(now());
        step.child_run_id.clear();
        step.waiting_for = text.clone();
        step.progress_message = text;
        self.set_step_state(at, StepState::Running, ctx);
        self.request_child(at, ctx);
    }

    fn request_child(&mut self, at: StepRef, ctx: &mut Ctx) {
        let StepKind::Child { workflow, version } = &self.plan.compiled.steps[at.spec()].kind
        else {
            return;
        };
        let step = self.row(at);
        ctx.asked.push(Asked::StartChild {
            parent: self.id.clone(),
            step: at,
            attempt: step.attempt,
            workflow: workflow.clone(),
            version: *version,
        });
    }

    /// Whether attempt `attempt` of `at` still waits for its child run to be started.
    pub fn wants_child(&self, at: StepRef, attempt: u32) -> bool {
        self.has(at) && {
            let step = self.row(at);
            self.run.state() == RunState::Running
                && step.state() == StepState::Running
                && step.attempt == attempt
                && step.child_run_id.is_empty()
                && matches!(
                    self.plan.compiled.steps[at.spec()].kind,
                    StepKind::Child { .. }
                )
        }
    }

    /// The step id of `at`, e.g. `scan` or `scan[3]`.
    pub fn step_key(&self, at: StepRef) -> String {
        self.row(at).step_id.clone()
    }

    /// The run inputs for the child of `at`: the step's evaluated inputs.
    pub fn child_inputs(&self, at: StepRef) -> Map<String, Json> {
        from_struct(self.row(at).inputs.as_ref())
    }

    /// The child run of (`at`, `attempt`) was created (in this batch, so in the same commit).
    pub fn child_started(&mut self, at: StepRef, child: &Run, ctx: &mut Ctx) {
        let text = format!(
            "child run {} ({} version {})",
            child.run_id, child.workflow, child.workflow_version
        );
        let step = self.row_mut(at);
        step.child_run_id = child.run_id.clone();
        step.waiting_for = text.clone();
        step.progress_message = text.clone();
        let attempt = step.attempt;
        self.mark(at, ctx);
        let update = pb::StepProgress {
            step_id: self.row(at).step_id.clone(),
            attempt,
            fraction: 0.0,
            message: text,
            metrics: HashMap::new(),
        };
        self.emit(run_event::Event::StepProgress(update), ctx);
    }

    /// The child run of (`at`, `attempt`) could not be started: the step fails with `error`.
    pub fn child_not_started(&mut self, at: StepRef, attempt: u32, error: String, ctx: &mut Ctx) {
        if self.wants_child(at, attempt) {
            self.row_mut(at).waiting_for.clear();
            self.fail_step(at, error, ctx);
        }
    }

    /// Child run `child` of step `step_id` ended: the step ends with it (it is ignored when
    /// the step no longer waits for that child, e.g. it was cancelled).
    pub fn child_ended(&mut self, step_id: &str, child: &RunEntry, ctx: &mut Ctx) {
        let Some(at) = self.find(step_id) else {
            return;
        };
        let step = self.row(at);
        if step.state() != StepState::Running || step.child_run_id != child.run.run_id {
            return;
        }
        let child_id = child.run.run_id.clone();
        self.row_mut(at).waiting_for.clear();
        match child.run.state() {
            RunState::Succeeded => {
                let outputs = child.outputs_by_step();
                let field = format!("steps.{step_id}.outputs");
                match check_payload(
                    &field,
                    &map_to_struct(&outputs),
                    ctx.config.max_payload_bytes,
                ) {
                    Ok(()) => self.wait_succeeded(at, outputs, ctx),
                    Err(error) => {
                        let error =
                            format!("the outputs of child run {child_id} are too large: {error}");
                        self.fail_step(at, error, ctx);
                    }
                }
            }
            RunState::Cancelled => {
                let error = format!("child run {child_id} was {}", child.run.error);
                self.fail_step(at, error, ctx);
            }
            _ => {
                let error = format!("child run {child_id} failed: {}", child.run.error);
                self.fail_step(at, error, ctx);
            }
        }
    }

    /// What a finished run gives the step that started it: `{step id: outputs}` for every
    /// step of its DAG that succeeded (a map as its list).
    fn outputs_by_step(&self) -> Map<String, Json> {
        self.steps
            .iter()
            .zip(&self.plan.compiled.steps)
            .filter(|(slot, spec)| spec.hook.is_none() && slot.row.state() == StepState::Succeeded)
            .map(|(slot, spec)| {
                let output = slot.output.clone().unwrap_or(Json::Object(Map::new()));
                (spec.id.clone(), output)
            })
            .collect()
    }

    /// The child runs this run's steps wait for now.
    pub fn running_children(&self) -> Vec<String> {
        self.all_refs()
            .into_iter()
            .map(|at| self.row(at))
            .filter(|step| step.state() == StepState::Running && !step.child_run_id.is_empty())
            .map(|step| step.child_run_id.clone())
            .collect()
    }

    /// Whether any step of this run can wait for an event (most runs: no, and are skipped).
    pub fn waits_for_events(&self) -> bool {
        self.plan
            .compiled
            .steps
            .iter()
            .any(|spec| matches!(spec.kind, StepKind::WaitFor { .. }))
    }

    /// DeliverEvent: every step of this run waiting for an event on `topic` whose filter accepts
    /// `payload` succeeds with the payload as its outputs. Returns their task ids. A filter that
    /// cannot be evaluated does not match (and is logged).
    pub fn deliver_event(
        &mut self,
        topic: &str,
        payload: &Map<String, Json>,
        ctx: &mut Ctx,
    ) -> Vec<String> {
        let mut resumed = Vec::new();
        if self.run.state() != RunState::Running {
            return resumed;
        }
        let event = Json::Object(payload.clone());
        let budget = dagmesh_spec::EvalBudget {
            max_payload_bytes: ctx.config.max_payload_bytes,
            ..dagmesh_spec::EvalBudget::default()
        };
        for index in 0..self.steps.len() {
            let plan = self.plan.clone();
            let spec = &plan.compiled.steps[index];
            let StepKind::WaitFor { topic: wanted, .. } = &spec.kind else {
                continue;
            };
            if wanted != topic || self.steps[index].row.state() != StepState::Running {
                continue;
            }
            let upstream = self.upstream_outputs(index);
            match spec.event_matches(&self.inputs, &upstream, &event, &budget) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::info!(run_id = %self.id, step = %spec.id, %error, "event filter failed; the event does not match");
                    continue;
                }
            }
            let at = StepRef::step(index);
            resumed.push(self.row(at).task_id.clone());
            self.wait_succeeded(at, payload.clone(), ctx);
        }
        resumed
    }

    /// ApproveStep: an approval step that waits succeeds with `outputs` (plus `approved_by`
    /// and the comment), or fails naming who denied it and why. The error says why not when the
    /// step is not an approval or does not wait.
    pub fn approve(
        &mut self,
        step_id: &str,
        approve: bool,
        mut outputs: Map<String, Json>,
        comment: &str,
        actor: &str,
        ctx: &mut Ctx,
    ) -> Result<(), String> {
        let Some(&spec) = self.plan.index.get(step_id) else {
            return Err(format!("step_id: run {} has no step {step_id:?}", self.id));
        };
        let at = StepRef::step(spec);
        if !matches!(
            self.plan.compiled.steps[spec].kind,
            StepKind::Approval { .. }
        ) {
            return Err(format!("step {step_id:?} is not an approval step"));
        }
        let state = self.row(at).state();
        if state != StepState::Running {
            return Err(format!(
                "step {step_id:?} does not wait for an approval (it is {})",
                state_name(state)
            ));
        }
        let actor = if actor.is_empty() { "anonymous" } else { actor };
        if !approve {
            let mut error = format!("denied by {actor}");
            if !comment.is_empty() {
                error.push_str(&format!(": {comment}"));
            }
            self.row_mut(at).waiting_for.clear();
            self.fail_step(at, error, ctx);
            return Ok(());
        }
        outputs.insert("approved_by".to_owned(), Json::String(actor.to_owned()));
        if !comment.is_empty() {
            outputs.insert("comment".to_owned(), Json::String(comment.to_owned()));
        }
        check_payload(
            "outputs",
            &map_to_struct(&outputs),
            ctx.config.max_payload_bytes,
        )
        .map_err(|error| error.to_string())?;
        self.wait_succeeded(at, outputs, ctx);
        Ok(())
    }

    /// SuspendRun / ResumeRun. While suspended nothing of the run is handed to a worker (queued
    /// entries are skipped at dispatch); resuming queues its READY tasks again.
    pub fn set_suspended(&mut self, suspended: bool, reason: &str, actor: &str, ctx: &mut Ctx) {
        if self.run.suspended == suspended {
            return;
        }
        self.run.suspended = suspended;
        let error = if suspended && !reason.is_empty() {
            format!("suspended: {reason}")
        } else {
            String::new()
        };
        self.emit(
            run_event::Event::RunState(pb::RunStateChanged {
                state: self.run.state,
                error,
                actor: actor.to_owned(),
                suspended,
            }),
            ctx,
        );
        for child in self.running_children() {
            ctx.asked.push(Asked::SuspendChild {
                child,
                suspend: suspended,
                reason: format!(
                    "parent run {} {}",
                    self.id,
                    if suspended { "suspended" } else { "resumed" }
                ),
                actor: actor.to_owned(),
            });
        }
        if !suspended {
            for at in self.all_refs() {
                if self.is_task(at) && self.row(at).state() == StepState::Ready {
                    self.enqueue(at, ctx);
                }
            }
        }
    }

    /// A map step whose needs are done: evaluates its list and every item's inputs, adds the
    /// items to the table (all written in this batch's commit) and starts the first
    /// `max_parallel` of them. A map expanded before (the run was retried) keeps its items.
    /// Returns the dependants released when the map finished at once (an empty list).
    fn expand(
        &mut self,
        index: usize,
        upstream: &HashMap<String, Json>,
        budget: &dagmesh_spec::EvalBudget,
        ctx: &mut Ctx,
    ) -> Option<Vec<usize>> {
        let at = StepRef::step(index);
        if self.steps[index].map.is_some() {
            self.steps[index].row.started_at.get_or_insert_with(now);
            self.set_step_state(at, StepState::Running, ctx);
            self.start_items(index, ctx);
            return None;
        }
        let plan = self.plan.clone();
        let spec = &plan.compiled.steps[index];
        let list = match spec.evaluate_for_each_with(&self.inputs, upstream, budget) {
            Ok(list) => list,
            Err(error) => {
                self.fail_step(at, error.to_string(), ctx);
                return None;
            }
        };
        let mut items = Vec::with_capacity(list.len());
        let mut broken = Vec::new();
        let mut reused = Vec::new();
        {
            let mut evaluator = spec.item_inputs(&self.inputs, upstream, budget);
            for (item, element) in list.iter().enumerate() {
                let step_id = format!("{}[{item}]", spec.id);
                let mut row = new_row(&self.run.run_id, &step_id, &spec.task);
                row.map_step = spec.id.clone();
                row.item_index = item as u32;
                let checked = evaluator
                    .evaluate(element, item)
                    .map_err(|error| error.to_string())
                    .map(|inputs| map_to_struct(&inputs))
                    .and_then(|inputs| {
                        let field = format!("steps.{step_id}.inputs");
                        check_payload(&field, &inputs, budget.max_payload_bytes)
                            .map(|()| inputs)
                            .map_err(|error| error.to_string())
                    });
                match checked {
                    Ok(inputs) => {
                        row.inputs = Some(inputs);
                        match self.cache_key(spec, &row, upstream, Some((element, item)), budget) {
                            Ok(key) => row.cache_key = key.unwrap_or_default(),
                            Err(error) => {
                                row.state = StepState::Failed as i32;
                                row.error = error;
                                row.finished_at = Some(now());
                                broken.push(item);
                            }
                        }
                        if row.state() == StepState::Pending
                            && matches!(spec.kind, StepKind::Task | StepKind::Child { .. })
                            && spec.hook.is_none()
                            && let Some(memoized) = self.memoized(&row)
                        {
                            row.attempt = 1;
                            row.state = StepState::Succeeded as i32;
                            row.outputs = memoized.outputs.clone();
                            row.cached_from = memoized.origin.clone();
                            row.progress = 1.0;
                            row.started_at = Some(now());
                            row.finished_at = row.started_at;
                            reused.push(item);
                        }
                    }
                    Err(error) => {
                        row.state = StepState::Failed as i32;
                        row.error = error;
                        row.finished_at = Some(now());
                        broken.push(item);
                    }
                }
                let mut slot = Slot::new(row);
                if slot.row.state() == StepState::Succeeded {
                    slot.output = Some(stored_output(&slot.row, false));
                }
                items.push(slot);
            }
        }
        let count = items.len();
        let mut map = MapState {
            items,
            ..MapState::default()
        };
        map.recount();
        let slot = &mut self.steps[index];
        slot.map = Some(Box::new(map));
        slot.row.item_count = count as u32;
        slot.row.started_at = Some(now());
        for item in 0..count {
            self.mark(StepRef::item(index, item), ctx);
        }
        self.set_step_state(at, StepState::Running, ctx);
        let mut ended: Vec<usize> = broken.iter().chain(&reused).copied().collect();
        ended.sort_unstable();
        for item in ended {
            let item = StepRef::item(index, item);
            let step = self.row(item);
            let event = run_event::Event::StepState(pb::StepStateChanged {
                step_id: step.step_id.clone(),
                state: step.state,
                attempt: step.attempt,
                worker: String::new(),
                error: step.error.clone(),
                item_count: 0,
                cached_from: step.cached_from.clone(),
            });
            self.emit(event, ctx);
        }
        if let Some(&first) = broken.first()
            && !spec.continue_on_item_failure
        {
            self.map_item_failed(index, first, ctx);
            return None;
        }
        self.start_items(index, ctx);
        self.complete_map_if_done(index, ctx)
    }

    /// Starts pending items of map `index` while `max_parallel` allows.
    fn start_items(&mut self, index: usize, ctx: &mut Ctx) {
        let limit = match self.plan.compiled.steps[index].max_parallel {
            0 => u32::MAX,
            limit => limit,
        };
        loop {
            let Some(map) = self.steps[index].map.as_mut() else {
                return;
            };
            if map.started >= limit {
                return;
            }
            let Some(item) = map.pending.pop_front() else {
                return;
            };
            let at = StepRef::item(index, item as usize);
            if self.row(at).state() == StepState::Pending {
                if self.is_task(at) {
                    self.make_ready(at, ctx);
                } else {
                    self.start_child(at, ctx);
                }
            }
        }
    }

    /// An item of map `index` ended (any terminal state): start the next one, fail the map
    /// (an item failed and failures are not tolerated), or finish the map when it was the last.
    fn item_ended(&mut self, at: StepRef, ctx: &mut Ctx) {
        let index = at.spec();
        if self.run.state() != RunState::Running
            || self.steps[index].row.state() != StepState::Running
        {
            return; // the map is being stopped or already ended
        }
        let tolerated = self.plan.compiled.steps[index].continue_on_item_failure;
        if self.row(at).state() == StepState::Failed && !tolerated {
            let item = at.item_index().unwrap_or_default();
            self.map_item_failed(index, item, ctx);
            return;
        }
        self.start_items(index, ctx);
        if let Some(released) = self.complete_map_if_done(index, ctx) {
            self.advance(released, ctx);
        }
    }

    /// Item `item` of map `index` failed for good and the map does not tolerate it: the map
    /// fails naming the item, and its other items are cancelled.
    fn map_item_failed(&mut self, index: usize, item: usize, ctx: &mut Ctx) {
        let failed = self.row(StepRef::item(index, item));
        let error = format!("item {item} ({}) failed: {}", failed.step_id, failed.error);
        // Failing the map cancels its other items (see `finish`).
        self.fail_step(StepRef::step(index), error, ctx);
    }

    /// Cancels every item of map `index` that has not ended.
    fn cancel_items(&mut self, index: usize, reason: &str, ctx: &mut Ctx) {
        let count = self.steps[index].map.as_ref().map_or(0, |m| m.items.len());
        for item in 0..count {
            self.cancel_step(StepRef::item(index, item), reason, ctx);
        }
        if let Some(map) = self.steps[index].map.as_mut() {
            map.pending.clear();
        }
    }

    /// When every item of map `index` has ended: its outputs become the list of the items'
    /// outputs (a tolerated failure as `{"error": ...}`) and it succeeds. Returns the
    /// dependants released, for the caller to advance.
    fn complete_map_if_done(&mut self, index: usize, ctx: &mut Ctx) -> Option<Vec<usize>> {
        let map = self.steps[index].map.as_ref()?;
        if map.unfinished > 0 || self.steps[index].row.state() != StepState::Running {
            return None;
        }
        let list: Vec<Json> = map
            .items
            .iter()
            .map(|item| match item.row.state() {
                StepState::Succeeded => item.output.clone().unwrap_or(Json::Object(Map::new())),
                _ => serde_json::json!({ "error": item.row.error }),
            })
            .collect();
        let list = Json::Array(list);
        let mut stored = Map::new();
        stored.insert("items".to_owned(), list);
        let outputs = map_to_struct(&stored);
        let at = StepRef::step(index);
        let field = format!("steps.{}.outputs", self.steps[index].row.step_id);
        if let Err(error) = check_payload(&field, &outputs, ctx.config.max_payload_bytes) {
            self.fail_step(
                at,
                format!("the list of its items' outputs is too large: {error}"),
                ctx,
            );
            return None;
        }
        let slot = &mut self.steps[index];
        slot.output = stored.remove("items");
        slot.row.outputs = Some(outputs);
        slot.row.progress = 1.0;
        self.finish(at, StepState::Succeeded, String::new(), ctx);
        Some(self.release_dependants(index))
    }

    /// Outputs of the upstream steps this step's expressions read (not every ancestor's: a
    /// join after a wide fan-out would clone them all for each evaluation).
    fn upstream_outputs(&self, index: usize) -> HashMap<String, Json> {
        let spec = &self.plan.compiled.steps[index];
        let mut outputs: HashMap<String, Json> = HashMap::new();
        if spec.hook.is_some() && spec.variables.iter().any(|v| v == dagmesh_spec::RUN_VAR) {
            outputs.insert(dagmesh_spec::RUN_VAR.to_owned(), self.run_variable());
        }
        outputs.extend(self.step_outputs(index));
        outputs
    }

    /// `run` in an exit hook's expressions: the DAG's outcome and what failed.
    fn run_variable(&self) -> Json {
        let failed: Vec<Json> = self
            .steps
            .iter()
            .zip(&self.plan.compiled.steps)
            .filter(|(slot, spec)| {
                spec.hook.is_none()
                    && matches!(slot.row.state(), StepState::Failed | StepState::Cancelled)
            })
            .map(|(slot, _)| serde_json::json!({ "step_id": slot.row.step_id, "error": slot.row.error }))
            .collect();
        let (state, error) = match self.dag_failed() {
            Some(error) => ("FAILED", error),
            None => ("SUCCEEDED", String::new()),
        };
        serde_json::json!({
            "run_id": self.run.run_id,
            "workflow": self.run.workflow,
            "state": state,
            "error": error,
            "failed_steps": failed,
        })
    }

    /// Why the DAG failed (its first failed or cancelled step), if it did.
    fn dag_failed(&self) -> Option<String> {
        self.steps
            .iter()
            .zip(&self.plan.compiled.steps)
            .find(|(slot, spec)| {
                spec.hook.is_none()
                    && matches!(slot.row.state(), StepState::Failed | StepState::Cancelled)
            })
            .map(|(slot, _)| format!("step \"{}\" failed: {}", slot.row.step_id, slot.row.error))
    }

    fn step_outputs(&self, index: usize) -> HashMap<String, Json> {
        self.plan.compiled.steps[index]
            .variables
            .iter()
            .filter(|name| {
                name.as_str() != dagmesh_spec::INPUTS_VAR && name.as_str() != dagmesh_spec::RUN_VAR
            })
            .map(|id| {
                let outputs = self
                    .plan
                    .index
                    .get(id)
                    .and_then(|&i| self.steps[i].output.clone());
                (id.clone(), outputs.unwrap_or(Json::Object(Map::new())))
            })
            .collect()
    }

    /// Dependants of plan step `index` whose needs are now all finished.
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

    // ---- tasks and attempts ----

    /// A new attempt: READY and queued for a worker.
    fn make_ready(&mut self, at: StepRef, ctx: &mut Ctx) {
        let route = self.plan.routes[at.spec()].clone();
        let step = self.row_mut(at);
        step.attempt += 1;
        step.worker.clear();
        step.worker_principal.clear();
        step.progress = 0.0;
        step.progress_message.clear();
        let attempt = step.attempt;
        // Say at once when no connected worker can take it (GetRun recomputes it live).
        step.waiting_reason = ctx.workers.waiting_reason(&route).unwrap_or_default();
        self.set_step_state(at, StepState::Ready, ctx);
        let key = &self.row(at).cache_key;
        if key.is_empty() {
            self.enqueue(at, ctx);
        } else {
            // Queued for a worker only on a miss (see `cache_answer`).
            ctx.asked.push(Asked::CacheLookup {
                run: self.id.clone(),
                step: at,
                attempt,
                key: key.clone(),
            });
        }
        if let Some(timeout) = self.plan.compiled.steps[at.spec()].schedule_to_start_timeout {
            ctx.schedule(
                ctx.after(timeout),
                Timer::ScheduleToStart {
                    run_id: self.id.clone(),
                    step: at,
                    attempt,
                },
            );
        }
    }

    /// The store's answer for the cache key of (step, attempt): a hit succeeds the step with
    /// the stored outputs, naming the run they came from; a miss queues it for a worker.
    pub fn cache_answer(
        &mut self,
        at: StepRef,
        attempt: u32,
        entry: Option<pb::CacheEntry>,
        ctx: &mut Ctx,
    ) {
        if !self.has(at) {
            return;
        }
        let step = self.row(at);
        if step.state() != StepState::Ready || step.attempt != attempt {
            return;
        }
        // A row read back from the store is checked like any input: a damaged or oversized
        // entry is a miss (the step runs), never outputs past the limits.
        let usable = |entry: &pb::CacheEntry| {
            let outputs = entry.outputs.clone().unwrap_or_default();
            let field = format!("cache entry {:?}", entry.key);
            let fits = check_payload(&field, &outputs, ctx.config.max_payload_bytes);
            if let Err(error) = &fits {
                tracing::warn!(run_id = %self.id, %error, "unusable step cache entry; the step runs");
            }
            entry.key == step.cache_key
                && fits.is_ok()
                && entry.run_id.len() <= dagmesh_proto::limits::MAX_NAME_LEN
        };
        let Some(entry) = entry.filter(usable) else {
            self.enqueue(at, ctx);
            return;
        };
        let outputs = from_struct(entry.outputs.as_ref());
        let step = self.row_mut(at);
        step.cached_from = entry.run_id;
        step.started_at = Some(now());
        step.waiting_reason.clear();
        self.wait_succeeded(at, outputs, ctx);
    }

    /// The schedule-to-start timeout of (step, attempt) passed: fail the step if it still
    /// waits for a worker, naming what no worker offered.
    pub fn schedule_to_start_expired(
        &mut self,
        at: StepRef,
        attempt: u32,
        waiting_reason: Option<String>,
        ctx: &mut Ctx,
    ) {
        if !self.has(at) {
            return;
        }
        let step = self.row(at);
        if step.state() != StepState::Ready || step.attempt != attempt {
            return;
        }
        let timeout = self.plan.compiled.steps[at.spec()]
            .schedule_to_start_timeout
            .unwrap_or_default();
        let mut error = format!(
            "no worker took the step within its schedule_to_start_timeout of {}",
            humanize(timeout)
        );
        if let Some(reason) = waiting_reason {
            error.push_str(&format!(" ({reason})"));
        }
        self.fail_step(at, error, ctx);
    }

    fn enqueue(&mut self, at: StepRef, ctx: &mut Ctx) {
        let task = QueuedTask {
            origin: Origin::Local {
                run_id: self.id.clone(),
                step: at,
            },
            attempt: self.row(at).attempt,
            queued_at: ctx.now,
        };
        let priority = self.plan.compiled.steps[at.spec()].priority;
        ctx.enqueue(&self.plan.routes[at.spec()], priority, task);
    }

    /// Assigns attempt `attempt` of `at` to `instance`; false when the step is no longer ready
    /// in that attempt (a stale queue entry or grant), or the run is suspended.
    pub fn assign(
        &mut self,
        at: StepRef,
        attempt: u32,
        instance: &Arc<str>,
        version: &str,
        ctx: &mut Ctx,
    ) -> bool {
        if !self.has(at) {
            return false;
        }
        let principal = ctx
            .workers
            .sessions
            .get(instance)
            .and_then(|session| session.principal.as_deref())
            .unwrap_or_default()
            .to_owned();
        if self.run.suspended {
            return false; // ResumeRun queues its ready tasks again
        }
        let step = self.row_mut(at);
        if step.state() != StepState::Ready || step.attempt != attempt {
            return false; // a stale queue entry: the step was cancelled or requeued meanwhile
        }
        step.worker = instance.to_string();
        step.worker_principal = principal;
        step.task_version = version.to_owned();
        step.waiting_reason.clear();
        self.set_step_state(at, StepState::Assigned, ctx);
        let spec = &self.plan.compiled.steps[at.spec()];
        let step = &self.slot(at).row;
        ctx.shared.push(Shared::Hold {
            instance: instance.clone(),
            principal: None,
            task_id: step.task_id.clone(),
            attempt,
            slots: spec.slots,
        });
        let deadline = spec.timeout.and_then(|timeout| {
            ctx.schedule(
                ctx.after(timeout),
                Timer::AttemptTimeout {
                    run_id: self.id.clone(),
                    step: at,
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
            traceparent: traces::traceparent(&self.run, &step.step_id, attempt),
            slots: spec.slots,
        };
        ctx.send(instance.clone(), server_message::Message::Assign(assign));
        true
    }

    pub fn started(&mut self, at: StepRef, ctx: &mut Ctx) {
        if self.row(at).state() == StepState::Assigned {
            self.row_mut(at).started_at = Some(now());
            self.set_step_state(at, StepState::Running, ctx);
        }
    }

    pub fn progress(&mut self, at: StepRef, progress: pb::TaskProgress, ctx: &mut Ctx) {
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
        let step = &slot_of(&self.steps, at).row;
        let update = pb::StepProgress {
            step_id: step.step_id.clone(),
            attempt: step.attempt,
            fraction,
            message,
            metrics,
        };
        let throttle = self.progress.entry(at).or_default();
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
                self.emit_progress(at, update, ctx);
            }
            Some(next) => {
                throttle.pending = Some(update);
                if !std::mem::replace(&mut throttle.flush_scheduled, true) {
                    ctx.schedule(
                        next,
                        Timer::ProgressFlush {
                            run_id: self.id.clone(),
                            step: at,
                            attempt: step.attempt,
                        },
                    );
                }
            }
        }
    }

    /// Writes the latest progress held back by the rate limit, if the attempt is still on.
    pub fn flush_progress(&mut self, at: StepRef, attempt: u32, ctx: &mut Ctx) {
        let Some(throttle) = self.progress.get_mut(&at) else {
            return;
        };
        if throttle.attempt != attempt {
            return;
        }
        throttle.flush_scheduled = false;
        let Some(update) = throttle.pending.take() else {
            return;
        };
        let step = &slot_of(&self.steps, at).row;
        if step.attempt != attempt || !is_active(step.state()) {
            return;
        }
        throttle.last_emit = Some(ctx.now);
        self.emit_progress(at, update, ctx);
    }

    fn emit_progress(&mut self, at: StepRef, update: pb::StepProgress, ctx: &mut Ctx) {
        let step = self.row_mut(at);
        step.progress = update.fraction;
        step.progress_message = update.message.clone();
        self.mark(at, ctx);
        self.emit(run_event::Event::StepProgress(update), ctx);
    }

    /// Task log lines, capped per line, per message and per attempt; every cut is marked.
    pub fn log(&mut self, at: StepRef, log: pb::TaskLog, ctx: &mut Ctx) {
        let step = &slot_of(&self.steps, at).row;
        let attempt = step.attempt;
        let budget = self.logs.entry(at).or_default();
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
        at: StepRef,
        attempt: u32,
        instance: &str,
    ) -> (RecordOutcome, String) {
        let slot = self.slot(at);
        let step = &slot.row;
        if slot.recorded_attempt == attempt && step.attempt == attempt && step.worker == instance {
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
        at: StepRef,
        attempt: u32,
        result: Result<prost_types::Struct, (String, bool)>,
        ctx: &mut Ctx,
    ) -> (RecordOutcome, String) {
        let slot = self.slot(at);
        let step = &slot.row;
        if step.attempt != attempt || !is_active(step.state()) {
            if slot.recorded_attempt == attempt {
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
        let slot = self.slot_mut(at);
        slot.recorded_attempt = attempt;
        slot.row.lost_in_a_row = 0;
        // The last progress held back by the rate limit goes out before the result, so the
        // log ends with what the worker last said.
        if let Some(throttle) = self.progress.get_mut(&at)
            && throttle.attempt == attempt
            && let Some(update) = throttle.pending.take()
        {
            self.emit_progress(at, update, ctx);
        }
        match result {
            Ok(outputs) => {
                let field = format!("steps.{}.outputs", self.row(at).step_id);
                match check_payload(&field, &outputs, ctx.config.max_payload_bytes) {
                    Err(error) => self.attempt_failed(at, error.to_string(), false, ctx),
                    Ok(()) => self.succeed(at, outputs, ctx),
                }
            }
            Err((error, retryable)) => self.attempt_failed(at, error, retryable, ctx),
        }
        (RecordOutcome::Accepted, String::new())
    }

    fn succeed(&mut self, at: StepRef, outputs: prost_types::Struct, ctx: &mut Ctx) {
        let row = self.row(at);
        if !row.cache_key.is_empty()
            && let Some(cache) = &self.plan.compiled.steps[at.spec()].cache
        {
            let stored_at = SystemTime::now();
            self.cache_writes.push(pb::CacheEntry {
                key: row.cache_key.clone(),
                run_id: row.run_id.clone(),
                step_id: row.step_id.clone(),
                outputs: Some(outputs.clone()),
                stored_at: Some(stored_at.into()),
                expires_at: stored_at
                    .checked_add(cache.ttl)
                    .map(Into::into)
                    .or(Some(stored_at.into())),
            });
            ctx.touch(&self.id);
        }
        let slot = self.slot_mut(at);
        slot.output = Some(Json::Object(from_struct(Some(&outputs))));
        slot.row.outputs = Some(outputs);
        slot.row.progress = 1.0;
        self.finish(at, StepState::Succeeded, String::new(), ctx);
        if at.item_index().is_none() {
            let released = self.release_dependants(at.spec());
            self.advance(released, ctx);
        }
    }

    /// A failed attempt that counts against the retry policy.
    fn attempt_failed(&mut self, at: StepRef, error: String, retryable: bool, ctx: &mut Ctx) {
        let spec = &self.plan.compiled.steps[at.spec()];
        let step = self.row(at);
        let counted = step.attempt.saturating_sub(step.lost_attempts);
        if !spec.retry.should_retry(counted, retryable) {
            self.fail_step(at, error, ctx);
            return;
        }
        let delay = spec.retry.backoff(counted, rand::random::<f64>());
        let attempt = step.attempt;
        let due = ctx.after(delay);
        self.row_mut(at).error = format!(
            "attempt {attempt} failed: {error} (next attempt in {})",
            humanize(delay)
        );
        self.set_step_state(at, StepState::RetryWait, ctx);
        ctx.schedule(
            due,
            Timer::RetryDue {
                run_id: self.id.clone(),
                step: at,
                attempt,
            },
        );
    }

    /// The worker of (step, attempt) was lost: a new attempt, not counted against the policy.
    pub fn attempt_lost(&mut self, at: StepRef, attempt: u32, reason: &str, ctx: &mut Ctx) {
        let step = self.row_mut(at);
        if step.attempt != attempt || !is_active(step.state()) {
            return;
        }
        step.lost_attempts += 1;
        step.lost_in_a_row += 1;
        if let Some(metrics) = crate::metrics::get() {
            metrics.step_lost(crate::metrics::task_type(&step.task));
        }
        step.error = format!("attempt {attempt}: {reason}");
        let lost_in_a_row = step.lost_in_a_row;
        let history = self.losses.entry(at).or_default();
        history.push(format!("attempt {attempt}: {reason}"));
        if history.len() > 5 {
            history.remove(0);
        }
        let cap = ctx.config.max_lost_attempts;
        if lost_in_a_row >= cap {
            // A task that takes its worker down every time (or a result that can never be
            // delivered) must not go round forever.
            let history = self.losses.remove(&at).unwrap_or_default();
            let error = format!(
                "lost {lost_in_a_row} attempts in a row (the limit is {cap}, \
                 --max-lost-attempts): {}",
                history.join("; ")
            );
            self.fail_step(at, error, ctx);
            return;
        }
        self.make_ready(at, ctx);
    }

    pub fn retry_due(&mut self, at: StepRef, attempt: u32, ctx: &mut Ctx) {
        if !self.has(at) {
            return;
        }
        let step = self.row(at);
        if step.state() == StepState::RetryWait && step.attempt == attempt {
            self.make_ready(at, ctx);
        }
    }

    pub fn timed_out(&mut self, at: StepRef, attempt: u32, ctx: &mut Ctx) {
        if !self.has(at) {
            return;
        }
        let step = self.row_mut(at);
        if step.attempt != attempt || !is_active(step.state()) {
            return;
        }
        step.lost_in_a_row = 0;
        let step = self.row(at);
        let timeout = self.plan.compiled.steps[at.spec()]
            .timeout
            .unwrap_or_default();
        let reason = format!("timed out after {}", humanize(timeout));
        // The worker keeps the slot until it answers the Cancel with a (stale) result.
        ctx.send(
            Arc::from(step.worker.as_str()),
            cancel_message(&step.task_id, attempt, &reason),
        );
        self.attempt_failed(at, reason, true, ctx);
    }

    /// A step failed for good. An item tells its map; a plan step fails the run, or with the
    /// workflow's `continue_on_failure` cancels only what depends on it.
    fn fail_step(&mut self, at: StepRef, error: String, ctx: &mut Ctx) {
        self.finish(at, StepState::Failed, error.clone(), ctx);
        if at.item_index().is_some() {
            return; // `finish` told the map (see `item_ended`)
        }
        if self.plan.compiled.steps[at.spec()].hook.is_some() {
            // A failed hook fails the run when all hooks are done; the others go on.
            self.check_done(ctx);
            return;
        }
        let step_id = self.row(at).step_id.clone();
        if self.plan.compiled.spec.continue_on_failure {
            // Only what depends on the failed step is given up; other branches go on.
            let plan = self.plan.clone();
            let mut work = vec![at.spec()];
            while let Some(failed) = work.pop() {
                for &dependant in &plan.compiled.steps[failed].dependants {
                    if !is_terminal(self.steps[dependant].row.state()) {
                        let reason = format!("upstream step \"{step_id}\" failed");
                        self.finish(StepRef::step(dependant), StepState::Cancelled, reason, ctx);
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

    /// Ends the run now: every unfinished step is cancelled, running ones get Cancel. A map
    /// step ends before its items, so that they do not start one another.
    fn stop(&mut self, state: RunState, reason: &str, actor: &str, ctx: &mut Ctx) {
        let has_hooks = self.plan.compiled.steps.iter().any(|s| s.hook.is_some());
        if state == RunState::Failed && has_hooks {
            // The DAG ends here; the exit hooks still run (see `check_done`).
            for at in self.all_refs() {
                if self.plan.compiled.steps[at.spec()].hook.is_none() {
                    self.cancel_step(at, reason, ctx);
                }
            }
            self.check_done(ctx);
            return;
        }
        for at in self.all_refs() {
            self.cancel_step(at, reason, ctx);
        }
        self.set_run_state_by(state, reason.to_owned(), actor, ctx);
    }

    /// Cancels one step if it has not ended; its worker (if any) gets Cancel.
    fn cancel_step(&mut self, at: StepRef, reason: &str, ctx: &mut Ctx) {
        let is_task = self.is_task(at);
        let step = &slot_of(&self.steps, at).row;
        if is_terminal(step.state()) {
            return;
        }
        if is_task && is_active(step.state()) {
            ctx.send(
                Arc::from(step.worker.as_str()),
                cancel_message(&step.task_id, step.attempt, reason),
            );
        }
        if !step.child_run_id.is_empty() && step.state() == StepState::Running {
            ctx.asked.push(Asked::CancelChild {
                child: step.child_run_id.clone(),
                reason: format!("parent run {} {reason}", self.id),
            });
        }
        self.row_mut(at).waiting_for.clear();
        self.finish(at, StepState::Cancelled, reason.to_owned(), ctx);
    }

    fn check_done(&mut self, ctx: &mut Ctx) {
        if self.run.state() != RunState::Running {
            return;
        }
        if self.dag_unfinished == 0 && self.unfinished > 0 {
            // The DAG has ended: the exit hooks that are still pending go (or are skipped).
            let hooks: Vec<usize> = (0..self.steps.len())
                .filter(|&i| {
                    self.plan.compiled.steps[i].hook.is_some()
                        && self.steps[i].row.state() == StepState::Pending
                })
                .collect();
            if !hooks.is_empty() {
                self.advance(hooks, ctx);
                return; // `advance` calls back here
            }
        }
        if self.unfinished > 0 {
            return;
        }
        let failed = self
            .steps
            .iter()
            .find(|slot| matches!(slot.row.state(), StepState::Failed | StepState::Cancelled));
        match failed {
            Some(slot) => {
                let error = format!("step \"{}\" failed: {}", slot.row.step_id, slot.row.error);
                self.set_run_state(RunState::Failed, error, ctx);
            }
            None => self.set_run_state(RunState::Succeeded, String::new(), ctx),
        }
    }

    fn finish(&mut self, at: StepRef, state: StepState, error: String, ctx: &mut Ctx) {
        let step = self.row_mut(at);
        step.error = error;
        step.finished_at = Some(now());
        self.set_step_state(at, state, ctx);
        if at.item_index().is_some() {
            self.item_ended(at, ctx);
        } else if is_terminal(state) && self.steps[at.spec()].map.is_some() {
            // However a map ends (an item failed, the run stopped, its upstream failed after a
            // retry kept its items), no item of it may stay behind.
            let reason = format!(
                "map step \"{}\" ended {}",
                self.steps[at.spec()].row.step_id,
                state_name(state)
            );
            self.cancel_items(at.spec(), &reason, ctx);
        }
    }

    fn set_step_state(&mut self, at: StepRef, state: StepState, ctx: &mut Ctx) {
        let is_task = self.is_task(at);
        let before = self.row(at).state();
        let in_dag = self.plan.compiled.steps[at.spec()].hook.is_none();
        match (at.item_index(), is_terminal(before), is_terminal(state)) {
            (None, false, true) => {
                self.unfinished -= 1;
                if in_dag {
                    self.dag_unfinished -= 1;
                }
            }
            (None, true, false) => {
                self.unfinished += 1;
                if in_dag {
                    self.dag_unfinished += 1;
                }
            }
            _ => {}
        }
        if at.item_index().is_some()
            && let Some(map) = self.steps[at.spec()].map.as_mut()
        {
            match (is_terminal(before), is_terminal(state)) {
                (false, true) => map.unfinished -= 1,
                (true, false) => map.unfinished += 1,
                _ => {}
            }
            match (is_started(before), is_started(state)) {
                (false, true) => map.started += 1,
                (true, false) => map.started -= 1,
                _ => {}
            }
        }
        // A task holds its shared resource while an attempt is assigned or running.
        if is_task && is_active(before) != is_active(state) {
            let resource = &self.plan.compiled.steps[at.spec()].concurrency_key;
            if is_active(state) {
                ctx.hold_resource(resource);
            } else {
                ctx.release_resource(resource);
            }
        }
        let step = self.row_mut(at);
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
            item_count: step.item_count,
            cached_from: step.cached_from.clone(),
        });
        self.mark(at, ctx);
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
            if !self.run.parent_run_id.is_empty() {
                ctx.asked.push(Asked::ChildEnded {
                    child: self.id.clone(),
                });
            }
            if std::mem::take(&mut self.admitted) {
                ctx.shared
                    .push(Shared::ReleaseBuckets(self.buckets.clone()));
            }
        }
        self.emit(
            run_event::Event::RunState(pb::RunStateChanged {
                state: state as i32,
                error,
                actor: actor.to_owned(),
                suspended: self.run.suspended,
            }),
            ctx,
        );
    }

    fn mark(&mut self, at: StepRef, ctx: &mut Ctx) {
        let slot = self.slot_mut(at);
        if !slot.dirty {
            slot.dirty = true;
            self.dirty_steps.push(at);
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
        for at in self.all_refs() {
            let step = self.row(at);
            if self.is_task(at) && is_active(step.state()) {
                ctx.shared.push(Shared::Release {
                    instance: Arc::from(step.worker.as_str()),
                    task_id: step.task_id.clone(),
                    attempt: step.attempt,
                });
                let resource = &self.plan.compiled.steps[at.spec()].concurrency_key;
                ctx.release_resource(resource);
            }
        }
        if self.admitted {
            ctx.shared
                .push(Shared::ReleaseBuckets(self.buckets.clone()));
        }
    }

    /// Moves this batch's changes into `out`: run row, then steps, then events.
    /// Feeds this batch's events to the spans (see [`Timeline::observe`]): spans are derived
    /// from what the transitions emitted, when the batch is committed.
    fn trace_events(&mut self) {
        if !traces::enabled() {
            return;
        }
        for event in &self.events {
            let when = event
                .at
                .and_then(|at| SystemTime::try_from(at).ok())
                .unwrap_or_else(SystemTime::now);
            match &event.event {
                Some(run_event::Event::RunState(change)) if is_finished(change.state()) => {
                    traces::run_ended(&self.run, when);
                }
                Some(run_event::Event::StepState(change)) => {
                    let Some(at) = self.find(&change.step_id) else {
                        continue;
                    };
                    let is_task = self.is_task(at);
                    let row = &slot_of(&self.steps, at).row;
                    self.trace
                        .observe(&self.run, row, at, is_task, change, when);
                }
                _ => {}
            }
        }
    }

    /// Feeds this batch's events to the metrics (see [`crate::metrics`]), like the spans.
    fn meter_events(&mut self) {
        let Some(metrics) = crate::metrics::get() else {
            return;
        };
        use crate::metrics::TaskChange;
        for event in &self.events {
            match &event.event {
                Some(run_event::Event::RunState(change)) => {
                    if event.seq == 1 {
                        metrics.run_started(&self.run.workflow);
                    }
                    if is_finished(change.state()) {
                        let state = change
                            .state()
                            .as_str_name()
                            .trim_start_matches("RUN_STATE_");
                        metrics.run_finished(&self.run.workflow, &state.to_ascii_lowercase());
                    }
                }
                Some(run_event::Event::StepState(change)) => {
                    let Some(at) = self.find(&change.step_id) else {
                        continue;
                    };
                    if !self.is_task(at) {
                        continue;
                    }
                    let when = event
                        .at
                        .and_then(|at| SystemTime::try_from(at).ok())
                        .unwrap_or_else(SystemTime::now);
                    let kind = match change.state() {
                        StepState::Ready => TaskChange::Ready,
                        StepState::Assigned => TaskChange::Assigned,
                        StepState::Running => TaskChange::Running,
                        StepState::Succeeded if change.cached_from.is_empty() => {
                            TaskChange::Succeeded
                        }
                        StepState::Failed => TaskChange::Failed,
                        StepState::RetryWait => TaskChange::Retrying,
                        _ => TaskChange::Other,
                    };
                    let task = &slot_of(&self.steps, at).row.task;
                    self.meter
                        .observe(at, crate::metrics::task_type(task), kind, when);
                }
                _ => {}
            }
        }
    }

    /// The run's own notifications, checked again when it is read back from the store (they
    /// were checked at submit; one that fails now is dropped, logged).
    fn checked_notifications(run: &Run) -> Vec<dagmesh_spec::notify::CompiledNotification> {
        if run.notifications.is_empty() {
            return Vec::new();
        }
        match dagmesh_spec::notify::compile_run_notifications(&run.notifications) {
            Ok(compiled) => compiled,
            Err(errors) => {
                tracing::warn!(run_id = %run.run_id, %errors, "stored notifications do not check; dropped");
                Vec::new()
            }
        }
    }

    /// Webhook deliveries for this batch's events, into `out` with the events themselves (the
    /// outbox, see [`crate::webhooks`]). Returns whether any was added.
    fn notify_events(&mut self, out: &mut Vec<Mutation>) -> bool {
        if self.plan.compiled.notifications.is_empty() && self.notifications.is_empty() {
            return false;
        }
        let hooks: Vec<&dagmesh_spec::notify::CompiledNotification> = self
            .plan
            .compiled
            .notifications
            .iter()
            .chain(&self.notifications)
            .collect();
        let mut added = false;
        for event in &self.events {
            let when = event
                .at
                .and_then(|at| SystemTime::try_from(at).ok())
                .unwrap_or_else(SystemTime::now);
            let (kind, step) = match &event.event {
                Some(run_event::Event::RunState(change)) => match change.state() {
                    RunState::Succeeded => ("run.succeeded", None),
                    RunState::Failed => ("run.failed", None),
                    RunState::Cancelled => ("run.cancelled", None),
                    _ => continue,
                },
                Some(run_event::Event::StepState(change)) => {
                    let Some(at) = self.find(&change.step_id) else {
                        continue;
                    };
                    let row = &slot_of(&self.steps, at).row;
                    match (change.state(), &self.plan.compiled.steps[at.spec()].kind) {
                        (StepState::Failed, _) => (
                            "step.failed",
                            Some(serde_json::json!({
                                "step_id": change.step_id,
                                "state": "FAILED",
                                "attempt": change.attempt,
                                "error": change.error,
                                "task": row.task,
                            })),
                        ),
                        (StepState::Running, StepKind::Approval { message, .. }) => (
                            "step.waiting_for_approval",
                            Some(serde_json::json!({
                                "step_id": change.step_id,
                                "state": "RUNNING",
                                "message": message,
                            })),
                        ),
                        _ => continue,
                    }
                }
                _ => continue,
            };
            for delivery in crate::webhooks::deliveries_for(&self.run, kind, step, when, &hooks) {
                added = true;
                out.push(Mutation {
                    mutation: Some(mutation::Mutation::PutWebhookDelivery(delivery)),
                });
            }
        }
        added
    }

    /// Moves this batch's changes into `out` (see above); returns whether webhook deliveries
    /// were among them.
    pub fn drain_mutations(&mut self, out: &mut Vec<Mutation>) -> bool {
        self.trace_events();
        self.meter_events();
        let notified = self.notify_events(out);
        let put = |mutation| Mutation {
            mutation: Some(mutation),
        };
        if std::mem::take(&mut self.run_dirty) {
            out.push(put(mutation::Mutation::PutRun(self.run.clone())));
        }
        for at in std::mem::take(&mut self.dirty_steps) {
            let slot = self.slot_mut(at);
            slot.dirty = false;
            out.push(put(mutation::Mutation::PutStep(slot.row.clone())));
        }
        out.extend(
            self.events
                .drain(..)
                .map(|event| put(mutation::Mutation::AppendEvent(event))),
        );
        out.extend(
            self.cache_writes
                .drain(..)
                .map(|entry| put(mutation::Mutation::PutCacheEntry(entry))),
        );
        notified
    }
}

/// The slot `at` names in `steps` (a free function, so that other fields can be borrowed
/// beside it). `at` must be in the table (see [`RunEntry::has`]).
fn slot_of(steps: &[Slot], at: StepRef) -> &Slot {
    let slot = &steps[at.spec()];
    match at.item_index() {
        None => slot,
        Some(item) => &slot.map.as_ref().expect("an item's map is expanded").items[item],
    }
}

/// A new PENDING row.
fn new_row(run_id: &str, step_id: &str, task: &str) -> Step {
    Step {
        run_id: run_id.to_owned(),
        step_id: step_id.to_owned(),
        task_id: format!("{run_id}/{step_id}"),
        state: StepState::Pending as i32,
        task: task.to_owned(),
        ..Step::default()
    }
}

/// What downstream expressions read of a succeeded step read back from the store: its outputs,
/// or for a map step the list stored under `items`.
fn stored_output(row: &Step, is_map: bool) -> Json {
    let mut outputs = from_struct(row.outputs.as_ref());
    if is_map {
        outputs
            .remove("items")
            .filter(Json::is_array)
            .unwrap_or(Json::Array(Vec::new()))
    } else {
        Json::Object(outputs)
    }
}

fn marker_line(text: String) -> pb::LogLine {
    pb::LogLine {
        at: Some(now()),
        level: "warn".into(),
        text,
    }
}

fn state_name(state: StepState) -> &'static str {
    state.as_str_name().trim_start_matches("STEP_STATE_")
}

#[cfg(test)]
mod tests {
    use super::parse_item_key;

    #[test]
    fn item_keys_have_one_spelling() {
        assert_eq!(parse_item_key("extract[17]"), Some(("extract", 17)));
        assert_eq!(parse_item_key("extract[0]"), Some(("extract", 0)));
        for bad in [
            "extract",
            "extract[]",
            "extract[01]",
            "extract[-1]",
            "extract[1]x",
            "e[123456]",
        ] {
            assert_eq!(parse_item_key(bad), None, "{bad}");
        }
    }
}

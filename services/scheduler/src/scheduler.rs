//! [`Scheduler`]: the API (schedules, triggers, events, backfills) and the loop that fires ticks
//! and drives backfills.

mod backfills;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use dagmesh_metastore::MetadataStore;
use dagmesh_metastore::ownership::{self, Ownership};
use dagmesh_proto::limits::{self, DEFAULT_MAX_PAYLOAD_BYTES, MAX_NAME_LEN};
use dagmesh_proto::v1::{
    CatchUp, PublishEventResponse, Schedule, SubmitRunRequest, Trigger, TriggeredRun, WorkflowRef,
    submit_run_request,
};
use prost_types::{Struct, Timestamp};
use serde_json::Value as Json;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::validate::{self, ScheduleDef};
use crate::{Clock, RunStarter, SchedError, expr, ticks};

/// Tag on every run a schedule starts; the value is the schedule's name.
pub const SCHEDULE_TAG: &str = "dagmesh.schedule";
/// Tag on every run a trigger starts; the value is the trigger's name.
pub const TRIGGER_TAG: &str = "dagmesh.trigger";
/// Tag on every partition run of a backfill; the value is the backfill's id.
pub const BACKFILL_TAG: &str = "dagmesh.backfill";
pub use crate::validate::DEFAULT_CATCH_UP_LIMIT;

/// Schedules and backfills hash (by id) into this many partitions, shared among the schedulers
/// of a database through leases (`scheduler/p-N`). Part of the data's layout: every scheduler
/// of a database must use the same number.
pub const SCHEDULER_PARTITIONS: u32 = 32;

/// Tunables of the loop.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Longest sleep of the loop: how soon changes made by another scheduler process (sharing
    /// the database) are noticed. Changes made through this one wake it at once.
    pub recheck_interval: Duration,
    /// Under CATCH_UP_SKIP, a tick noticed later than this is a missed tick and is skipped.
    pub misfire_grace: Duration,
    /// How often running backfills look at their partition runs.
    pub backfill_poll: Duration,
    /// Wait after a transient failure (executor or store unreachable) before trying again.
    pub retry_delay: Duration,
    /// TTL of this scheduler's leases (its membership and its partitions): the schedules of a
    /// scheduler that died move to the others within this time. Renewed every third of it.
    pub lease_ttl: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            recheck_interval: Duration::from_secs(30),
            misfire_grace: Duration::from_secs(60),
            backfill_poll: Duration::from_secs(1),
            retry_delay: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(15),
        }
    }
}

/// The scheduler. Cheap to clone; clones share the state and wake the same loop.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn MetadataStore>,
    starter: Arc<dyn RunStarter>,
    clock: Arc<dyn Clock>,
    config: SchedulerConfig,
    /// Wakes the loop after a change (new or resumed schedule, new backfill).
    wake: Notify,
    /// Held while a backfill is driven, cancelled or resumed, so a cancel never races a submit
    /// of this process.
    backfills: Mutex<()>,
    /// Partition runs whose end a task is waiting for, to wake the loop when a slot frees.
    awaited_runs: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Which schedules and backfills this scheduler drives (the others' belong to other
    /// schedulers of the same database). Locked for a whole pass.
    ownership: Mutex<Ownership>,
}

fn to_ts(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        // Below 2e9 (a leap second at most), so it always fits.
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(999_999_999),
    }
}

/// `at + by`, or the end of time: a wake-up time never overflows.
fn later(at: DateTime<Utc>, by: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(by)
        .ok()
        .and_then(|by| at.checked_add_signed(by))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Run inputs evaluated from expressions, checked like the executor checks a submit's inputs
/// (depth and size), so that the refusal says which schedule, trigger or backfill made them.
fn inputs_struct(inputs: serde_json::Map<String, Json>) -> Result<Struct, String> {
    let inputs = dagmesh_proto::json::to_struct(&Json::Object(inputs));
    limits::check_payload("inputs", &inputs, DEFAULT_MAX_PAYLOAD_BYTES)
        .map_err(|e| e.to_string())?;
    Ok(inputs)
}

fn invalid(message: String) -> SchedError {
    SchedError::InvalidArgument(message)
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Refuses inputs (a trial evaluation) that the workflow's declared inputs would refuse at
/// submit.
fn check_declared(
    declared: &[dagmesh_spec::DeclaredInput],
    inputs: serde_json::Map<String, Json>,
    workflow: &str,
    trial: &str,
) -> Result<(), SchedError> {
    dagmesh_spec::check_run_inputs(declared, inputs, "inputs")
        .map(|_| ())
        .map_err(|errors| {
            invalid(format!(
                "the inputs for {trial} do not match what workflow {workflow} declares:\n{errors}"
            ))
        })
}

/// A trigger's input mapping must give every required declared input and nothing undeclared
/// (the values depend on the event and are checked when one arrives). Without a mapping the
/// event's payload is the inputs, which only an event can show.
fn check_mapping(
    declared: &[dagmesh_spec::DeclaredInput],
    mapping: &std::collections::HashMap<String, String>,
    workflow: &str,
) -> Result<(), SchedError> {
    if declared.is_empty() || mapping.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    for input in declared {
        if input.default.is_none() && !mapping.contains_key(&input.name) {
            problems.push(format!(
                "inputs.{}: required input of type {} is not mapped",
                input.name, input.kind
            ));
        }
    }
    let mut extra: Vec<&String> = mapping
        .keys()
        .filter(|name| declared.iter().all(|input| &input.name != *name))
        .collect();
    extra.sort();
    for name in extra {
        problems.push(format!(
            "inputs.{name}: workflow {workflow} declares no such input"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(invalid(format!(
            "the input mapping does not match what workflow {workflow} declares:\n{}",
            problems.join("\n")
        )))
    }
}

fn workflow_ref(name: &str, version: u32) -> Option<submit_run_request::WorkflowRef> {
    Some(submit_run_request::WorkflowRef::Workflow(WorkflowRef {
        name: name.to_owned(),
        version,
    }))
}

impl Scheduler {
    pub fn new(
        store: Arc<dyn MetadataStore>,
        starter: Arc<dyn RunStarter>,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
    ) -> Self {
        crate::metrics::register_all();
        let ownership = Ownership::new(
            store.clone(),
            "scheduler",
            ownership::unique_holder(),
            SCHEDULER_PARTITIONS,
            config.lease_ttl,
        );
        Scheduler {
            inner: Arc::new(Inner {
                ownership: Mutex::new(ownership),
                store,
                starter,
                clock,
                config,
                wake: Notify::new(),
                backfills: Mutex::new(()),
                awaited_runs: Default::default(),
            }),
        }
    }

    /// Starts the loop; it runs until the task is aborted (it holds no state that is not in the
    /// store, so aborting it at any point loses nothing).
    pub fn spawn(&self) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.run_loop().await })
    }

    /// Hands this scheduler's partitions to the others at once (a clean shutdown; after the
    /// loop was aborted). Without it they move when the leases expire.
    pub async fn release_partitions(&self) {
        self.inner.ownership.lock().await.release_all().await;
    }

    async fn run_loop(self) {
        loop {
            let now = self.inner.clock.now();
            let wake_at = match self.run_due().await {
                Ok(next) => next,
                Err(error) => {
                    tracing::warn!(%error, "scheduler pass failed; retrying");
                    later(now, self.inner.config.retry_delay)
                }
            };
            let sleep = self.inner.clock.sleep_until(wake_at);
            tokio::select! {
                () = sleep => {}
                () = self.inner.wake.notified() => {}
            }
        }
    }

    /// One pass: fires every due tick of every active schedule and drives running backfills.
    /// Returns when the next pass is due. The loop calls this; tests call it directly after
    /// moving a manual clock.
    pub async fn run_due(&self) -> Result<DateTime<Utc>, SchedError> {
        let now = self.inner.clock.now();
        let mut ownership = self.inner.ownership.lock().await;
        if ownership.refresh_due() {
            ownership.refresh().await?;
        }
        let recheck = self
            .inner
            .config
            .recheck_interval
            .min(ownership.refresh_interval());
        let mut next = later(now, recheck);
        for schedule in self.inner.store.list_schedules().await? {
            // Another scheduler of this database fires it.
            if schedule.paused || !ownership.owns_key(&schedule.id) {
                continue;
            }
            // A record that breaks a limit (written by another version, or edited in the
            // database) is skipped, not retried: it cannot start to pass by itself.
            let def = match validate::schedule(&schedule) {
                Ok(def) => def,
                Err(error) => {
                    tracing::warn!(schedule = %schedule.id, %error, "invalid schedule skipped");
                    continue;
                }
            };
            match self.fire(&schedule, &def, now).await {
                Ok(Some(at)) => next = next.min(at),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(schedule = %schedule.name, %error, "schedule tick failed; retrying");
                    next = next.min(later(now, self.inner.config.retry_delay));
                }
            }
        }
        if self.drive_backfills(&ownership).await? {
            next = next.min(later(now, self.inner.config.backfill_poll));
        }
        Ok(next)
    }

    /// Fires the due ticks of one schedule, then moves its `last_tick` (compare-and-set).
    /// Returns its next tick.
    async fn fire(
        &self,
        schedule: &Schedule,
        def: &ScheduleDef,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, SchedError> {
        let ScheduleDef {
            zone,
            ref cron,
            catch_up_limit,
        } = *def;
        let after = last_handled(schedule).unwrap_or(now);
        let catch_up = schedule.catch_up();
        let skip_late = matches!(catch_up, CatchUp::Unspecified | CatchUp::Skip);
        // SKIP runs every tick noticed within the misfire grace (a handover between schedulers
        // or a short restart delays ticks without losing them), so it looks further back than
        // its one-tick limit; the walk back stops at `last_tick`.
        let limit = if skip_late {
            limits::MAX_CATCH_UP_TICKS as usize
        } else {
            catch_up_limit
        };
        let due = ticks::due_ticks(cron, zone, after, now, limit);
        if let Some(&latest) = due.last() {
            let grace = chrono::Duration::from_std(self.inner.config.misfire_grace)
                .unwrap_or(chrono::Duration::MAX);
            let run: Vec<DateTime<Utc>> = if skip_late {
                due.iter()
                    .copied()
                    .filter(|&tick| now - tick <= grace)
                    .collect()
            } else {
                due.clone()
            };
            for &tick in &run {
                self.start_tick(schedule, zone, tick).await?;
            }
            let skipped = due.len() - run.len();
            if skipped > 0 {
                crate::metrics::tick("missed", skipped as u64);
                tracing::info!(schedule = %schedule.name, skipped, latest = %latest,
                    "missed ticks skipped (later than the misfire grace)");
            }
            let advanced = self
                .inner
                .store
                .advance_schedule(&schedule.id, schedule.last_tick, to_ts(latest))
                .await?;
            if !advanced {
                // Another scheduler handled these ticks; the runs are the same (idempotency).
                tracing::debug!(schedule = %schedule.name, "ticks already advanced elsewhere");
            }
        }
        let from = due.last().copied().unwrap_or(after).max(now);
        Ok(ticks::next_tick(cron, zone, from))
    }

    /// Starts the run of one tick. Permanent errors (the workflow was deleted, an input
    /// expression fails) are logged and the tick counts as handled; transient ones come back.
    async fn start_tick(
        &self,
        schedule: &Schedule,
        zone: chrono_tz::Tz,
        tick: DateTime<Utc>,
    ) -> Result<(), SchedError> {
        let tick_text = Json::String(ticks::local_rfc3339(tick, zone));
        let name = Json::String(schedule.name.clone());
        let inputs = match expr::eval_inputs(
            &schedule.inputs,
            &[("tick", &tick_text), ("schedule", &name)],
        ) {
            Ok(inputs) => inputs,
            Err(error) => {
                tracing::warn!(schedule = %schedule.name, %tick, %error, "tick not run: inputs failed");
                return Ok(());
            }
        };
        let inputs = match inputs_struct(inputs) {
            Ok(inputs) => inputs,
            Err(error) => {
                tracing::warn!(schedule = %schedule.name, %tick, %error, "tick not run: inputs too big");
                return Ok(());
            }
        };
        let mut tags = schedule.tags.clone();
        tags.insert(SCHEDULE_TAG.to_owned(), schedule.name.clone());
        let request = SubmitRunRequest {
            workflow_ref: workflow_ref(&schedule.workflow, schedule.workflow_version),
            inputs: Some(inputs),
            idempotency_key: format!("schedule/{}/{}", schedule.id, ticks::utc_rfc3339(tick)),
            tags,
            ..SubmitRunRequest::default()
        };
        match self.inner.starter.submit(request).await {
            Ok((run, created)) => {
                if created {
                    crate::metrics::tick("fired", 1);
                    if self.inner.clock.now() - tick > crate::metrics::LATE_AFTER {
                        crate::metrics::tick("late", 1);
                    }
                }
                tracing::info!(schedule = %schedule.name, %tick, run_id = %run.run_id, created, "tick");
                Ok(())
            }
            Err(error) if error.is_transient() => Err(error),
            Err(error) => {
                tracing::warn!(schedule = %schedule.name, %tick, %error, "tick not run");
                Ok(())
            }
        }
    }

    // --- schedules ---

    /// Validates and stores a schedule; the loop picks it up at once.
    /// Nothing may be set up to start a workflow (version) that is not registered: it would only
    /// fail later, at 3 a.m., with the reason buried in a log.
    /// Returns the inputs the version declares (the latest, when not pinned).
    async fn check_workflow(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Vec<dagmesh_spec::DeclaredInput>, SchedError> {
        let pinned = (version != 0).then_some(version);
        match self.inner.store.get_workflow(name, pinned).await {
            Ok(workflow) => Ok(dagmesh_spec::declared_inputs(
                &workflow.spec.unwrap_or_default(),
            )),
            Err(dagmesh_metastore::StoreError::NotFound(_)) => Err(SchedError::NotFound(format!(
                "workflow: {name:?}{} is not registered (apply it first)",
                pinned.map(|v| format!(" version {v}")).unwrap_or_default()
            ))),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn create_schedule(&self, schedule: Schedule) -> Result<Schedule, SchedError> {
        // The output-only fields are ignored, so they cannot fail the checks either.
        let schedule = Schedule {
            id: String::new(),
            last_tick: None,
            next_tick: None,
            created_at: None,
            ..schedule
        };
        let ScheduleDef { zone, cron, .. } = validate::schedule(&schedule).map_err(invalid)?;
        let declared = self
            .check_workflow(&schedule.workflow, schedule.workflow_version)
            .await?;
        let now = self.inner.clock.now();
        let first = ticks::next_tick(&cron, zone, now)
            .ok_or_else(|| invalid("cron: never matches".into()))?;
        // A trial evaluation with the first tick catches type errors now, not at 3 a.m.
        let tick = Json::String(ticks::local_rfc3339(first, zone));
        let name = Json::String(schedule.name.clone());
        let trial = expr::eval_inputs(&schedule.inputs, &[("tick", &tick), ("schedule", &name)])
            .map_err(invalid)?;
        check_declared(&declared, trial, &schedule.workflow, "the first tick")?;
        let schedule = Schedule {
            id: new_id(),
            last_tick: None,
            next_tick: None,
            created_at: Some(to_ts(now)),
            ..schedule
        };
        let created = self.inner.store.create_schedule(schedule).await?;
        self.inner.wake.notify_one();
        Ok(self.with_next_tick(created))
    }

    pub async fn get_schedule(&self, id_or_name: &str) -> Result<Schedule, SchedError> {
        let schedule = self.inner.store.get_schedule(id_or_name).await?;
        Ok(self.with_next_tick(schedule))
    }

    pub async fn list_schedules(&self) -> Result<Vec<Schedule>, SchedError> {
        let schedules = self.inner.store.list_schedules().await?;
        Ok(schedules
            .into_iter()
            .map(|s| self.with_next_tick(s))
            .collect())
    }

    pub async fn pause_schedule(&self, id_or_name: &str) -> Result<Schedule, SchedError> {
        let schedule = self
            .inner
            .store
            .set_schedule_paused(id_or_name, true)
            .await?;
        Ok(self.with_next_tick(schedule))
    }

    pub async fn resume_schedule(&self, id_or_name: &str) -> Result<Schedule, SchedError> {
        let schedule = self
            .inner
            .store
            .set_schedule_paused(id_or_name, false)
            .await?;
        self.inner.wake.notify_one();
        Ok(self.with_next_tick(schedule))
    }

    pub async fn delete_schedule(&self, id_or_name: &str) -> Result<(), SchedError> {
        Ok(self.inner.store.delete_schedule(id_or_name).await?)
    }

    /// Fills `next_tick`; a record that fails its checks has none.
    fn with_next_tick(&self, mut schedule: Schedule) -> Schedule {
        if let (Ok(def), Some(after)) = (validate::schedule(&schedule), last_handled(&schedule)) {
            schedule.next_tick = ticks::next_tick(&def.cron, def.zone, after).map(to_ts);
        }
        schedule
    }

    // --- triggers and events ---

    pub async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, SchedError> {
        let trigger = Trigger {
            id: String::new(),
            created_at: None,
            ..trigger
        };
        validate::trigger(&trigger).map_err(invalid)?;
        let declared = self
            .check_workflow(&trigger.workflow, trigger.workflow_version)
            .await?;
        check_mapping(&declared, &trigger.inputs, &trigger.workflow)?;
        if !trigger.filter.is_empty() {
            expr::compile(&trigger.filter).map_err(|e| invalid(format!("filter: {e}")))?;
        }
        expr::check_inputs(&trigger.inputs).map_err(invalid)?;
        let trigger = Trigger {
            id: new_id(),
            created_at: Some(to_ts(self.inner.clock.now())),
            ..trigger
        };
        Ok(self.inner.store.create_trigger(trigger).await?)
    }

    pub async fn list_triggers(&self, topic: &str) -> Result<Vec<Trigger>, SchedError> {
        Ok(self.inner.store.list_triggers(topic).await?)
    }

    pub async fn delete_trigger(&self, id_or_name: &str) -> Result<(), SchedError> {
        Ok(self.inner.store.delete_trigger(id_or_name).await?)
    }

    /// Starts one run per trigger of `topic` whose filter accepts `payload`. Every trigger's
    /// filter and inputs are evaluated before any run starts, so an input error starts nothing.
    /// A filter that fails to evaluate (a missing field) counts as not matching.
    pub async fn publish_event(
        &self,
        topic: &str,
        payload: serde_json::Map<String, Json>,
        event_id: &str,
    ) -> Result<PublishEventResponse, SchedError> {
        if topic.is_empty() {
            return Err(invalid("topic: required".into()));
        }
        limits::check_len("topic", topic, MAX_NAME_LEN).map_err(invalid)?;
        limits::check_len("event_id", event_id, MAX_NAME_LEN).map_err(invalid)?;
        let event = Json::Object(payload);
        // The payload is what the default mapping passes on as run inputs: same limits.
        limits::check_payload(
            "payload",
            &dagmesh_proto::json::to_struct(&event),
            DEFAULT_MAX_PAYLOAD_BYTES,
        )
        .map_err(|e| invalid(e.to_string()))?;
        let topic_value = Json::String(topic.to_owned());
        let variables = [("event", &event), ("topic", &topic_value)];
        let mut response = PublishEventResponse::default();
        let mut requests = Vec::new();
        for trigger in self.inner.store.list_triggers(topic).await? {
            if let Err(error) = validate::trigger(&trigger) {
                // A bad record must not keep the topic's other triggers from firing.
                tracing::warn!(trigger = %trigger.id, %error, "invalid trigger skipped");
                response.skipped_triggers.push(trigger.name);
                continue;
            }
            if !trigger.filter.is_empty() {
                let accepted = expr::compile(&trigger.filter)
                    .and_then(|program| expr::eval(&program, &variables));
                match accepted {
                    Ok(Json::Bool(true)) => {}
                    Ok(Json::Bool(false)) => {
                        response.skipped_triggers.push(trigger.name);
                        continue;
                    }
                    Ok(other) => {
                        tracing::warn!(trigger = %trigger.name, value = %other, "filter is not a bool; event skipped");
                        response.skipped_triggers.push(trigger.name);
                        continue;
                    }
                    Err(error) => {
                        tracing::info!(trigger = %trigger.name, %error, "filter failed; event skipped");
                        response.skipped_triggers.push(trigger.name);
                        continue;
                    }
                }
            }
            let inputs = if trigger.inputs.is_empty() {
                event.as_object().cloned().unwrap_or_default()
            } else {
                expr::eval_inputs(&trigger.inputs, &variables)
                    .map_err(|e| invalid(format!("trigger {:?}: {e}", trigger.name)))?
            };
            // Checked before any run starts: one event that does not fit a trigger's workflow
            // starts nothing, and the caller learns which field is wrong.
            let pinned = (trigger.workflow_version != 0).then_some(trigger.workflow_version);
            if let Ok(workflow) = self
                .inner
                .store
                .get_workflow(&trigger.workflow, pinned)
                .await
            {
                let declared = dagmesh_spec::declared_inputs(&workflow.spec.unwrap_or_default());
                dagmesh_spec::check_run_inputs(&declared, inputs.clone(), "inputs").map_err(
                    |errors| {
                        invalid(format!(
                            "trigger {:?}: the event's inputs do not match what workflow {} \
                             declares:\n{errors}",
                            trigger.name, trigger.workflow
                        ))
                    },
                )?;
            }
            let inputs = inputs_struct(inputs)
                .map_err(|e| invalid(format!("trigger {:?}: {e}", trigger.name)))?;
            let mut tags = trigger.tags.clone();
            tags.insert(TRIGGER_TAG.to_owned(), trigger.name.clone());
            let idempotency_key = if event_id.is_empty() {
                String::new()
            } else {
                format!("event/{}/{event_id}", trigger.id)
            };
            let request = SubmitRunRequest {
                workflow_ref: workflow_ref(&trigger.workflow, trigger.workflow_version),
                inputs: Some(inputs),
                idempotency_key,
                tags,
                ..SubmitRunRequest::default()
            };
            requests.push((trigger.name, request));
        }
        for (trigger, request) in requests {
            let (run, created) = self.inner.starter.submit(request).await?;
            response.runs.push(TriggeredRun {
                trigger,
                run: Some(run),
                created,
            });
        }
        // Steps of running runs waiting for this event. Delivering again (a retried publish)
        // resumes nothing twice: a resumed step no longer waits.
        let payload = dagmesh_proto::json::to_struct(&event);
        response.resumed_steps = self.inner.starter.deliver_event(topic, payload).await?;
        Ok(response)
    }
}

/// The last tick a schedule handled, or its creation: ticks after this are due. `None` when
/// neither is set or valid.
fn last_handled(schedule: &Schedule) -> Option<DateTime<Utc>> {
    let ts = schedule
        .last_tick
        .as_ref()
        .or(schedule.created_at.as_ref())?;
    validate::timestamp("last_tick", ts).ok()
}

//! [`Scheduler`]: the API (schedules, triggers, events, backfills) and the loop that fires ticks
//! and drives backfills.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dagmesh_metastore::MetadataStore;
use dagmesh_proto::v1::{
    Backfill, BackfillState, CatchUp, ListRunsRequest, Partition, PublishEventResponse, Run,
    RunState, Schedule, SubmitRunRequest, Trigger, TriggeredRun, WorkflowRef, submit_run_request,
};
use prost_types::Timestamp;
use serde_json::Value as Json;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::ticks::{self, Grain};
use crate::{Clock, RunStarter, SchedError, expr};

/// Tag on every run a schedule starts; the value is the schedule's name.
pub const SCHEDULE_TAG: &str = "dagmesh.schedule";
/// Tag on every run a trigger starts; the value is the trigger's name.
pub const TRIGGER_TAG: &str = "dagmesh.trigger";
/// Tag on every partition run of a backfill; the value is the backfill's id.
pub const BACKFILL_TAG: &str = "dagmesh.backfill";
/// `catch_up_limit` when the schedule says 0.
pub const DEFAULT_CATCH_UP_LIMIT: u32 = 100;

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
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            recheck_interval: Duration::from_secs(30),
            misfire_grace: Duration::from_secs(60),
            backfill_poll: Duration::from_secs(1),
            retry_delay: Duration::from_secs(1),
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
}

fn to_ts(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn from_ts(ts: &Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32).unwrap_or_default()
}

fn invalid(message: String) -> SchedError {
    SchedError::InvalidArgument(message)
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
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
        Scheduler {
            inner: Arc::new(Inner {
                store,
                starter,
                clock,
                config,
                wake: Notify::new(),
                backfills: Mutex::new(()),
            }),
        }
    }

    /// Starts the loop; it runs until the task is aborted (it holds no state that is not in the
    /// store, so aborting it at any point loses nothing).
    pub fn spawn(&self) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.run_loop().await })
    }

    async fn run_loop(self) {
        loop {
            let now = self.inner.clock.now();
            let wake_at = match self.run_due().await {
                Ok(next) => next,
                Err(error) => {
                    tracing::warn!(%error, "scheduler pass failed; retrying");
                    now + self.inner.config.retry_delay
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
        let mut next = now + self.inner.config.recheck_interval;
        for schedule in self.inner.store.list_schedules().await? {
            if schedule.paused {
                continue;
            }
            match self.fire(&schedule, now).await {
                Ok(Some(at)) => next = next.min(at),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(schedule = %schedule.name, %error, "schedule tick failed; retrying");
                    next = next.min(now + self.inner.config.retry_delay);
                }
            }
        }
        if self.drive_backfills().await? {
            next = next.min(now + self.inner.config.backfill_poll);
        }
        Ok(next)
    }

    /// Fires the due ticks of one schedule, then moves its `last_tick` (compare-and-set).
    /// Returns its next tick.
    async fn fire(
        &self,
        schedule: &Schedule,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, SchedError> {
        let zone = ticks::parse_zone(&schedule.time_zone).map_err(invalid)?;
        let cron = ticks::parse_cron(&schedule.cron).map_err(invalid)?;
        let after = schedule
            .last_tick
            .as_ref()
            .or(schedule.created_at.as_ref())
            .map(from_ts)
            .unwrap_or(now);
        let catch_up = schedule.catch_up();
        let limit = match catch_up {
            CatchUp::All => match schedule.catch_up_limit {
                0 => DEFAULT_CATCH_UP_LIMIT as usize,
                n => n as usize,
            },
            _ => 1,
        };
        let due = ticks::due_ticks(&cron, zone, after, now, limit);
        if let Some(&latest) = due.last() {
            let grace = chrono::Duration::from_std(self.inner.config.misfire_grace)
                .unwrap_or(chrono::Duration::MAX);
            let run: &[DateTime<Utc>] = match catch_up {
                CatchUp::Unspecified | CatchUp::Skip if now - latest > grace => &[],
                _ => &due,
            };
            for &tick in run {
                self.start_tick(schedule, zone, tick).await?;
            }
            if run.is_empty() {
                tracing::info!(schedule = %schedule.name, tick = %latest, "missed tick skipped");
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
        Ok(ticks::next_tick(&cron, zone, from))
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
        let mut tags = schedule.tags.clone();
        tags.insert(SCHEDULE_TAG.to_owned(), schedule.name.clone());
        let request = SubmitRunRequest {
            workflow_ref: workflow_ref(&schedule.workflow, schedule.workflow_version),
            inputs: Some(dagmesh_proto::json::to_struct(&Json::Object(inputs))),
            idempotency_key: format!("schedule/{}/{}", schedule.id, ticks::utc_rfc3339(tick)),
            tags,
            ..SubmitRunRequest::default()
        };
        match self.inner.starter.submit(request).await {
            Ok((run, created)) => {
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
    async fn check_workflow(&self, name: &str, version: u32) -> Result<(), SchedError> {
        let pinned = (version != 0).then_some(version);
        match self.inner.store.get_workflow(name, pinned).await {
            Ok(_) => Ok(()),
            Err(dagmesh_metastore::StoreError::NotFound(_)) => Err(SchedError::NotFound(format!(
                "workflow: {name:?}{} is not registered (apply it first)",
                pinned.map(|v| format!(" version {v}")).unwrap_or_default()
            ))),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn create_schedule(&self, schedule: Schedule) -> Result<Schedule, SchedError> {
        if schedule.name.is_empty() {
            return Err(invalid("name: required".into()));
        }
        if schedule.workflow.is_empty() {
            return Err(invalid("workflow: required".into()));
        }
        self.check_workflow(&schedule.workflow, schedule.workflow_version)
            .await?;
        let zone = ticks::parse_zone(&schedule.time_zone).map_err(invalid)?;
        let cron = ticks::parse_cron(&schedule.cron).map_err(invalid)?;
        let now = self.inner.clock.now();
        let first = ticks::next_tick(&cron, zone, now)
            .ok_or_else(|| invalid("cron: never matches".into()))?;
        // A trial evaluation with the first tick catches type errors now, not at 3 a.m.
        let tick = Json::String(ticks::local_rfc3339(first, zone));
        let name = Json::String(schedule.name.clone());
        expr::eval_inputs(&schedule.inputs, &[("tick", &tick), ("schedule", &name)])
            .map_err(invalid)?;
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

    fn with_next_tick(&self, mut schedule: Schedule) -> Schedule {
        let after = schedule
            .last_tick
            .as_ref()
            .or(schedule.created_at.as_ref())
            .map(from_ts);
        if let (Ok(zone), Ok(cron), Some(after)) = (
            ticks::parse_zone(&schedule.time_zone),
            ticks::parse_cron(&schedule.cron),
            after,
        ) {
            schedule.next_tick = ticks::next_tick(&cron, zone, after).map(to_ts);
        }
        schedule
    }

    // --- triggers and events ---

    pub async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, SchedError> {
        if trigger.name.is_empty() {
            return Err(invalid("name: required".into()));
        }
        if trigger.topic.is_empty() {
            return Err(invalid("topic: required".into()));
        }
        if trigger.workflow.is_empty() {
            return Err(invalid("workflow: required".into()));
        }
        self.check_workflow(&trigger.workflow, trigger.workflow_version)
            .await?;
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
        let event = Json::Object(payload);
        let topic_value = Json::String(topic.to_owned());
        let variables = [("event", &event), ("topic", &topic_value)];
        let mut response = PublishEventResponse::default();
        let mut requests = Vec::new();
        for trigger in self.inner.store.list_triggers(topic).await? {
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
            let mut tags = trigger.tags.clone();
            tags.insert(TRIGGER_TAG.to_owned(), trigger.name.clone());
            let idempotency_key = if event_id.is_empty() {
                String::new()
            } else {
                format!("event/{}/{event_id}", trigger.id)
            };
            let request = SubmitRunRequest {
                workflow_ref: workflow_ref(&trigger.workflow, trigger.workflow_version),
                inputs: Some(dagmesh_proto::json::to_struct(&Json::Object(inputs))),
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
        Ok(response)
    }

    // --- backfills ---

    pub async fn create_backfill(&self, backfill: Backfill) -> Result<Backfill, SchedError> {
        if backfill.workflow.is_empty() {
            return Err(invalid("workflow: required".into()));
        }
        self.check_workflow(&backfill.workflow, backfill.workflow_version)
            .await?;
        let (Some(start), Some(end)) = (&backfill.start, &backfill.end) else {
            return Err(invalid("start, end: required".into()));
        };
        if from_ts(end) <= from_ts(start) {
            return Err(invalid("end: must be after start".into()));
        }
        grain(&backfill)?;
        ticks::parse_zone(&backfill.time_zone).map_err(invalid)?;
        expr::check_inputs(&backfill.inputs).map_err(invalid)?;
        let mut backfill = Backfill {
            id: new_id(),
            max_concurrency: backfill.max_concurrency.max(1),
            state: BackfillState::Running as i32,
            done: 0,
            running: 0,
            failed: 0,
            created_at: Some(to_ts(self.inner.clock.now())),
            ..backfill
        };
        let total = partitions_of(&backfill)?.len();
        if total >= ticks::MAX_PARTITIONS {
            return Err(invalid(format!(
                "end: more than {} partitions",
                ticks::MAX_PARTITIONS
            )));
        }
        backfill.total = total as u32;
        backfill.queued = total as u32;
        self.inner.store.put_backfill(backfill.clone()).await?;
        self.inner.wake.notify_one();
        Ok(backfill)
    }

    /// The backfill with its progress counted from its runs now.
    pub async fn get_backfill(&self, id: &str) -> Result<Backfill, SchedError> {
        let mut backfill = self.inner.store.get_backfill(id).await?;
        let runs = self.partition_runs(&backfill.id).await?;
        count(&mut backfill, &runs);
        Ok(backfill)
    }

    pub async fn list_backfills(&self) -> Result<Vec<Backfill>, SchedError> {
        Ok(self.inner.store.list_backfills().await?)
    }

    /// Stops submitting and cancels the partition runs that have not ended.
    pub async fn cancel_backfill(&self, id: &str) -> Result<Backfill, SchedError> {
        let _guard = self.inner.backfills.lock().await;
        let mut backfill = self.inner.store.get_backfill(id).await?;
        if backfill.state() != BackfillState::Running {
            return Err(SchedError::FailedPrecondition(format!(
                "backfill {id} already ended ({})",
                state_name(backfill.state())
            )));
        }
        backfill.state = BackfillState::Cancelled as i32;
        self.inner.store.put_backfill(backfill.clone()).await?;
        for run in self.partition_runs(id).await?.values() {
            if is_active(run) {
                match self
                    .inner
                    .starter
                    .cancel(&run.run_id, "backfill cancelled")
                    .await
                {
                    Ok(()) | Err(SchedError::FailedPrecondition(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        let runs = self.partition_runs(id).await?;
        count(&mut backfill, &runs);
        self.inner.store.put_backfill(backfill.clone()).await?;
        Ok(backfill)
    }

    /// Continues a cancelled or failed backfill with the partitions that have no run yet.
    pub async fn resume_backfill(&self, id: &str) -> Result<Backfill, SchedError> {
        let backfill = {
            let _guard = self.inner.backfills.lock().await;
            let mut backfill = self.inner.store.get_backfill(id).await?;
            match backfill.state() {
                BackfillState::Cancelled | BackfillState::Failed => {}
                state => {
                    return Err(SchedError::FailedPrecondition(format!(
                        "backfill {id} is {}; only CANCELLED or FAILED backfills resume",
                        state_name(state)
                    )));
                }
            }
            backfill.state = BackfillState::Running as i32;
            self.inner.store.put_backfill(backfill.clone()).await?;
            backfill
        };
        self.inner.wake.notify_one();
        Ok(backfill)
    }

    /// Drives every running backfill once; true while any is still running.
    async fn drive_backfills(&self) -> Result<bool, SchedError> {
        let _guard = self.inner.backfills.lock().await;
        let mut any_running = false;
        for backfill in self.inner.store.list_backfills().await? {
            if backfill.state() != BackfillState::Running {
                continue;
            }
            match self.drive(backfill).await {
                Ok(running) => any_running |= running,
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => tracing::warn!(%error, "backfill step failed"),
            }
        }
        Ok(any_running)
    }

    /// Submits partitions in order up to `max_concurrency` active runs, counts progress and
    /// ends the backfill once every partition's run ended. The partition runs themselves are
    /// the state: a restarted scheduler carries on from what exists.
    async fn drive(&self, mut backfill: Backfill) -> Result<bool, SchedError> {
        let zone = ticks::parse_zone(&backfill.time_zone).map_err(invalid)?;
        let partitions = partitions_of(&backfill)?;
        let runs = self.partition_runs(&backfill.id).await?;
        count(&mut backfill, &runs);
        let mut running = backfill.running;
        for (index, (start, end)) in partitions.iter().enumerate() {
            if running >= backfill.max_concurrency.max(1) {
                break;
            }
            let key = partition_key(&backfill.id, *start);
            if runs.contains_key(&key) {
                continue;
            }
            let partition = serde_json::json!({
                "start": ticks::local_rfc3339(*start, zone),
                "end": ticks::local_rfc3339(*end, zone),
                "index": index,
            });
            let inputs = match expr::eval_inputs(&backfill.inputs, &[("partition", &partition)]) {
                Ok(inputs) => inputs,
                Err(error) => {
                    tracing::warn!(backfill = %backfill.id, %error, "backfill failed: inputs");
                    backfill.state = BackfillState::Failed as i32;
                    self.inner.store.put_backfill(backfill).await?;
                    return Ok(false);
                }
            };
            let mut tags = backfill.tags.clone();
            tags.insert(BACKFILL_TAG.to_owned(), backfill.id.clone());
            let request = SubmitRunRequest {
                workflow_ref: workflow_ref(&backfill.workflow, backfill.workflow_version),
                inputs: Some(dagmesh_proto::json::to_struct(&Json::Object(inputs))),
                idempotency_key: key,
                tags,
                ..SubmitRunRequest::default()
            };
            match self.inner.starter.submit(request).await {
                Ok((run, _)) => {
                    tracing::info!(backfill = %backfill.id, partition = index, run_id = %run.run_id, "partition started");
                    running += 1;
                }
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    tracing::warn!(backfill = %backfill.id, %error, "backfill failed: submit");
                    backfill.state = BackfillState::Failed as i32;
                    self.inner.store.put_backfill(backfill).await?;
                    return Ok(false);
                }
            }
        }
        let runs = self.partition_runs(&backfill.id).await?;
        count(&mut backfill, &runs);
        if backfill.queued == 0 && backfill.running == 0 {
            backfill.state = if backfill.failed == 0 {
                BackfillState::Succeeded
            } else {
                BackfillState::Failed
            } as i32;
        }
        let still_running = backfill.state() == BackfillState::Running;
        self.inner.store.put_backfill(backfill).await?;
        Ok(still_running)
    }

    /// The runs of a backfill by idempotency key.
    async fn partition_runs(&self, id: &str) -> Result<HashMap<String, Run>, SchedError> {
        let mut runs = HashMap::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .inner
                .starter
                .list_runs(ListRunsRequest {
                    tags: [(BACKFILL_TAG.to_owned(), id.to_owned())].into(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await?;
            for run in page.runs {
                runs.insert(run.idempotency_key.clone(), run);
            }
            if page.next_page_token.is_empty() {
                return Ok(runs);
            }
            page_token = page.next_page_token;
        }
    }
}

fn grain(backfill: &Backfill) -> Result<Grain, SchedError> {
    match backfill.partition() {
        Partition::Hourly => Ok(Grain::Hourly),
        Partition::Daily => Ok(Grain::Daily),
        Partition::Unspecified => Err(invalid("partition: HOURLY or DAILY required".into())),
    }
}

fn partitions_of(backfill: &Backfill) -> Result<Vec<ticks::Span>, SchedError> {
    let zone = ticks::parse_zone(&backfill.time_zone).map_err(invalid)?;
    let (Some(start), Some(end)) = (&backfill.start, &backfill.end) else {
        return Err(invalid("start, end: required".into()));
    };
    Ok(ticks::partitions(
        grain(backfill)?,
        zone,
        from_ts(start),
        from_ts(end),
    ))
}

fn partition_key(id: &str, start: DateTime<Utc>) -> String {
    format!("backfill/{id}/{}", ticks::utc_rfc3339(start))
}

fn is_active(run: &Run) -> bool {
    matches!(run.state(), RunState::Queued | RunState::Running)
}

/// Progress counts from the partition runs.
fn count(backfill: &mut Backfill, runs: &HashMap<String, Run>) {
    let (mut done, mut running, mut failed) = (0, 0, 0);
    for run in runs.values() {
        match run.state() {
            RunState::Succeeded => done += 1,
            RunState::Failed | RunState::Cancelled => failed += 1,
            _ => running += 1,
        }
    }
    backfill.done = done;
    backfill.running = running;
    backfill.failed = failed;
    backfill.queued = backfill.total.saturating_sub(done + running + failed);
}

fn state_name(state: BackfillState) -> &'static str {
    state.as_str_name().trim_start_matches("BACKFILL_STATE_")
}

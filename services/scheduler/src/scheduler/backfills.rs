//! Backfills: one run per partition of a range, at most `max_concurrency` at a time.
//!
//! The stored [`Backfill`] is the whole state and its size does not depend on the range: a
//! cursor (`next_partition`), the ids of the runs that were active at the last look (at most
//! `max_concurrency`) and counters. Partition `k` is computed from the range when it is
//! submitted. Each pass asks the executor only about the active runs; a run that ended moves from
//! `active_run_ids` to `done` or `failed` in the same record write, so a count is never taken
//! twice.
//!
//! Exactly once: the record is a function of (the previous record, what the executor said), and
//! every partition's run has an idempotency key. A restart that lost the last write, or a second
//! scheduler that overwrites a newer record with an older view, only moves the cursor back; the
//! partitions it then submits again return their existing runs, which are counted from there.

use std::collections::HashSet;

use dagmesh_metastore::StoreError;
use dagmesh_metastore::ownership::Ownership;
use dagmesh_proto::limits::{self, MAX_BACKFILL_CONCURRENCY, MAX_ERROR_LEN};
use dagmesh_proto::v1::{
    Backfill, BackfillState, ListRunsRequest, Run, RunState, SubmitRunRequest,
};

use super::{BACKFILL_TAG, Scheduler, inputs_struct, invalid, new_id, to_ts, workflow_ref};
use crate::validate::{self, BackfillDef};
use crate::{SchedError, expr, ticks};

/// How often a cancel or resume redoes its change after losing a race with the driver.
const UPDATE_ATTEMPTS: usize = 16;

/// Most partition runs whose end is awaited at once (each is a task, and in split mode a
/// WatchRun stream).
const MAX_AWAITED_RUNS: usize = 1_000;

/// What one look at a backfill's active runs found.
struct Settled {
    still_active: Vec<String>,
    done: u32,
    failed: u32,
}

impl Scheduler {
    pub async fn create_backfill(&self, backfill: Backfill) -> Result<Backfill, SchedError> {
        let backfill = Backfill {
            id: new_id(),
            // 0 means 1 (proto), so that a client that leaves it unset gets a working backfill.
            max_concurrency: backfill.max_concurrency.max(1),
            state: BackfillState::Running as i32,
            total: 0,
            done: 0,
            running: 0,
            failed: 0,
            queued: 0,
            next_partition: 0,
            active_run_ids: Vec::new(),
            error: String::new(),
            created_at: Some(to_ts(self.inner.clock.now())),
            revision: 0,
            ..backfill
        };
        let def = validate::backfill(&backfill).map_err(invalid)?;
        let declared = self
            .check_workflow(&backfill.workflow, backfill.workflow_version)
            .await?;
        expr::check_inputs(&backfill.inputs).map_err(invalid)?;
        // A trial with the first partition: a backfill whose runs would all be refused is
        // refused now, naming the input.
        if let Some((start, end)) = def.partitions.get(0) {
            let partition = serde_json::json!({
                "start": ticks::local_rfc3339(start, def.zone),
                "end": ticks::local_rfc3339(end, def.zone),
                "index": 0,
            });
            let trial = expr::eval_inputs(&backfill.inputs, &[("partition", &partition)])
                .map_err(invalid)?;
            super::check_declared(&declared, trial, &backfill.workflow, "the first partition")?;
        }
        let total = def.partitions.total();
        let backfill = Backfill {
            total,
            queued: total,
            ..backfill
        };
        let backfill = self.inner.store.put_backfill(backfill).await?;
        self.inner.wake.notify_one();
        Ok(backfill)
    }

    /// Reads the backfill, applies `change` and writes it back if nobody wrote it meanwhile;
    /// on a lost race (the scheduler that drives it wrote its progress), reads it again and
    /// redoes the change. `change` refuses by returning an error.
    async fn update_backfill(
        &self,
        id: &str,
        change: impl Fn(&mut Backfill) -> Result<(), SchedError>,
    ) -> Result<Backfill, SchedError> {
        // Each lost race means another write landed; a driver writes once per pass, so a few
        // attempts always suffice unless the store misbehaves.
        for _ in 0..UPDATE_ATTEMPTS {
            let mut backfill = self.inner.store.get_backfill(id).await?;
            change(&mut backfill)?;
            match self.inner.store.put_backfill(backfill).await {
                Ok(stored) => return Ok(stored),
                Err(StoreError::Conflict(_)) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(SchedError::Unavailable(format!(
            "backfill {id} kept changing under this update ({UPDATE_ATTEMPTS} attempts); try again"
        )))
    }

    /// The backfill with its progress as of the scheduler's last look.
    pub async fn get_backfill(&self, id: &str) -> Result<Backfill, SchedError> {
        Ok(self.inner.store.get_backfill(id).await?)
    }

    pub async fn list_backfills(&self) -> Result<Vec<Backfill>, SchedError> {
        Ok(self.inner.store.list_backfills().await?)
    }

    /// Stops submitting and cancels the partition runs that have not ended.
    pub async fn cancel_backfill(&self, id: &str) -> Result<Backfill, SchedError> {
        let _guard = self.inner.backfills.lock().await;
        // Written first, so that the scheduler that drives it stops submitting as soon as it
        // can (its next write of the record is refused: it reads the cancel instead).
        let mut backfill = self
            .update_backfill(id, |backfill| {
                if backfill.state() != BackfillState::Running {
                    return Err(SchedError::FailedPrecondition(format!(
                        "backfill {id} already ended ({})",
                        state_name(backfill.state())
                    )));
                }
                backfill.state = BackfillState::Cancelled as i32;
                Ok(())
            })
            .await?;
        // The runs of the record, and any a second scheduler started that this record does not
        // know yet (they are found again, ended, if the backfill is resumed).
        let mut targets: Vec<String> = backfill.active_run_ids.clone();
        for run_id in self.active_runs(id).await? {
            if !targets.contains(&run_id) {
                targets.push(run_id);
            }
        }
        for run_id in &targets {
            match self
                .inner
                .starter
                .cancel(run_id, "backfill cancelled")
                .await
            {
                Ok(()) | Err(SchedError::FailedPrecondition(_) | SchedError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        self.settle(&mut backfill).await?;
        match self.inner.store.put_backfill(backfill).await {
            Ok(stored) => Ok(stored),
            // The driver counted them meanwhile: its record is as good.
            Err(StoreError::Conflict(_)) => Ok(self.inner.store.get_backfill(id).await?),
            Err(error) => Err(error.into()),
        }
    }

    /// Continues a cancelled or failed backfill with the partitions that have no run yet.
    pub async fn resume_backfill(&self, id: &str) -> Result<Backfill, SchedError> {
        let backfill = {
            let _guard = self.inner.backfills.lock().await;
            self.update_backfill(id, |backfill| {
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
                backfill.error.clear();
                Ok(())
            })
            .await?
        };
        self.inner.wake.notify_one();
        Ok(backfill)
    }

    /// Drives every running backfill once (and counts the runs of stopped ones that were still
    /// active); true while any is still running.
    pub(super) async fn drive_backfills(&self, ownership: &Ownership) -> Result<bool, SchedError> {
        let _guard = self.inner.backfills.lock().await;
        let mut any_running = false;
        for backfill in self.inner.store.list_backfills().await? {
            if !ownership.owns_key(&backfill.id) {
                continue; // another scheduler of this database drives it
            }
            let running = backfill.state() == BackfillState::Running;
            if !running && backfill.active_run_ids.is_empty() {
                continue;
            }
            let id = backfill.id.clone();
            match self.drive(backfill).await {
                Ok(running) => any_running |= running,
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => tracing::warn!(backfill = %id, %error, "backfill step failed"),
            }
        }
        Ok(any_running)
    }

    /// Counts the active runs that ended, submits partitions in order up to `max_concurrency`
    /// active runs, and ends the backfill once every partition's run ended. Returns whether it
    /// still runs.
    async fn drive(&self, mut backfill: Backfill) -> Result<bool, SchedError> {
        let def = match validate::stored_backfill(&backfill) {
            Ok(def) => def,
            Err(reason) => {
                tracing::warn!(backfill = %backfill.id, %reason, "invalid backfill record");
                if backfill.state() == BackfillState::Running {
                    self.fail(backfill, format!("invalid backfill record: {reason}"))
                        .await?;
                }
                return Ok(false);
            }
        };
        if backfill.next_partition == 0 && backfill.active_run_ids.is_empty() {
            // Nothing submitted yet (or a record of a version that counted from a listing of
            // every run): counts start from zero and re-submits find existing runs.
            backfill.done = 0;
            backfill.failed = 0;
        }
        self.settle(&mut backfill).await?;
        if backfill.state() == BackfillState::Running
            && let Err(error) = self.submit_partitions(&mut backfill, &def).await
        {
            // What was submitted so far is kept; a transient failure is retried next pass.
            update_counts(&mut backfill);
            let Some(stored) = self.write_progress(backfill).await? else {
                return Ok(true);
            };
            return match error {
                SubmitError::Transient(error) => Err(error),
                SubmitError::Permanent(reason) => {
                    tracing::warn!(backfill = %stored.id, %reason, "backfill failed");
                    self.fail(stored, reason).await?;
                    Ok(false)
                }
            };
        }
        update_counts(&mut backfill);
        if backfill.state() == BackfillState::Running
            && backfill.queued == 0
            && backfill.running == 0
        {
            backfill.state = if backfill.failed == 0 {
                BackfillState::Succeeded
            } else {
                BackfillState::Failed
            } as i32;
        }
        let still_running = backfill.state() == BackfillState::Running;
        if still_running {
            self.wake_when_ended(&backfill.active_run_ids);
        }
        if self.write_progress(backfill).await?.is_none() {
            return Ok(true);
        }
        Ok(still_running)
    }

    /// Writes a driver's view of a backfill and returns what was stored; `None` when someone
    /// changed the record since it was read (a cancel or resume through another scheduler):
    /// nothing was written, and the next pass reads the change. Runs this pass submitted are
    /// not lost: their partitions' idempotency keys give them back when submitted again.
    async fn write_progress(&self, backfill: Backfill) -> Result<Option<Backfill>, SchedError> {
        let id = backfill.id.clone();
        match self.inner.store.put_backfill(backfill).await {
            Ok(stored) => Ok(Some(stored)),
            Err(StoreError::Conflict(reason)) => {
                tracing::debug!(backfill = %id, %reason, "backfill changed meanwhile; next pass");
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Wakes the loop the moment one of these partition runs ends, so that the next partition
    /// starts when a slot frees rather than at the next poll. One task per run, at most
    /// [`MAX_AWAITED_RUNS`] in all (the poll covers the rest).
    fn wake_when_ended(&self, run_ids: &[String]) {
        let mut awaited = self
            .inner
            .awaited_runs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for run_id in run_ids {
            if awaited.len() >= MAX_AWAITED_RUNS || !awaited.insert(run_id.clone()) {
                continue;
            }
            let this = self.clone();
            let run_id = run_id.clone();
            tokio::spawn(async move {
                let ended = this.inner.starter.wait_ended(&run_id).await;
                if let Err(error) = &ended {
                    // Not waited for again before the next poll: no busy loop while the
                    // executor is away.
                    tracing::debug!(run_id, %error, "cannot wait for a partition run; polling");
                    tokio::time::sleep(this.inner.config.backfill_poll).await;
                }
                this.inner
                    .awaited_runs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&run_id);
                if ended.is_ok() {
                    this.inner.wake.notify_one();
                }
            });
        }
    }

    /// Submits partitions from the cursor while fewer than `max_concurrency` runs are active.
    /// At most `max_concurrency` submits per pass, even when re-submits find runs that already
    /// ended (a record written by an older version starts its cursor at 0).
    async fn submit_partitions(
        &self,
        backfill: &mut Backfill,
        def: &BackfillDef,
    ) -> Result<(), SubmitError> {
        let limit = backfill.max_concurrency as usize;
        let mut submits = 0;
        while backfill.active_run_ids.len() < limit
            && submits < limit
            && backfill.next_partition < def.partitions.total()
        {
            let index = backfill.next_partition;
            let Some((start, end)) = def.partitions.get(index) else {
                // Validated ranges never get here; were one to, it must end, not stall.
                return Err(SubmitError::Permanent(format!(
                    "partition {index}: outside the supported time range"
                )));
            };
            let key = partition_key(&backfill.id, start);
            let partition = serde_json::json!({
                "start": ticks::local_rfc3339(start, def.zone),
                "end": ticks::local_rfc3339(end, def.zone),
                "index": index,
            });
            let inputs = expr::eval_inputs(&backfill.inputs, &[("partition", &partition)])
                .and_then(inputs_struct)
                .map_err(|e| {
                    SubmitError::Permanent(format!(
                        "partition {index} ({}): {e}",
                        ticks::utc_rfc3339(start)
                    ))
                })?;
            let mut tags = backfill.tags.clone();
            tags.insert(BACKFILL_TAG.to_owned(), backfill.id.clone());
            let request = SubmitRunRequest {
                workflow_ref: workflow_ref(&backfill.workflow, backfill.workflow_version),
                inputs: Some(inputs),
                idempotency_key: key,
                tags,
                ..SubmitRunRequest::default()
            };
            submits += 1;
            match self.inner.starter.submit(request).await {
                Ok((run, created)) => {
                    tracing::info!(backfill = %backfill.id, partition = index, run_id = %run.run_id, created, "partition started");
                    if is_ended(&run) {
                        count_ended(&mut backfill.done, &mut backfill.failed, &run);
                    } else if !backfill.active_run_ids.contains(&run.run_id) {
                        backfill.active_run_ids.push(run.run_id);
                    }
                    backfill.next_partition = index.saturating_add(1);
                }
                Err(error) if error.is_transient() => return Err(SubmitError::Transient(error)),
                Err(error) => {
                    return Err(SubmitError::Permanent(format!(
                        "partition {index} ({}): submit refused: {error}",
                        ticks::utc_rfc3339(start)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Moves the active runs that ended into the counts.
    async fn settle(&self, backfill: &mut Backfill) -> Result<(), SchedError> {
        if backfill.active_run_ids.is_empty() {
            return Ok(());
        }
        // One listing of the runs that are active answers for most ids; only the others are
        // looked up one by one (they ended, or changed state between the two listings).
        let active = self.active_runs(&backfill.id).await?;
        let mut settled = Settled {
            still_active: Vec::new(),
            done: backfill.done,
            failed: backfill.failed,
        };
        for run_id in &backfill.active_run_ids {
            if active.contains(run_id) {
                settled.still_active.push(run_id.clone());
                continue;
            }
            match self.inner.starter.get_run(run_id).await {
                Ok(run) if is_ended(&run) => {
                    count_ended(&mut settled.done, &mut settled.failed, &run);
                }
                Ok(_) => settled.still_active.push(run_id.clone()),
                Err(SchedError::NotFound(_) | SchedError::Store(StoreError::NotFound(_))) => {
                    // Deleted (or never durable): nothing will ever end it, so it counts as
                    // failed rather than holding a slot forever.
                    tracing::warn!(backfill = %backfill.id, run_id, "partition run not found; counted as failed");
                    settled.failed = settled.failed.saturating_add(1);
                }
                // Counts change only all together, so an error here loses nothing.
                Err(error) => return Err(error),
            }
        }
        backfill.active_run_ids = settled.still_active;
        backfill.done = settled.done;
        backfill.failed = settled.failed;
        update_counts(backfill);
        Ok(())
    }

    /// Ids of the backfill's runs that are QUEUED or RUNNING: about `max_concurrency` of them.
    async fn active_runs(&self, id: &str) -> Result<HashSet<String>, SchedError> {
        let mut ids = HashSet::new();
        for state in [RunState::Running, RunState::Queued] {
            let mut page_token = String::new();
            loop {
                let page = self
                    .inner
                    .starter
                    .list_runs(ListRunsRequest {
                        tags: [(BACKFILL_TAG.to_owned(), id.to_owned())].into(),
                        state: state as i32,
                        page_size: 1000,
                        page_token,
                        ..Default::default()
                    })
                    .await?;
                ids.extend(page.runs.into_iter().map(|run| run.run_id));
                // Two schedulers may briefly exceed max_concurrency, never by more than this;
                // past it the remaining ids are looked up one by one instead.
                if page.next_page_token.is_empty()
                    || ids.len() > 2 * MAX_BACKFILL_CONCURRENCY as usize
                {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        Ok(ids)
    }

    async fn fail(&self, mut backfill: Backfill, reason: String) -> Result<(), SchedError> {
        backfill.state = BackfillState::Failed as i32;
        backfill.error = reason;
        limits::truncate_marked(&mut backfill.error, MAX_ERROR_LEN);
        self.write_progress(backfill).await?;
        Ok(())
    }
}

enum SubmitError {
    /// The executor or store is unreachable: try again next pass.
    Transient(SchedError),
    /// The backfill cannot go on: it fails with this reason.
    Permanent(String),
}

fn partition_key(id: &str, start: chrono::DateTime<chrono::Utc>) -> String {
    format!("backfill/{id}/{}", ticks::utc_rfc3339(start))
}

fn is_ended(run: &Run) -> bool {
    matches!(
        run.state(),
        RunState::Succeeded | RunState::Failed | RunState::Cancelled
    )
}

fn count_ended(done: &mut u32, failed: &mut u32, run: &Run) {
    if run.state() == RunState::Succeeded {
        *done = done.saturating_add(1);
    } else {
        *failed = failed.saturating_add(1);
    }
}

/// `running` and `queued` from the cursor and the active runs.
fn update_counts(backfill: &mut Backfill) {
    backfill.running = u32::try_from(backfill.active_run_ids.len()).unwrap_or(u32::MAX);
    backfill.queued = backfill.total.saturating_sub(backfill.next_partition);
}

fn state_name(state: BackfillState) -> &'static str {
    state.as_str_name().trim_start_matches("BACKFILL_STATE_")
}

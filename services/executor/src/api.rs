//! The executor as an [`ExecutorApi`]: the run API in-process, with the request checks and the
//! watch algorithm (snapshot, resume after a sequence number, paging, a fallback while the run
//! is not active here). The `RunService` adapter and every in-process caller go through it.

use std::time::Duration;

use dagmesh_api::{ApiError, ApiStream, Caller, ExecutorApi};
use dagmesh_proto::limits::{MAX_ENTRIES, MAX_NAME_LEN, MAX_VALUE_LEN, check_len};
use dagmesh_proto::v1::{
    ApplyWorkflowRequest, ApplyWorkflowResponse, ApproveStepRequest, CancelRunRequest,
    DeliverEventRequest, DeliverEventResponse, GetStepLogsRequest, GetStepLogsResponse,
    GetWorkflowRequest, ListQueuesRequest, ListQueuesResponse, ListRunsRequest, ListRunsResponse,
    ListWorkersRequest, ListWorkersResponse, ListWorkflowsRequest, ListWorkflowsResponse,
    QueueInfo, ResumeRunRequest, RetryRunRequest, Run, RunEvent, RunState, SubmitRunRequest,
    SubmitRunResponse, SuspendRunRequest, WatchRunRequest, WatchRunResponse, Workflow, run_event,
    watch_run_response,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::engine::Command;
use crate::{ExecError, Executor};

/// Events per store read while watching (one page).
const EVENT_PAGE: u32 = 1000;

type Sender<T> = mpsc::Sender<Result<T, ApiError>>;

#[async_trait::async_trait]
impl ExecutorApi for Executor {
    async fn apply_workflow(
        &self,
        request: ApplyWorkflowRequest,
    ) -> Result<ApplyWorkflowResponse, ApiError> {
        let spec = request
            .spec
            .ok_or_else(|| ApiError::invalid_argument("spec: required"))?;
        let (workflow, created) = Executor::apply_workflow(self, spec).await?;
        Ok(ApplyWorkflowResponse {
            workflow: Some(workflow),
            created,
        })
    }

    async fn get_workflow(&self, request: GetWorkflowRequest) -> Result<Workflow, ApiError> {
        check_len("name", &request.name, MAX_NAME_LEN).map_err(ApiError::invalid_argument)?;
        let version = (request.version != 0).then_some(request.version);
        Ok(self
            .store()
            .get_workflow(&request.name, version)
            .await
            .map_err(ExecError::from)?)
    }

    async fn list_workflows(
        &self,
        _: ListWorkflowsRequest,
    ) -> Result<ListWorkflowsResponse, ApiError> {
        let workflows = self
            .store()
            .list_workflows()
            .await
            .map_err(ExecError::from)?;
        Ok(ListWorkflowsResponse { workflows })
    }

    async fn list_workers(&self, _: ListWorkersRequest) -> Result<ListWorkersResponse, ApiError> {
        let workers = Executor::list_workers(self).await?;
        Ok(ListWorkersResponse { workers })
    }

    async fn list_queues(
        &self,
        request: ListQueuesRequest,
    ) -> Result<ListQueuesResponse, ApiError> {
        let task_type = request.task_type;
        check_len("task_type", &task_type, MAX_NAME_LEN).map_err(ApiError::invalid_argument)?;
        let snapshot = self.queues().await?;
        let queues = snapshot
            .queues
            .into_iter()
            .filter(|queue| task_type.is_empty() || queue.task_type == task_type)
            .map(|queue| QueueInfo {
                task_type: queue.task_type,
                version_requirement: queue.version_req.to_string(),
                labels: queue.labels.into_iter().collect(),
                slots_per_task: queue.slots_per_task,
                queued: queue.queued,
                oldest_age: queue
                    .oldest_age
                    .and_then(|age| prost_types::Duration::try_from(age).ok()),
                running: queue.running,
                matching_workers: queue.matching_workers,
                free_slots: queue.free_slots,
            })
            .collect();
        Ok(ListQueuesResponse { queues })
    }

    async fn submit_run(
        &self,
        caller: &Caller,
        request: SubmitRunRequest,
    ) -> Result<SubmitRunResponse, ApiError> {
        // Kept only while it may have to go to another replica.
        let again = self.config().share_partitions.then(|| request.clone());
        let submitted = self
            .submit_traced(request, &caller.actor, caller.traceparent.as_deref())
            .await
            .map(|(run, created)| SubmitRunResponse {
                run: Some(run),
                created,
            });
        self.here_or_at_owner(caller, submitted, |owner, caller| async move {
            owner.submit_run(&caller, kept(again)?).await
        })
        .await
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, ApiError> {
        check_run_id(run_id)?;
        let run = self
            .store()
            .get_run(run_id)
            .await
            .map_err(ExecError::from)?;
        let mut runs = [run];
        self.fill_queue_positions(&mut runs).await?;
        let [mut run] = runs;
        self.fill_waiting_reasons(&mut run).await?;
        Ok(run)
    }

    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, ApiError> {
        check_list_request(&request)?;
        let mut runs = self
            .store()
            .list_runs(&request)
            .await
            .map_err(ExecError::from)?;
        self.fill_queue_positions(&mut runs.runs).await?;
        Ok(runs)
    }

    async fn watch_run(
        &self,
        request: WatchRunRequest,
    ) -> Result<ApiStream<WatchRunResponse>, ApiError> {
        check_run_id(&request.run_id)?;
        // Fail unknown runs before the stream opens, so the caller gets NOT_FOUND directly.
        let run = self
            .store()
            .get_run(&request.run_id)
            .await
            .map_err(ExecError::from)?;
        let executor = self.clone();
        Ok(spawn_stream(move |tx| {
            watch(executor, run, request.after_seq, tx)
        }))
    }

    async fn get_step_logs(
        &self,
        request: GetStepLogsRequest,
    ) -> Result<ApiStream<GetStepLogsResponse>, ApiError> {
        check_run_id(&request.run_id)?;
        check_len("step_id", &request.step_id, MAX_NAME_LEN).map_err(ApiError::invalid_argument)?;
        let run = self
            .store()
            .get_run(&request.run_id)
            .await
            .map_err(ExecError::from)?;
        let executor = self.clone();
        Ok(spawn_stream(move |tx| {
            step_logs(executor, run, request, tx)
        }))
    }

    async fn cancel_run(
        &self,
        caller: &Caller,
        request: CancelRunRequest,
    ) -> Result<Run, ApiError> {
        let cancelled = self
            .cancel_as(&request.run_id, &request.reason, &caller.actor)
            .await;
        self.here_or_at_owner(caller, cancelled, |owner, caller| async move {
            owner.cancel_run(&caller, request).await
        })
        .await
    }

    async fn retry_run(&self, caller: &Caller, request: RetryRunRequest) -> Result<Run, ApiError> {
        check_run_id(&request.run_id)?;
        let retried = self
            .retry_as(&request.run_id, &request.from_step, &caller.actor)
            .await;
        self.here_or_at_owner(caller, retried, |owner, caller| async move {
            owner.retry_run(&caller, request).await
        })
        .await
    }

    async fn approve_step(
        &self,
        caller: &Caller,
        request: ApproveStepRequest,
    ) -> Result<Run, ApiError> {
        let again = self.config().share_partitions.then(|| request.clone());
        let approved = self.approve_step_as(request, &caller.actor).await;
        self.here_or_at_owner(caller, approved, |owner, caller| async move {
            owner.approve_step(&caller, kept(again)?).await
        })
        .await
    }

    async fn suspend_run(
        &self,
        caller: &Caller,
        request: SuspendRunRequest,
    ) -> Result<Run, ApiError> {
        let suspended = self
            .suspend_as(&request.run_id, true, &request.reason, &caller.actor)
            .await;
        self.here_or_at_owner(caller, suspended, |owner, caller| async move {
            owner.suspend_run(&caller, request).await
        })
        .await
    }

    async fn resume_run(
        &self,
        caller: &Caller,
        request: ResumeRunRequest,
    ) -> Result<Run, ApiError> {
        let resumed = self
            .suspend_as(&request.run_id, false, "", &caller.actor)
            .await;
        self.here_or_at_owner(caller, resumed, |owner, caller| async move {
            owner.resume_run(&caller, request).await
        })
        .await
    }

    async fn deliver_event(
        &self,
        caller: &Caller,
        request: DeliverEventRequest,
    ) -> Result<DeliverEventResponse, ApiError> {
        let payload = request.payload.clone().unwrap_or_default();
        let mut resumed = Executor::deliver_event(self, &request.topic, payload).await?;
        if self.config().share_partitions && !caller.forwarded {
            // The waiting steps are on whichever replica drives their runs: every one hears it.
            // A replica that cannot be reached fails the call after the others heard it; a
            // retry resumes only what still waits.
            let mut unreached = Vec::new();
            for (url, peer) in self.other_replicas().await? {
                match peer
                    .deliver_event(&forwarded(caller), request.clone())
                    .await
                {
                    Ok(answer) => resumed.extend(answer.resumed),
                    Err(error) => unreached.push(format!("{url}: {error}")),
                }
            }
            if !unreached.is_empty() {
                return Err(ApiError::unavailable(format!(
                    "the event reached only some executor replicas (retry; steps already resumed \
                     are not resumed twice): {}",
                    unreached.join("; ")
                )));
            }
        }
        Ok(DeliverEventResponse { resumed })
    }
}

/// The caller of a call this replica forwards to the replica that drives its run.
fn forwarded(caller: &Caller) -> Caller {
    Caller {
        forwarded: true,
        ..caller.clone()
    }
}

/// A request kept for another replica (`Some` whenever the partitions are shared, the only time
/// `here_or_at_owner` forwards).
fn kept<T>(request: Option<T>) -> Result<T, ApiError> {
    request.ok_or_else(|| ApiError::unavailable("this executor does not share the partitions"))
}

impl Executor {
    /// `local`'s answer to a call about a run, unless the run belongs to a partition another
    /// replica drives: then `remote` makes the same call there, as forwarded (see `owner_of`).
    async fn here_or_at_owner<T, Fut>(
        &self,
        caller: &Caller,
        local: Result<T, ExecError>,
        remote: impl FnOnce(std::sync::Arc<dagmesh_api::GrpcExecutor>, Caller) -> Fut,
    ) -> Result<T, ApiError>
    where
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        match local {
            Err(ExecError::Elsewhere { partition, message }) => {
                let owner = self.owner_of(partition, caller, message).await?;
                remote(owner, forwarded(caller)).await
            }
            answer => Ok(answer?),
        }
    }

    /// The other live replicas that share the partitions (their member leases), with clients.
    async fn other_replicas(
        &self,
    ) -> Result<Vec<(String, std::sync::Arc<dagmesh_api::GrpcExecutor>)>, ApiError> {
        let prefix = format!(
            "{}{}/",
            dagmesh_metastore::MEMBER_LEASES,
            crate::partitions::GROUP
        );
        let members = self
            .store()
            .list_live_leases(&prefix)
            .await
            .map_err(ExecError::from)?;
        let own = self.config().advertise_url.as_deref();
        let mut others = Vec::new();
        for member in &members {
            let Some(url) = dagmesh_metastore::ownership::holder_address(&member.holder) else {
                continue;
            };
            if Some(url) != own {
                others.push((url.to_owned(), self.replica(url)?));
            }
        }
        Ok(others)
    }

    /// A client of the replica at `url` (kept, a few dozen at most).
    fn replica(&self, url: &str) -> Result<std::sync::Arc<dagmesh_api::GrpcExecutor>, ApiError> {
        let mut owners = self.inner.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(owner) = owners.get(url) {
            return Ok(owner.clone());
        }
        let owner = std::sync::Arc::new(dagmesh_api::GrpcExecutor::connect_lazy(
            url,
            &self.config().peers,
        )?);
        if owners.len() >= 64 {
            owners.clear(); // replicas come and go; never an unbounded map
        }
        owners.insert(url.to_owned(), owner.clone());
        Ok(owner)
    }

    /// The replica that drives `partition`, for a call about one of its runs (executors that
    /// share the partitions); UNAVAILABLE with `message` when the call cannot go there: not
    /// sharing, forwarded once already, or the partition has no other live owner right now
    /// (it is being handed over).
    async fn owner_of(
        &self,
        partition: u32,
        caller: &Caller,
        message: String,
    ) -> Result<std::sync::Arc<dagmesh_api::GrpcExecutor>, ApiError> {
        let unavailable = || ApiError::unavailable(message.clone());
        if !self.config().share_partitions || caller.forwarded {
            return Err(unavailable());
        }
        let name = format!("{}/p-{partition}", crate::partitions::GROUP);
        // In a handover the partition has no live lease for a moment (a refresh interval when
        // it is handed back, the TTL when its owner died): wait that long for the next owner
        // rather than fail the call.
        let give_up = tokio::time::Instant::now() + self.config().executor_lease_ttl;
        let url = loop {
            let leases = self
                .store()
                .list_live_leases(&name)
                .await
                .map_err(ExecError::from)?;
            let holder = leases
                .iter()
                .find(|lease| lease.name == name)
                .and_then(|lease| dagmesh_metastore::ownership::holder_address(&lease.holder));
            if let Some(url) = holder {
                break url.to_owned();
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(unavailable());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        if Some(url.as_str()) == self.config().advertise_url.as_deref() {
            return Err(unavailable()); // this replica, which is taking it up right now
        }
        self.replica(&url)
    }
}

/// A stream fed by `produce` on a task of its own; the error it ends with, if any, is the
/// stream's last item. The task ends when `produce` does, or when the reader drops the stream
/// (`produce` sees its sender fail or close).
fn spawn_stream<T, F, Fut>(produce: F) -> ApiStream<T>
where
    T: Send + 'static,
    F: FnOnce(Sender<T>) -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(256);
    let errors = tx.clone();
    let produced = produce(tx);
    tokio::spawn(async move {
        if let Err(error) = produced.await {
            let _ = errors.send(Err(error)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn check_run_id(run_id: &str) -> Result<(), ApiError> {
    check_len("run_id", run_id, MAX_VALUE_LEN).map_err(ApiError::invalid_argument)
}

fn check_list_request(request: &ListRunsRequest) -> Result<(), ApiError> {
    let invalid = ApiError::invalid_argument;
    check_len("workflow", &request.workflow, MAX_NAME_LEN).map_err(invalid)?;
    check_len("page_token", &request.page_token, MAX_VALUE_LEN).map_err(invalid)?;
    if request.page_size > dagmesh_metastore::MAX_PAGE_SIZE {
        return Err(invalid(format!(
            "page_size: {} is over the maximum of {}",
            request.page_size,
            dagmesh_metastore::MAX_PAGE_SIZE
        )));
    }
    if request.tags.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "tags: {} entries, over the limit of {MAX_ENTRIES}",
            request.tags.len()
        )));
    }
    for (key, value) in &request.tags {
        check_len("tags key", key, MAX_NAME_LEN).map_err(invalid)?;
        check_len(&format!("tags.{key}"), value, MAX_VALUE_LEN).map_err(invalid)?;
    }
    for (field, time) in [
        ("created_after", &request.created_after),
        ("created_before", &request.created_before),
    ] {
        if let Some(time) = time
            && dagmesh_metastore::run_id_floor(time).is_none()
        {
            return Err(invalid(format!(
                "{field}: {}s {}ns is not a time runs can have been created at \
                 (1970 to year 10889, nanos 0 to 999,999,999)",
                time.seconds, time.nanos
            )));
        }
    }
    Ok(())
}

fn is_finished(state: RunState) -> bool {
    matches!(
        state,
        RunState::Succeeded | RunState::Failed | RunState::Cancelled
    )
}

/// Whether `step_id` is `wanted` or one of its items (`wanted[3]`); an empty `wanted` takes all.
fn step_matches(step_id: &str, wanted: &str) -> bool {
    wanted.is_empty()
        || step_id == wanted
        || step_id
            .strip_prefix(wanted)
            .is_some_and(|rest| rest.starts_with('[') && rest.ends_with(']'))
}

/// GetStepLogs: the run's StepLog events from the store, filtered; with `follow`, the watch
/// below (resumed after `after_seq`, so without a snapshot) feeds new ones until the run ends.
async fn step_logs(
    executor: Executor,
    run: Run,
    request: GetStepLogsRequest,
    tx: Sender<GetStepLogsResponse>,
) -> Result<(), ApiError> {
    let wanted = |event: &RunEvent| match &event.event {
        Some(run_event::Event::StepLog(log))
            if step_matches(&log.step_id, &request.step_id)
                && (request.attempt == 0 || request.attempt == log.attempt) =>
        {
            Some(GetStepLogsResponse {
                step_id: log.step_id.clone(),
                attempt: log.attempt,
                lines: log.lines.clone(),
                seq: event.seq,
            })
        }
        _ => None,
    };
    if !request.follow {
        let store = executor.store().clone();
        let mut cursor = request.after_seq;
        loop {
            let events = store
                .read_events(&run.run_id, cursor, EVENT_PAGE)
                .await
                .map_err(ExecError::from)?;
            let full_page = events.len() == EVENT_PAGE as usize;
            for event in events {
                cursor = event.seq;
                if let Some(lines) = wanted(&event)
                    && tx.send(Ok(lines)).await.is_err()
                {
                    return Ok(());
                }
            }
            if !full_page {
                return Ok(());
            }
        }
    }
    let mut events =
        spawn_stream(move |events| watch(executor, run, Some(request.after_seq), events));
    loop {
        let item = tokio::select! {
            item = events.next() => item,
            () = tx.closed() => break, // the reader left
        };
        let item = match item {
            None => break, // the run ended
            Some(item) => item?,
        };
        if let Some(watch_run_response::Message::Event(event)) = item.message
            && let Some(lines) = wanted(&event)
            && tx.send(Ok(lines)).await.is_err()
        {
            break; // the reader left
        }
    }
    Ok(())
}

/// Streams a run: snapshot (unless resuming), then events from the store each time the engine
/// says the run's log grew, until the run's final event. Reading from the log, not from a live
/// feed, means a slow watcher skips nothing and a resumed one sees exactly what it missed.
async fn watch(
    executor: Executor,
    run: Run,
    after_seq: Option<u64>,
    tx: Sender<WatchRunResponse>,
) -> Result<(), ApiError> {
    let run_id = run.run_id.clone();
    let store = executor.store().clone();
    let subscribe = || async {
        executor
            .inner
            .engine
            .call(|reply| Command::Watch {
                run_id: run_id.clone(),
                reply,
            })
            .await
    };
    let mut updates = subscribe().await?;
    let mut cursor = after_seq.unwrap_or_default();
    if after_seq.is_none() {
        // Re-read after subscribing so no commit falls between the snapshot and the updates.
        let mut run = store.get_run(&run_id).await.map_err(ExecError::from)?;
        executor.fill_waiting_reasons(&mut run).await?;
        cursor = run.last_seq;
        let finished = is_finished(run.state());
        let snapshot = WatchRunResponse {
            message: Some(watch_run_response::Message::Snapshot(run)),
        };
        if tx.send(Ok(snapshot)).await.is_err() || finished {
            return Ok(());
        }
    }
    loop {
        let events = store
            .read_events(&run_id, cursor, EVENT_PAGE)
            .await
            .map_err(ExecError::from)?;
        let full_page = events.len() == EVENT_PAGE as usize;
        let mut finished = false;
        for event in events {
            cursor = event.seq;
            if let Some(run_event::Event::RunState(change)) = &event.event {
                finished = is_finished(change.state());
            }
            let item = WatchRunResponse {
                message: Some(watch_run_response::Message::Event(event)),
            };
            if tx.send(Ok(item)).await.is_err() {
                return Ok(()); // the watcher left
            }
        }
        if full_page {
            continue;
        }
        if finished {
            return Ok(());
        }
        match &mut updates {
            Some(receiver) => {
                tokio::select! {
                    changed = receiver.changed() => {
                        if changed.is_err() {
                            updates = None; // the run ended; one more read gets its last events
                        }
                    }
                    () = tx.closed() => return Ok(()),
                }
            }
            None => {
                let run = store.get_run(&run_id).await.map_err(ExecError::from)?;
                if is_finished(run.state()) && run.last_seq <= cursor {
                    return Ok(());
                }
                // Another replica drives it (executors that share the partitions): follow that
                // replica's live stream from the cursor, until it ends or breaks.
                if let Some(events) = owners_watch(&executor, &run, cursor).await {
                    tokio::pin!(events);
                    while let Some(Ok(item)) = events.next().await {
                        let Some(watch_run_response::Message::Event(event)) = &item.message else {
                            continue;
                        };
                        if event.seq <= cursor {
                            continue;
                        }
                        cursor = event.seq;
                        let ended = matches!(&event.event,
                            Some(run_event::Event::RunState(change)) if is_finished(change.state()));
                        if tx.send(Ok(item)).await.is_err() || ended {
                            return Ok(());
                        }
                    }
                    updates = subscribe().await?;
                    continue;
                }
                // Not active in this executor right now (it is recovering, or the run is
                // between owners): look again shortly.
                tokio::time::sleep(Duration::from_millis(200)).await;
                updates = subscribe().await?;
            }
        }
    }
}

/// The live event stream of `run` from the replica that drives it, after `cursor`; `None` when
/// this executor does not share the partitions, drives the run itself, or cannot reach the
/// owner (the caller then polls the store).
async fn owners_watch(
    executor: &Executor,
    run: &Run,
    cursor: u64,
) -> Option<ApiStream<WatchRunResponse>> {
    let owner = executor
        .owner_of(run.partition, &Caller::default(), String::new())
        .await
        .ok()?;
    let request = WatchRunRequest {
        run_id: run.run_id.clone(),
        after_seq: Some(cursor),
    };
    owner.watch_run(request).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    #[test]
    fn list_requests_name_the_field_that_is_out_of_range() {
        let time = |seconds, nanos| Some(Timestamp { seconds, nanos });
        let ok = ListRunsRequest {
            created_after: time(1_764_000_000, 0),
            created_before: time(1_765_000_000, 999_999_999),
            ..Default::default()
        };
        assert!(check_list_request(&ok).is_ok());
        for (request, field) in [
            (
                ListRunsRequest {
                    created_after: time(-1, 0),
                    ..Default::default()
                },
                "created_after",
            ),
            (
                ListRunsRequest {
                    created_before: time(0, 1_000_000_000),
                    ..Default::default()
                },
                "created_before",
            ),
            (
                ListRunsRequest {
                    created_before: time(i64::MAX, 0),
                    ..Default::default()
                },
                "created_before",
            ),
            (
                ListRunsRequest {
                    page_size: dagmesh_metastore::MAX_PAGE_SIZE + 1,
                    ..Default::default()
                },
                "page_size",
            ),
        ] {
            let error = check_list_request(&request).unwrap_err();
            assert_eq!(error.kind, dagmesh_api::ErrorKind::InvalidArgument);
            assert!(error.message.starts_with(field), "{error}");
        }
    }
}

use std::time::Duration;

use dagmesh_proto::v1::{
    ApproveStepRequest, CancelRunRequest, DeliverEventRequest, DeliverEventResponse, GetRunRequest,
    GetStepLogsRequest, GetStepLogsResponse, ListRunsRequest, ListRunsResponse, ResumeRunRequest,
    RetryRunRequest, Run, RunState, SubmitRunRequest, SubmitRunResponse, SuspendRunRequest,
    WatchRunRequest, WatchRunResponse, run_event, run_service_server::RunService,
    watch_run_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use dagmesh_auth::Principal;

use crate::engine::Command;
use crate::{ExecError, Executor};

pub(super) struct Runs(pub Executor);

type WatchItem = Result<WatchRunResponse, Status>;

#[tonic::async_trait]
impl RunService for Runs {
    async fn submit_run(
        &self,
        request: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        let actor = Principal::of(&request).name;
        // A backend's W3C trace context: the run's spans continue its trace.
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let (run, created) = self
            .0
            .submit_traced(request.into_inner(), &actor, traceparent.as_deref())
            .await?;
        Ok(Response::new(SubmitRunResponse {
            run: Some(run),
            created,
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let run_id = request.into_inner().run_id;
        check_run_id(&run_id)?;
        let run = self
            .0
            .store()
            .get_run(&run_id)
            .await
            .map_err(ExecError::from)?;
        let mut runs = [run];
        self.0.fill_queue_positions(&mut runs).await?;
        let [mut run] = runs;
        self.0.fill_waiting_reasons(&mut run).await?;
        Ok(Response::new(run))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let request = request.into_inner();
        check_list_request(&request)?;
        if request.page_size > 1000 {
            return Err(Status::invalid_argument(format!(
                "page_size: {} is over the maximum of 1000",
                request.page_size
            )));
        }
        let mut runs = self
            .0
            .store()
            .list_runs(&request)
            .await
            .map_err(ExecError::from)?;
        self.0.fill_queue_positions(&mut runs.runs).await?;
        Ok(Response::new(runs))
    }

    type WatchRunStream = ReceiverStream<WatchItem>;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let request = request.into_inner();
        check_run_id(&request.run_id)?;
        // Fail unknown runs before the stream opens, so the caller gets NOT_FOUND directly.
        let run = self
            .0
            .store()
            .get_run(&request.run_id)
            .await
            .map_err(ExecError::from)?;
        let (tx, rx) = mpsc::channel(256);
        let executor = self.0.clone();
        tokio::spawn(async move {
            if let Err(status) = watch(executor, run, request.after_seq, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type GetStepLogsStream = ReceiverStream<Result<GetStepLogsResponse, Status>>;

    async fn get_step_logs(
        &self,
        request: Request<GetStepLogsRequest>,
    ) -> Result<Response<Self::GetStepLogsStream>, Status> {
        let request = request.into_inner();
        check_run_id(&request.run_id)?;
        dagmesh_proto::limits::check_len(
            "step_id",
            &request.step_id,
            dagmesh_proto::limits::MAX_NAME_LEN,
        )
        .map_err(Status::invalid_argument)?;
        let run = self
            .0
            .store()
            .get_run(&request.run_id)
            .await
            .map_err(ExecError::from)?;
        let (tx, rx) = mpsc::channel(256);
        let executor = self.0.clone();
        tokio::spawn(async move {
            if let Err(status) = step_logs(executor, run, request, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let actor = Principal::of(&request).name;
        let request = request.into_inner();
        let run = self
            .0
            .cancel_as(&request.run_id, &request.reason, &actor)
            .await?;
        Ok(Response::new(run))
    }

    async fn retry_run(&self, request: Request<RetryRunRequest>) -> Result<Response<Run>, Status> {
        let actor = Principal::of(&request).name;
        let request = request.into_inner();
        check_run_id(&request.run_id)?;
        let run = self
            .0
            .retry_as(&request.run_id, &request.from_step, &actor)
            .await?;
        Ok(Response::new(run))
    }

    async fn approve_step(
        &self,
        request: Request<ApproveStepRequest>,
    ) -> Result<Response<Run>, Status> {
        let actor = Principal::of(&request).name;
        let run = self.0.approve_step_as(request.into_inner(), &actor).await?;
        Ok(Response::new(run))
    }

    async fn suspend_run(
        &self,
        request: Request<SuspendRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let actor = Principal::of(&request).name;
        let request = request.into_inner();
        let run = self
            .0
            .suspend_as(&request.run_id, true, &request.reason, &actor)
            .await?;
        Ok(Response::new(run))
    }

    async fn deliver_event(
        &self,
        request: Request<DeliverEventRequest>,
    ) -> Result<Response<DeliverEventResponse>, Status> {
        let request = request.into_inner();
        let resumed = self
            .0
            .deliver_event(&request.topic, request.payload.unwrap_or_default())
            .await?;
        Ok(Response::new(DeliverEventResponse { resumed }))
    }

    async fn resume_run(
        &self,
        request: Request<ResumeRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let actor = Principal::of(&request).name;
        let run_id = request.into_inner().run_id;
        let run = self.0.suspend_as(&run_id, false, "", &actor).await?;
        Ok(Response::new(run))
    }
}

fn check_run_id(run_id: &str) -> Result<(), Status> {
    dagmesh_proto::limits::check_len("run_id", run_id, dagmesh_proto::limits::MAX_VALUE_LEN)
        .map_err(Status::invalid_argument)
}

fn check_list_request(request: &ListRunsRequest) -> Result<(), Status> {
    use dagmesh_proto::limits::{MAX_ENTRIES, MAX_NAME_LEN, MAX_VALUE_LEN, check_len};
    let invalid = Status::invalid_argument;
    check_len("workflow", &request.workflow, MAX_NAME_LEN).map_err(invalid)?;
    check_len("page_token", &request.page_token, MAX_VALUE_LEN).map_err(invalid)?;
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
    tx: &mpsc::Sender<Result<GetStepLogsResponse, Status>>,
) -> Result<(), Status> {
    let wanted = |event: &dagmesh_proto::v1::RunEvent| match &event.event {
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
                .read_events(&run.run_id, cursor, 1000)
                .await
                .map_err(ExecError::from)?;
            let full_page = events.len() == 1000;
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
    let (events_tx, mut events_rx) = mpsc::channel(256);
    let follow = tokio::spawn(async move {
        if let Err(status) = watch(executor, run, Some(request.after_seq), &events_tx).await {
            let _ = events_tx.send(Err(status)).await;
        }
    });
    loop {
        let item = tokio::select! {
            item = events_rx.recv() => item,
            () = tx.closed() => break, // the reader left
        };
        let item = match item {
            None => break, // the run ended
            Some(Ok(item)) => item,
            Some(Err(status)) => {
                follow.abort();
                return Err(status);
            }
        };
        if let Some(watch_run_response::Message::Event(event)) = item.message
            && let Some(lines) = wanted(&event)
            && tx.send(Ok(lines)).await.is_err()
        {
            break; // the reader left
        }
    }
    follow.abort();
    Ok(())
}

/// Streams a run: snapshot (unless resuming), then events from the store each time the engine
/// says the run's log grew, until the run's final event. Reading from the log, not from a live
/// feed, means a slow watcher skips nothing and a resumed one sees exactly what it missed.
async fn watch(
    executor: Executor,
    run: Run,
    after_seq: Option<u64>,
    tx: &mpsc::Sender<WatchItem>,
) -> Result<(), Status> {
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
            .read_events(&run_id, cursor, 1000)
            .await
            .map_err(ExecError::from)?;
        let full_page = events.len() == 1000;
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
                // Not active in this executor right now (it is recovering, or the run is
                // between owners): look again shortly.
                tokio::time::sleep(Duration::from_millis(200)).await;
                updates = subscribe().await?;
            }
        }
    }
}

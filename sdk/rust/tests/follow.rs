//! The run follower against a scripted RunService on a real socket: each WatchRun call plays
//! the next script, so a test can break the stream exactly where it wants.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dagmesh_proto::v1::run_service_server::{RunService, RunServiceServer};
use dagmesh_proto::v1::{
    CancelRunRequest, GetRunRequest, ListRunsRequest, ListRunsResponse, RetryRunRequest, Run,
    RunEvent, RunState, RunStateChanged, Step, StepState, StepStateChanged, SubmitRunRequest,
    SubmitRunResponse, WatchRunRequest, WatchRunResponse, run_event, watch_run_response,
};
use dagmesh_sdk::{Client, ClientError, Followed, RunFollower};
use futures::{Stream, StreamExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

/// What one WatchRun call does.
enum Watch {
    /// Fails the call itself.
    Refuse(Status),
    /// Sends these, then closes the stream (an `Err` in the list ends it with that status).
    Send(Vec<Result<WatchRunResponse, Status>>),
}

#[derive(Default)]
struct Script {
    /// One per WatchRun call, in order; past the end, calls fail with FAILED_PRECONDITION.
    watches: Mutex<VecDeque<Watch>>,
    /// The `after_seq` of each WatchRun call, as asked.
    asked: Mutex<Vec<Option<u64>>>,
    /// GetRun's answers, in order; the last one repeats.
    runs: Mutex<VecDeque<Result<Run, Status>>>,
}

impl Script {
    fn new(watches: Vec<Watch>, runs: Vec<Result<Run, Status>>) -> Self {
        Script {
            watches: Mutex::new(watches.into()),
            asked: Mutex::default(),
            runs: Mutex::new(runs.into()),
        }
    }

    fn asked(&self) -> Vec<Option<u64>> {
        self.asked.lock().unwrap().clone()
    }
}

fn run(state: RunState, last_seq: u64) -> Run {
    Run {
        run_id: "run-1".into(),
        workflow: "room-scan".into(),
        workflow_version: 1,
        state: state.into(),
        last_seq,
        steps: vec![Step {
            step_id: "mesh".into(),
            state: if state == RunState::Running {
                StepState::Running
            } else {
                StepState::Succeeded
            }
            .into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn snapshot(state: RunState, last_seq: u64) -> Result<WatchRunResponse, Status> {
    Ok(WatchRunResponse {
        message: Some(watch_run_response::Message::Snapshot(run(state, last_seq))),
    })
}

fn event(seq: u64, event: run_event::Event) -> Result<WatchRunResponse, Status> {
    Ok(WatchRunResponse {
        message: Some(watch_run_response::Message::Event(RunEvent {
            run_id: "run-1".into(),
            seq,
            at: None,
            event: Some(event),
        })),
    })
}

/// A step event: what most of a run's log is.
fn step(seq: u64) -> Result<WatchRunResponse, Status> {
    event(
        seq,
        run_event::Event::StepState(StepStateChanged {
            step_id: "mesh".into(),
            state: StepState::Running.into(),
            attempt: 1,
            ..Default::default()
        }),
    )
}

fn run_state(seq: u64, state: RunState, error: &str) -> Result<WatchRunResponse, Status> {
    event(
        seq,
        run_event::Event::RunState(RunStateChanged {
            state: state.into(),
            error: error.into(),
            actor: String::new(),
            suspended: false,
        }),
    )
}

#[tonic::async_trait]
impl RunService for Script {
    type WatchRunStream = ReceiverStream<Result<WatchRunResponse, Status>>;
    type GetStepLogsStream = ReceiverStream<Result<dagmesh_proto::v1::GetStepLogsResponse, Status>>;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        self.asked.lock().unwrap().push(request.get_ref().after_seq);
        let next = self.watches.lock().unwrap().pop_front();
        let messages = match next {
            Some(Watch::Send(messages)) => messages,
            Some(Watch::Refuse(status)) => return Err(status),
            None => {
                return Err(Status::failed_precondition(
                    "the script has no more watches",
                ));
            }
        };
        let (tx, rx) = mpsc::channel(messages.len().max(1));
        for message in messages {
            tx.send(message).await.expect("the buffer has room for all");
        }
        // `tx` drops here: the stream closes after the messages.
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_run(&self, _: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let mut runs = self.runs.lock().unwrap();
        let answer = if runs.len() > 1 {
            runs.pop_front()
        } else {
            runs.front().cloned()
        };
        answer
            .unwrap_or_else(|| Err(Status::internal("the script has no GetRun answer")))
            .map(Response::new)
    }

    async fn get_step_logs(
        &self,
        _: Request<dagmesh_proto::v1::GetStepLogsRequest>,
    ) -> Result<Response<Self::GetStepLogsStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn submit_run(
        &self,
        _: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn list_runs(
        &self,
        _: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn cancel_run(&self, _: Request<CancelRunRequest>) -> Result<Response<Run>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn retry_run(&self, _: Request<RetryRunRequest>) -> Result<Response<Run>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn approve_step(
        &self,
        _: Request<dagmesh_proto::v1::ApproveStepRequest>,
    ) -> Result<Response<Run>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn suspend_run(
        &self,
        _: Request<dagmesh_proto::v1::SuspendRunRequest>,
    ) -> Result<Response<Run>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn resume_run(
        &self,
        _: Request<dagmesh_proto::v1::ResumeRunRequest>,
    ) -> Result<Response<Run>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn deliver_event(
        &self,
        _: Request<dagmesh_proto::v1::DeliverEventRequest>,
    ) -> Result<Response<dagmesh_proto::v1::DeliverEventResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// Serves `script` on a free port and connects a client to it.
async fn serve(script: Script) -> (Client, Arc<Script>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let script = Arc::new(script);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RunServiceServer::from_arc(script.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (Client::connect(url).await.unwrap(), script)
}

/// Quick reconnects, so that a test with breaks takes milliseconds.
fn quick(follower: RunFollower) -> RunFollower {
    follower.backoff(Duration::from_millis(1), Duration::from_millis(4))
}

/// Every item until the follower ends.
async fn all(
    follower: impl Stream<Item = Result<Followed, ClientError>>,
) -> Vec<Result<Followed, ClientError>> {
    tokio::time::timeout(Duration::from_secs(10), follower.collect())
        .await
        .expect("the follower ends")
}

/// One item as a line to compare.
fn describe(item: &Result<Followed, ClientError>) -> String {
    match item {
        Ok(Followed::Snapshot(run)) => format!("snapshot after {}", run.last_seq),
        Ok(Followed::Event(event)) => format!("event {}", event.seq),
        Ok(Followed::Reconnecting { error, .. }) => format!("reconnecting: {:?}", error.code()),
        Ok(Followed::Ended {
            run,
            get_run_error: None,
        }) => format!("ended {:?}", run.state()),
        Ok(Followed::Ended {
            run,
            get_run_error: Some(error),
        }) => format!("ended {:?} (GetRun: {:?})", run.state(), error.code()),
        Err(error) => format!("error: {:?}", error.code()),
    }
}

fn described(items: &[Result<Followed, ClientError>]) -> Vec<String> {
    items.iter().map(describe).collect()
}

#[tokio::test]
async fn follows_a_snapshot_and_its_events_to_the_end() {
    let (client, script) = serve(Script::new(
        vec![Watch::Send(vec![
            snapshot(RunState::Running, 1),
            step(2),
            run_state(3, RunState::Succeeded, ""),
        ])],
        vec![Ok(run(RunState::Succeeded, 3))],
    ))
    .await;

    let items = all(client.follow_run("run-1")).await;
    assert_eq!(
        described(&items),
        ["snapshot after 1", "event 2", "event 3", "ended Succeeded"]
    );
    let Some(Ok(Followed::Ended { run, .. })) = items.last() else {
        panic!("{items:?}")
    };
    assert_eq!(
        run.steps[0].state(),
        StepState::Succeeded,
        "the final run comes from GetRun, steps included"
    );
    assert_eq!(script.asked(), [None], "one watch, from a snapshot");
}

#[tokio::test]
async fn a_broken_stream_resumes_after_the_last_event_and_repeats_none() {
    let (client, script) = serve(Script::new(
        vec![
            Watch::Send(vec![
                snapshot(RunState::Running, 1),
                step(2),
                Err(Status::unavailable("executor restarting")),
            ]),
            // A server that replays a little more than asked: event 2 again.
            Watch::Send(vec![
                step(2),
                step(3),
                run_state(4, RunState::Succeeded, ""),
            ]),
        ],
        vec![Ok(run(RunState::Succeeded, 4))],
    ))
    .await;

    let items = all(quick(client.follow_run("run-1"))).await;
    assert_eq!(
        described(&items),
        [
            "snapshot after 1",
            "event 2",
            "reconnecting: Unavailable",
            "event 3",
            "event 4",
            "ended Succeeded",
        ]
    );
    let Ok(Followed::Reconnecting { error, retry_in }) = &items[2] else {
        panic!("{items:?}")
    };
    assert_eq!(error.message(), "executor restarting");
    assert!(*retry_in <= Duration::from_millis(4), "{retry_in:?}");
    assert_eq!(script.asked(), [None, Some(2)]);
}

#[tokio::test]
async fn a_stream_closed_before_the_end_resumes_when_get_run_says_the_run_goes_on() {
    let (client, script) = serve(Script::new(
        vec![
            Watch::Send(vec![snapshot(RunState::Running, 1), step(2)]),
            Watch::Send(vec![run_state(3, RunState::Failed, "mesh failed")]),
        ],
        vec![Ok(run(RunState::Running, 2)), Ok(run(RunState::Failed, 3))],
    ))
    .await;

    let items = all(quick(client.follow_run("run-1"))).await;
    assert_eq!(
        described(&items),
        [
            "snapshot after 1",
            "event 2",
            "reconnecting: Unavailable",
            "event 3",
            "ended Failed",
        ]
    );
    assert_eq!(script.asked(), [None, Some(2)]);
}

#[tokio::test]
async fn a_stream_closed_after_the_end_of_a_replay_ends_with_get_run() {
    // Replaying from past the last event: nothing comes, and GetRun says the run is over.
    let (client, script) = serve(Script::new(
        vec![Watch::Send(Vec::new())],
        vec![Ok(run(RunState::Succeeded, 3))],
    ))
    .await;

    let items = all(client.follow_run_after("run-1", 7)).await;
    assert_eq!(described(&items), ["ended Succeeded"]);
    assert_eq!(script.asked(), [Some(7)]);
}

#[tokio::test]
async fn a_refused_call_before_any_message_asks_for_a_snapshot_again() {
    let (client, script) = serve(Script::new(
        vec![
            Watch::Refuse(Status::unavailable("no leader yet")),
            Watch::Send(vec![snapshot(RunState::Succeeded, 3)]),
        ],
        vec![Ok(run(RunState::Succeeded, 3))],
    ))
    .await;

    let items = all(quick(client.follow_run("run-1"))).await;
    assert_eq!(
        described(&items),
        [
            "reconnecting: Unavailable",
            "snapshot after 3",
            "ended Succeeded"
        ]
    );
    assert_eq!(script.asked(), [None, None]);
}

#[tokio::test]
async fn replaying_from_zero_asks_for_every_event_and_gets_no_snapshot() {
    let (client, script) = serve(Script::new(
        vec![Watch::Send(vec![
            step(1),
            run_state(2, RunState::Cancelled, "cancelled by ops"),
        ])],
        vec![Ok(run(RunState::Cancelled, 2))],
    ))
    .await;

    let items = all(client.follow_run_after("run-1", 0)).await;
    assert_eq!(described(&items), ["event 1", "event 2", "ended Cancelled"]);
    assert_eq!(script.asked(), [Some(0)], "0 is a replay, not a snapshot");
}

#[tokio::test]
async fn an_unknown_run_stops_the_follower_with_not_found() {
    let (client, script) = serve(Script::new(
        vec![Watch::Refuse(Status::not_found("no run \"run-1\""))],
        Vec::new(),
    ))
    .await;

    let mut follower = quick(client.follow_run("run-1"));
    let items = all(&mut follower).await;
    assert_eq!(described(&items), ["error: NotFound"]);
    let Some(Err(error)) = items.last() else {
        panic!("{items:?}")
    };
    assert_eq!(error.message(), "no run \"run-1\"");
    assert!(follower.next().await.is_none(), "it stays ended");
    assert_eq!(script.asked().len(), 1, "no reconnect for NotFound");
}

#[tokio::test]
async fn events_already_seen_are_dropped() {
    // The snapshot contains events up to 2; the server then sends old, repeated and new ones.
    let (client, _script) = serve(Script::new(
        vec![Watch::Send(vec![
            snapshot(RunState::Running, 2),
            step(1),
            step(2),
            step(3),
            step(3),
            step(2),
            run_state(4, RunState::Succeeded, ""),
        ])],
        vec![Ok(run(RunState::Succeeded, 4))],
    ))
    .await;

    let items = all(client.follow_run("run-1")).await;
    assert_eq!(
        described(&items),
        ["snapshot after 2", "event 3", "event 4", "ended Succeeded"]
    );
}

#[tokio::test]
async fn it_gives_up_once_reconnects_have_failed_for_the_limit() {
    let refusals = (0..10_000)
        .map(|_| Watch::Refuse(Status::unavailable("executor down")))
        .collect();
    let (client, script) = serve(Script::new(refusals, Vec::new())).await;

    let started = tokio::time::Instant::now();
    let follower = quick(client.follow_run("run-1")).give_up_after(Duration::from_millis(60));
    let items = all(follower).await;
    let lines = described(&items);
    let (last, reconnects) = lines.split_last().unwrap();
    assert_eq!(last, "error: Unavailable");
    assert!(reconnects.len() >= 2, "{lines:?}");
    assert!(reconnects.iter().all(|l| l == "reconnecting: Unavailable"));
    assert!(started.elapsed() >= Duration::from_millis(60));
    assert_eq!(script.asked().len(), lines.len());
}

#[tokio::test]
async fn when_get_run_fails_at_the_end_the_last_known_run_is_given() {
    let (client, _script) = serve(Script::new(
        vec![Watch::Send(vec![
            snapshot(RunState::Running, 1),
            run_state(2, RunState::Failed, "mesh failed"),
        ])],
        vec![Err(Status::unavailable("store down"))],
    ))
    .await;

    let items = all(client.follow_run("run-1")).await;
    assert_eq!(
        described(&items),
        [
            "snapshot after 1",
            "event 2",
            "ended Failed (GetRun: Unavailable)"
        ]
    );
    let Some(Ok(Followed::Ended { run, .. })) = items.last() else {
        panic!("{items:?}")
    };
    assert_eq!(
        (run.run_id.as_str(), run.error.as_str(), run.last_seq),
        ("run-1", "mesh failed", 2)
    );
    assert!(run.steps.is_empty(), "the fallback claims no step states");
}

#[tokio::test]
async fn polling_in_a_select_next_to_a_timer_loses_nothing() {
    // What the CLI does: redraw every few milliseconds while following. The ticks land in the
    // middle of messages, GetRun calls and backoffs, and must cost no item.
    let (client, script) = serve(Script::new(
        vec![
            Watch::Send(vec![snapshot(RunState::Running, 1), step(2)]),
            Watch::Send(vec![step(3), Err(Status::internal("h2 protocol error"))]),
            Watch::Send(vec![run_state(4, RunState::Succeeded, "")]),
        ],
        vec![
            Ok(run(RunState::Running, 2)),
            Ok(run(RunState::Succeeded, 4)),
        ],
    ))
    .await;

    let mut follower = client
        .follow_run("run-1")
        .backoff(Duration::from_millis(20), Duration::from_millis(40));
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut items = Vec::new();
    let mut ticks = 0;
    let followed = async {
        loop {
            tokio::select! {
                item = follower.next() => match item {
                    Some(item) => items.push(item),
                    None => break,
                },
                _ = ticker.tick() => ticks += 1,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), followed)
        .await
        .expect("the follower ends");
    assert_eq!(
        described(&items),
        [
            "snapshot after 1",
            "event 2",
            "reconnecting: Unavailable",
            "event 3",
            "reconnecting: Internal",
            "event 4",
            "ended Succeeded",
        ]
    );
    assert!(ticks > 5, "the timer ran meanwhile ({ticks} ticks)");
    assert_eq!(script.asked(), [None, Some(2), Some(3)]);
}

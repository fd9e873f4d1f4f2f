//! The worker against a fake executor over a real socket: each test plays the server's side of
//! the protocol in `proto/dagmesh/v1/worker.proto` and checks what the worker sends.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeServer, S, STEP, Session, W, task_ref};
use dagmesh_proto::json::{from_struct, to_struct};
use dagmesh_proto::v1::{TaskCompleted, TaskFailed, TaskStarted, TaskTypeVersion, Welcome};
use dagmesh_sdk::{TaskContext, TaskError, Worker, WorkerError, WorkerHandle};
use prost::Message as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

#[derive(Deserialize)]
struct EchoIn {
    text: String,
}

#[derive(Deserialize)]
struct BigIn {
    bytes: usize,
}

#[derive(Deserialize)]
struct CountIn {
    count: u32,
}

/// A worker with one handler per behaviour under test. `block` tasks wait for a permit of
/// `gate` (or their cancellation).
fn worker(url: &str, slots: u32, gate: Arc<Semaphore>) -> Worker {
    Worker::builder(url)
        .name("mesher")
        .instance_id("mesher-1")
        .label("gpu", "true")
        .slots(slots)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .task(
            "echo",
            "1.0.0",
            |ctx: TaskContext, input: EchoIn| async move {
                ctx.info("hello log");
                ctx.progress_with_metrics(0.5, "halfway", [("triangles", 42.0)]);
                Ok::<_, TaskError>(json!({
                    "text": input.text,
                    "task_id": ctx.task_id(),
                    "attempt": ctx.attempt(),
                    "run_id": ctx.run_id(),
                    "step_id": ctx.step_id(),
                    "traceparent": ctx.traceparent(),
                }))
            },
        )
        .task("block", "1.0.0", move |ctx: TaskContext, _: Value| {
            let gate = gate.clone();
            async move {
                tokio::select! {
                    permit = gate.acquire() => {
                        permit.map_err(|e| TaskError::fatal(e.to_string()))?.forget();
                        Ok(json!({"released": true}))
                    }
                    () = ctx.cancelled() => Err(TaskError::retryable("cancelled")),
                }
            }
        })
        .task("big", "2.1.0", |_: TaskContext, input: BigIn| async move {
            Ok::<_, TaskError>(json!({"blob": "x".repeat(input.bytes)}))
        })
        .task(
            "count",
            "1.0.0",
            |_: TaskContext, input: CountIn| async move {
                Ok::<_, TaskError>(json!({"doubled": input.count * 2}))
            },
        )
        .task("panic", "1.0.0", |_: TaskContext, _: Value| async move {
            if true {
                panic!("boom");
            }
            Ok::<_, TaskError>(())
        })
        .build()
        .expect("valid worker")
}

type Run = JoinHandle<Result<(), WorkerError>>;

/// Runs the worker until it is drained through its handle or by the server.
fn start(worker: Worker) -> (WorkerHandle, Run) {
    let handle = worker.handle();
    (
        handle,
        tokio::spawn(worker.run_until(std::future::pending())),
    )
}

async fn finished(run: Run) -> Result<(), WorkerError> {
    tokio::time::timeout(STEP, run)
        .await
        .expect("worker returns in time")
        .expect("worker task did not panic")
}

/// After a drain: the worker closes its side, the server closes its side, `run` returns Ok.
async fn expect_closed(mut session: Session, run: Run) {
    assert!(session.next().await.is_none(), "worker closes the stream");
    drop(session);
    finished(run).await.expect("drain ends with Ok");
}

fn started(task_id: &str, attempt: u32) -> W {
    W::Started(TaskStarted {
        task_id: task_id.into(),
        attempt,
    })
}

async fn expect_failed(session: &mut Session, task_id: &str) -> TaskFailed {
    match session.recv_protocol().await {
        W::Failed(failed) if failed.task_id == task_id => failed,
        other => panic!("expected failed for {task_id}, got {other:?}"),
    }
}

async fn expect_completed(session: &mut Session) -> TaskCompleted {
    match session.recv_protocol().await {
        W::Completed(completed) => completed,
        other => panic!("expected completed, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_describes_the_worker_then_heartbeats_and_a_local_drain_closes() {
    let mut server = FakeServer::start().await;
    let worker = worker(&server.url, 2, Arc::new(Semaphore::new(0)));
    let handle = worker.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));

    let mut session = server.session().await;
    let Some(W::Hello(hello)) = session.inbound.message().await.unwrap().unwrap().message else {
        panic!("hello first");
    };
    assert_eq!(hello.worker_name, "mesher");
    assert_eq!(hello.instance_id, "mesher-1");
    assert_eq!(hello.labels.get("gpu").map(String::as_str), Some("true"));
    assert_eq!(hello.slots, 2);
    assert_eq!(hello.sdk_language, "rust");
    assert_eq!(hello.sdk_version, env!("CARGO_PKG_VERSION"));
    assert!(hello.in_flight.is_empty());
    let types: Vec<_> = hello
        .task_types
        .iter()
        .map(|t| (&*t.name, &*t.version))
        .collect();
    assert_eq!(
        types,
        [
            ("echo", "1.0.0"),
            ("block", "1.0.0"),
            ("big", "2.1.0"),
            ("count", "1.0.0"),
            ("panic", "1.0.0")
        ]
    );

    session
        .send(S::Welcome(Welcome {
            session_id: "s1".into(),
            heartbeat_interval_ms: 20,
            lease_ms: 1000,
            max_payload_bytes: 1 << 20,
            resumed: vec![],
        }))
        .await;
    let state = handle.wait_for(|s| s.connected).await;
    assert_eq!(state.session_id.as_deref(), Some("s1"));
    for _ in 0..2 {
        let message = tokio::time::timeout(STEP, session.inbound.message()).await;
        let message = message.unwrap().unwrap().unwrap().message;
        assert!(matches!(message, Some(W::Heartbeat(_))), "{message:?}");
    }

    stop.send(()).unwrap();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
    assert!(!handle.is_connected());
}

#[tokio::test]
async fn assign_runs_the_handler_and_reports_progress_logs_and_outputs() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session
        .assign("run1/mesh", 2, "echo", json!({"text": "hi"}))
        .await;
    assert_eq!(session.recv().await, started("run1/mesh", 2));
    let (mut progress, mut logs) = (None, Vec::new());
    let completed = loop {
        match session.recv().await {
            W::Progress(p) => progress = Some(p),
            W::Log(l) => logs.extend(l.lines),
            W::Completed(c) => break c,
            other => panic!("unexpected {other:?}"),
        }
    };
    let progress = progress.expect("progress reaches the server before the result");
    assert_eq!((progress.fraction, &*progress.message), (0.5, "halfway"));
    assert_eq!(progress.metrics["triangles"], 42.0);
    assert_eq!(
        (progress.task_id.as_str(), progress.attempt),
        ("run1/mesh", 2)
    );
    assert!(
        logs.iter()
            .any(|l| l.text == "hello log" && l.level == "info"),
        "{logs:?}"
    );
    assert_eq!(
        (completed.task_id.as_str(), completed.attempt),
        ("run1/mesh", 2)
    );
    assert_eq!(
        Value::Object(from_struct(completed.outputs.as_ref())),
        json!({
            "text": "hi",
            "task_id": "run1/mesh",
            "attempt": 2,
            "run_id": "run1",
            "step_id": "mesh",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        })
    );

    // The result is held until Recorded.
    let state = handle.wait_for(|s| s.running == 0).await;
    assert_eq!(state.unacknowledged, 1);
    session.recorded("run1/mesh", 2).await;
    handle.wait_for(|s| s.in_flight() == 0).await;

    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn reconnect_lists_in_flight_tasks_and_resends_unrecorded_results() {
    let mut server = FakeServer::start().await;
    let gate = Arc::new(Semaphore::new(0));
    let (handle, run) = start(worker(&server.url, 3, gate.clone()));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session.assign("r/a", 1, "echo", json!({"text": "a"})).await;
    session.assign("r/b", 1, "echo", json!({"text": "b"})).await;
    session.assign("r/c", 1, "block", json!({})).await;
    let mut completed = Vec::new();
    while completed.len() < 2 {
        match session.recv_protocol().await {
            W::Started(_) => {}
            W::Completed(c) => completed.push(c.task_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    completed.sort();
    assert_eq!(completed, ["r/a", "r/b"]);
    // Only a's result becomes durable; b's is lost with the stream.
    session.recorded("r/a", 1).await;
    handle
        .wait_for(|s| s.unacknowledged == 1 && s.running == 1)
        .await;
    drop(session);

    let mut session = server.session().await;
    let hello = session.handshake(1 << 20).await;
    assert_eq!(
        hello.instance_id, "mesher-1",
        "same instance across reconnects"
    );
    assert_eq!(hello.in_flight, [task_ref("r/b", 1), task_ref("r/c", 1)]);
    let resent = expect_completed(&mut session).await;
    assert_eq!((resent.task_id.as_str(), resent.attempt), ("r/b", 1));
    assert_eq!(
        Value::Object(from_struct(resent.outputs.as_ref()))["text"],
        "b"
    );

    // The task that kept running reports on the new stream.
    gate.add_permits(1);
    let c = expect_completed(&mut session).await;
    assert_eq!(c.task_id, "r/c");
    session.recorded("r/b", 1).await;
    session.recorded("r/c", 1).await;
    let state = handle.wait_for(|s| s.in_flight() == 0).await;
    assert_eq!(state.sessions, 2);

    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn cancel_fires_the_tasks_token_and_its_result_is_still_sent() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session.assign("r/slow", 1, "block", json!({})).await;
    assert_eq!(session.recv().await, started("r/slow", 1));
    session.cancel("r/slow", 1).await;
    let failed = expect_failed(&mut session, "r/slow").await;
    assert_eq!((&*failed.error, failed.retryable), ("cancelled", true));

    session.recorded("r/slow", 1).await;
    handle.wait_for(|s| s.in_flight() == 0).await;
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn own_drain_takes_no_new_work_and_closes_once_results_are_recorded() {
    let mut server = FakeServer::start().await;
    let gate = Arc::new(Semaphore::new(0));
    let (handle, run) = start(worker(&server.url, 2, gate.clone()));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session.assign("r/long", 1, "block", json!({})).await;
    assert_eq!(session.recv().await, started("r/long", 1));
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    assert!(handle.state().draining);

    // Work that races the drain is refused, retryably, so another worker runs it.
    session
        .assign("r/late", 1, "echo", json!({"text": "x"}))
        .await;
    // A refusal comes without Started: the task was not taken.
    let refused = expect_failed(&mut session, "r/late").await;
    assert!(
        refused.retryable && refused.error.contains("draining"),
        "{refused:?}"
    );
    session.recorded("r/late", 1).await;

    assert!(!run.is_finished(), "a running task holds the drain open");
    gate.add_permits(1);
    assert_eq!(expect_completed(&mut session).await.task_id, "r/long");
    assert!(
        !run.is_finished(),
        "an unrecorded result holds the drain open"
    );
    session.recorded("r/long", 1).await;
    expect_closed(session, run).await;
}

#[tokio::test]
async fn executor_drain_finishes_the_work_then_reconnects_and_takes_new_work() {
    let mut server = FakeServer::start().await;
    let gate = Arc::new(Semaphore::new(0));
    let (handle, run) = start(worker(&server.url, 2, gate.clone()));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session.assign("r/long", 1, "block", json!({})).await;
    assert_eq!(session.recv().await, started("r/long", 1));
    session.drain().await;
    let state = handle.wait_for(|s| s.executor_draining).await;
    assert!(!state.draining, "the worker itself was not told to stop");

    // The executor takes no more work from this stream; an Assign racing the Drain is refused
    // retryably, so that the next executor can give it to anyone.
    session
        .assign("r/late", 1, "echo", json!({"text": "x"}))
        .await;
    // A refusal comes without Started: the task was not taken.
    let refused = expect_failed(&mut session, "r/late").await;
    assert!(
        refused.retryable && refused.error.contains("draining"),
        "{refused:?}"
    );
    session.recorded("r/late", 1).await;

    gate.add_permits(1);
    assert_eq!(expect_completed(&mut session).await.task_id, "r/long");
    session.recorded("r/long", 1).await;
    // Nothing in flight: the worker closes this stream (sending no Draining: it is not
    // stopping) ...
    assert!(session.next().await.is_none(), "worker closes the stream");
    drop(session);

    // ... and comes back, with nothing to resume, and runs new work.
    let mut session = server.session().await;
    let hello = session.handshake(1 << 20).await;
    assert_eq!(hello.instance_id, "mesher-1");
    assert!(hello.in_flight.is_empty(), "{:?}", hello.in_flight);
    let state = handle.wait_for(|s| s.sessions == 2 && s.connected).await;
    assert!(!state.executor_draining && !state.draining, "{state:?}");
    session
        .assign("r2/echo", 1, "echo", json!({"text": "again"}))
        .await;
    assert_eq!(session.recv().await, started("r2/echo", 1));
    let completed = expect_completed(&mut session).await;
    assert_eq!(
        Value::Object(from_struct(completed.outputs.as_ref()))["text"],
        "again"
    );
    session.recorded("r2/echo", 1).await;
    handle.wait_for(|s| s.in_flight() == 0).await;
    assert!(!run.is_finished());

    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn results_unrecorded_when_a_draining_executor_leaves_go_to_the_next_one() {
    let mut server = FakeServer::start().await;
    let gate = Arc::new(Semaphore::new(0));
    let (handle, run) = start(worker(&server.url, 1, gate.clone()));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session.assign("r/long", 1, "block", json!({})).await;
    assert_eq!(session.recv().await, started("r/long", 1));
    session.drain().await;
    handle.wait_for(|s| s.executor_draining).await;
    gate.add_permits(1);
    assert_eq!(expect_completed(&mut session).await.task_id, "r/long");
    // The executor's drain timed out: it goes away without recording the result.
    drop(session);

    let mut session = server.session().await;
    let hello = session.handshake(1 << 20).await;
    assert_eq!(hello.in_flight, [task_ref("r/long", 1)]);
    let resent = expect_completed(&mut session).await;
    assert_eq!((resent.task_id.as_str(), resent.attempt), ("r/long", 1));
    session.recorded("r/long", 1).await;
    handle.wait_for(|s| s.in_flight() == 0).await;

    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn a_worker_stopped_during_an_executor_drain_exits_once_recorded() {
    let mut server = FakeServer::start().await;
    let gate = Arc::new(Semaphore::new(0));
    let (handle, run) = start(worker(&server.url, 1, gate.clone()));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session.assign("r/long", 1, "block", json!({})).await;
    assert_eq!(session.recv().await, started("r/long", 1));
    session.drain().await;
    handle.wait_for(|s| s.executor_draining).await;
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));

    gate.add_permits(1);
    assert_eq!(expect_completed(&mut session).await.task_id, "r/long");
    assert!(
        !run.is_finished(),
        "an unrecorded result holds the drain open"
    );
    session.recorded("r/long", 1).await;
    // Exits instead of reconnecting: `run` returns Ok.
    expect_closed(session, run).await;
}

#[tokio::test]
async fn a_worker_stopped_while_reconnecting_after_an_executor_drain_exits() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;
    session.drain().await;
    assert!(session.next().await.is_none(), "nothing in flight: closed");
    drop(session);

    // The next executor is not answering yet: the worker dials and waits.
    let mut session = server.session().await;
    assert!(matches!(session.recv().await, W::Hello(_)));
    handle.drain();
    finished(run)
        .await
        .expect("a stop while offline ends with Ok");
    assert!(!handle.is_connected());
}

#[tokio::test]
async fn assigns_over_the_announced_limits_fail_the_attempt_not_the_worker() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 2, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    session.handshake(1024).await;

    // Inputs larger than the Welcome's limit.
    let inputs = json!({"text": "x".repeat(5000)});
    let size = to_struct(&inputs).encoded_len();
    session.assign("r/huge", 1, "echo", inputs).await;
    // A refusal comes without Started: the task was not taken.
    let failed = expect_failed(&mut session, "r/huge").await;
    assert_eq!(
        failed.error,
        format!("inputs of \"echo\" are {size} bytes, over the 1024-byte payload limit")
    );
    assert!(!failed.retryable, "the same inputs would come again");

    // Inputs nested deeper than the contract allows.
    let mut deep = json!(1);
    for _ in 0..dagmesh_proto::limits::MAX_PAYLOAD_DEPTH {
        deep = json!({ "a": deep });
    }
    session
        .assign("r/deep", 1, "echo", json!({ "text": "x", "d": deep }))
        .await;
    let failed = expect_failed(&mut session, "r/deep").await;
    assert!(
        failed.error.starts_with("inputs of \"echo\": inputs.d.a.a")
            && failed.error.contains("limit of 20 levels"),
        "{}",
        failed.error
    );

    // More slots than the worker has, up to the largest number the field holds.
    session
        .send(S::Assign(dagmesh_proto::v1::Assign {
            slots: u32::MAX,
            ..common::assign("r/wide", 1, "echo", json!({"text": "x"}))
        }))
        .await;
    let failed = expect_failed(&mut session, "r/wide").await;
    assert!(
        failed.retryable
            && failed
                .error
                .contains(&format!("task needs {} slot(s), 0 of 2 in use", u32::MAX)),
        "{failed:?}"
    );

    // The worker still runs what fits.
    session
        .assign("r/fine", 1, "echo", json!({"text": "ok"}))
        .await;
    assert_eq!(session.recv().await, started("r/fine", 1));
    assert_eq!(expect_completed(&mut session).await.task_id, "r/fine");
    for task in ["r/huge", "r/deep", "r/wide", "r/fine"] {
        session.recorded(task, 1).await;
    }
    handle.wait_for(|s| s.in_flight() == 0).await;
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn output_over_the_payload_limit_fails_naming_limit_and_size() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    session.handshake(1024).await;

    session
        .assign("r/big", 1, "big@2.1.0", json!({"bytes": 5000}))
        .await;
    assert_eq!(session.recv().await, started("r/big", 1));
    let failed = expect_failed(&mut session, "r/big").await;
    let size = to_struct(&json!({"blob": "x".repeat(5000)})).encoded_len();
    assert_eq!(
        failed.error,
        format!("output of \"big\" is {size} bytes, over the 1024-byte payload limit")
    );
    assert!(!failed.retryable);

    // Under the limit it passes.
    session
        .assign("r/small", 1, "big@2.1.0", json!({"bytes": 10}))
        .await;
    assert_eq!(session.recv().await, started("r/small", 1));
    assert_eq!(expect_completed(&mut session).await.task_id, "r/small");

    session.recorded("r/big", 1).await;
    session.recorded("r/small", 1).await;
    handle.wait_for(|s| s.in_flight() == 0).await;
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn bad_input_and_panics_fail_the_attempt_not_the_worker() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session
        .assign("r/bad", 1, "count", json!({"count": "many"}))
        .await;
    assert_eq!(session.recv().await, started("r/bad", 1));
    let failed = expect_failed(&mut session, "r/bad").await;
    assert!(!failed.retryable, "a retry would see the same input");
    assert!(
        failed.error.contains("\"count\"") && failed.error.contains("invalid type"),
        "{}",
        failed.error
    );

    session.assign("r/boom", 1, "panic", json!({})).await;
    assert_eq!(session.recv().await, started("r/boom", 1));
    let failed = expect_failed(&mut session, "r/boom").await;
    assert!(failed.retryable);
    assert!(failed.error.contains("panicked: boom"), "{}", failed.error);

    // Unknown task types are refused too.
    session
        .send(S::Assign(dagmesh_proto::v1::Assign {
            task_type: Some(TaskTypeVersion {
                name: "echo".into(),
                version: "9.0.0".into(),
            }),
            ..common::assign("r/nope", 1, "echo", json!({}))
        }))
        .await;
    // A refusal comes without Started: the task was not taken.
    let failed = expect_failed(&mut session, "r/nope").await;
    assert!(failed.error.contains("no handler"), "{}", failed.error);

    session
        .assign("r/good", 1, "count", json!({"count": 21}))
        .await;
    assert_eq!(session.recv().await, started("r/good", 1));
    let completed = expect_completed(&mut session).await;
    assert_eq!(
        Value::Object(from_struct(completed.outputs.as_ref())),
        json!({"doubled": 42})
    );

    for task in ["r/bad", "r/boom", "r/nope", "r/good"] {
        session.recorded(task, 1).await;
    }
    handle.wait_for(|s| s.in_flight() == 0).await;
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn slots_run_tasks_side_by_side_and_refuse_more() {
    let mut server = FakeServer::start().await;
    let gate = Arc::new(Semaphore::new(0));
    let (handle, run) = start(worker(&server.url, 2, gate.clone()));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;

    session.assign("r/one", 1, "block", json!({})).await;
    session.assign("r/two", 1, "block", json!({})).await;
    assert_eq!(session.recv().await, started("r/one", 1));
    assert_eq!(session.recv().await, started("r/two", 1));
    assert_eq!(handle.wait_for(|s| s.running == 2).await.running, 2);

    // A third task over Hello.slots is refused rather than run.
    session.assign("r/three", 1, "block", json!({})).await;
    // A refusal comes without Started: the task was not taken.
    let refused = expect_failed(&mut session, "r/three").await;
    assert!(
        refused.retryable && refused.error.contains("no room"),
        "{refused:?}"
    );

    gate.add_permits(2);
    let mut done = vec![
        expect_completed(&mut session).await.task_id,
        expect_completed(&mut session).await.task_id,
    ];
    done.sort();
    assert_eq!(done, ["r/one", "r/two"]);
    for task in ["r/one", "r/two", "r/three"] {
        session.recorded(task, 1).await;
    }
    handle.wait_for(|s| s.in_flight() == 0).await;
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn invalid_argument_on_hello_is_fatal() {
    let mut server = FakeServer::start().await;
    let (_handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    assert!(matches!(session.recv().await, W::Hello(_)));
    session
        .fail(tonic::Status::invalid_argument(
            "task_types[0].version: not semver",
        ))
        .await;
    match finished(run).await {
        Err(WorkerError::Rejected(status)) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), "task_types[0].version: not semver");
        }
        other => panic!("expected rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn unavailable_executor_is_retried_with_the_same_instance() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    assert!(matches!(session.recv().await, W::Hello(_)));
    session
        .fail(tonic::Status::unavailable("executor starting"))
        .await;
    drop(session);

    let mut session = server.session().await;
    let hello = session.handshake(1 << 20).await;
    assert_eq!(hello.instance_id, "mesher-1");
    handle.wait_for(|s| s.connected).await;
    handle.drain();
    assert!(matches!(session.recv().await, W::Draining(_)));
    expect_closed(session, run).await;
}

#[tokio::test]
async fn abort_stops_at_once_and_reports_what_was_lost() {
    let mut server = FakeServer::start().await;
    let (handle, run) = start(worker(&server.url, 1, Arc::new(Semaphore::new(0))));
    let mut session = server.session().await;
    session.handshake(1 << 20).await;
    session.assign("r/stuck", 1, "block", json!({})).await;
    assert_eq!(session.recv().await, started("r/stuck", 1));
    handle.wait_for(|s| s.running == 1).await;

    handle.abort();
    match finished(run).await {
        Err(WorkerError::Aborted {
            running,
            unacknowledged,
        }) => assert_eq!((running, unacknowledged), (1, 0)),
        other => panic!("expected abort, got {other:?}"),
    }
}

//! The worker protocol's guarantees, driven message by message with a raw stream.

use std::time::Duration;

use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{
    self as pb, RecordOutcome, RetryPolicy, RunState, StepState, server_message, worker_message,
};
use dagmesh_sdk::{SubmitRun, TaskContext, TaskError, Worker};
use serde_json::{Value, json};

async fn submit(sandbox: &Sandbox, spec: pb::WorkflowSpec) -> anyhow::Result<String> {
    Ok(sandbox
        .client()
        .await?
        .submit(SubmitRun::inline(spec))
        .await?
        .run_id)
}

async fn wait(sandbox: &Sandbox, run_id: &str) -> anyhow::Result<pb::Run> {
    wait_for_run(&sandbox.client().await?, run_id).await
}

#[tokio::test]
async fn the_same_result_sent_twice_is_recorded_once() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, welcome) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("raw-1", "echo", "1.0.0", 1),
    )
    .await?;
    assert_eq!(welcome.lease_ms, 1000);
    let run_id = submit(
        &sandbox,
        workflow("dup", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    assert_eq!(assign.run_id, run_id);
    assert_eq!((assign.step_id.as_str(), assign.attempt), ("only", 1));
    assert!(
        assign.traceparent.starts_with("00-"),
        "a W3C traceparent travels with the task"
    );
    worker.start(&assign).await?;
    worker.complete(&assign.task_id, 1, json!({"v": 1})).await?;
    worker.complete(&assign.task_id, 1, json!({"v": 1})).await?;
    let first = worker.expect_recorded().await?;
    let second = worker.expect_recorded().await?;
    assert_eq!(first.outcome(), RecordOutcome::Accepted);
    assert_eq!(second.outcome(), RecordOutcome::Duplicate);

    let run = wait(&sandbox, &run_id).await?;
    assert_succeeded(&run);
    let events = all_events(sandbox.channel().await?, &run_id).await?;
    let states = step_states(&events, "only");
    assert_eq!(
        states.iter().filter(|s| *s == "SUCCEEDED").count(),
        1,
        "{states:?}"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_result_for_a_stale_attempt_is_refused() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("raw-2", "slow", "1.0.0", 2),
    )
    .await?;
    let mut slow = step("slow", "slow", &[], &[]);
    slow.timeout = "200ms".into();
    slow.retry = Some(RetryPolicy {
        max_attempts: 2,
        initial_backoff: "10ms".into(),
        ..RetryPolicy::default()
    });
    let run_id = submit(&sandbox, workflow("stale", vec![slow])).await?;
    let first = worker.expect_assign().await?;
    worker.start(&first).await?;
    // Say nothing more: the attempt times out.
    match worker.next().await? {
        server_message::Message::Cancel(cancel) => {
            assert_eq!(
                (cancel.task_id.as_str(), cancel.attempt),
                (first.task_id.as_str(), 1)
            );
            assert!(cancel.reason.contains("timed out"), "{}", cancel.reason);
        }
        other => panic!("expected Cancel, got {other:?}"),
    }
    let second = worker.expect_assign().await?;
    assert_eq!(second.attempt, 2);
    worker
        .complete(&first.task_id, 1, json!({"from": "attempt 1"}))
        .await?;
    let refused = worker.expect_recorded().await?;
    assert_eq!(refused.outcome(), RecordOutcome::Stale);
    assert!(refused.detail.contains("not current"), "{}", refused.detail);

    worker.start(&second).await?;
    worker
        .complete(&second.task_id, 2, json!({"from": "attempt 2"}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    let run = wait(&sandbox, &run_id).await?;
    assert_succeeded(&run);
    let outputs = dagmesh_proto::json::from_struct(run.steps[0].outputs.as_ref());
    assert_eq!(Value::Object(outputs), json!({"from": "attempt 2"}));
    sandbox.stop().await
}

#[tokio::test]
async fn a_task_on_a_crashed_worker_is_redelivered_after_the_lease() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut doomed, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("doomed", "work", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow("crash", vec![step("work", "work", &[], &[])]),
    )
    .await?;
    let assign = doomed.expect_assign().await?;
    doomed.start(&assign).await?;

    let survivor = Worker::builder(sandbox.url())
        .instance_id("survivor")
        .task("work", "1.0.0", |ctx: TaskContext, _: Value| async move {
            Ok::<_, TaskError>(json!({"attempt": ctx.attempt()}))
        })
        .build()?;
    tokio::spawn(survivor.run_until(std::future::pending()));
    doomed.crash();

    let run = wait(&sandbox, &run_id).await?;
    assert_succeeded(&run);
    let step = &run.steps[0];
    assert_eq!(step.attempt, 2, "a new attempt after the lease");
    assert_eq!(step.worker, "survivor");
    assert_eq!(
        step.lost_attempts, 1,
        "a lost worker does not use up the retry policy"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_worker_that_reconnects_within_the_lease_keeps_its_task() -> anyhow::Result<()> {
    let mut config = fast_config();
    config.lease = Duration::from_secs(10);
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    let hello = RawWorker::hello("flaky-net", "work", "1.0.0", 1);
    let (mut worker, _) = RawWorker::connect(&sandbox.url(), hello.clone()).await?;
    let run_id = submit(
        &sandbox,
        workflow("reconnect", vec![step("work", "work", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    worker.start(&assign).await?;
    worker.crash();

    let mut hello = hello;
    hello.in_flight = vec![pb::TaskRef {
        task_id: assign.task_id.clone(),
        attempt: assign.attempt,
    }];
    let (mut worker, welcome) = RawWorker::connect(&sandbox.url(), hello).await?;
    assert_eq!(welcome.resumed.len(), 1, "the task is still this worker's");
    assert_eq!(welcome.resumed[0].task_id, assign.task_id);
    worker
        .complete(&assign.task_id, 1, json!({"kept": true}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    let run = wait(&sandbox, &run_id).await?;
    assert_succeeded(&run);
    assert_eq!(run.steps[0].attempt, 1, "no redelivery");
    sandbox.stop().await
}

#[tokio::test]
async fn a_worker_never_holds_more_tasks_than_its_slots() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("two-slots", "work", "1.0.0", 2),
    )
    .await?;
    let steps = (0..5)
        .map(|i| step(&format!("s{i}"), "work", &[], &[]))
        .collect();
    let run_id = submit(&sandbox, workflow("credit", steps)).await?;
    let a = worker.expect_assign().await?;
    let b = worker.expect_assign().await?;
    worker.heartbeat().await?;
    let extra = tokio::time::timeout(Duration::from_millis(500), worker.next()).await;
    assert!(
        extra.is_err(),
        "a third task arrived while both slots were busy: {extra:?}"
    );

    // Finish tasks one at a time; each freed slot may bring one new Assign, never more.
    let mut outstanding = vec![a, b];
    let mut completed = 0;
    while let Some(task) = outstanding.pop() {
        worker
            .complete(&task.task_id, task.attempt, json!({}))
            .await?;
        completed += 1;
        loop {
            match worker.next().await? {
                server_message::Message::Recorded(recorded) => {
                    assert_eq!(recorded.task_id, task.task_id);
                    break;
                }
                server_message::Message::Assign(next) => outstanding.push(next),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            outstanding.len() <= 2,
            "{} tasks held with 2 slots",
            outstanding.len()
        );
    }
    assert_eq!(completed, 5);
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    sandbox.stop().await
}

#[tokio::test]
async fn an_oversized_output_fails_the_step_with_the_limit_and_size() -> anyhow::Result<()> {
    let mut config = fast_config();
    config.max_payload_bytes = 2048;
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    let (mut worker, welcome) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("raw-big", "big", "1.0.0", 1),
    )
    .await?;
    assert_eq!(welcome.max_payload_bytes, 2048);
    let run_id = submit(
        &sandbox,
        workflow("oversize", vec![step("big", "big", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    // A worker that ignores the limit it was told: the executor still refuses the payload.
    worker
        .complete(&assign.task_id, 1, json!({"blob": "z".repeat(10_000)}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    let run = wait(&sandbox, &run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    let step = &run.steps[0];
    assert_eq!(step.state(), StepState::Failed);
    assert!(
        step.error.contains("over the 2048-byte payload limit"),
        "{}",
        step.error
    );
    assert!(step.error.contains("bytes"), "{}", step.error);
    sandbox.stop().await
}

#[tokio::test]
async fn a_bad_hello_is_refused_with_the_field_named() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let mut hello = RawWorker::hello("bad", "work", "not-semver", 1);
    let error = RawWorker::connect(&sandbox.url(), hello.clone())
        .await
        .err()
        .expect("refused");
    let status = error
        .downcast_ref::<tonic::Status>()
        .expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("hello.task_types[0].version"),
        "{}",
        status.message()
    );

    hello.task_types[0].version = "1.0.0".into();
    hello.slots = 0;
    let error = RawWorker::connect(&sandbox.url(), hello)
        .await
        .err()
        .expect("refused");
    let status = error
        .downcast_ref::<tonic::Status>()
        .expect("a gRPC status");
    assert!(
        status.message().contains("hello.slots"),
        "{}",
        status.message()
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_draining_worker_gets_no_new_tasks() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("drainer", "work", "1.0.0", 4),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow(
            "drain",
            vec![
                step("first", "work", &[], &[]),
                step("second", "work", &["first"], &[]),
            ],
        ),
    )
    .await?;
    let first = worker.expect_assign().await?;
    worker
        .send(worker_message::Message::Draining(pb::Draining {}))
        .await?;
    worker.complete(&first.task_id, 1, json!({})).await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    worker.heartbeat().await?;
    let extra = tokio::time::timeout(Duration::from_millis(500), worker.next()).await;
    assert!(
        extra.is_err(),
        "a draining worker was given work: {extra:?}"
    );

    let fresh = Worker::builder(sandbox.url())
        .task("work", "1.0.0", |_: TaskContext, _: Value| async {
            Ok::<_, TaskError>(json!({}))
        })
        .build()?;
    tokio::spawn(fresh.run_until(std::future::pending()));
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    sandbox.stop().await
}

#[tokio::test]
async fn a_silent_worker_loses_its_task_and_its_stream_after_the_lease() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut silent, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("silent", "work", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow("silent", vec![step("work", "work", &[], &[])]),
    )
    .await?;
    let assign = silent.expect_assign().await?;
    silent.start(&assign).await?;
    // The stream stays open but no heartbeat follows: after the lease (1 s here) the executor
    // ends the session, closes the stream, and gives the task to someone else.
    // Within a few leases, not the sandbox's patience: the stream must really end.
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.next())
        .await
        .map_err(|_| anyhow::anyhow!("the silent worker's stream is still open"))?;
    assert!(
        closed.is_err(),
        "the executor closes a silent worker's stream, got {closed:?}"
    );
    let (mut healthy, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("healthy", "work", "1.0.0", 1),
    )
    .await?;
    let again = healthy.expect_assign().await?;
    assert_eq!(
        (again.task_id.as_str(), again.attempt),
        (assign.task_id.as_str(), 2)
    );
    healthy.complete(&again.task_id, 2, json!({})).await?;
    assert_eq!(
        healthy.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    let run = wait(&sandbox, &run_id).await?;
    assert_succeeded(&run);
    assert_eq!(run.steps[0].worker, "healthy");
    sandbox.stop().await
}

//! A hostile client against a real mesh: a raw worker written from the proto (not an SDK) that
//! breaks each rule of worker.proto, requests with out-of-range values, floods, a second
//! executor and garbage on the port. Each test asserts what the victim would notice: the server
//! keeps serving, nothing it does not hold changes, nothing loops, and every refusal says what
//! was wrong.

use std::time::Duration;

use dagmesh_executor::ExecutorConfig;
use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{
    self as pb, RecordOutcome, RunState, StepState, run_event, server_message, worker_message,
};
use dagmesh_sdk::SubmitRun;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

async fn submit(sandbox: &Sandbox, spec: pb::WorkflowSpec) -> anyhow::Result<String> {
    Ok(sandbox
        .client()
        .await?
        .submit(SubmitRun::inline(spec))
        .await?
        .run_id)
}

async fn submit_status(
    sandbox: &Sandbox,
    spec: pb::WorkflowSpec,
    inputs: Value,
) -> Result<pb::SubmitRunResponse, tonic::Status> {
    let mut client =
        pb::run_service_client::RunServiceClient::new(sandbox.channel().await.expect("channel"));
    client
        .submit_run(pb::SubmitRunRequest {
            workflow_ref: Some(pb::submit_run_request::WorkflowRef::Spec(spec)),
            inputs: Some(dagmesh_proto::json::to_struct(&inputs)),
            ..pb::SubmitRunRequest::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn get_run(sandbox: &Sandbox, run_id: &str) -> anyhow::Result<pb::Run> {
    let mut client = pb::run_service_client::RunServiceClient::new(sandbox.channel().await?);
    Ok(client
        .get_run(pb::GetRunRequest {
            run_id: run_id.into(),
        })
        .await?
        .into_inner())
}

async fn wait(sandbox: &Sandbox, run_id: &str) -> anyhow::Result<pb::Run> {
    wait_for_run(&sandbox.client().await?, run_id).await
}

/// Polls GetRun until `done` holds.
async fn poll_run(
    sandbox: &Sandbox,
    run_id: &str,
    done: impl Fn(&pb::Run) -> bool,
) -> anyhow::Result<pb::Run> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let run = get_run(sandbox, run_id).await?;
        if done(&run) {
            return Ok(run);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "run never reached the expected state: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The mesh still serves: a one-step run submitted now goes to `worker` and succeeds.
async fn still_serves(sandbox: &Sandbox, worker: &mut RawWorker, name: &str) -> anyhow::Result<()> {
    let run_id = submit(
        sandbox,
        workflow(name, vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    worker
        .complete(&assign.task_id, assign.attempt, json!({}))
        .await?;
    assert_succeeded(&wait(sandbox, &run_id).await?);
    Ok(())
}

fn nested(levels: usize) -> Value {
    let mut value = json!("leaf");
    for _ in 1..levels {
        value = json!({ "a": value });
    }
    value
}

fn progress(task_id: &str, attempt: u32, fraction: f32, message: &str) -> worker_message::Message {
    worker_message::Message::Progress(pb::TaskProgress {
        task_id: task_id.into(),
        attempt,
        fraction,
        message: message.into(),
        metrics: Default::default(),
    })
}

fn log(task_id: &str, attempt: u32, lines: Vec<String>) -> worker_message::Message {
    worker_message::Message::Log(pb::TaskLog {
        task_id: task_id.into(),
        attempt,
        lines: lines
            .into_iter()
            .map(|text| pb::LogLine {
                at: None,
                level: "info".into(),
                text,
            })
            .collect(),
    })
}

#[tokio::test]
async fn a_result_from_a_worker_that_does_not_hold_the_task_is_stale_and_changes_nothing()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut holder, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("holder", "echo", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow(
            "forged",
            vec![
                step("first", "echo", &[], &[]),
                step("second", "echo", &["first"], &[("got", "first.who")]),
            ],
        ),
    )
    .await?;
    let assign = holder.expect_assign().await?;
    holder.start(&assign).await?;

    // The forger connects after the task was assigned, so it holds nothing, and tries
    // everything a worker could say about the task.
    let (mut forger, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("forger", "echo", "1.0.0", 1),
    )
    .await?;
    forger
        .send(progress(
            &assign.task_id,
            assign.attempt,
            0.99,
            "forged progress",
        ))
        .await?;
    forger
        .send(log(
            &assign.task_id,
            assign.attempt,
            vec!["forged log".into()],
        ))
        .await?;
    forger
        .send(worker_message::Message::Failed(pb::TaskFailed {
            task_id: assign.task_id.clone(),
            attempt: assign.attempt,
            error: "forged failure".into(),
            retryable: false,
        }))
        .await?;
    let refused = forger.expect_recorded().await?;
    assert_eq!(refused.outcome(), RecordOutcome::Stale);
    assert!(
        refused.detail.contains("not held by worker forger"),
        "{}",
        refused.detail
    );
    forger
        .complete(&assign.task_id, assign.attempt, json!({"who": "forger"}))
        .await?;
    assert_eq!(
        forger.expect_recorded().await?.outcome(),
        RecordOutcome::Stale
    );

    // The real holder's result still counts and is what flows downstream.
    holder
        .complete(&assign.task_id, assign.attempt, json!({"who": "holder"}))
        .await?;
    assert_eq!(
        holder.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    // `second` goes to whichever worker is free; answer it from both sides honestly.
    let (second, by_holder) = tokio::select! {
        a = holder.expect_assign() => (a?, true),
        a = forger.expect_assign() => (a?, false),
    };
    assert_eq!(second.step_id, "second");
    let inputs = dagmesh_proto::json::from_struct(second.inputs.as_ref());
    assert_eq!(inputs["got"], json!("holder"), "forged outputs never flow");
    let worker = if by_holder { &holder } else { &forger };
    worker
        .complete(&second.task_id, second.attempt, json!({}))
        .await?;

    let run = wait(&sandbox, &run_id).await?;
    assert_succeeded(&run);
    let events = all_events(sandbox.channel().await?, &run_id).await?;
    for event in &events {
        match &event.event {
            Some(run_event::Event::StepProgress(p)) => {
                assert_ne!(
                    p.message, "forged progress",
                    "a non-holder's progress was kept"
                )
            }
            Some(run_event::Event::StepLog(l)) => assert!(
                l.lines.iter().all(|line| line.text != "forged log"),
                "a non-holder's log was kept"
            ),
            _ => {}
        }
    }
    sandbox.stop().await
}

#[tokio::test]
async fn a_second_stream_for_a_connected_instance_is_refused() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut victim, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("victim", "echo", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow("takeover", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = victim.expect_assign().await?;

    let refused = RawWorker::connect_once(
        &sandbox.url(),
        RawWorker::hello("victim", "echo", "9.0.0", 50),
    )
    .await;
    let error = refused.err().expect("the takeover must be refused");
    let status = error
        .downcast_ref::<tonic::Status>()
        .expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status}");
    assert!(status.message().contains("hello.instance_id"), "{status}");

    // The victim keeps its task and its result counts.
    victim.start(&assign).await?;
    victim
        .complete(&assign.task_id, assign.attempt, json!({"ok": true}))
        .await?;
    assert_eq!(
        victim.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    sandbox.stop().await
}

#[tokio::test]
async fn a_hello_that_breaks_a_limit_is_refused_naming_the_field() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let cases: Vec<(pb::Hello, &str)> = vec![
        (
            RawWorker::hello(&"i".repeat(300), "echo", "1.0.0", 1),
            "hello.instance_id: 300 bytes, over the limit of 128",
        ),
        (
            RawWorker::hello("many-slots", "echo", "1.0.0", 1_000_000),
            "hello.slots: 1000000 is over the limit of 10000",
        ),
        (
            pb::Hello {
                labels: (0..100).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..RawWorker::hello("many-labels", "echo", "1.0.0", 1)
            },
            "hello.labels: 100 entries, over the limit of 64",
        ),
    ];
    for (hello, expected) in cases {
        let error = RawWorker::connect_once(&sandbox.url(), hello)
            .await
            .err()
            .expect("refused");
        let status = error.downcast_ref::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert!(status.message().contains(expected), "{status}");
    }
    sandbox.stop().await
}

#[tokio::test]
async fn an_oversized_message_ends_the_stream_with_resource_exhausted_and_never_loops()
-> anyhow::Result<()> {
    let config = ExecutorConfig {
        max_payload_bytes: 64 * 1024,
        max_lost_attempts: 2,
        reconnect_grace: Duration::from_millis(100),
        ..fast_config()
    };
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    let run_id = submit(
        &sandbox,
        workflow("huge", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    // Bigger than the stream accepts at all (payload limit twice plus 1 MiB of envelope).
    let huge = json!({ "blob": "x".repeat(3 * 1024 * 1024) });
    for attempt in 1..=2 {
        let (mut worker, _) = RawWorker::connect(
            &sandbox.url(),
            RawWorker::hello(&format!("big-{attempt}"), "echo", "1.0.0", 1),
        )
        .await?;
        let assign = worker.expect_assign().await?;
        assert_eq!(assign.attempt, attempt);
        worker.start(&assign).await?;
        worker
            .complete(&assign.task_id, assign.attempt, huge.clone())
            .await?;
        let error = worker.next().await.expect_err("the stream must end");
        let status = error
            .downcast_ref::<tonic::Status>()
            .unwrap_or_else(|| panic!("a status, not {error:#}"));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        assert!(status.message().contains("65536 bytes"), "{status}");
    }
    let run = wait(&sandbox, &run_id).await?;
    assert_eq!(run.state(), RunState::Failed, "{run:?}");
    let step = &run.steps[0];
    assert_eq!(step.state(), StepState::Failed);
    assert!(
        step.error.contains("lost 2 attempts in a row"),
        "{}",
        step.error
    );
    assert!(step.error.contains("over the size limit"), "{}", step.error);
    sandbox.stop().await
}

#[tokio::test]
async fn deep_payloads_are_refused_at_submit_and_fail_the_step_as_outputs() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let spec = workflow("deep", vec![step("only", "echo", &[], &[])]);
    let refused = submit_status(&sandbox, spec.clone(), json!({ "x": nested(25) }))
        .await
        .expect_err("deep inputs are refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("inputs.x.a.a")
            && refused.message().contains("limit of 20 levels"),
        "{refused}"
    );

    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("deep-w", "echo", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(&sandbox, spec).await?;
    let assign = worker.expect_assign().await?;
    worker
        .complete(&assign.task_id, assign.attempt, json!({ "x": nested(25) }))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    let run = wait(&sandbox, &run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    assert!(
        run.steps[0].error.contains("steps.only.outputs.x.a")
            && run.steps[0].error.contains("limit of 20 levels"),
        "{}",
        run.steps[0].error
    );
    // The run stays readable and the server restarts over it.
    let database = sandbox.database;
    sandbox.mesh.shutdown().await?;
    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    assert_eq!(get_run(&sandbox, &run_id).await?.state(), RunState::Failed);
    sandbox.stop().await
}

#[tokio::test]
async fn a_progress_flood_is_coalesced_and_the_latest_value_is_kept() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("chatty", "echo", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow("flood", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    worker.start(&assign).await?;
    const MESSAGES: usize = 5000;
    for i in 1..=MESSAGES {
        let fraction = i as f32 / MESSAGES as f32;
        worker
            .send(progress(
                &assign.task_id,
                assign.attempt,
                fraction,
                &format!("p{i}"),
            ))
            .await?;
    }
    let last = format!("p{MESSAGES}");
    let run = poll_run(&sandbox, &run_id, |run| {
        run.steps[0].progress_message == last
    })
    .await?;
    assert!((run.steps[0].progress - 1.0).abs() < 1e-6);
    worker
        .complete(&assign.task_id, assign.attempt, json!({}))
        .await?;
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    let events = all_events(sandbox.channel().await?, &run_id).await?;
    let kept = events
        .iter()
        .filter(|e| matches!(e.event, Some(run_event::Event::StepProgress(_))))
        .count();
    assert!(
        kept < MESSAGES / 10,
        "{kept} of {MESSAGES} progress messages became events"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn log_floods_are_cut_per_line_and_per_attempt_and_say_so() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("loud", "echo", "1.0.0", 1)).await?;
    let run_id = submit(
        &sandbox,
        workflow("logs", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    worker.start(&assign).await?;
    // 3 messages of 30 lines of 40 KiB: each line is cut to 16 KiB, and the attempt's 1 MiB
    // fills up in the third message.
    for _ in 0..3 {
        let lines = (0..30).map(|_| "y".repeat(40 * 1024)).collect();
        worker
            .send(log(&assign.task_id, assign.attempt, lines))
            .await?;
    }
    worker
        .complete(&assign.task_id, assign.attempt, json!({}))
        .await?;
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    let events = all_events(sandbox.channel().await?, &run_id).await?;
    let lines: Vec<&pb::LogLine> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(run_event::Event::StepLog(l)) => Some(&l.lines),
            _ => None,
        })
        .flatten()
        .collect();
    let kept: usize = lines.iter().map(|l| l.text.len()).sum();
    assert!(kept <= 1024 * 1024 + 4096, "{kept} bytes of log kept");
    assert!(
        lines.iter().all(|l| l.text.len() <= 16 * 1024),
        "every line is cut to 16 KiB"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.text.contains("[truncated: 40960 bytes")),
        "a cut line says so"
    );
    assert!(
        lines.iter().any(|l| l.text.contains("log limit reached")),
        "the per-attempt cap says so"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_step_no_worker_can_take_says_why_and_its_schedule_to_start_timeout_fails_it()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    // A worker is connected, but with the wrong version and without the label.
    let (_worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("cpu-only", "mesh.build", "1.0.0", 4),
    )
    .await?;
    let mut gpu = step("build", "mesh.build@^1.2", &[], &[]);
    gpu.labels.insert("gpu".into(), "true".into());
    let run_id = submit(&sandbox, workflow("nobody", vec![gpu.clone()])).await?;
    let expected = "waiting: no connected worker offers mesh.build@^1.2 with gpu=true";
    let run = poll_run(&sandbox, &run_id, |run| {
        run.steps[0].state() == StepState::Ready
    })
    .await?;
    assert_eq!(run.steps[0].waiting_reason, expected);
    // The run never ends (nobody can take it): read its log so far from the store.
    let events = sandbox
        .mesh
        .executor()
        .store()
        .read_events(&run_id, 0, 1000)
        .await?;
    assert!(
        events.iter().any(|e| matches!(&e.event,
            Some(run_event::Event::StepState(s)) if s.error == expected)),
        "the READY event says why, for watchers"
    );

    gpu.schedule_to_start_timeout = "300ms".into();
    let run_id = submit(&sandbox, workflow("nobody-timeout", vec![gpu])).await?;
    let run = wait(&sandbox, &run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    assert!(
        run.steps[0]
            .error
            .contains("schedule_to_start_timeout of 300ms")
            && run.steps[0].error.contains(expected),
        "{}",
        run.steps[0].error
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_worker_whose_stream_ended_loses_its_task_after_the_grace_not_the_lease()
-> anyhow::Result<()> {
    let config = ExecutorConfig {
        // A silent worker would keep its task far longer than this test waits.
        lease: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(1),
        reconnect_grace: Duration::from_millis(200),
        ..fast_config()
    };
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    let (mut doomed, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("doomed", "echo", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow("grace", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let first = doomed.expect_assign().await?;
    let (mut spare, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("spare", "echo", "1.0.0", 1),
    )
    .await?;
    doomed.crash();
    let second = spare.expect_assign().await?;
    assert_eq!(
        (second.task_id.as_str(), second.attempt),
        (first.task_id.as_str(), 2)
    );
    spare
        .complete(&second.task_id, second.attempt, json!({}))
        .await?;
    let run = wait(&sandbox, &run_id).await?;
    assert_succeeded(&run);
    assert!(
        run.steps[0].lost_attempts == 1,
        "the lost attempt does not count against retries"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_result_resent_after_the_run_ended_is_duplicate_for_its_worker_and_stale_for_others()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("resender", "echo", "1.0.0", 1),
    )
    .await?;
    let run_id = submit(
        &sandbox,
        workflow("ended", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    worker
        .complete(&assign.task_id, assign.attempt, json!({"v": 1}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    // Resent on a new stream (as after a reconnect that lost the acknowledgement).
    worker.crash();
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("resender", "echo", "1.0.0", 1),
    )
    .await?;
    worker
        .complete(&assign.task_id, assign.attempt, json!({"v": 1}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Duplicate
    );
    let (mut other, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("other", "echo", "1.0.0", 1),
    )
    .await?;
    other
        .complete(&assign.task_id, assign.attempt, json!({"v": 2}))
        .await?;
    assert_eq!(
        other.expect_recorded().await?.outcome(),
        RecordOutcome::Stale
    );
    sandbox.stop().await
}

#[tokio::test]
async fn garbage_on_the_port_does_not_hurt_anyone() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let addr = sandbox.url().trim_start_matches("http://").to_owned();
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        (0..65536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect(),
    ];
    for bytes in garbage {
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        let _ = stream.write_all(&bytes).await;
        let _ = stream.shutdown().await;
    }
    // Half-open connections that say nothing.
    let _idle: Vec<tokio::net::TcpStream> = futures::future::try_join_all(
        (0..20).map(|_| tokio::net::TcpStream::connect(addr.clone())),
    )
    .await?;
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("after", "echo", "1.0.0", 1),
    )
    .await?;
    still_serves(&sandbox, &mut worker, "after").await?;
    sandbox.stop().await
}

#[tokio::test]
async fn a_second_executor_on_the_same_database_waits_or_refuses_naming_the_holder()
-> anyhow::Result<()> {
    let first = Sandbox::start().await?;
    let url = first.database.url();
    let refused = dagmesh::mesh::Mesh::start(dagmesh::mesh::MeshOptions {
        listen: "127.0.0.1:0".into(),
        database_url: url.clone(),
        executor: ExecutorConfig {
            standby: false,
            ..fast_config()
        },
        security: Default::default(),
    })
    .await;
    let error = format!("{:#}", refused.err().expect("a second executor is refused"));
    assert!(
        error.contains("another executor") && error.contains("pid-"),
        "{error}"
    );

    // A standby waits, and takes over once the first one stops.
    let standby = tokio::spawn(dagmesh::mesh::Mesh::start(dagmesh::mesh::MeshOptions {
        listen: "127.0.0.1:0".into(),
        database_url: url,
        executor: fast_config(),
        security: Default::default(),
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !standby.is_finished(),
        "the standby waits while the lease is held"
    );
    let database = first.database;
    first.mesh.shutdown().await?;
    let mesh = tokio::time::timeout(PATIENCE, standby).await???;
    let second = Sandbox {
        mesh,
        database,
        settings: Default::default(),
        worker_env: Vec::new(),
        keep: None,
    };
    let (mut worker, _) =
        RawWorker::connect(&second.url(), RawWorker::hello("w", "echo", "1.0.0", 1)).await?;
    still_serves(&second, &mut worker, "takeover").await?;
    second.stop().await
}

#[tokio::test]
async fn a_run_whose_records_cannot_be_read_is_quarantined_and_the_server_starts()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let spec = workflow("broken", vec![step("only", "echo", &[], &[])]);
    let broken = submit(&sandbox, spec.clone()).await?;
    let healthy = submit(&sandbox, spec).await?;
    let database = sandbox.database;
    sandbox.mesh.shutdown().await?;

    // Damage one step record behind the store's back, as a bad disk or an old bug would.
    let url = database.url();
    let pool = sqlx::SqlitePool::connect(&url).await?;
    let damaged = sqlx::query("UPDATE steps SET body = x'ffffffff0102' WHERE run_id = ?")
        .bind(&broken)
        .execute(&pool)
        .await?;
    assert_eq!(damaged.rows_affected(), 1);
    pool.close().await;

    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    let run = get_run(&sandbox, &broken).await?;
    assert_eq!(run.state(), RunState::Failed);
    assert!(run.error.contains("quarantined"), "{}", run.error);
    // Everything else is served: the healthy run goes on.
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("w", "echo", "1.0.0", 1)).await?;
    let assign = worker.expect_assign().await?;
    assert_eq!(assign.run_id, healthy);
    worker
        .complete(&assign.task_id, assign.attempt, json!({}))
        .await?;
    assert_succeeded(&wait(&sandbox, &healthy).await?);
    sandbox.stop().await
}

#[tokio::test]
async fn workflows_with_out_of_range_values_are_refused_naming_the_field() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let mut timeout = step("only", "echo", &[], &[]);
    timeout.timeout = "100000000000000d".into();
    let mut backoff = step("only", "echo", &[], &[]);
    backoff.retry = Some(pb::RetryPolicy {
        max_attempts: 3,
        initial_backoff: "1000000000h".into(),
        ..pb::RetryPolicy::default()
    });
    let mut attempts = step("only", "echo", &[], &[]);
    attempts.retry = Some(pb::RetryPolicy {
        max_attempts: u32::MAX,
        ..pb::RetryPolicy::default()
    });
    for (spec_step, field) in [
        (timeout, "steps[0].timeout"),
        (backoff, "steps[0].retry.initial_backoff"),
        (attempts, "steps[0].retry.max_attempts"),
    ] {
        let refused = submit_status(&sandbox, workflow("bad", vec![spec_step]), json!({}))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        assert!(refused.message().contains(field), "{field}: {refused}");
    }
    // The server is still fine.
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("w", "echo", "1.0.0", 1)).await?;
    still_serves(&sandbox, &mut worker, "fine").await?;
    sandbox.stop().await
}

#[tokio::test]
async fn an_unknown_or_unheld_task_message_is_answered_and_the_stream_stays_up()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("lost", "echo", "1.0.0", 1)).await?;
    for task_id in [
        "no-slash",
        "nope/nope",
        &format!("{}/x", "r".repeat(10_000)),
        "",
    ] {
        worker
            .send(worker_message::Message::Started(pb::TaskStarted {
                task_id: task_id.into(),
                attempt: u32::MAX,
            }))
            .await?;
        worker.complete(task_id, 0, json!({})).await?;
        let recorded = worker.expect_recorded().await?;
        assert_eq!(recorded.outcome(), RecordOutcome::Stale, "{task_id:.20}");
    }
    // Still a working session.
    let run_id = submit(
        &sandbox,
        workflow("still", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = loop {
        match worker.next().await? {
            server_message::Message::Assign(assign) => break assign,
            _ => continue,
        }
    };
    worker
        .complete(&assign.task_id, assign.attempt, json!({}))
        .await?;
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    sandbox.stop().await
}

#[tokio::test]
async fn a_commit_the_store_refuses_fails_that_request_and_the_engine_goes_on() -> anyhow::Result<()>
{
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("w", "echo", "1.0.0", 1)).await?;
    let run_id = submit(
        &sandbox,
        workflow("clash", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    let run = poll_run(&sandbox, &run_id, |run| {
        run.steps[0].state() == StepState::Assigned
    })
    .await?;

    // Someone else writes the run's next event behind the executor's back (as a second writer
    // or a bug would): the executor's next commit for this run now conflicts.
    let pool = sqlx::SqlitePool::connect(&sandbox.database.url()).await?;
    let clash = pb::RunEvent {
        run_id: run_id.clone(),
        seq: run.last_seq + 1,
        at: None,
        event: Some(run_event::Event::RunState(pb::RunStateChanged {
            state: RunState::Running as i32,
            error: "written behind the executor's back".into(),
            actor: String::new(),
            suspended: false,
        })),
    };
    sqlx::query("INSERT INTO events (run_id, seq, body) VALUES (?, ?, ?)")
        .bind(&run_id)
        .bind(clash.seq as i64)
        .bind(prost::Message::encode_to_vec(&clash))
        .execute(&pool)
        .await?;
    pool.close().await;

    // The result that would have been written is refused with its batch: never acknowledged.
    worker
        .complete(&assign.task_id, assign.attempt, json!({"v": 1}))
        .await?;
    let nothing = tokio::time::timeout(Duration::from_millis(500), worker.next()).await;
    assert!(
        nothing.is_err(),
        "a refused result must not be acknowledged: {nothing:?}"
    );

    // The run was reloaded from the store and the worker still holds its task: sending the
    // result again (as every SDK does with unacknowledged results) records it.
    worker
        .complete(&assign.task_id, assign.attempt, json!({"v": 1}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        RecordOutcome::Accepted
    );
    assert_succeeded(&wait(&sandbox, &run_id).await?);

    // And the engine serves everyone else as before.
    still_serves(&sandbox, &mut worker, "after-clash").await?;
    sandbox.stop().await
}

#[tokio::test]
async fn an_expression_that_would_build_a_huge_value_fails_its_step_before_it_runs()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("w", "echo", "1.0.0", 1)).await?;
    let bomb = workflow(
        "bomb",
        vec![step(
            "boom",
            "echo",
            &[],
            &[("xs", "inputs.xs.map(a, inputs.xs.map(b, inputs.xs))")],
        )],
    );
    let xs: Vec<u32> = (0..2000).collect();
    let submitted = submit_status(&sandbox, bomb, json!({ "xs": xs })).await?;
    let bomb_id = submitted.run.expect("run").run_id;
    let run = wait(&sandbox, &bomb_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    let error = &run.steps[0].error;
    assert!(
        error.contains("boom") && error.contains("over the budget"),
        "{error}"
    );
    // Nobody else noticed: a normal run goes through right after.
    let run_id = submit(
        &sandbox,
        workflow("fine", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let assign = worker.expect_assign().await?;
    assert_eq!(assign.run_id, run_id, "the bomb never reached a worker");
    worker
        .complete(&assign.task_id, assign.attempt, json!({}))
        .await?;
    assert_succeeded(&wait(&sandbox, &run_id).await?);
    sandbox.stop().await
}

#[tokio::test]
async fn a_ten_thousand_step_chain_is_accepted_and_starts() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let steps: Vec<pb::StepSpec> = (0..10_000)
        .map(|i| {
            if i == 0 {
                step("s0", "echo", &[], &[])
            } else {
                let previous = format!("s{}", i - 1);
                step(
                    &format!("s{i}"),
                    "echo",
                    &[&previous],
                    &[("n", &format!("{previous}.n"))],
                )
            }
        })
        .collect();
    let run_id = submit(&sandbox, workflow("long-chain", steps)).await?;
    let run = poll_run(&sandbox, &run_id, |run| {
        run.steps
            .first()
            .is_some_and(|s| s.state() == StepState::Ready)
    })
    .await?;
    assert_eq!(run.steps.len(), 10_000);
    assert_eq!(run.steps[9_999].state(), StepState::Pending);
    let mut client = pb::run_service_client::RunServiceClient::new(sandbox.channel().await?);
    client
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
            reason: "done looking".into(),
        })
        .await?;
    assert_eq!(wait(&sandbox, &run_id).await?.state(), RunState::Cancelled);
    sandbox.stop().await
}

#[tokio::test]
async fn a_quarantine_reason_is_bounded_like_any_error_echoed_back() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let run_id = submit(
        &sandbox,
        workflow("quarantined", vec![step("only", "echo", &[], &[])]),
    )
    .await?;
    let store = sandbox.mesh.executor().store().clone();
    let run = store
        .quarantine_run(&run_id, &"why ".repeat(256 * 1024))
        .await?;
    assert_eq!(run.state(), RunState::Failed);
    assert!(run.error.len() <= 16 * 1024, "{} bytes", run.error.len());
    assert!(
        run.error.contains("[truncated: 1048576 bytes"),
        "{}",
        &run.error[run.error.len() - 60..]
    );
    sandbox.stop().await
}

//! Run behaviour end to end: the mesh on real sockets, SDK workers on real streams.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{
    RetryPolicy, RunState, StepState, SubmitRunRequest, WorkflowRef,
    run_service_client::RunServiceClient, submit_run_request,
};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use serde_json::{Value, json};
use tokio::sync::mpsc;

async fn wait(client: &Client, run_id: &str) -> dagmesh_proto::v1::Run {
    wait_for_run(client, run_id).await.expect("run ended")
}

fn outputs(run: &dagmesh_proto::v1::Run, step: &str) -> Value {
    let step = run
        .steps
        .iter()
        .find(|s| s.step_id == step)
        .unwrap_or_else(|| panic!("no step {step}"));
    Value::Object(dagmesh_proto::json::from_struct(step.outputs.as_ref()))
}

fn step_of<'a>(run: &'a dagmesh_proto::v1::Run, step: &str) -> &'a dagmesh_proto::v1::Step {
    run.steps.iter().find(|s| s.step_id == step).expect("step")
}

async fn echo(_: TaskContext, input: Value) -> Result<Value, TaskError> {
    Ok(input)
}

#[tokio::test]
async fn outputs_flow_downstream_in_dependency_order() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(
        Worker::builder(sandbox.url())
            .slots(4)
            .task("echo", "1.0.0", echo)
            .task("sum", "1.0.0", |_: TaskContext, input: Value| async move {
                let total: i64 = input["values"]
                    .as_array()
                    .map(|values| values.iter().filter_map(Value::as_i64).sum())
                    .unwrap_or_default();
                Ok::<_, TaskError>(json!({ "total": total }))
            }),
    )
    .await?;
    let spec = workflow(
        "data-passing",
        vec![
            step(
                "a",
                "echo@^1",
                &[],
                &[("n", "inputs.n"), ("label", "'first'")],
            ),
            step("b", "echo@^1", &["a"], &[("n", "a.n * 10")]),
            step("c", "echo@^1", &["a"], &[("n", "a.n + 1")]),
            step(
                "total",
                "sum@^1",
                &["b", "c"],
                &[("values", "[a.n, b.n, c.n]")],
            ),
        ],
    );
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({"n": 4})))
        .await?;
    let run = wait(&client, &run.run_id).await;
    assert_succeeded(&run);
    assert_eq!(outputs(&run, "a"), json!({"n": 4, "label": "first"}));
    assert_eq!(outputs(&run, "b"), json!({"n": 40}));
    assert_eq!(outputs(&run, "c"), json!({"n": 5}));
    assert_eq!(outputs(&run, "total"), json!({"total": 49}));

    // `total` was dispatched only after both of its needs succeeded.
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    let position = |step: &str, state: &str| {
        events
            .iter()
            .position(|e| match &e.event {
                Some(dagmesh_proto::v1::run_event::Event::StepState(c)) => {
                    c.step_id == step && c.state().as_str_name().ends_with(state)
                }
                _ => false,
            })
            .unwrap_or_else(|| panic!("no {state} event for {step}"))
    };
    assert!(position("b", "SUCCEEDED") < position("total", "ASSIGNED"));
    assert!(position("c", "SUCCEEDED") < position("total", "ASSIGNED"));
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "the event log has no gaps"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn false_when_skips_the_step_and_its_dependants() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(Worker::builder(sandbox.url()).task("echo", "1.0.0", echo)).await?;
    let mut gated = step("notify", "echo@^1", &["build"], &[]);
    gated.when = "inputs.email != ''".into();
    let spec = workflow(
        "when",
        vec![
            step("build", "echo@^1", &[], &[]),
            gated,
            step("audit", "echo@^1", &["notify"], &[]),
            step("report", "echo@^1", &["build"], &[]),
        ],
    );
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(spec.clone()).inputs(json!({"email": ""})))
        .await?;
    let run = wait(&client, &run.run_id).await;
    assert_succeeded(&run);
    assert_eq!(step_of(&run, "notify").state(), StepState::Skipped);
    assert_eq!(step_of(&run, "audit").state(), StepState::Skipped);
    assert!(
        step_of(&run, "audit")
            .error
            .contains("needs skipped step \"notify\"")
    );
    assert_eq!(step_of(&run, "report").state(), StepState::Succeeded);

    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({"email": "a@b.c"})))
        .await?;
    let run = wait(&client, &run.run_id).await;
    assert_eq!(step_of(&run, "notify").state(), StepState::Succeeded);
    assert_eq!(step_of(&run, "audit").state(), StepState::Succeeded);
    sandbox.stop().await
}

#[tokio::test]
async fn failed_attempts_are_retried_with_backoff_until_they_succeed() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    spawn_worker(Worker::builder(sandbox.url()).task(
        "flaky",
        "1.0.0",
        move |ctx: TaskContext, _: Value| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if ctx.attempt() < 3 {
                    Err(TaskError::retryable(format!("flake #{}", ctx.attempt())))
                } else {
                    Ok(json!({"attempt": ctx.attempt()}))
                }
            }
        },
    ))
    .await?;
    let mut flaky = step("flaky", "flaky", &[], &[]);
    flaky.retry = Some(RetryPolicy {
        max_attempts: 3,
        initial_backoff: "50ms".into(),
        max_backoff: "200ms".into(),
        ..RetryPolicy::default()
    });
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(workflow("retries", vec![flaky.clone()])))
        .await?;
    let run = wait(&client, &run.run_id).await;
    assert_succeeded(&run);
    assert_eq!(step_of(&run, "flaky").attempt, 3);
    assert_eq!(outputs(&run, "flaky"), json!({"attempt": 3}));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    let states = step_states(&events, "flaky");
    assert_eq!(
        states.iter().filter(|s| *s == "RETRY_WAIT").count(),
        2,
        "two backoffs: {states:?}"
    );

    // Exhausted retries fail the run and say why.
    flaky.retry.as_mut().expect("set").max_attempts = 2;
    let run = client
        .submit(SubmitRun::inline(workflow(
            "retries-exhausted",
            vec![flaky],
        )))
        .await?;
    let run = wait(&client, &run.run_id).await;
    assert_eq!(run.state(), RunState::Failed);
    assert!(
        run.error.contains("step \"flaky\" failed: flake #2"),
        "{}",
        run.error
    );
    sandbox.stop().await
}

#[tokio::test]
async fn fatal_errors_are_not_retried_and_fail_the_run_fast() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (cancelled_tx, mut cancelled) = mpsc::unbounded_channel();
    spawn_worker(
        Worker::builder(sandbox.url())
            .slots(2)
            .task("bad", "1.0.0", |_: TaskContext, _: Value| async {
                Err::<Value, _>(TaskError::fatal("corrupt input"))
            })
            .task("slow", "1.0.0", move |ctx: TaskContext, _: Value| {
                let cancelled_tx = cancelled_tx.clone();
                async move {
                    ctx.cancelled().await;
                    let _ = cancelled_tx.send(ctx.step_id().to_owned());
                    Err::<Value, _>(TaskError::retryable("cancelled"))
                }
            }),
    )
    .await?;
    let mut bad = step("bad", "bad", &[], &[]);
    bad.retry = Some(RetryPolicy {
        max_attempts: 5,
        ..RetryPolicy::default()
    });
    let spec = workflow(
        "fail-fast",
        vec![
            step("other", "slow", &[], &[]),
            bad,
            step("after", "slow", &["bad"], &[]),
        ],
    );
    let client = sandbox.client().await?;
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let run = wait(&client, &run.run_id).await;
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(
        step_of(&run, "bad").attempt,
        1,
        "fatal errors are not retried"
    );
    assert_eq!(step_of(&run, "bad").state(), StepState::Failed);
    assert_eq!(step_of(&run, "after").state(), StepState::Cancelled);
    assert_eq!(step_of(&run, "other").state(), StepState::Cancelled);
    assert!(
        run.error.contains("step \"bad\" failed: corrupt input"),
        "{}",
        run.error
    );
    let cancelled_step = tokio::time::timeout(PATIENCE, cancelled.recv()).await?;
    assert_eq!(
        cancelled_step.as_deref(),
        Some("other"),
        "the running step got Cancel"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn an_attempt_past_its_timeout_is_cancelled_and_retried() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (cancelled_tx, mut cancelled) = mpsc::unbounded_channel();
    spawn_worker(Worker::builder(sandbox.url()).slots(2).task(
        "slow",
        "1.0.0",
        move |ctx: TaskContext, _: Value| {
            let cancelled_tx = cancelled_tx.clone();
            async move {
                if ctx.attempt() == 1 {
                    ctx.cancelled().await;
                    let _ = cancelled_tx.send(ctx.attempt());
                    return Err(TaskError::retryable("stopped"));
                }
                Ok(json!({"attempt": ctx.attempt()}))
            }
        },
    ))
    .await?;
    let mut slow = step("slow", "slow", &[], &[]);
    slow.timeout = "300ms".into();
    slow.retry = Some(RetryPolicy {
        max_attempts: 2,
        initial_backoff: "10ms".into(),
        ..RetryPolicy::default()
    });
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(workflow("timeouts", vec![slow])))
        .await?;
    let run = wait(&client, &run.run_id).await;
    assert_succeeded(&run);
    assert_eq!(step_of(&run, "slow").attempt, 2);
    let first = tokio::time::timeout(PATIENCE, cancelled.recv()).await?;
    assert_eq!(first, Some(1), "the timed-out attempt's handler saw Cancel");
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    let timed_out = events.iter().any(|e| match &e.event {
        Some(dagmesh_proto::v1::run_event::Event::StepState(c)) => {
            c.error.contains("timed out after 300ms")
        }
        _ => false,
    });
    assert!(timed_out, "an event says the attempt timed out");
    sandbox.stop().await
}

#[tokio::test]
async fn cancelling_a_run_cancels_its_running_steps() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    spawn_worker(Worker::builder(sandbox.url()).task(
        "block",
        "1.0.0",
        move |ctx: TaskContext, _: Value| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send("started");
                ctx.cancelled().await;
                let _ = events_tx.send("cancelled");
                Err::<Value, _>(TaskError::retryable("cancelled"))
            }
        },
    ))
    .await?;
    let client = sandbox.client().await?;
    let spec = workflow(
        "cancel",
        vec![
            step("block", "block", &[], &[]),
            step("next", "block", &["block"], &[]),
        ],
    );
    let run = client.submit(SubmitRun::inline(spec)).await?;
    assert_eq!(
        tokio::time::timeout(PATIENCE, events.recv()).await?,
        Some("started")
    );
    let cancelled = client.cancel_run(&run.run_id, "customer left").await?;
    assert_eq!(cancelled.state(), RunState::Cancelled);
    assert_eq!(
        tokio::time::timeout(PATIENCE, events.recv()).await?,
        Some("cancelled")
    );
    let run = wait(&client, &run.run_id).await;
    assert_eq!(run.state(), RunState::Cancelled);
    assert_eq!(run.error, "cancelled: customer left");
    assert!(run.steps.iter().all(|s| s.state() == StepState::Cancelled));

    let again = client
        .cancel_run(&run.run_id, "")
        .await
        .expect_err("already ended");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert!(
        again.message().contains("already ended (CANCELLED)"),
        "{}",
        again.message()
    );
    sandbox.stop().await
}

#[tokio::test]
async fn retry_run_reruns_only_what_did_not_succeed() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let healthy = Arc::new(Mutex::new(false));
    let upstream_calls = Arc::new(AtomicU32::new(0));
    let (flag, calls) = (healthy.clone(), upstream_calls.clone());
    spawn_worker(
        Worker::builder(sandbox.url())
            .task("upstream", "1.0.0", move |_: TaskContext, _: Value| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, TaskError>(json!({"value": 7})) }
            })
            .task(
                "downstream",
                "1.0.0",
                move |_: TaskContext, input: Value| {
                    let ok = *flag.lock().expect("flag");
                    async move {
                        if ok {
                            Ok(json!({"doubled": input["value"].as_i64().unwrap_or_default() * 2}))
                        } else {
                            Err(TaskError::fatal("dependency offline"))
                        }
                    }
                },
            ),
    )
    .await?;
    let client = sandbox.client().await?;
    let spec = workflow(
        "retry-run",
        vec![
            step("up", "upstream", &[], &[]),
            step("down", "downstream", &["up"], &[("value", "up.value")]),
        ],
    );
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let run = wait(&client, &run.run_id).await;
    assert_eq!(run.state(), RunState::Failed);

    *healthy.lock().expect("flag") = true;
    let retried = client.retry_run(&run.run_id).await?;
    assert_eq!(retried.state(), RunState::Running);
    let run = wait(&client, &run.run_id).await;
    assert_succeeded(&run);
    assert_eq!(outputs(&run, "down"), json!({"doubled": 14}));
    assert_eq!(
        upstream_calls.load(Ordering::SeqCst),
        1,
        "succeeded steps are not re-run"
    );
    assert_eq!(step_of(&run, "down").attempt, 2);

    let again = client.retry_run(&run.run_id).await.expect_err("succeeded");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    sandbox.stop().await
}

#[tokio::test]
async fn a_retried_submit_with_the_same_idempotency_key_returns_the_first_run() -> anyhow::Result<()>
{
    let sandbox = Sandbox::start().await?;
    let client = sandbox.client().await?;
    client
        .apply_workflow(workflow("idem", vec![step("only", "echo", &[], &[])]))
        .await?;
    let mut runs = RunServiceClient::new(sandbox.channel().await?);
    let request = || SubmitRunRequest {
        workflow_ref: Some(submit_run_request::WorkflowRef::Workflow(WorkflowRef {
            name: "idem".into(),
            version: 0,
        })),
        idempotency_key: "upload-42".into(),
        ..SubmitRunRequest::default()
    };
    let first = runs.submit_run(request()).await?.into_inner();
    let second = runs.submit_run(request()).await?.into_inner();
    assert!(first.created);
    assert!(!second.created);
    let (first, second) = (first.run.expect("run"), second.run.expect("run"));
    assert_eq!(first.run_id, second.run_id);
    let listed = client
        .list_runs(dagmesh_proto::v1::ListRunsRequest {
            workflow: "idem".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(listed.runs.len(), 1, "one run, not two");
    sandbox.stop().await
}

#[tokio::test]
async fn invalid_specs_are_rejected_with_field_paths() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let client = sandbox.client().await?;
    let unknown_need = workflow(
        "bad",
        vec![
            step("a", "echo", &[], &[]),
            step("b", "echo", &["nope"], &[]),
        ],
    );
    let error = client
        .submit(SubmitRun::inline(unknown_need))
        .await
        .expect_err("invalid");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error
            .message()
            .contains("steps[1].needs[0]: unknown step \"nope\""),
        "{}",
        error.message()
    );

    let cycle = workflow(
        "cycle",
        vec![
            step("a", "echo", &["c"], &[]),
            step("b", "echo", &["a"], &[]),
            step("c", "echo", &["b"], &[]),
        ],
    );
    let error = client.apply_workflow(cycle).await.expect_err("cycle");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.message().contains("cycle"), "{}", error.message());
    for id in ["\"a\"", "\"b\"", "\"c\""] {
        assert!(error.message().contains(id), "{}", error.message());
    }

    let not_upstream = workflow(
        "scope",
        vec![
            step("a", "echo", &[], &[]),
            step("b", "echo", &[], &[("x", "a.value")]),
        ],
    );
    let error = client
        .apply_workflow(not_upstream)
        .await
        .expect_err("scope");
    assert!(
        error.message().contains("steps[1].inputs"),
        "{}",
        error.message()
    );

    let missing = client
        .submit(SubmitRun::workflow("never-applied"))
        .await
        .expect_err("unknown workflow");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    sandbox.stop().await
}

#[tokio::test]
async fn payloads_over_the_limit_fail_clearly() -> anyhow::Result<()> {
    let mut config = fast_config();
    config.max_payload_bytes = 1024;
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    spawn_worker(Worker::builder(sandbox.url()).task(
        "big",
        "1.0.0",
        |_: TaskContext, _: Value| async { Ok::<_, TaskError>(json!({"blob": "x".repeat(4096)})) },
    ))
    .await?;
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(workflow(
            "big",
            vec![step("big", "big", &[], &[])],
        )))
        .await?;
    let run = wait(&client, &run.run_id).await;
    assert_eq!(run.state(), RunState::Failed);
    let error = &step_of(&run, "big").error;
    assert!(error.contains("1024-byte payload limit"), "{error}");

    let error = client
        .submit(
            SubmitRun::inline(workflow("big", vec![step("big", "big", &[], &[])]))
                .inputs(json!({"blob": "y".repeat(4096)})),
        )
        .await
        .expect_err("inputs over the limit");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("over the 1024-byte payload limit"),
        "{}",
        error.message()
    );
    sandbox.stop().await
}

#[tokio::test]
async fn steps_go_to_workers_with_matching_labels_and_versions() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let worker = |name: &'static str, version: &'static str| {
        let seen = seen.clone();
        Worker::builder(sandbox.url()).name(name).slots(2).task(
            "render",
            version,
            move |ctx: TaskContext, _: Value| {
                seen.lock().expect("seen").insert(
                    ctx.step_id().to_owned(),
                    (name, ctx.task_version().to_owned()),
                );
                async { Ok::<_, TaskError>(json!({})) }
            },
        )
    };
    spawn_worker(worker("cpu-v1", "1.4.0")).await?;
    spawn_worker(worker("cpu-v2", "2.1.0")).await?;
    spawn_worker(worker("gpu-v2", "2.0.0").label("gpu", "true")).await?;
    let mut on_gpu = step("on_gpu", "render@^2", &[], &[]);
    on_gpu.labels.insert("gpu".into(), "true".into());
    let spec = workflow(
        "routing",
        vec![
            step("old", "render@<2", &[], &[]),
            step("new", "render@>=2.1", &[], &[]),
            on_gpu,
        ],
    );
    let client = sandbox.client().await?;
    let run = client.submit(SubmitRun::inline(spec)).await?;
    assert_succeeded(&wait(&client, &run.run_id).await);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen["old"], ("cpu-v1", "1.4.0".to_owned()));
    assert_eq!(seen["new"], ("cpu-v2", "2.1.0".to_owned()));
    assert_eq!(seen["on_gpu"], ("gpu-v2", "2.0.0".to_owned()));
    sandbox.stop().await
}

#[tokio::test]
async fn watch_streams_progress_in_order_and_resumes_from_a_sequence_number() -> anyhow::Result<()>
{
    use dagmesh_proto::v1::run_event::Event;
    let sandbox = Sandbox::start().await?;
    spawn_worker(Worker::builder(sandbox.url()).task(
        "mesh",
        "1.0.0",
        |ctx: TaskContext, _: Value| async move {
            for tenth in 1..=5 {
                ctx.progress(tenth as f32 / 5.0, format!("pass {tenth}"));
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            ctx.info("mesh done");
            Ok::<_, TaskError>(json!({"triangles": 12}))
        },
    ))
    .await?;
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(workflow(
            "watch",
            vec![step("mesh", "mesh", &[], &[])],
        )))
        .await?;
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    let fractions: Vec<f32> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::StepProgress(p)) => Some(p.fraction),
            _ => None,
        })
        .collect();
    assert!(!fractions.is_empty(), "progress reached the watcher");
    assert!(
        fractions.windows(2).all(|w| w[0] <= w[1]),
        "in order: {fractions:?}"
    );
    assert_eq!(fractions.last(), Some(&1.0));
    assert!(events.iter().any(|e| matches!(&e.event, Some(Event::StepLog(l)) if l.lines.iter().any(|line| line.text == "mesh done"))));
    assert!(matches!(
        events.last().and_then(|e| e.event.as_ref()),
        Some(Event::RunState(change)) if change.state() == RunState::Succeeded
    ));

    // Resuming after seq 3 replays exactly the rest.
    let mut runs = RunServiceClient::new(sandbox.channel().await?);
    let mut resumed = runs
        .watch_run(dagmesh_proto::v1::WatchRunRequest {
            run_id: run.run_id.clone(),
            after_seq: Some(3),
        })
        .await?
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(item) = resumed.message().await? {
        if let Some(dagmesh_proto::v1::watch_run_response::Message::Event(e)) = item.message {
            seqs.push(e.seq);
        }
    }
    let expected: Vec<u64> = events.iter().map(|e| e.seq).filter(|&s| s > 3).collect();
    assert_eq!(seqs, expected);
    sandbox.stop().await
}

#[tokio::test]
async fn workers_list_shows_connected_workers_and_their_load() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let handle = spawn_worker(
        Worker::builder(sandbox.url())
            .name("thumbnailer")
            .label("zone", "eu")
            .slots(3)
            .task("thumb", "1.2.0", echo),
    )
    .await?;
    let mut cluster = dagmesh_proto::v1::cluster_service_client::ClusterServiceClient::new(
        sandbox.channel().await?,
    );
    let workers = cluster
        .list_workers(dagmesh_proto::v1::ListWorkersRequest {})
        .await?
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    let worker = &workers[0];
    assert_eq!(worker.instance_id, handle.instance_id());
    assert_eq!(worker.worker_name, "thumbnailer");
    assert_eq!(worker.slots, 3);
    assert_eq!(worker.labels.get("zone").map(String::as_str), Some("eu"));
    assert_eq!(worker.sdk_language, "rust");
    assert!(worker.connected);
    sandbox.stop().await
}

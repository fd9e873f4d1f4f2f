//! Dynamic workflows end to end: map steps (`for_each`) and typed run inputs, through the
//! mesh on real sockets with SDK workers and raw protocol workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{
    self as pb, InputSpec, RunState, StepState, SubmitRunRequest,
    run_service_client::RunServiceClient, submit_run_request,
};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use serde_json::{Value, json};

fn step_of<'a>(run: &'a pb::Run, step: &str) -> &'a pb::Step {
    run.steps
        .iter()
        .find(|s| s.step_id == step)
        .unwrap_or_else(|| panic!("run has no step {step}"))
}

fn outputs(run: &pb::Run, step: &str) -> Value {
    Value::Object(dagmesh_proto::json::from_struct(
        step_of(run, step).outputs.as_ref(),
    ))
}

fn map_step(
    id: &str,
    task: &str,
    needs: &[&str],
    for_each: &str,
    inputs: &[(&str, &str)],
) -> pb::StepSpec {
    pb::StepSpec {
        for_each: for_each.into(),
        ..step(id, task, needs, inputs)
    }
}

/// `list` returns `{"items": [0, 1, ..., n-1]}`; `square` returns `{"square": x*x}` after a
/// short sleep, counting how many run at once; `sum` adds up `values`.
async fn spawn_map_workers(sandbox: &Sandbox, peak: Arc<AtomicU32>) -> anyhow::Result<()> {
    let running = Arc::new(AtomicU32::new(0));
    spawn_worker(
        Worker::builder(sandbox.url())
            .slots(8)
            .task("list", "1.0.0", |_: TaskContext, input: Value| async move {
                let n = input["n"].as_u64().unwrap_or(0);
                Ok::<_, TaskError>(json!({ "items": (0..n).collect::<Vec<_>>() }))
            })
            .task("square", "1.0.0", move |_: TaskContext, input: Value| {
                let (running, peak) = (running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    let x = input["x"].as_i64().unwrap_or_default();
                    if input["fail_on"].as_i64() == Some(x) {
                        return Err(TaskError::fatal(format!("refusing {x}")));
                    }
                    Ok(json!({ "square": x * x, "position": input["position"].clone() }))
                }
            })
            .task("sum", "1.0.0", |_: TaskContext, input: Value| async move {
                let total: i64 = input["values"]
                    .as_array()
                    .map(|values| values.iter().filter_map(Value::as_i64).sum())
                    .unwrap_or_default();
                Ok::<_, TaskError>(json!({ "total": total, "count": input["values"].as_array().map_or(0, Vec::len) }))
            }),
    )
    .await?;
    Ok(())
}

fn squares_workflow(max_parallel: u32, continue_on_failure: bool) -> pb::WorkflowSpec {
    let mut extract = map_step(
        "square",
        "square@^1",
        &["lister"],
        "lister.items",
        &[
            ("x", "item"),
            ("position", "index"),
            ("fail_on", "inputs.fail_on"),
        ],
    );
    extract.max_parallel = max_parallel;
    extract.continue_on_failure = continue_on_failure;
    workflow(
        "squares",
        vec![
            step("lister", "list@^1", &[], &[("n", "inputs.n")]),
            extract,
            step(
                "sum",
                "sum@^1",
                &["square"],
                &[("values", "square.filter(s, has(s.square)).map(s, s.square)")],
            ),
        ],
    )
}

#[tokio::test]
async fn a_map_runs_one_task_per_item_within_max_parallel_and_dependants_see_a_list()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let peak = Arc::new(AtomicU32::new(0));
    spawn_map_workers(&sandbox, peak.clone()).await?;
    let client = sandbox.client().await?;
    let run = client
        .submit(
            SubmitRun::inline(squares_workflow(3, false)).inputs(json!({"n": 10, "fail_on": -1})),
        )
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(outputs(&run, "sum"), json!({"total": 285, "count": 10}));
    let map = step_of(&run, "square");
    assert_eq!(map.item_count, 10);
    let items = outputs(&run, "square")["items"].clone();
    assert_eq!(items.as_array().map(Vec::len), Some(10));
    assert_eq!(
        items[7],
        json!({"square": 49, "position": 7}),
        "items keep their order"
    );
    for i in 0..10 {
        let item = step_of(&run, &format!("square[{i}]"));
        assert_eq!(item.state(), StepState::Succeeded);
        assert_eq!((item.map_step.as_str(), item.item_index), ("square", i));
        assert_eq!(item.task_id, format!("{}/square[{i}]", run.run_id));
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "{peak} items ran at once; max_parallel is 3");
    assert!(peak >= 2, "items never ran in parallel (peak {peak})");

    // WatchRun carries the items: each has its own state changes.
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    assert_eq!(
        step_states(&events, "square[3]"),
        ["READY", "ASSIGNED", "RUNNING", "SUCCEEDED"]
    );
    assert_eq!(step_states(&events, "square"), ["RUNNING", "SUCCEEDED"]);
    sandbox.stop().await
}

#[tokio::test]
async fn a_failed_item_fails_the_map_unless_failures_are_tolerated() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_map_workers(&sandbox, Arc::new(AtomicU32::new(0))).await?;
    let client = sandbox.client().await?;

    let run = client
        .submit(SubmitRun::inline(squares_workflow(2, false)).inputs(json!({"n": 6, "fail_on": 2})))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    let map = step_of(&run, "square");
    assert_eq!(map.state(), StepState::Failed);
    assert!(
        map.error
            .starts_with("item 2 (square[2]) failed: refusing 2"),
        "{}",
        map.error
    );
    assert!(run.error.contains("square[2]"), "{}", run.error);
    // Items after the failure never started: max_parallel 2 kept them pending.
    assert_eq!(step_of(&run, "square[5]").state(), StepState::Cancelled);
    assert_eq!(step_of(&run, "sum").state(), StepState::Cancelled);

    let run = client
        .submit(SubmitRun::inline(squares_workflow(0, true)).inputs(json!({"n": 4, "fail_on": 1})))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    let items = outputs(&run, "square")["items"].clone();
    assert_eq!(items[0], json!({"square": 0, "position": 0}));
    assert!(
        items[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("refusing 1")),
        "{items}"
    );
    assert_eq!(outputs(&run, "sum"), json!({"total": 13, "count": 3}));
    sandbox.stop().await
}

#[tokio::test]
async fn an_empty_list_succeeds_at_once_and_a_bad_list_fails_the_step() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_map_workers(&sandbox, Arc::new(AtomicU32::new(0))).await?;
    let client = sandbox.client().await?;
    let run = client
        .submit(
            SubmitRun::inline(squares_workflow(0, false)).inputs(json!({"n": 0, "fail_on": -1})),
        )
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(outputs(&run, "square"), json!({"items": []}));
    assert_eq!(outputs(&run, "sum"), json!({"total": 0, "count": 0}));

    let mut spec = squares_workflow(0, false);
    spec.name = "not-a-list".into();
    spec.steps[1].for_each = "lister".into(); // an object, not a list
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({"n": 2, "fail_on": -1})))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    let error = &step_of(&run, "square").error;
    assert!(
        error.starts_with("step \"square\": for_each: returned map"),
        "{error}"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn ten_thousand_items_expand_in_one_commit_and_all_run() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(Worker::builder(sandbox.url()).slots(64).task(
        "noop",
        "1.0.0",
        |_: TaskContext, _: Value| async move { Ok::<_, TaskError>(json!({})) },
    ))
    .await?;
    let spec = workflow(
        "wide-map",
        vec![
            map_step("each", "noop@^1", &[], "inputs.items", &[("i", "index")]),
            step("join", "noop@^1", &["each"], &[("n", "size(each)")]),
        ],
    );
    let items: Vec<u32> = (0..10_000).collect();
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({ "items": items })))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(step_of(&run, "each").item_count, 10_000);
    assert_eq!(
        Value::Object(dagmesh_proto::json::from_struct(
            step_of(&run, "join").inputs.as_ref()
        )),
        json!({"n": 10_000})
    );
    let over: Vec<u32> = (0..10_001).collect();
    let spec = workflow(
        "too-wide",
        vec![map_step("each", "noop@^1", &[], "inputs.items", &[])],
    );
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({ "items": over })))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    assert!(
        step_of(&run, "each")
            .error
            .contains("a list of 10001 items, over the limit of 10000 items per step"),
        "{}",
        step_of(&run, "each").error
    );
    sandbox.stop().await
}

/// A raw worker holds items while the engine restarts on the same database: the map, its items
/// and their attempts come back from the store, and the run finishes with every item once.
#[tokio::test]
async fn a_map_survives_an_executor_restart_mid_run() -> anyhow::Result<()> {
    let sandbox = Sandbox::start_with(Database::sqlite()?, fast_config()).await?;
    let spec = workflow(
        "restart-map",
        vec![
            {
                let mut s = map_step("each", "raw@^1", &[], "inputs.items", &[("x", "item")]);
                s.max_parallel = 2;
                s
            },
            step("after", "raw@^1", &["each"], &[("xs", "each.map(e, e.x)")]),
        ],
    );
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({"items": ["a", "b", "c", "d"]})))
        .await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("raw-1", "raw", "1.0.0", 4)).await?;
    let first = worker.expect_assign().await?;
    let second = worker.expect_assign().await?;
    assert_eq!(
        [first.step_id.as_str(), second.step_id.as_str()],
        ["each[0]", "each[1]"]
    );
    worker.start(&first).await?;
    worker
        .complete(&first.task_id, first.attempt, json!({"x": "A"}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        pb::RecordOutcome::Accepted
    );
    let third = worker.expect_assign().await?;
    assert_eq!(third.step_id, "each[2]");
    drop(worker);

    // Restart: a new mesh on the same SQLite file.
    let sandbox = sandbox.restart(fast_config()).await?;
    // The held item is resumed if the new executor still holds it for this instance, or
    // reassigned as a new attempt if its grace ran out during the shutdown: either way it is
    // answered once more and counted once.
    let mut hello = RawWorker::hello("raw-1", "raw", "1.0.0", 4);
    hello.in_flight = vec![pb::TaskRef {
        task_id: second.task_id.clone(),
        attempt: second.attempt,
    }];
    let (mut worker, welcome) = RawWorker::connect(&sandbox.url(), hello).await?;
    if !welcome.resumed.is_empty() {
        worker
            .complete(&second.task_id, second.attempt, json!({"x": "1"}))
            .await?;
    }
    let mut seen = vec![];
    let mut last_inputs = None;
    while last_inputs.is_none() {
        if let pb::server_message::Message::Assign(assign) = worker.next().await? {
            seen.push(assign.step_id.clone());
            if assign.step_id == "after" {
                last_inputs = assign.inputs.clone();
            }
            let x = assign
                .step_id
                .trim_start_matches("each[")
                .trim_end_matches(']')
                .to_owned();
            worker.start(&assign).await?;
            worker
                .complete(&assign.task_id, assign.attempt, json!({"x": x}))
                .await?;
        }
    }
    assert!(
        !seen.contains(&"each[0]".to_owned()),
        "the item recorded before the restart ran again: {seen:?}"
    );
    assert!(seen.contains(&"each[3]".to_owned()), "{seen:?}");
    // each[0]'s output from before the restart, the others from after it, in item order.
    assert_eq!(
        Value::Object(dagmesh_proto::json::from_struct(last_inputs.as_ref())),
        json!({"xs": ["A", "1", "2", "3"]})
    );
    let client = sandbox.client().await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    for item in ["each[0]", "each[1]", "each[2]", "each[3]"] {
        let succeeded = step_states(&events, item)
            .iter()
            .filter(|s| *s == "SUCCEEDED")
            .count();
        assert_eq!(succeeded, 1, "{item} succeeded {succeeded} times");
    }
    sandbox.stop().await
}

#[tokio::test]
async fn cancelling_a_run_cancels_running_items() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let spec = workflow(
        "cancel-map",
        vec![map_step(
            "each",
            "raw@^1",
            &[],
            "[1, 2, 3]",
            &[("x", "item")],
        )],
    );
    let client = sandbox.client().await?;
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("raw-c", "raw", "1.0.0", 3)).await?;
    let mut assigned = Vec::new();
    for _ in 0..3 {
        let assign = worker.expect_assign().await?;
        worker.start(&assign).await?;
        assigned.push(assign);
    }
    let cancelled = client.cancel_run(&run.run_id, "enough").await?;
    assert_eq!(cancelled.state(), RunState::Cancelled);
    let mut cancels = 0;
    while cancels < 3 {
        if let pb::server_message::Message::Cancel(cancel) = worker.next().await? {
            assert!(cancel.task_id.contains("/each["), "{cancel:?}");
            cancels += 1;
        }
    }
    for step in &cancelled.steps {
        assert_eq!(step.state(), StepState::Cancelled, "{}", step.step_id);
    }
    sandbox.stop().await
}

fn typed_workflow() -> pb::WorkflowSpec {
    let mut spec = workflow(
        "typed",
        vec![step(
            "echo",
            "echo@^1",
            &[],
            &[("room", "inputs.room_id"), ("count", "inputs.image_count")],
        )],
    );
    spec.inputs = [
        (
            "room_id".to_owned(),
            InputSpec {
                r#type: "string".into(),
                ..InputSpec::default()
            },
        ),
        (
            "image_count".to_owned(),
            InputSpec {
                r#type: "int".into(),
                default: Some(dagmesh_proto::json::to_value(&json!(8))),
                description: "how many images".into(),
            },
        ),
    ]
    .into();
    spec
}

#[tokio::test]
async fn declared_inputs_are_checked_at_submit_and_defaults_filled_in() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(Worker::builder(sandbox.url()).task(
        "echo",
        "1.0.0",
        |_: TaskContext, input: Value| async move { Ok::<_, TaskError>(input) },
    ))
    .await?;
    let mut runs = RunServiceClient::new(sandbox.channel().await?);
    let submit = |inputs: Value| SubmitRunRequest {
        workflow_ref: Some(submit_run_request::WorkflowRef::Spec(typed_workflow())),
        inputs: Some(dagmesh_proto::json::to_struct(&inputs)),
        ..SubmitRunRequest::default()
    };
    let status = runs
        .submit_run(submit(json!({"image_count": "many", "colour": "red"})))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let message = status.message();
    for expected in [
        "the inputs do not match what workflow typed version 1 declares",
        "inputs.image_count: the string \"many\" is not of type int",
        "inputs.room_id: required input of type string is missing",
        "inputs.colour: the workflow declares no input \"colour\"",
    ] {
        assert!(
            message.contains(expected),
            "missing {expected:?} in {message}"
        );
    }
    let run = runs
        .submit_run(submit(json!({"room_id": "kitchen"})))
        .await?
        .into_inner()
        .run
        .expect("run");
    assert_eq!(
        Value::Object(dagmesh_proto::json::from_struct(run.inputs.as_ref())),
        json!({"room_id": "kitchen", "image_count": 8})
    );
    let client: Client = sandbox.client().await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(
        outputs(&run, "echo"),
        json!({"room": "kitchen", "count": 8})
    );
    sandbox.stop().await
}

fn sleep_step(id: &str, needs: &[&str], duration: &str) -> pb::StepSpec {
    pb::StepSpec {
        id: id.into(),
        needs: needs.iter().map(|s| (*s).to_owned()).collect(),
        sleep: duration.into(),
        ..pb::StepSpec::default()
    }
}

fn approval_step(id: &str, needs: &[&str], message: &str, timeout: &str) -> pb::StepSpec {
    pb::StepSpec {
        id: id.into(),
        needs: needs.iter().map(|s| (*s).to_owned()).collect(),
        approval: Some(pb::ApprovalSpec {
            message: message.into(),
            timeout: timeout.into(),
        }),
        ..pb::StepSpec::default()
    }
}

async fn spawn_echo(sandbox: &Sandbox) -> anyhow::Result<()> {
    spawn_worker(Worker::builder(sandbox.url()).slots(4).task(
        "echo",
        "1.0.0",
        |_: TaskContext, input: Value| async move { Ok::<_, TaskError>(input) },
    ))
    .await?;
    Ok(())
}

/// Waits until `step` of the run is RUNNING (a sleep or an approval waiting).
async fn until_waiting(client: &Client, run_id: &str, step: &str) -> anyhow::Result<pb::Step> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let run = client.get_run(run_id).await?;
        let found = run.steps.iter().find(|s| s.step_id == step).cloned();
        if let Some(found) = found
            && found.state() == StepState::Running
        {
            return Ok(found);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{step} never waited: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_sleep_step_waits_then_succeeds() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_echo(&sandbox).await?;
    let spec = workflow(
        "sleepy",
        vec![
            sleep_step("nap", &[], "400ms"),
            step("after", "echo@^1", &["nap"], &[("slept", "nap.slept")]),
        ],
    );
    let client = sandbox.client().await?;
    let started = std::time::Instant::now();
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let nap = until_waiting(&client, &run.run_id, "nap").await?;
    assert!(
        nap.waiting_for.starts_with("sleep until "),
        "{}",
        nap.waiting_for
    );
    assert!(nap.wake_at.is_some());
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "woke early"
    );
    assert_eq!(outputs(&run, "after"), json!({"slept": "400ms"}));
    sandbox.stop().await
}

#[tokio::test]
async fn an_approval_waits_for_approve_or_deny() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_echo(&sandbox).await?;
    let spec = workflow(
        "reviewed",
        vec![
            step("build", "echo@^1", &[], &[("n", "1")]),
            approval_step("review", &["build"], "Ship build 1?", ""),
            step(
                "ship",
                "echo@^1",
                &["review"],
                &[("by", "review.approved_by"), ("ticket", "review.ticket")],
            ),
        ],
    );
    let client = sandbox.client().await?;
    let mut runs = RunServiceClient::new(sandbox.channel().await?);

    let run = client.submit(SubmitRun::inline(spec.clone())).await?;
    let review = until_waiting(&client, &run.run_id, "review").await?;
    assert_eq!(review.waiting_for, "approval: Ship build 1?");
    // Approving a step that is no approval, or an unknown one, says why.
    for (step_id, expected) in [
        ("build", "step \"build\" is not an approval step"),
        ("nope", "has no step \"nope\""),
    ] {
        let status = runs
            .approve_step(pb::ApproveStepRequest {
                run_id: run.run_id.clone(),
                step_id: step_id.into(),
                approve: true,
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains(expected), "{}", status.message());
    }
    client
        .approve_step(
            &run.run_id,
            "review",
            json!({"ticket": "OPS-7"}),
            "looks good",
        )
        .await?;
    let done = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&done);
    assert_eq!(
        outputs(&done, "review"),
        json!({"ticket": "OPS-7", "approved_by": "anonymous", "comment": "looks good"})
    );
    assert_eq!(
        outputs(&done, "ship"),
        json!({"by": "anonymous", "ticket": "OPS-7"})
    );
    // Once approved, it waits no more.
    let status = runs
        .approve_step(pb::ApproveStepRequest {
            run_id: run.run_id.clone(),
            step_id: "review".into(),
            approve: true,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    let run = client.submit(SubmitRun::inline(spec.clone())).await?;
    until_waiting(&client, &run.run_id, "review").await?;
    client
        .deny_step(&run.run_id, "review", "not on a Friday")
        .await?;
    let denied = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(denied.state(), RunState::Failed);
    assert_eq!(
        step_of(&denied, "review").error,
        "denied by anonymous: not on a Friday"
    );
    assert_eq!(step_of(&denied, "ship").state(), StepState::Cancelled);

    let mut timed = spec;
    timed.name = "reviewed-quickly".into();
    timed.steps[1].approval.as_mut().expect("approval").timeout = "300ms".into();
    let run = client.submit(SubmitRun::inline(timed)).await?;
    let expired = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(expired.state(), RunState::Failed);
    assert_eq!(
        step_of(&expired, "review").error,
        "no approval within its timeout of 300ms"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_suspended_run_hands_out_nothing_until_resumed() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let spec = workflow(
        "holdable",
        vec![
            step("first", "raw@^1", &[], &[]),
            step("second", "raw@^1", &["first"], &[]),
        ],
    );
    let client = sandbox.client().await?;
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("raw-s", "raw", "1.0.0", 2)).await?;
    let first = worker.expect_assign().await?;
    let suspended = client
        .suspend_run(&run.run_id, "checking the warehouse")
        .await?;
    assert!(suspended.suspended);
    worker.start(&first).await?;
    worker
        .complete(&first.task_id, first.attempt, json!({}))
        .await?;
    assert_eq!(
        worker.expect_recorded().await?.outcome(),
        pb::RecordOutcome::Accepted
    );
    // `second` is ready, and stays with the executor while the run is suspended.
    let quiet = tokio::time::timeout(Duration::from_millis(400), worker.next()).await;
    assert!(
        quiet.is_err(),
        "a suspended run handed out a task: {quiet:?}"
    );
    let held = client.get_run(&run.run_id).await?;
    assert_eq!(step_of(&held, "second").state(), StepState::Ready);
    let resumed = client.resume_run(&run.run_id).await?;
    assert!(!resumed.suspended);
    let second = worker.expect_assign().await?;
    assert_eq!(second.step_id, "second");
    worker.start(&second).await?;
    worker
        .complete(&second.task_id, second.attempt, json!({}))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    let changes: Vec<(bool, String)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::run_event::Event::RunState(c)) => Some((c.suspended, c.error.clone())),
            _ => None,
        })
        .collect();
    assert!(
        changes.contains(&(true, "suspended: checking the warehouse".to_owned())),
        "{changes:?}"
    );
    sandbox.stop().await
}

/// Sleeps and approvals keep waiting across a restart of the executor: the wake-up time comes
/// back from the store, and an approval given after the restart is taken.
#[tokio::test]
async fn waits_survive_a_restart() -> anyhow::Result<()> {
    let database = Database::sqlite()?;
    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    let spec = workflow(
        "waits",
        vec![
            sleep_step("nap", &[], "1500ms"),
            approval_step("review", &[], "ok?", ""),
        ],
    );
    let client = sandbox.client().await?;
    let started = std::time::Instant::now();
    let run = client.submit(SubmitRun::inline(spec)).await?;
    until_waiting(&client, &run.run_id, "review").await?;
    until_waiting(&client, &run.run_id, "nap").await?;
    let sandbox = sandbox.restart(fast_config()).await?;
    let client = sandbox.client().await?;
    until_waiting(&client, &run.run_id, "review").await?;
    client
        .approve_step(&run.run_id, "review", json!({}), "")
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the sleep ended early after the restart"
    );
    assert_eq!(outputs(&run, "nap"), json!({"slept": "1s 500ms"}));
    sandbox.stop().await
}

/// Exit hooks run after the DAG: `on_failure` sees what failed, `on_success` is skipped, and the
/// run ends with the DAG's outcome; a failed hook fails a run whose DAG succeeded.
#[tokio::test]
async fn exit_hooks_run_after_the_dag_and_see_the_outcome() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(
        Worker::builder(sandbox.url())
            .slots(4)
            .task("echo", "1.0.0", |_: TaskContext, input: Value| async move {
                Ok::<_, TaskError>(input)
            })
            .task("boom", "1.0.0", |_: TaskContext, _: Value| async move {
                Err::<Value, _>(TaskError::fatal("disk full"))
            }),
    )
    .await?;
    let text = r#"
name: hooked
steps:
  - {id: build, task: echo@^1, inputs: {n: 1}}
  - {id: test, task: "boom@^1", needs: [build]}
  - {id: ship, task: echo@^1, needs: [test]}
on_exit:
  - {id: cleanup, task: echo@^1, inputs: {state: run.state}}
on_success:
  - {id: celebrate, task: echo@^1}
on_failure:
  - id: page
    task: echo@^1
    inputs: {failed: "run.failed_steps.map(f, f.step_id)", error: run.error, built: build.n}
"#;
    let spec = dagmesh_spec::parse_workflow(text, dagmesh_spec::Format::Yaml)?;
    let client = sandbox.client().await?;
    let run = client.submit(SubmitRun::inline(spec.clone())).await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(run.error, "step \"test\" failed: disk full");
    assert_eq!(outputs(&run, "cleanup"), json!({"state": "FAILED"}));
    assert_eq!(
        outputs(&run, "page"),
        json!({"failed": ["test", "ship"], "error": "step \"test\" failed: disk full", "built": 1})
    );
    let celebrate = step_of(&run, "celebrate");
    assert_eq!(celebrate.state(), StepState::Skipped);
    assert!(
        celebrate
            .error
            .contains("on_success hooks run only when it succeeds"),
        "{}",
        celebrate.error
    );
    // The hooks ran after the DAG had ended.
    let events = all_events(sandbox.channel().await?, &run.run_id).await?;
    let position = |step: &str, state: &str| {
        events.iter().position(|e| matches!(&e.event,
            Some(pb::run_event::Event::StepState(c)) if c.step_id == step && c.state().as_str_name().ends_with(state)))
    };
    assert!(position("ship", "CANCELLED") < position("page", "READY"));

    let mut passing = spec;
    passing.name = "hooked-ok".into();
    passing.steps[1].task = "echo@^1".into();
    passing.on_success[0].task = "boom@^1".into();
    let run = client.submit(SubmitRun::inline(passing)).await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed, "a failed hook fails the run");
    assert_eq!(run.error, "step \"celebrate\" failed: disk full");
    assert_eq!(outputs(&run, "cleanup"), json!({"state": "SUCCEEDED"}));
    assert_eq!(step_of(&run, "page").state(), StepState::Skipped);
    assert_eq!(step_of(&run, "ship").state(), StepState::Succeeded);
    sandbox.stop().await
}

/// The room-scan example end to end: a variable number of photos mapped over, the reconstruction
/// as a child workflow, and the exit hook telling the customer how it went — also when the scan
/// fails.
#[tokio::test]
async fn room_scan_maps_over_its_photos_and_notifies_in_an_exit_hook() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(dagmesh_example_room_scan::cpu_worker(&sandbox.url())).await?;
    spawn_worker(dagmesh_example_room_scan::gpu_worker(&sandbox.url())).await?;
    let spec = dagmesh_spec::parse_workflow(
        dagmesh_example_room_scan::WORKFLOW_YAML,
        dagmesh_spec::Format::Yaml,
    )?;
    let client = sandbox.client().await?;
    client
        .apply_workflow(dagmesh_spec::parse_workflow(
            dagmesh_example_room_scan::MESH_WORKFLOW_YAML,
            dagmesh_spec::Format::Yaml,
        )?)
        .await?;
    let inputs = json!({"room_id": "hall", "image_count": 5, "notify_email": "me@example.com"});
    let run = client
        .submit(SubmitRun::inline(spec.clone()).inputs(inputs))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(step_of(&run, "features").item_count, 5);
    let child = client
        .get_run(&step_of(&run, "reconstruct").child_run_id)
        .await?;
    assert_eq!((child.workflow.as_str(), child.depth), ("room-mesh", 1));
    assert_succeeded(&child);
    assert_eq!(
        outputs(&run, "notify")["message"],
        json!("me@example.com: your scan of hall is ready (1058 triangles, 5 thumbnails)")
    );

    // No photos: fetch fails for good, and the hook still tells the customer.
    let inputs = json!({"room_id": "hall", "image_count": 0, "notify_email": "me@example.com"});
    let run = client
        .submit(SubmitRun::inline(spec).inputs(inputs))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    let message = outputs(&run, "notify")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("me@example.com: we could not finish your scan of hall")
            && message.contains("image_count must be at least 1"),
        "{message}"
    );
    sandbox.stop().await
}

/// A `wait_for` step is resumed by an event published through the events API whose filter
/// accepts it (correlated with the run's inputs); others leave it waiting, and it times out.
#[tokio::test]
async fn a_step_waits_for_a_matching_event() -> anyhow::Result<()> {
    use dagmesh_proto::v1::{
        PublishEventRequest, scheduler_service_client::SchedulerServiceClient,
    };
    let sandbox = Sandbox::start().await?;
    spawn_echo(&sandbox).await?;
    let text = r#"
name: waits-for-upload
inputs: {room: {type: string}}
steps:
  - id: upload
    wait_for: {topic: uploads, filter: "event.room == inputs.room && event.size > 0", timeout: 1h}
  - {id: use, task: echo@^1, needs: [upload], inputs: {key: upload.key}}
"#;
    let spec = dagmesh_spec::parse_workflow(text, dagmesh_spec::Format::Yaml)?;
    let client = sandbox.client().await?;
    let kitchen = client
        .submit(SubmitRun::inline(spec.clone()).inputs(json!({"room": "kitchen"})))
        .await?;
    let hall = client
        .submit(SubmitRun::inline(spec.clone()).inputs(json!({"room": "hall"})))
        .await?;
    let waiting = until_waiting(&client, &kitchen.run_id, "upload").await?;
    assert_eq!(waiting.waiting_for, "an event on topic uploads");
    until_waiting(&client, &hall.run_id, "upload").await?;
    let mut scheduler = SchedulerServiceClient::new(sandbox.channel().await?);
    let publish = |payload: Value| PublishEventRequest {
        topic: "uploads".into(),
        payload: Some(dagmesh_proto::json::to_struct(&payload)),
        event_id: String::new(),
    };
    let ignored = scheduler
        .publish_event(publish(
            json!({"room": "kitchen", "size": 0, "key": "empty"}),
        ))
        .await?
        .into_inner();
    assert!(ignored.resumed_steps.is_empty(), "{ignored:?}");
    let resumed = scheduler
        .publish_event(publish(
            json!({"room": "kitchen", "size": 3, "key": "k/1.jpg"}),
        ))
        .await?
        .into_inner();
    assert_eq!(
        resumed.resumed_steps,
        [format!("{}/upload", kitchen.run_id)]
    );
    let done = wait_for_run(&client, &kitchen.run_id).await?;
    assert_succeeded(&done);
    assert_eq!(outputs(&done, "use"), json!({"key": "k/1.jpg"}));
    // The hall run still waits; it gives up at its timeout.
    let still = client.get_run(&hall.run_id).await?;
    assert_eq!(step_of(&still, "upload").state(), StepState::Running);
    client.cancel_run(&hall.run_id, "done testing").await?;

    let mut quick = spec;
    quick.name = "waits-briefly".into();
    quick.steps[0].wait_for.as_mut().expect("wait_for").timeout = "300ms".into();
    let run = client
        .submit(SubmitRun::inline(quick).inputs(json!({"room": "attic"})))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(
        step_of(&run, "upload").error,
        "no event on topic uploads within its timeout of 300ms"
    );
    sandbox.stop().await
}

/// `retry --from STEP`: that step and everything downstream run again, even in a run that
/// succeeded; upstream results stand.
#[tokio::test]
async fn retry_from_a_step_reruns_it_and_what_follows() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    spawn_worker(Worker::builder(sandbox.url()).slots(4).task(
        "count",
        "1.0.0",
        move |ctx: TaskContext, _: Value| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, TaskError>(json!({ "attempt": ctx.attempt() }))
            }
        },
    ))
    .await?;
    let spec = workflow(
        "rerun",
        vec![
            step("a", "count@^1", &[], &[]),
            map_step("b", "count@^1", &["a"], "[1, 2]", &[]),
            step("c", "count@^1", &["b"], &[]),
            step("side", "count@^1", &["a"], &[]),
        ],
    );
    let client = sandbox.client().await?;
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let first = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&first);
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    let mut runs = RunServiceClient::new(sandbox.channel().await?);
    let status = runs
        .retry_run(pb::RetryRunRequest {
            run_id: run.run_id.clone(),
            from_step: "nope".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("from_step: workflow rerun version 1 has no step \"nope\""),
        "{}",
        status.message()
    );
    let status = runs
        .retry_run(pb::RetryRunRequest {
            run_id: run.run_id.clone(),
            from_step: String::new(),
        })
        .await
        .expect_err("a succeeded run is retried only from a step");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    client.retry_run_from(&run.run_id, "b").await?;
    let second = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&second);
    // b's two items and c ran again; a and side did not.
    assert_eq!(calls.load(Ordering::SeqCst), 8);
    assert_eq!(step_of(&second, "a").attempt, 1);
    assert_eq!(step_of(&second, "side").attempt, 1);
    assert_eq!(step_of(&second, "b[1]").attempt, 2);
    assert_eq!(step_of(&second, "c").attempt, 2);
    assert_eq!(outputs(&second, "c"), json!({"attempt": 2}));
    assert_eq!(second.retried_by, "anonymous");
    sandbox.stop().await
}

/// The new RPC fields are bounded and refused with the field named, and nothing changes.
#[tokio::test]
async fn hostile_values_in_the_new_run_calls_are_refused_with_the_field() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let client = sandbox.client().await?;
    let run = client
        .submit(SubmitRun::inline(workflow(
            "hostile-waits",
            vec![approval_step("review", &[], "ok?", "")],
        )))
        .await?;
    until_waiting(&client, &run.run_id, "review").await?;
    let mut runs = RunServiceClient::new(sandbox.channel().await?);
    let long = "x".repeat(5000);
    let mut deep = json!(1);
    for _ in 0..30 {
        deep = json!({ "d": deep });
    }
    let big = json!({ "blob": "y".repeat(5 * 1024 * 1024) });
    let approve = |step_id: &str, outputs: &Value, comment: &str| pb::ApproveStepRequest {
        run_id: run.run_id.clone(),
        step_id: step_id.into(),
        approve: true,
        outputs: Some(dagmesh_proto::json::to_struct(outputs)),
        comment: comment.into(),
    };
    let refusals = [
        (
            runs.approve_step(approve("review", &json!({}), &long))
                .await
                .err(),
            "comment: ",
        ),
        (
            runs.approve_step(approve(&long, &json!({}), ""))
                .await
                .err(),
            "step_id: ",
        ),
        (
            runs.approve_step(approve("", &json!({}), "")).await.err(),
            "step_id: required",
        ),
        (
            runs.approve_step(approve("review", &deep, "")).await.err(),
            "outputs",
        ),
        (
            runs.approve_step(approve("review", &big, "")).await.err(),
            "outputs",
        ),
        (
            runs.suspend_run(pb::SuspendRunRequest {
                run_id: run.run_id.clone(),
                reason: long.clone(),
            })
            .await
            .err(),
            "reason: ",
        ),
        (
            runs.deliver_event(pb::DeliverEventRequest {
                topic: String::new(),
                payload: None,
            })
            .await
            .err(),
            "topic: required",
        ),
        (
            runs.deliver_event(pb::DeliverEventRequest {
                topic: long.clone(),
                payload: None,
            })
            .await
            .err(),
            "topic: ",
        ),
        (
            runs.deliver_event(pb::DeliverEventRequest {
                topic: "t".into(),
                payload: Some(dagmesh_proto::json::to_struct(&deep)),
            })
            .await
            .err(),
            "payload",
        ),
        (
            runs.retry_run(pb::RetryRunRequest {
                run_id: run.run_id.clone(),
                from_step: long.clone(),
            })
            .await
            .err(),
            "from_step: ",
        ),
        (
            runs.submit_run(SubmitRunRequest {
                workflow_ref: Some(submit_run_request::WorkflowRef::Spec(workflow(
                    "hostile-waits",
                    vec![approval_step("review", &[], "ok?", "")],
                ))),
                memoize_from: long.clone(),
                ..SubmitRunRequest::default()
            })
            .await
            .err(),
            "memoize_from: ",
        ),
        (
            // A child workflow step whose workflow name is garbage, and a cache without ttl.
            runs.submit_run(SubmitRunRequest {
                workflow_ref: Some(submit_run_request::WorkflowRef::Spec(workflow(
                    "hostile-child",
                    vec![
                        pb::StepSpec {
                            workflow: format!("{long}@0"),
                            ..step("a", "", &[], &[])
                        },
                        pb::StepSpec {
                            cache: Some(pb::CacheSpec {
                                key: long.clone(),
                                ttl: String::new(),
                            }),
                            ..step("b", "t", &[], &[])
                        },
                    ],
                ))),
                ..SubmitRunRequest::default()
            })
            .await
            .err()
            .inspect(|status| {
                for field in [
                    "steps[0].workflow: ",
                    "steps[1].cache.key: ",
                    "steps[1].cache.ttl: ",
                ] {
                    assert!(status.message().contains(field), "{field}: {status:?}");
                }
            }),
            "",
        ),
    ];
    for (status, prefix) in refusals {
        let status = status.unwrap_or_else(|| panic!("{prefix} was accepted"));
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{prefix}: {status:?}"
        );
        assert!(
            status.message().starts_with(prefix),
            "{prefix}: {}",
            status.message()
        );
        assert!(
            status.message().len() < 2048,
            "{prefix}: the input echoed back"
        );
    }
    // Still waiting, untouched.
    let still = client.get_run(&run.run_id).await?;
    assert_eq!(step_of(&still, "review").state(), StepState::Running);
    assert!(!still.suspended);

    // 10,000 made-up inputs against a declaration: refused, with a bounded answer.
    let many: serde_json::Map<String, Value> =
        (0..10_000).map(|i| (format!("k{i}"), json!(i))).collect();
    let status = runs
        .submit_run(SubmitRunRequest {
            workflow_ref: Some(submit_run_request::WorkflowRef::Spec(typed_workflow())),
            inputs: Some(dagmesh_proto::json::map_to_struct(&many)),
            ..SubmitRunRequest::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let message = status.message();
    assert!(
        message.contains("and 9990 more inputs the workflow does not declare"),
        "{}",
        &message[..message.len().min(500)]
    );
    assert!(message.len() < 4096, "{} bytes", message.len());
    sandbox.stop().await
}

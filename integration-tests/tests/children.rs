//! Child workflows (`StepSpec.workflow`) end to end: a step starts a run of another workflow and
//! ends with it, through the mesh on real sockets with SDK workers.

use std::time::Duration;

use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{self as pb, InputSpec, RunState, StepState};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use serde_json::{Value, json};

fn step_of<'a>(run: &'a pb::Run, step: &str) -> &'a pb::Step {
    run.steps
        .iter()
        .find(|s| s.step_id == step)
        .unwrap_or_else(|| panic!("run has no step {step}: {run:?}"))
}

fn outputs(run: &pb::Run, step: &str) -> Value {
    Value::Object(dagmesh_proto::json::from_struct(
        step_of(run, step).outputs.as_ref(),
    ))
}

fn child_step(id: &str, workflow: &str, needs: &[&str], inputs: &[(&str, &str)]) -> pb::StepSpec {
    pb::StepSpec {
        workflow: workflow.into(),
        ..step(id, "", needs, inputs)
    }
}

/// `double` returns `{"value": 2x}`; `wait` sleeps `ms` then echoes; `fail` always fails.
async fn spawn_workers(sandbox: &Sandbox) -> anyhow::Result<()> {
    spawn_worker(
        Worker::builder(sandbox.url())
            .slots(16)
            .task(
                "double",
                "1.0.0",
                |_: TaskContext, input: Value| async move {
                    let x = input["x"].as_i64().unwrap_or_default();
                    Ok::<_, TaskError>(json!({ "value": 2 * x }))
                },
            )
            .task("wait", "1.0.0", |_: TaskContext, input: Value| async move {
                let ms = input["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, TaskError>(input)
            })
            .task("fail", "1.0.0", |_: TaskContext, _: Value| async move {
                Err::<Value, _>(TaskError::fatal("broken on purpose"))
            }),
    )
    .await?;
    Ok(())
}

/// `doubler`: two steps, declares `x: int`.
fn doubler() -> pb::WorkflowSpec {
    let mut spec = workflow(
        "doubler",
        vec![
            step("first", "double@^1", &[], &[("x", "inputs.x")]),
            step("second", "double@^1", &["first"], &[("x", "first.value")]),
        ],
    );
    spec.inputs.insert(
        "x".into(),
        InputSpec {
            r#type: "int".into(),
            ..InputSpec::default()
        },
    );
    spec
}

async fn until_child(client: &Client, run_id: &str, step: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let run = client.get_run(run_id).await?;
        if let Some(found) = run.steps.iter().find(|s| s.step_id == step)
            && !found.child_run_id.is_empty()
        {
            return Ok(found.child_run_id.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{step} never started a child: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_child_workflow_runs_and_its_outputs_are_the_steps() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_workers(&sandbox).await?;
    let client = sandbox.client().await?;
    client.apply_workflow(doubler()).await?;
    let parent = workflow(
        "parent",
        vec![
            child_step("twice", "doubler", &[], &[("x", "inputs.n")]),
            step(
                "after",
                "double@^1",
                &["twice"],
                &[("x", "twice.second.value")],
            ),
        ],
    );
    let run = client
        .submit(
            SubmitRun::inline(parent)
                .inputs(json!({"n": 3}))
                .idempotency_key("children-link-both-ways"),
        )
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    // A keyed root run lives in its key's partition (of the default 256), the child in its
    // parent's, so that one executor replica owns the whole tree.
    let partition = dagmesh_metastore::ownership::partition_of("children-link-both-ways", 256);
    assert_eq!(run.partition, partition);
    assert_eq!(
        outputs(&run, "twice"),
        json!({"first": {"value": 6}, "second": {"value": 12}})
    );
    assert_eq!(outputs(&run, "after"), json!({"value": 24}));
    // GetRun links both ways.
    let child_id = step_of(&run, "twice").child_run_id.clone();
    assert!(!child_id.is_empty());
    let child = client.get_run(&child_id).await?;
    assert_eq!(child.workflow, "doubler");
    assert_eq!(child.parent_run_id, run.run_id);
    assert_eq!(child.parent_step_id, "twice");
    assert_eq!(child.depth, 1);
    assert_eq!(child.partition, partition);
    assert_eq!(child.state(), RunState::Succeeded);
    assert_eq!(child.submitted_by, run.submitted_by);
    sandbox.stop().await
}

#[tokio::test]
async fn a_map_of_child_workflows_runs_one_child_per_item() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_workers(&sandbox).await?;
    let client = sandbox.client().await?;
    client.apply_workflow(doubler()).await?;
    let mut each = child_step("each", "doubler@1", &[], &[("x", "item")]);
    each.for_each = "[1, 2, 3, 4, 5]".into();
    each.max_parallel = 2;
    let parent = workflow(
        "fan",
        vec![
            each,
            step(
                "total",
                "double@^1",
                &["each"],
                &[("x", "each[4].second.value")],
            ),
        ],
    );
    let run = client.submit(SubmitRun::inline(parent)).await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    let list = outputs(&run, "each");
    let seconds: Vec<i64> = list["items"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| c["second"]["value"].as_i64().unwrap_or_default())
        .collect();
    assert_eq!(seconds, vec![4, 8, 12, 16, 20]);
    assert_eq!(outputs(&run, "total"), json!({"value": 40}));
    let children: Vec<&pb::Step> = run.steps.iter().filter(|s| s.map_step == "each").collect();
    assert_eq!(children.len(), 5);
    for item in children {
        let child = client.get_run(&item.child_run_id).await?;
        assert_eq!(child.parent_step_id, item.step_id);
        assert_eq!(child.workflow_version, 1);
        assert_eq!(child.partition, run.partition);
    }
    // An unkeyed root run hashes its own id.
    let partition = dagmesh_metastore::ownership::partition_of(&run.run_id, 256);
    assert_eq!(run.partition, partition);
    sandbox.stop().await
}

#[tokio::test]
async fn a_failed_child_fails_the_step_and_bad_inputs_or_names_are_named() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_workers(&sandbox).await?;
    let client = sandbox.client().await?;
    client.apply_workflow(doubler()).await?;
    client
        .apply_workflow(workflow("breaks", vec![step("boom", "fail@^1", &[], &[])]))
        .await?;
    for (child, inputs, expected) in [
        (
            "breaks",
            vec![],
            "failed: step \"boom\" failed: broken on purpose",
        ),
        ("doubler", vec![("x", "'three'")], "steps.bad.inputs.x"),
        ("nowhere", vec![], "nowhere"),
        ("doubler@7", vec![("x", "1")], "version 7"),
    ] {
        let parent = workflow("parent", vec![child_step("bad", child, &[], &inputs)]);
        let run = client.submit(SubmitRun::inline(parent)).await?;
        let run = wait_for_run(&client, &run.run_id).await?;
        assert_eq!(run.state(), RunState::Failed, "{child}: {run:?}");
        let bad = step_of(&run, "bad");
        assert_eq!(bad.state(), StepState::Failed);
        assert!(bad.error.contains(expected), "{child}: {}", bad.error);
    }
    sandbox.stop().await
}

#[tokio::test]
async fn a_workflow_that_starts_itself_stops_at_the_depth_limit() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let client = sandbox.client().await?;
    let spec = workflow("forever", vec![child_step("again", "forever", &[], &[])]);
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_eq!(run.state(), RunState::Failed);
    // Walk down to the deepest child: it names the limit.
    let mut deepest = run.clone();
    while let Some(child) = deepest
        .steps
        .iter()
        .find(|s| !s.child_run_id.is_empty())
        .map(|s| s.child_run_id.clone())
    {
        deepest = client.get_run(&child).await?;
    }
    assert_eq!(deepest.depth, dagmesh_proto::limits::MAX_CHILD_DEPTH);
    let again = step_of(&deepest, "again");
    assert!(
        again.error.contains("over the limit of 8"),
        "{}",
        again.error
    );
    sandbox.stop().await
}

#[tokio::test]
async fn cancelling_the_parent_cancels_its_children_and_suspend_reaches_them() -> anyhow::Result<()>
{
    let sandbox = Sandbox::start().await?;
    spawn_workers(&sandbox).await?;
    let client = sandbox.client().await?;
    client
        .apply_workflow(workflow(
            "slow",
            vec![
                step("nap", "wait@^1", &[], &[("ms", "200")]),
                step("more", "wait@^1", &["nap"], &[("ms", "60000")]),
            ],
        ))
        .await?;
    let parent = workflow("parent", vec![child_step("slow", "slow", &[], &[])]);
    let run = client.submit(SubmitRun::inline(parent)).await?;
    let child_id = until_child(&client, &run.run_id, "slow").await?;
    let suspended = client.suspend_run(&run.run_id, "look").await?;
    assert!(suspended.suspended);
    assert!(client.get_run(&child_id).await?.suspended);
    client.resume_run(&run.run_id).await?;
    assert!(!client.get_run(&child_id).await?.suspended);
    client.cancel_run(&run.run_id, "enough").await?;
    let child = wait_for_run(&client, &child_id).await?;
    assert_eq!(child.state(), RunState::Cancelled);
    assert!(child.error.contains(&run.run_id), "{}", child.error);
    // A child cannot be retried on its own: its parent would not hear of it.
    let refused = client.retry_run(&child_id).await.expect_err("refused");
    assert!(
        refused.to_string().contains("retry the parent"),
        "{refused}"
    );
    sandbox.stop().await
}

#[tokio::test]
async fn a_child_run_survives_an_executor_restart() -> anyhow::Result<()> {
    let database = Database::sqlite()?;
    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    let client = sandbox.client().await?;
    client
        .apply_workflow(workflow(
            "waits",
            vec![pb::StepSpec {
                id: "review".into(),
                approval: Some(pb::ApprovalSpec::default()),
                ..pb::StepSpec::default()
            }],
        ))
        .await?;
    let parent = workflow("parent", vec![child_step("inner", "waits", &[], &[])]);
    let run = client.submit(SubmitRun::inline(parent)).await?;
    let child_id = until_child(&client, &run.run_id, "inner").await?;
    let sandbox = sandbox.restart(fast_config()).await?;
    let client = sandbox.client().await?;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let child = client.get_run(&child_id).await?;
        if step_of(&child, "review").state() == StepState::Running {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{child:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .approve_step(&child_id, "review", json!({"ok": true}), "")
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(outputs(&run, "inner")["review"]["ok"], json!(true));
    sandbox.stop().await
}

#[tokio::test]
async fn a_memoized_resubmit_reuses_what_succeeded_and_runs_the_rest() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let sandbox = Sandbox::start().await?;
    let runs = Arc::new(AtomicU32::new(0));
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let (counted, flaky) = (runs.clone(), flaky_calls.clone());
    spawn_worker(
        Worker::builder(sandbox.url())
            .slots(8)
            .task("count", "1.0.0", move |_: TaskContext, input: Value| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, TaskError>(json!({ "x": input["x"].clone() }))
                }
            })
            .task("flaky", "1.0.0", move |_: TaskContext, _: Value| {
                let flaky = flaky.clone();
                async move {
                    if flaky.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(TaskError::fatal("first time fails"));
                    }
                    Ok(json!({ "ok": true }))
                }
            }),
    )
    .await?;
    let client = sandbox.client().await?;
    let mut each = step("each", "count@^1", &["a"], &[("x", "item")]);
    each.for_each = "[1, 2, 3]".into();
    client
        .apply_workflow(workflow(
            "memo",
            vec![
                step("a", "count@^1", &[], &[("x", "inputs.n")]),
                each,
                step("last", "flaky@^1", &["each"], &[]),
            ],
        ))
        .await?;
    let first = client
        .submit(SubmitRun::workflow("memo").inputs(json!({"n": 1})))
        .await?;
    let first = wait_for_run(&client, &first.run_id).await?;
    assert_eq!(first.state(), RunState::Failed);
    assert_eq!(runs.load(Ordering::SeqCst), 4);

    let second = client
        .submit(
            SubmitRun::workflow("memo")
                .inputs(json!({"n": 1}))
                .memoized_from(&first.run_id),
        )
        .await?;
    let second = wait_for_run(&client, &second.run_id).await?;
    assert_succeeded(&second);
    assert_eq!(runs.load(Ordering::SeqCst), 4, "a and the items ran again");
    for reused in ["a", "each[0]", "each[2]"] {
        assert_eq!(
            step_of(&second, reused).cached_from,
            first.run_id,
            "{reused}"
        );
    }
    assert_eq!(step_of(&second, "last").cached_from, "");
    assert_eq!(outputs(&second, "a"), json!({"x": 1}));
    // The event says where the outputs came from.
    let events = all_events(sandbox.channel().await?, &second.run_id).await?;
    assert!(events.iter().any(|e| matches!(
        &e.event,
        Some(pb::run_event::Event::StepState(s)) if s.step_id == "a" && s.cached_from == first.run_id
    )));

    // Other inputs: nothing matches, everything runs.
    let third = client
        .submit(
            SubmitRun::workflow("memo")
                .inputs(json!({"n": 2}))
                .memoized_from(&second.run_id),
        )
        .await?;
    wait_for_run(&client, &third.run_id).await?;
    assert_eq!(runs.load(Ordering::SeqCst), 5, "only the items matched");

    // The source must exist and have run the same workflow version.
    let missing = client
        .submit(SubmitRun::workflow("memo").memoized_from("no-such-run"))
        .await
        .expect_err("unknown run");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    client
        .apply_workflow(workflow("other", vec![step("a", "count@^1", &[], &[])]))
        .await?;
    let other = client
        .submit(SubmitRun::workflow("other").memoized_from(&first.run_id))
        .await
        .expect_err("another workflow");
    assert_eq!(other.code(), tonic::Code::InvalidArgument);
    assert!(other.to_string().contains("memoize_from"), "{other}");
    sandbox.stop().await
}

fn cached(mut spec: pb::StepSpec, key: &str, ttl: &str) -> pb::StepSpec {
    spec.cache = Some(pb::CacheSpec {
        key: key.into(),
        ttl: ttl.into(),
    });
    spec
}

/// A memoized step runs once per key: later runs (and items) with the same key take the stored
/// outputs, naming the run they came from, until the entry expires; the cache outlives a restart.
#[tokio::test]
async fn a_cached_step_runs_once_per_key_until_its_ttl() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let database = Database::sqlite()?;
    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    let calls = Arc::new(AtomicU32::new(0));
    let spawn = |sandbox: &Sandbox, calls: Arc<AtomicU32>| {
        Worker::builder(sandbox.url()).slots(8).task(
            "slow.square",
            "1.0.0",
            move |_: TaskContext, input: Value| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let x = input["x"].as_i64().unwrap_or_default();
                    Ok::<_, TaskError>(json!({ "square": x * x }))
                }
            },
        )
    };
    spawn_worker(spawn(&sandbox, calls.clone())).await?;
    let client = sandbox.client().await?;
    let mut items = cached(
        step(
            "items",
            "slow.square@^1",
            &[],
            &[("x", "item"), ("noise", "index")],
        ),
        "item",
        "1h",
    );
    items.for_each = "[2, 3, 2]".into();
    let spec = workflow(
        "memoized",
        vec![
            cached(
                step("one", "slow.square@^1", &[], &[("x", "inputs.x")]),
                "",
                "1h",
            ),
            items,
            cached(
                step("short", "slow.square@^1", &[], &[("x", "inputs.x + 100")]),
                "",
                "300ms",
            ),
        ],
    );
    client.apply_workflow(spec).await?;
    let submit = |x: i64| SubmitRun::workflow("memoized").inputs(json!({ "x": x }));
    let first = client.submit(submit(4)).await?;
    let first = wait_for_run(&client, &first.run_id).await?;
    assert_succeeded(&first);
    // one, short and three items: the two items with x = 2 may both run (they start together).
    let after_first = calls.load(Ordering::SeqCst);
    assert!((4..=5).contains(&after_first), "{after_first}");
    assert!(!step_of(&first, "one").cache_key.is_empty());
    assert_eq!(step_of(&first, "one").cached_from, "");

    let second = client.submit(submit(4)).await?;
    let second = wait_for_run(&client, &second.run_id).await?;
    assert_succeeded(&second);
    // Everything was a hit: no new calls.
    assert_eq!(calls.load(Ordering::SeqCst), after_first);
    for step in ["one", "items[0]", "items[1]", "items[2]", "short"] {
        assert_eq!(step_of(&second, step).cached_from, first.run_id, "{step}");
    }
    assert_eq!(outputs(&second, "one"), json!({"square": 16}));
    assert_eq!(
        outputs(&second, "items")["items"],
        json!([{"square": 4}, {"square": 9}, {"square": 4}])
    );
    let events = all_events(sandbox.channel().await?, &second.run_id).await?;
    assert!(events.iter().any(|e| matches!(
        &e.event,
        Some(pb::run_event::Event::StepState(s)) if s.step_id == "one" && s.cached_from == first.run_id
    )));

    // Other inputs miss; an expired entry misses; the cache survives a restart.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sandbox = sandbox.restart(fast_config()).await?;
    spawn_worker(spawn(&sandbox, calls.clone())).await?;
    let client = sandbox.client().await?;
    let third = client.submit(submit(4)).await?;
    let third = wait_for_run(&client, &third.run_id).await?;
    assert_succeeded(&third);
    assert_eq!(step_of(&third, "one").cached_from, first.run_id);
    assert_eq!(
        step_of(&third, "short").cached_from,
        "",
        "expired after 300ms"
    );
    assert_eq!(calls.load(Ordering::SeqCst), after_first + 1);
    let fourth = client.submit(submit(5)).await?;
    let fourth = wait_for_run(&client, &fourth.run_id).await?;
    assert_eq!(step_of(&fourth, "one").cached_from, "");
    assert_eq!(outputs(&fourth, "one"), json!({"square": 25}));
    sandbox.stop().await
}

/// A cache row damaged in the store (outputs nested past the limit, a huge run id) is a miss:
/// the step runs instead of taking outputs no worker could have given.
#[tokio::test]
async fn a_damaged_cache_entry_is_a_miss() -> anyhow::Result<()> {
    use prost::Message as _;
    let sandbox = Sandbox::start().await?;
    spawn_workers(&sandbox).await?;
    let client = sandbox.client().await?;
    let spec = workflow(
        "memo-damaged",
        vec![cached(step("d", "double@^1", &[], &[("x", "3")]), "", "1h")],
    );
    let first = client.submit(SubmitRun::inline(spec.clone())).await?;
    let first = wait_for_run(&client, &first.run_id).await?;
    assert_succeeded(&first);
    let key = step_of(&first, "d").cache_key.clone();
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    let pool = sqlx::SqlitePool::connect(&sandbox.database.url()).await?;
    for (stored, run_id) in [
        (json!({ "value": deep }), first.run_id.clone()),
        (json!({ "value": 6 }), "r".repeat(10_000)),
    ] {
        let damaged = pb::CacheEntry {
            key: key.clone(),
            run_id,
            step_id: "d".into(),
            outputs: Some(dagmesh_proto::json::to_struct(&stored)),
            stored_at: None,
            expires_at: Some((std::time::SystemTime::now() + Duration::from_secs(3600)).into()),
        };
        sqlx::query("UPDATE step_cache SET body = ? WHERE key = ?")
            .bind(damaged.encode_to_vec())
            .bind(&key)
            .execute(&pool)
            .await?;
        let again = client.submit(SubmitRun::inline(spec.clone())).await?;
        let again = wait_for_run(&client, &again.run_id).await?;
        assert_succeeded(&again);
        assert_eq!(
            step_of(&again, "d").cached_from,
            "",
            "a damaged entry was used"
        );
        assert_eq!(outputs(&again, "d"), json!({"value": 6}));
    }
    pool.close().await;
    sandbox.stop().await
}

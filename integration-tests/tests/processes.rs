//! The real `dagmesh` binary as child processes: killed mid-run, split into metastore and
//! executor, probed with grpcurl's protocols, and stopped with SIGTERM.
//!
//! Every child is a [`ChildGuard`]: it is SIGKILLed and reaped when the test ends, pass or fail,
//! and its log is printed when the test fails.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use dagmesh_integration_tests::{
    ChildGuard, Database, PATIENCE, all_events, assert_succeeded, channel, connected, free_port,
    scheduled_ticks, step, step_states, wait_for_run, workflow,
};
use dagmesh_proto::v1::{ReadRunRequest, Run, metadata_service_client::MetadataServiceClient};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker, WorkerHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// `dagmesh up` on `port` and the SQLite file in `dir`, with test timings; healthy on return.
async fn start_up(name: &str, dir: &Path, port: u16, extra: &[&str]) -> anyhow::Result<ChildGuard> {
    let listen = format!("127.0.0.1:{port}");
    let database = sqlite_url(dir);
    let mut args = vec![
        "up",
        "--listen",
        &listen,
        "--database",
        &database,
        "--lease",
        "1s",
        "--heartbeat-interval",
        "200ms",
        // Security has its own tests (security.rs); these are about processes and crashes.
        "--no-auth",
    ];
    args.extend_from_slice(extra);
    let mut child = spawn_open(name, &args, dir)?;
    child.wait_ready(&format!("http://{listen}")).await?;
    Ok(child)
}

/// `dagmesh ARGS` without authentication (security.rs tests it; these tests are about
/// processes and crashes).
fn spawn_open(name: &str, args: &[&str], dir: &Path) -> anyhow::Result<ChildGuard> {
    ChildGuard::spawn_with_env(name, args, &[("DAGMESH_NO_AUTH", "true")], dir)
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("db.sqlite").display())
}

/// Runs `worker` in the background until the test ends (the runtime drops it then).
fn spawn_worker(
    worker: Worker,
) -> (
    WorkerHandle,
    JoinHandle<Result<(), dagmesh_sdk::WorkerError>>,
) {
    let handle = worker.handle();
    (
        handle,
        tokio::spawn(worker.run_until(std::future::pending())),
    )
}

fn outputs(run: &Run, step_id: &str) -> serde_json::Map<String, Value> {
    let step = run
        .steps
        .iter()
        .find(|s| s.step_id == step_id)
        .unwrap_or_else(|| panic!("run {} has no step {step_id}", run.run_id));
    dagmesh_proto::json::from_struct(step.outputs.as_ref())
}

#[derive(Deserialize)]
struct CountInput {
    #[serde(default)]
    x: Option<f64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_sigkill_mid_run_recovers_every_run() -> anyhow::Result<()> {
    const RUNS: usize = 5;
    const STEPS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let mut up = start_up("up-1", dir.path(), port, &[]).await?;

    // Every handler execution, as (task id, attempt), in the order they finished.
    let (done_tx, mut done_rx) = watch::channel(Vec::<(String, u32)>::new());
    let done_tx = Arc::new(done_tx);
    let mut workers = Vec::new();
    for i in 0..2 {
        let done = done_tx.clone();
        let worker = Worker::builder(&url)
            .name("chaos")
            .instance_id(format!("chaos-{i}"))
            .slots(2)
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
            .task(
                "chaos.step",
                "1.0.0",
                move |ctx: TaskContext, input: CountInput| {
                    let done = done.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        done.send_modify(|d| d.push((ctx.task_id().to_owned(), ctx.attempt())));
                        Ok::<_, TaskError>(json!({ "n": input.x.unwrap_or(0.0) + 1.0 }))
                    }
                },
            )
            .build()?;
        workers.push(spawn_worker(worker));
    }
    for (handle, _) in &workers {
        connected(handle).await?;
    }

    // a -> (b, c) -> d -> e -> f; each step outputs n = x + 1, so f.n is 7 in every run.
    let task = "chaos.step@^1";
    let spec = workflow(
        "chaos-diamond",
        vec![
            step("a", task, &[], &[]),
            step("b", task, &["a"], &[("x", "a.n")]),
            step("c", task, &["a"], &[("x", "a.n")]),
            step("d", task, &["b", "c"], &[("x", "b.n + c.n")]),
            step("e", task, &["d"], &[("x", "d.n")]),
            step("f", task, &["e"], &[("x", "e.n")]),
        ],
    );
    let client = Client::connect(&url).await?;
    let mut run_ids = Vec::new();
    for i in 0..RUNS {
        let run = client
            .submit(SubmitRun::inline(spec.clone()).idempotency_key(format!("chaos-{i}")))
            .await?;
        run_ids.push(run.run_id);
    }

    // Kill once a fair share of the work is done, with most of it still to go; then kill the
    // next process too, soon after it has recovered, while workers are still reconnecting.
    let mut kills = Vec::new();
    for (next_process, more) in [(2, 8), (3, 4)] {
        let target = done_rx.borrow().len() + more;
        tokio::time::timeout(PATIENCE, done_rx.wait_for(|d| d.len() >= target))
            .await
            .with_context(|| format!("workers never finished {target} steps"))??;
        up.sigkill()?;
        let finished = done_rx.borrow().len();
        assert!(
            finished < RUNS * STEPS.len(),
            "every step had finished before kill {}; nothing was tested",
            kills.len() + 1
        );
        kills.push(finished);
        up = start_up(&format!("up-{next_process}"), dir.path(), port, &[]).await?;
    }
    let client = Client::connect(&url).await?;
    let channel = channel(&url).await?;
    for run_id in &run_ids {
        let run = wait_for_run(&client, run_id).await?;
        assert_succeeded(&run);
        let events = all_events(channel.clone(), run_id).await?;
        for step_id in STEPS {
            let states = step_states(&events, step_id);
            let succeeded = states.iter().filter(|s| *s == "SUCCEEDED").count();
            assert_eq!(
                succeeded, 1,
                "run {run_id} step {step_id}: SUCCEEDED recorded {succeeded} times: {states:?}"
            );
            assert!(
                !outputs(&run, step_id).is_empty(),
                "run {run_id} step {step_id} has no outputs"
            );
        }
        assert_eq!(
            outputs(&run, "f").get("n").and_then(Value::as_f64),
            Some(7.0),
            "run {run_id}: wrong data reached the last step"
        );
        // The recorded attempt of every step is one that a worker really ran.
        let done = done_rx.borrow().clone();
        for step in &run.steps {
            assert!(
                done.contains(&(step.task_id.clone(), step.attempt)),
                "run {run_id} step {} records attempt {} that no worker finished",
                step.step_id,
                step.attempt
            );
        }
    }
    let done = done_rx.borrow().clone();
    let distinct: BTreeSet<_> = done.iter().collect();
    eprintln!(
        "steps finished at the kills: {:?}; {} executions in all for {} steps ({} repeated)",
        kills,
        done.len(),
        RUNS * STEPS.len(),
        done.len() - distinct.len()
    );
    for (handle, task) in workers {
        handle.abort();
        let _ = task.await;
    }
    Ok(())
}

/// A map of 40 items (at most 6 at once) feeding a join, killed twice mid-map: every item is
/// recorded exactly once, items recorded before a kill keep their outputs, and the join sees
/// the whole list in item order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_sigkill_mid_map_recovers_every_item() -> anyhow::Result<()> {
    const ITEMS: usize = 40;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    // A killed executor's lease runs out quickly, so that its successor takes over at once.
    let fast = ["--executor-lease-ttl", "2s"];
    let mut up = start_up("up-1", dir.path(), port, &fast).await?;
    let (done_tx, mut done_rx) = watch::channel(Vec::<(String, u32)>::new());
    let done_tx = Arc::new(done_tx);
    let mut workers = Vec::new();
    for i in 0..2 {
        let done = done_tx.clone();
        let worker = Worker::builder(&url)
            .name("mapper")
            .instance_id(format!("mapper-{i}"))
            .slots(3)
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
            .task(
                "double",
                "1.0.0",
                move |ctx: TaskContext, input: CountInput| {
                    let done = done.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        done.send_modify(|d| d.push((ctx.task_id().to_owned(), ctx.attempt())));
                        Ok::<_, TaskError>(json!({ "n": input.x.unwrap_or(0.0) * 2.0 }))
                    }
                },
            )
            .task("sum", "1.0.0", |_: TaskContext, input: Value| async move {
                let total: f64 = input["ns"]
                    .as_array()
                    .map(|ns| ns.iter().filter_map(Value::as_f64).sum())
                    .unwrap_or_default();
                Ok::<_, TaskError>(json!({ "total": total, "ns": input["ns"].clone() }))
            })
            .build()?;
        workers.push(spawn_worker(worker));
    }
    for (handle, _) in &workers {
        connected(handle).await?;
    }
    let mut map = step("each", "double@^1", &[], &[("x", "item")]);
    map.for_each = "inputs.xs".into();
    map.max_parallel = 6;
    let spec = workflow(
        "chaos-map",
        vec![
            map,
            step("join", "sum@^1", &["each"], &[("ns", "each.map(e, e.n)")]),
        ],
    );
    let xs: Vec<usize> = (0..ITEMS).collect();
    let client = Client::connect(&url).await?;
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({ "xs": xs })))
        .await?;
    for (next_process, more) in [(2, 10), (3, 8)] {
        let target = done_rx.borrow().len() + more;
        tokio::time::timeout(PATIENCE, done_rx.wait_for(|d| d.len() >= target))
            .await
            .with_context(|| format!("workers never finished {target} items"))??;
        up.sigkill()?;
        ensure!(
            done_rx.borrow().len() < ITEMS,
            "every item had finished before the kill; nothing was tested"
        );
        up = start_up(&format!("up-{next_process}"), dir.path(), port, &fast).await?;
    }
    let client = Client::connect(&url).await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    let ns: Vec<f64> = outputs(&run, "join")
        .get("ns")
        .and_then(Value::as_array)
        .map(|ns| ns.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let expected: Vec<f64> = (0..ITEMS).map(|x| x as f64 * 2.0).collect();
    assert_eq!(
        ns, expected,
        "the join sees every item's output in item order"
    );
    let events = all_events(channel(&url).await?, &run.run_id).await?;
    let done = done_rx.borrow().clone();
    for i in 0..ITEMS {
        let item = format!("each[{i}]");
        let states = step_states(&events, &item);
        let succeeded = states.iter().filter(|s| *s == "SUCCEEDED").count();
        assert_eq!(
            succeeded, 1,
            "{item}: SUCCEEDED recorded {succeeded} times: {states:?}"
        );
        let row = run
            .steps
            .iter()
            .find(|s| s.step_id == item)
            .expect("item row");
        assert!(
            done.contains(&(row.task_id.clone(), row.attempt)),
            "{item} records attempt {} that no worker finished",
            row.attempt
        );
    }
    for (handle, task) in workers {
        handle.abort();
        let _ = task.await;
    }
    Ok(())
}

/// SIGKILL while a map of child workflows runs, each child a memoized task: after two kills
/// every child step ends once with its own child run, every child's task succeeds once, and a
/// second run of the same inputs after the kills is served from the cache without a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_sigkill_mid_child_workflows_keeps_children_and_cache() -> anyhow::Result<()> {
    const ITEMS: usize = 12;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let fast = ["--executor-lease-ttl", "2s"];
    let mut up = start_up("up-1", dir.path(), port, &fast).await?;
    let (done_tx, mut done_rx) = watch::channel(Vec::<(String, u32)>::new());
    let done_tx = Arc::new(done_tx);
    let done = done_tx.clone();
    let worker = Worker::builder(&url)
        .name("children")
        .instance_id("children-0")
        .slots(3)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .task(
            "double",
            "1.0.0",
            move |ctx: TaskContext, input: CountInput| {
                let done = done.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    done.send_modify(|d| d.push((ctx.task_id().to_owned(), ctx.attempt())));
                    Ok::<_, TaskError>(json!({ "n": input.x.unwrap_or(0.0) * 2.0 }))
                }
            },
        )
        .build()?;
    let (handle, task) = spawn_worker(worker);
    connected(&handle).await?;
    let client = Client::connect(&url).await?;
    let mut doubled = step("twice", "double@^1", &[], &[("x", "inputs.x")]);
    doubled.cache = Some(dagmesh_proto::v1::CacheSpec {
        key: String::new(),
        ttl: "1h".into(),
    });
    client
        .apply_workflow(workflow("child-double", vec![doubled]))
        .await?;
    let mut each = step("each", "", &[], &[("x", "item")]);
    each.workflow = "child-double".into();
    each.for_each = "inputs.xs".into();
    each.max_parallel = 3;
    let spec = workflow("chaos-children", vec![each]);
    let xs: Vec<usize> = (0..ITEMS).collect();
    let run = client
        .submit(SubmitRun::inline(spec.clone()).inputs(json!({ "xs": xs })))
        .await?;
    for (next_process, more) in [(2, 3), (3, 3)] {
        let target = done_rx.borrow().len() + more;
        tokio::time::timeout(PATIENCE, done_rx.wait_for(|d| d.len() >= target))
            .await
            .with_context(|| format!("the worker never finished {target} children"))??;
        up.sigkill()?;
        ensure!(
            done_rx.borrow().len() < ITEMS,
            "every child had finished before the kill; nothing was tested"
        );
        up = start_up(&format!("up-{next_process}"), dir.path(), port, &fast).await?;
    }
    let client = Client::connect(&url).await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    let events = all_events(channel(&url).await?, &run.run_id).await?;
    let mut children = BTreeSet::new();
    for i in 0..ITEMS {
        let item = format!("each[{i}]");
        let states = step_states(&events, &item);
        let succeeded = states.iter().filter(|s| *s == "SUCCEEDED").count();
        assert_eq!(succeeded, 1, "{item}: {states:?}");
        let row = run.steps.iter().find(|s| s.step_id == item).expect("item");
        assert_eq!(
            outputs(&run, &item)["twice"]["n"].as_f64(),
            Some(i as f64 * 2.0),
            "{item}"
        );
        let child = client.get_run(&row.child_run_id).await?;
        assert_eq!(child.parent_step_id, item);
        assert_succeeded(&child);
        let child_events = all_events(channel(&url).await?, &child.run_id).await?;
        let states = step_states(&child_events, "twice");
        assert_eq!(
            states.iter().filter(|s| *s == "SUCCEEDED").count(),
            1,
            "{item}'s child: {states:?}"
        );
        children.insert(child.run_id);
    }
    assert_eq!(children.len(), ITEMS, "one child run per item");

    // The same inputs again: every child's task is a cache hit, no worker runs anything.
    let ran = done_rx.borrow().len();
    let again = client
        .submit(SubmitRun::inline(spec).inputs(json!({ "xs": xs })))
        .await?;
    let again = wait_for_run(&client, &again.run_id).await?;
    assert_succeeded(&again);
    assert_eq!(done_rx.borrow().len(), ran, "the second run ran tasks");
    handle.abort();
    let _ = task.await;
    Ok(())
}

/// SIGKILL while a run sleeps, waits for an approval and for an event: after the restart the
/// sleep wakes at its stored time (not earlier), and the approval and the event resume the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_sigkill_mid_waits_keeps_every_wait() -> anyhow::Result<()> {
    use dagmesh_proto::v1::{
        PublishEventRequest, scheduler_service_client::SchedulerServiceClient,
    };
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let fast = ["--executor-lease-ttl", "2s"];
    let mut up = start_up("up-1", dir.path(), port, &fast).await?;
    let text = r#"
name: chaos-waits
inputs: {room: {type: string}}
steps:
  - {id: nap, sleep: 4s}
  - {id: review, approval: {message: "ok?"}}
  - id: upload
    wait_for: {topic: uploads, filter: "event.room == inputs.room"}
"#;
    let spec = dagmesh_spec::parse_workflow(text, dagmesh_spec::Format::Yaml)?;
    let client = Client::connect(&url).await?;
    let started = Instant::now();
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({"room": "attic"})))
        .await?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = client.get_run(&run.run_id).await?;
        let waiting = got
            .steps
            .iter()
            .filter(|s| !s.waiting_for.is_empty())
            .count();
        if waiting == 3 {
            break;
        }
        ensure!(Instant::now() < deadline, "the waits never began: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.sigkill()?;
    up = start_up("up-2", dir.path(), port, &fast).await?;
    let client = Client::connect(&url).await?;
    client
        .approve_step(
            &run.run_id,
            "review",
            json!({"ticket": 1}),
            "after the crash",
        )
        .await?;
    let mut scheduler = SchedulerServiceClient::new(channel(&url).await?);
    let resumed = scheduler
        .publish_event(PublishEventRequest {
            topic: "uploads".into(),
            payload: Some(dagmesh_proto::json::to_struct(&json!({"room": "attic"}))),
            event_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(resumed.resumed_steps, [format!("{}/upload", run.run_id)]);
    let done = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&done);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "the sleep ended early after the SIGKILL"
    );
    assert_eq!(outputs(&done, "review")["ticket"], json!(1));
    drop(up);
    Ok(())
}

#[derive(Deserialize)]
struct TextInput {
    text: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_metastore_and_executor_processes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (store_port, exec_port) = (free_port()?, free_port()?);
    let store_url = format!("http://127.0.0.1:{store_port}");
    let exec_url = format!("http://127.0.0.1:{exec_port}");

    let mut metastore = spawn_open(
        "metastore",
        &[
            "metastore",
            "--listen",
            &format!("127.0.0.1:{store_port}"),
            "--database",
            &sqlite_url(dir.path()),
        ],
        dir.path(),
    )?;
    let executor_args = [
        "executor",
        "--listen",
        &format!("127.0.0.1:{exec_port}"),
        "--metastore",
        &store_url,
        "--lease",
        "1s",
        "--heartbeat-interval",
        "200ms",
        "--drain-timeout",
        "5s",
    ];
    let mut executor = spawn_open("executor-1", &executor_args, dir.path())?;
    metastore.wait_ready(&store_url).await?;
    executor.wait_ready(&exec_url).await?;

    let worker = Worker::builder(&exec_url)
        .name("split")
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .task(
            "split.upper",
            "1.0.0",
            |_ctx: TaskContext, input: TextInput| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, TaskError>(json!({ "text": input.text.to_uppercase() }))
            },
        )
        .build()?;
    let (handle, worker_task) = spawn_worker(worker);
    connected(&handle).await?;

    let spec = workflow(
        "split-upper",
        vec![
            step("greet", "split.upper@^1", &[], &[("text", "inputs.name")]),
            step(
                "shout",
                "split.upper@^1",
                &["greet"],
                &[("text", "greet.text + ' world'")],
            ),
        ],
    );
    let client = Client::connect(&exec_url).await?;
    let submitted = client
        .submit(SubmitRun::inline(spec.clone()).inputs(json!({ "name": "alice" })))
        .await?;
    let run = wait_for_run(&client, &submitted.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(
        outputs(&run, "shout").get("text"),
        Some(&json!("ALICE WORLD"))
    );

    // What the executor reports is what the metastore holds.
    let stored = MetadataServiceClient::new(channel(&store_url).await?)
        .get_run(ReadRunRequest {
            run_id: run.run_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(stored.state(), run.state());
    assert_eq!(
        (&stored.workflow, stored.workflow_version, stored.last_seq),
        (&run.workflow, run.workflow_version, run.last_seq)
    );
    let by_id = |r: &Run| -> HashMap<String, (i32, u32, serde_json::Map<String, Value>)> {
        r.steps
            .iter()
            .map(|s| {
                (
                    s.step_id.clone(),
                    (
                        s.state,
                        s.attempt,
                        dagmesh_proto::json::from_struct(s.outputs.as_ref()),
                    ),
                )
            })
            .collect()
    };
    assert_eq!(
        by_id(&stored),
        by_id(&run),
        "steps differ between executor and metastore"
    );

    // The executor crashes while a step runs; a new one, on the same metastore, finishes the run.
    let second = client
        .submit(SubmitRun::inline(spec).inputs(json!({ "name": "bob" })))
        .await?;
    tokio::time::timeout(PATIENCE, handle.wait_for(|state| state.running == 1))
        .await
        .context("the second run never reached the worker")?;
    executor.sigkill()?;
    executor = spawn_open("executor-2", &executor_args, dir.path())?;
    executor.wait_ready(&exec_url).await?;
    let client = Client::connect(&exec_url).await?;
    let second = wait_for_run(&client, &second.run_id).await?;
    assert_succeeded(&second);
    assert_eq!(
        outputs(&second, "shout").get("text"),
        Some(&json!("BOB WORLD"))
    );
    let events = all_events(channel(&exec_url).await?, &second.run_id).await?;
    for step_id in ["greet", "shout"] {
        let states = step_states(&events, step_id);
        assert_eq!(
            states.iter().filter(|s| *s == "SUCCEEDED").count(),
            1,
            "{step_id} went through {states:?}"
        );
    }
    let first = client.get_run(&run.run_id).await?;
    assert_eq!(
        first.state(),
        run.state(),
        "the new executor lost the first run"
    );

    // SIGTERM drains each process and exits cleanly, the executor first (it tells the worker).
    executor.sigterm()?;
    let status = executor.wait_exit(Duration::from_secs(15)).await?;
    assert!(
        status.success(),
        "executor exited with {status}{}",
        executor.context()
    );
    // The worker finished its work and, the executor having gone away, tries to reconnect
    // (an SDK worker only exits when it is itself told to stop): stop it.
    tokio::time::timeout(
        PATIENCE,
        handle.wait_for(|s| !s.connected && s.in_flight() == 0),
    )
    .await
    .context("worker did not finish its work after the executor's drain")?;
    handle.drain();
    tokio::time::timeout(PATIENCE, worker_task)
        .await
        .context("worker did not stop when told to")???;
    metastore.sigterm()?;
    let status = metastore.wait_exit(Duration::from_secs(15)).await?;
    assert!(
        status.success(),
        "metastore exited with {status}{}",
        metastore.context()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_health_and_reflection_for_grpcurl() -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let _up = start_up("up", dir.path(), port, &[]).await?;
    let channel = channel(&url).await?;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "dagmesh.v1.RunService", "dagmesh.v1.WorkerService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .with_context(|| format!("health check {service:?}"))?
            .into_inner();
        assert_eq!(response.status, 1, "health of {service:?} is not SERVING");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "dagmesh.v1.NoSuchService".into(),
        })
        .await
        .expect_err("an unknown service has no health");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let expected = [
        "dagmesh.v1.RunService",
        "dagmesh.v1.WorkflowService",
        "dagmesh.v1.WorkerService",
        "dagmesh.v1.ClusterService",
        "dagmesh.v1.SchedulerService",
        "grpc.health.v1.Health",
    ];
    let v1alpha = reflection_v1alpha(channel.clone()).await?;
    let v1 = reflection_v1(channel.clone()).await?;
    for (version, listed) in [("v1alpha", &v1alpha), ("v1", &v1)] {
        // The store API stays in-process: `dagmesh up` does not serve it.
        assert!(
            !listed
                .services
                .iter()
                .any(|s| s == "dagmesh.v1.MetadataService"),
            "reflection {version} lists the store API: {:?}",
            listed.services
        );
        for service in expected {
            assert!(
                listed.services.iter().any(|s| s == service),
                "reflection {version} does not list {service}: {:?}",
                listed.services
            );
        }
        // What `grpcurl describe` and every grpcurl call need: the file defining a service.
        assert!(
            listed
                .run_service_file
                .contains(&"dagmesh/v1/run.proto".to_owned()),
            "reflection {version} did not send run.proto for dagmesh.v1.RunService: {:?}",
            listed.run_service_file
        );
    }

    match Command::new("grpcurl").arg("-version").output() {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipping the grpcurl part: no grpcurl on PATH");
        }
        Err(error) => return Err(error).context("running grpcurl -version"),
        Ok(_) => {
            let target = format!("127.0.0.1:{port}");
            let list = run_grpcurl(&["-plaintext", &target, "list"]).await?;
            for service in expected {
                assert!(
                    list.contains(service),
                    "grpcurl list lacks {service}:\n{list}"
                );
            }
            let workers = run_grpcurl(&[
                "-plaintext",
                "-d",
                "{}",
                &target,
                "dagmesh.v1.ClusterService/ListWorkers",
            ])
            .await?;
            assert!(
                workers.trim_start().starts_with('{'),
                "grpcurl call printed {workers}"
            );
            // A dynamic workflow driven by grpcurl alone: a run with declared inputs and an
            // approval step, submitted inline, then approved with ApproveStep.
            let submit = json!({"spec": {
                "name": "grpcurl-approval",
                "inputs": {"who": {"type": "string", "default": "grpcurl"}},
                "steps": [{"id": "ok", "approval": {"message": "go?"}}],
            }})
            .to_string();
            let submitted = run_grpcurl(&[
                "-plaintext",
                "-d",
                &submit,
                &target,
                "dagmesh.v1.RunService/SubmitRun",
            ])
            .await?;
            let submitted: Value = serde_json::from_str(&submitted)
                .with_context(|| format!("SubmitRun printed {submitted}"))?;
            let run_id = submitted["run"]["runId"]
                .as_str()
                .context("runId")?
                .to_owned();
            let approve = json!({
                "runId": run_id, "stepId": "ok", "approve": true, "outputs": {"ticket": 7},
            })
            .to_string();
            let approved = run_grpcurl(&[
                "-plaintext",
                "-d",
                &approve,
                &target,
                "dagmesh.v1.RunService/ApproveStep",
            ])
            .await?;
            assert!(
                approved.contains("RUN_STATE_SUCCEEDED") && approved.contains("\"approved_by\""),
                "ApproveStep printed {approved}"
            );

            // A child workflow through grpcurl: the parent's step starts a run of the approval
            // workflow; approving the child ends the parent's step with the child's outputs.
            let parent = json!({"spec": {
                "name": "grpcurl-parent",
                "steps": [{"id": "inner", "workflow": "grpcurl-approval"}],
            }})
            .to_string();
            let submitted = run_grpcurl(&[
                "-plaintext",
                "-d",
                &parent,
                &target,
                "dagmesh.v1.RunService/SubmitRun",
            ])
            .await?;
            let submitted: Value = serde_json::from_str(&submitted)?;
            let parent_id = submitted["run"]["runId"]
                .as_str()
                .context("runId")?
                .to_owned();
            let get = json!({ "runId": parent_id }).to_string();
            let deadline = std::time::Instant::now() + PATIENCE;
            let child_id = loop {
                let got = run_grpcurl(&[
                    "-plaintext",
                    "-d",
                    &get,
                    &target,
                    "dagmesh.v1.RunService/GetRun",
                ])
                .await?;
                let got: Value = serde_json::from_str(&got)?;
                if let Some(child) = got["steps"][0]["childRunId"].as_str() {
                    break child.to_owned();
                }
                ensure!(std::time::Instant::now() < deadline, "no child run: {got}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let approve = json!({"runId": child_id, "stepId": "ok", "approve": true}).to_string();
            run_grpcurl(&[
                "-plaintext",
                "-d",
                &approve,
                &target,
                "dagmesh.v1.RunService/ApproveStep",
            ])
            .await?;
            let client = Client::connect(&url).await?;
            let parent = wait_for_run(&client, &parent_id).await?;
            assert_succeeded(&parent);
            assert_eq!(
                outputs(&parent, "inner")["ok"]["approved_by"],
                json!("anonymous")
            );
        }
    }
    Ok(())
}

async fn run_grpcurl(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new("grpcurl")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("grpcurl {args:?} hung"))??;
    ensure!(
        output.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

struct Reflected {
    services: Vec<String>,
    /// Names of the files sent for the symbol `dagmesh.v1.RunService`.
    run_service_file: Vec<String>,
}

async fn reflection_v1alpha(
    channel: dagmesh_proto::connect::AuthChannel,
) -> anyhow::Result<Reflected> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("dagmesh.v1.RunService".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut reflected = Reflected {
        services: Vec::new(),
        run_service_file: Vec::new(),
    };
    for _ in 0..2 {
        let response = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .context("reflection v1alpha stalled")??
            .context("reflection v1alpha stream ended early")?;
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                reflected.services = list.service.into_iter().map(|s| s.name).collect();
            }
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                reflected.run_service_file = file_names(&files.file_descriptor_proto)?;
            }
            other => bail!("unexpected reflection v1alpha response {other:?}"),
        }
    }
    Ok(reflected)
}

async fn reflection_v1(channel: dagmesh_proto::connect::AuthChannel) -> anyhow::Result<Reflected> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("dagmesh.v1.RunService".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut reflected = Reflected {
        services: Vec::new(),
        run_service_file: Vec::new(),
    };
    for _ in 0..2 {
        let response = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .context("reflection v1 stalled")??
            .context("reflection v1 stream ended early")?;
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                reflected.services = list.service.into_iter().map(|s| s.name).collect();
            }
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                reflected.run_service_file = file_names(&files.file_descriptor_proto)?;
            }
            other => bail!("unexpected reflection v1 response {other:?}"),
        }
    }
    Ok(reflected)
}

fn file_names(encoded: &[Vec<u8>]) -> anyhow::Result<Vec<String>> {
    use prost::Message as _;
    encoded
        .iter()
        .map(|bytes| {
            Ok(prost_types::FileDescriptorProto::decode(bytes.as_slice())?
                .name()
                .to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let mut up = start_up("up-1", dir.path(), port, &["--drain-timeout", "10s"]).await?;

    let worker = Worker::builder(&url)
        .name("slow")
        .task(
            "slow.step",
            "1.0.0",
            |_ctx: TaskContext, _input: Value| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, TaskError>(json!({ "slept_ms": 1000 }))
            },
        )
        .build()?;
    let (handle, worker_task) = spawn_worker(worker);
    connected(&handle).await?;

    let client = Client::connect(&url).await?;
    let run = client
        .submit(SubmitRun::inline(workflow(
            "sigterm-drain",
            vec![step("nap", "slow.step@^1", &[], &[])],
        )))
        .await?;
    tokio::time::timeout(PATIENCE, handle.wait_for(|state| state.running == 1))
        .await
        .context("the worker never started the task")?;

    let signalled = Instant::now();
    up.sigterm()?;
    let status = up.wait_exit(Duration::from_secs(15)).await?;
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "dagmesh up exited with {status} after SIGTERM{}",
        up.context()
    );
    eprintln!("dagmesh up drained and exited in {took:?}");

    // The executor told the worker to drain: it finished its task, got the result recorded
    // and now waits to reconnect to a restarted executor; it exits only when told to.
    tokio::time::timeout(
        PATIENCE,
        handle.wait_for(|s| !s.connected && s.in_flight() == 0),
    )
    .await
    .context("worker did not finish its work after the executor's drain")?;
    handle.drain();
    tokio::time::timeout(PATIENCE, worker_task)
        .await
        .context("worker did not stop when told to")???;
    let state = handle.state();
    assert_eq!(
        (state.running, state.unacknowledged),
        (0, 0),
        "the worker stopped with work not recorded: {state:?}"
    );

    // The next process on the same database finds the run done, by the first attempt.
    let port = free_port()?;
    let _up = start_up("up-2", dir.path(), port, &[]).await?;
    let client = Client::connect(format!("http://127.0.0.1:{port}")).await?;
    let run = client.get_run(&run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(
        run.steps[0].attempt, 1,
        "the task ran again: {:?}",
        run.steps[0]
    );
    assert_eq!(
        outputs(&run, "nap").get("slept_ms").and_then(Value::as_f64),
        Some(1000.0)
    );
    Ok(())
}

/// Two `dagmesh scheduler` processes against one metastore on one PostgreSQL database, sharing
/// the schedule through leases, under chaos: each SIGKILLed and restarted, one frozen with
/// SIGSTOP past its lease and then resumed (a zombie owner). Every tick of a per-second
/// schedule becomes exactly one run, and no tick from the first to the end is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scheduler_processes_on_one_postgres_database_run_each_tick_once() -> anyhow::Result<()>
{
    use dagmesh_proto::v1::{
        CreateScheduleRequest, ListRunsRequest, PauseScheduleRequest, Schedule,
        run_service_client::RunServiceClient, scheduler_service_client::SchedulerServiceClient,
    };
    let Some(database) = Database::postgres().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let (metastore_addr, executor_addr) = (addr(free_port()?), addr(free_port()?));
    let (first_addr, second_addr) = (addr(free_port()?), addr(free_port()?));
    let url = |a: &str| format!("http://{a}");
    let database_url = database.url();

    let mut metastore = spawn_open(
        "metastore",
        &[
            "metastore",
            "--listen",
            &metastore_addr,
            "--database",
            &database_url,
        ],
        dir.path(),
    )?;
    metastore.wait_ready(&url(&metastore_addr)).await?;
    let mut executor = spawn_open(
        "executor",
        &[
            "executor",
            "--listen",
            &executor_addr,
            "--metastore",
            &url(&metastore_addr),
        ],
        dir.path(),
    )?;
    executor.wait_ready(&url(&executor_addr)).await?;
    let scheduler_args = |listen: &str| {
        [
            "scheduler".to_owned(),
            "--listen".into(),
            listen.to_owned(),
            "--metastore".into(),
            url(&metastore_addr),
            "--executor".into(),
            url(&executor_addr),
            // Short, so that the chaos below moves the schedule a few times in seconds.
            "--lease-ttl".into(),
            "2s".into(),
        ]
    };
    let first_args = scheduler_args(&first_addr);
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let mut first = spawn_open("scheduler-1", &first_args, dir.path())?;
    first.wait_ready(&url(&first_addr)).await?;

    Client::connect(url(&executor_addr))
        .await?
        .apply_workflow(workflow("ticking", vec![step("only", "echo", &[], &[])]))
        .await?;
    let schedule = Schedule {
        name: "every-second".into(),
        cron: "* * * * * *".into(),
        workflow: "ticking".into(),
        // Every tick must run: a handover delays ticks by up to the lease TTL, and under the
        // default policy only the latest of the ticks that came due meanwhile would run.
        catch_up: dagmesh_proto::v1::CatchUp::All as i32,
        ..Schedule::default()
    };
    SchedulerServiceClient::new(channel(&url(&first_addr)).await?)
        .create_schedule(CreateScheduleRequest {
            schedule: Some(schedule),
        })
        .await?;
    let second_args = scheduler_args(&second_addr);
    let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
    let mut second = spawn_open("scheduler-2", &second_args, dir.path())?;
    second.wait_ready(&url(&second_addr)).await?;

    // Real cron ticks need real time. Lose the first without warning and bring it back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    first.sigkill()?;
    let mut first = spawn_open("scheduler-1b", &first_args, dir.path())?;
    first.wait_ready(&url(&first_addr)).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Freeze the second past its lease: the first takes its share, and when the second wakes
    // it must not fire anything twice.
    second.sigstop()?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    second.sigcont()?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    second.sigkill()?;
    let mut second = spawn_open("scheduler-2b", &second_args, dir.path())?;
    second.wait_ready(&url(&second_addr)).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let paused_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    SchedulerServiceClient::new(channel(&url(&second_addr)).await?)
        .pause_schedule(PauseScheduleRequest {
            schedule: "every-second".into(),
        })
        .await?;
    // A pass that started before the pause may still fire the tick it was on.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let runs = RunServiceClient::new(channel(&url(&executor_addr)).await?)
        .list_runs(ListRunsRequest {
            workflow: "ticking".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .runs;
    let mut ticks = scheduled_ticks(&runs)?;
    ticks.sort_unstable();
    let distinct = {
        let mut d = ticks.clone();
        d.dedup();
        d
    };
    assert_eq!(distinct, ticks, "a tick started two runs");
    let first_tick = ticks[0];
    let expected: Vec<i64> = (first_tick..first_tick + ticks.len() as i64).collect();
    assert_eq!(
        ticks, expected,
        "a tick between the first and the last was missed"
    );
    // Still firing at the end: the chaos left someone owning the schedule.
    let last_tick = ticks[ticks.len() - 1];
    assert!(
        last_tick >= paused_at - 4 && ticks.len() >= 12,
        "ticks stopped early: {} ticks, the last {}s before the pause",
        ticks.len(),
        paused_at - last_tick
    );

    drop((first, second, executor, metastore));
    database.cleanup().await
}

//! Concurrency limits: run admission (QUEUED runs, priorities) and step resources.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dagmesh::mesh::{Mesh, MeshOptions};
use dagmesh_executor::Limits;
use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{RunState, StepState, WorkflowSpec};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use serde_json::{Value, json};

fn config_with(limits: &str) -> dagmesh_executor::ExecutorConfig {
    let mut config = fast_config();
    config.limits = Arc::new(Limits::from_yaml(limits).expect("valid limits"));
    config
}

/// Counts handlers running at once, overall and per `group` input.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    max: AtomicUsize,
    per_group: Mutex<HashMap<String, (usize, usize)>>,
}

impl Concurrency {
    fn enter(&self, group: &str) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        let mut groups = self.per_group.lock().expect("groups");
        let (current, max) = groups.entry(group.to_owned()).or_default();
        *current += 1;
        *max = (*max).max(*current);
    }

    fn leave(&self, group: &str) {
        self.now.fetch_sub(1, Ordering::SeqCst);
        let mut groups = self.per_group.lock().expect("groups");
        groups.get_mut(group).expect("entered").0 -= 1;
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    fn group_max(&self, group: &str) -> usize {
        self.per_group.lock().expect("groups")[group].1
    }
}

/// A worker whose `work` task sleeps `ms` (input) while counted in `concurrency`.
fn counting_worker(
    url: String,
    slots: u32,
    concurrency: Arc<Concurrency>,
) -> dagmesh_sdk::WorkerBuilder {
    Worker::builder(url)
        .slots(slots)
        .task("work", "1.0.0", move |_: TaskContext, input: Value| {
            let concurrency = concurrency.clone();
            async move {
                let group = input["group"].as_str().unwrap_or_default().to_owned();
                concurrency.enter(&group);
                tokio::time::sleep(Duration::from_millis(input["ms"].as_u64().unwrap_or(20))).await;
                concurrency.leave(&group);
                Ok::<_, TaskError>(json!({}))
            }
        })
}

fn one_step(name: &str, inputs: &[(&str, &str)]) -> WorkflowSpec {
    workflow(name, vec![step("only", "work", &[], inputs)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_submissions_never_exceed_a_workflow_limit() -> anyhow::Result<()> {
    let sandbox = Sandbox::start_with(
        Database::sqlite()?,
        config_with("runs:\n  - {name: etl, workflow: limited-etl, max: 3}\n"),
    )
    .await?;
    let concurrency = Arc::new(Concurrency::default());
    spawn_worker(counting_worker(sandbox.url(), 50, concurrency.clone())).await?;
    let client = sandbox.client().await?;
    client
        .apply_workflow(one_step("limited-etl", &[("ms", "20")]))
        .await?;
    let submits = (0..200).map(|_| client.submit(SubmitRun::workflow("limited-etl")));
    let runs = futures::future::try_join_all(submits).await?;

    // Right after the burst most runs wait, each with its own place in the queue.
    let queued = client
        .list_runs(dagmesh_proto::v1::ListRunsRequest {
            workflow: "limited-etl".into(),
            state: RunState::Queued as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .runs;
    // The store answers the list; the engine numbers the runs still waiting. A run admitted
    // between the two reads QUEUED with position 0; the others hold exactly 1..=k.
    let mut positions: Vec<u32> = queued
        .iter()
        .map(|run| run.queue_position)
        .filter(|&position| position > 0)
        .collect();
    positions.sort_unstable();
    assert!(
        queued.len() - positions.len() <= 3,
        "at most a batch of admissions in flight: {} queued, {} with positions",
        queued.len(),
        positions.len()
    );
    assert_eq!(
        positions,
        (1..=positions.len() as u32).collect::<Vec<_>>(),
        "the waiting runs are numbered 1..=k"
    );

    for run in &runs {
        assert_succeeded(&wait_for_run(&client, &run.run_id).await?);
    }
    assert!(
        concurrency.max() <= 3,
        "{} runs ran at once, limit 3",
        concurrency.max()
    );
    sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limit_applies_per_key_value() -> anyhow::Result<()> {
    let sandbox = Sandbox::start_with(
        Database::sqlite()?,
        config_with("runs:\n  - {name: per-customer, key: inputs.customer, max: 1}\n"),
    )
    .await?;
    let concurrency = Arc::new(Concurrency::default());
    spawn_worker(counting_worker(sandbox.url(), 8, concurrency.clone())).await?;
    let client = sandbox.client().await?;
    let spec = one_step(
        "per-customer",
        &[("group", "inputs.customer"), ("ms", "80")],
    );
    let mut runs = Vec::new();
    for i in 0..8 {
        let customer = if i % 2 == 0 { "acme" } else { "globex" };
        let submit = SubmitRun::inline(spec.clone()).inputs(json!({ "customer": customer }));
        runs.push(client.submit(submit).await?);
    }
    for run in &runs {
        assert_succeeded(&wait_for_run(&client, &run.run_id).await?);
    }
    assert_eq!(concurrency.group_max("acme"), 1, "one acme run at a time");
    assert_eq!(
        concurrency.group_max("globex"),
        1,
        "one globex run at a time"
    );
    assert_eq!(concurrency.max(), 2, "different customers ran side by side");

    // A run the key cannot be evaluated for (another workflow, no `customer` input) is not
    // held by the limit, even while a run of each customer is running.
    let blockers: Vec<_> = ["acme", "globex"]
        .into_iter()
        .map(|customer| {
            let submit = SubmitRun::inline(one_step(
                "per-customer",
                &[("group", "inputs.customer"), ("ms", "3000")],
            ))
            .inputs(json!({ "customer": customer }));
            client.submit(submit)
        })
        .collect();
    let blockers = futures::future::try_join_all(blockers).await?;
    let other = client
        .submit(SubmitRun::inline(one_step("other", &[("ms", "10")])))
        .await?;
    assert_succeeded(&wait_for_run(&client, &other.run_id).await?);
    let same_customer = client
        .submit(
            SubmitRun::inline(one_step("per-customer", &[("group", "inputs.customer")]))
                .inputs(json!({ "customer": "acme" })),
        )
        .await?;
    assert_eq!(
        client.get_run(&same_customer.run_id).await?.state(),
        RunState::Queued,
        "a third acme run waits for the first"
    );
    for run in blockers.iter().chain([&same_customer]) {
        assert_succeeded(&wait_for_run(&client, &run.run_id).await?);
    }
    sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_leave_the_queue_first() -> anyhow::Result<()> {
    let sandbox = Sandbox::start_with(
        Database::sqlite()?,
        config_with("runs:\n  - {name: one-at-a-time, max: 1}\n"),
    )
    .await?;
    let started: Arc<Mutex<Vec<String>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let (log, open) = (started.clone(), gate.clone());
    spawn_worker(Worker::builder(sandbox.url()).slots(4).task(
        "work",
        "1.0.0",
        move |_: TaskContext, input: Value| {
            let (log, open) = (log.clone(), open.clone());
            async move {
                let name = input["name"].as_str().unwrap_or_default().to_owned();
                log.lock().expect("log").push(name.clone());
                if name == "blocker" {
                    open.notified().await;
                }
                Ok::<_, TaskError>(json!({}))
            }
        },
    ))
    .await?;
    let client = sandbox.client().await?;
    let spec = one_step("priorities", &[("name", "inputs.name")]);
    let submit = |name: &str, priority: i32| {
        SubmitRun::inline(spec.clone())
            .inputs(json!({ "name": name }))
            .priority(priority)
    };
    let blocker = client.submit(submit("blocker", 0)).await?;
    let low = client.submit(submit("low", 0)).await?;
    let high = client.submit(submit("high", 10)).await?;
    assert_eq!(low.state(), RunState::Queued);
    let low_now = client.get_run(&low.run_id).await?;
    let high_now = client.get_run(&high.run_id).await?;
    assert_eq!((high_now.queue_position, low_now.queue_position), (1, 2));

    gate.notify_one();
    for run in [&blocker, &low, &high] {
        assert_succeeded(&wait_for_run(&client, &run.run_id).await?);
    }
    assert_eq!(*started.lock().expect("log"), ["blocker", "high", "low"]);
    sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_resource_limit_holds_across_runs() -> anyhow::Result<()> {
    let sandbox =
        Sandbox::start_with(Database::sqlite()?, config_with("steps:\n  warehouse: 2\n")).await?;
    let concurrency = Arc::new(Concurrency::default());
    spawn_worker(counting_worker(sandbox.url(), 10, concurrency.clone())).await?;
    let client = sandbox.client().await?;
    let mut load = step("load", "work", &[], &[("ms", "60")]);
    load.concurrency_key = "warehouse".into();
    let spec = workflow("warehouse-loads", vec![load]);
    let mut runs = Vec::new();
    for _ in 0..10 {
        runs.push(client.submit(SubmitRun::inline(spec.clone())).await?);
    }
    for run in &runs {
        assert_succeeded(&wait_for_run(&client, &run.run_id).await?);
    }
    assert_eq!(
        concurrency.max(),
        2,
        "at most 2 warehouse loads at once, and 2 did run together"
    );
    sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_runs_survive_a_restart_and_run_once() -> anyhow::Result<()> {
    let limits = "runs:\n  - {name: one-at-a-time, max: 1}\n";
    let database = Database::sqlite()?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let start = || {
        Mesh::start(MeshOptions {
            listen: listen.clone(),
            database_url: database.url(),
            executor: config_with(limits),
            security: Default::default(),
        })
    };
    let mesh = start().await?;
    let url = mesh.url();
    let concurrency = Arc::new(Concurrency::default());
    spawn_worker(counting_worker(url.clone(), 4, concurrency.clone())).await?;
    let client = Client::connect(url.clone()).await?;
    let spec = one_step("restart-queue", &[("ms", "150")]);
    let mut runs = Vec::new();
    for _ in 0..4 {
        runs.push(client.submit(SubmitRun::inline(spec.clone())).await?);
    }
    assert_eq!(runs[3].state(), RunState::Queued);
    mesh.abort(); // a crash, with runs running and queued
    let mesh = start().await?;

    let client = Client::connect(url).await?;
    for run in &runs {
        let run = wait_for_run(&client, &run.run_id).await?;
        assert_succeeded(&run);
        assert_eq!(run.steps[0].state(), StepState::Succeeded);
        let events = all_events(channel(&mesh.url()).await?, &run.run_id).await?;
        let succeeded = step_states(&events, "only")
            .iter()
            .filter(|s| *s == "SUCCEEDED")
            .count();
        assert_eq!(succeeded, 1, "run {} recorded once", run.run_id);
    }
    assert!(concurrency.max() <= 1, "the limit held across the restart");
    mesh.shutdown().await?;
    database.cleanup().await
}

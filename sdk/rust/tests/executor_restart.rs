//! The worker against a real executor (the in-process mesh of `dagmesh up`) that drains, as on
//! SIGTERM, and comes back on the same port and database: the worker finishes what it runs,
//! reconnects and takes new work, unless it was itself told to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dagmesh::mesh::{Mesh, MeshOptions};
use dagmesh_executor::ExecutorConfig;
use dagmesh_proto::v1::{RunState, StepSpec, WorkflowSpec};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker, WorkerError, WorkerHandle};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Long enough for a loaded 2-core CI machine; a test that hits it has hung.
const PATIENCE: Duration = Duration::from_secs(30);

async fn start_mesh(listen: &str, database_url: &str) -> anyhow::Result<Mesh> {
    Mesh::start(MeshOptions {
        listen: listen.to_owned(),
        database_url: database_url.to_owned(),
        executor: ExecutorConfig {
            lease: Duration::from_secs(10),
            heartbeat_interval: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(20),
            ..ExecutorConfig::default()
        },
        security: Default::default(),
    })
    .await
}

/// `hold` waits for a permit of `gate`; `echo` answers at once.
fn worker(url: &str, gate: Arc<Semaphore>) -> anyhow::Result<Worker> {
    Ok(Worker::builder(url)
        .name("restart")
        .instance_id("restart-1")
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .task("hold", "1.0.0", move |_: TaskContext, _: Value| {
            let gate = gate.clone();
            async move {
                let permit = gate.acquire().await;
                permit
                    .map_err(|e| TaskError::fatal(e.to_string()))?
                    .forget();
                Ok::<_, TaskError>(json!({"held": true}))
            }
        })
        .task(
            "echo",
            "1.0.0",
            |ctx: TaskContext, input: Value| async move {
                Ok::<_, TaskError>(json!({"input": input, "attempt": ctx.attempt()}))
            },
        )
        .build()?)
}

fn one_step(name: &str, task: &str) -> SubmitRun {
    SubmitRun::inline(WorkflowSpec {
        name: name.into(),
        steps: vec![StepSpec {
            id: "only".into(),
            task: task.into(),
            ..StepSpec::default()
        }],
        ..WorkflowSpec::default()
    })
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .with_context(|| format!("timed out: {what}"))
}

type Run = JoinHandle<Result<(), WorkerError>>;

struct Started {
    dir: tempfile::TempDir,
    database_url: String,
    addr: SocketAddr,
    mesh: Mesh,
    handle: WorkerHandle,
    run: Run,
    gate: Arc<Semaphore>,
}

/// A mesh on SQLite in a temporary directory, and a connected worker.
async fn start() -> anyhow::Result<Started> {
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let mesh = start_mesh("127.0.0.1:0", &database_url).await?;
    let gate = Arc::new(Semaphore::new(0));
    let worker = worker(&mesh.url(), gate.clone())?;
    let handle = worker.handle();
    let run = tokio::spawn(worker.run_until(std::future::pending()));
    within("worker connects", handle.wait_for(|s| s.connected)).await?;
    Ok(Started {
        dir,
        database_url,
        addr: mesh.addr(),
        mesh,
        handle,
        run,
        gate,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drained_by_a_restarting_executor_finishes_reconnects_and_runs_new_steps()
-> anyhow::Result<()> {
    let Started {
        dir: _dir,
        database_url,
        addr,
        mesh,
        handle,
        run,
        gate,
    } = start().await?;
    let client = Client::connect(mesh.url()).await?;
    let first = client.submit(one_step("restart-hold", "hold@^1")).await?;
    within("the step starts", handle.wait_for(|s| s.running == 1)).await?;

    // SIGTERM of `dagmesh up`: the executor drains (Drain to every worker, waits for the work
    // in flight), then stops serving.
    let shutdown = tokio::spawn(mesh.shutdown());
    let state = within(
        "the worker hears the drain",
        handle.wait_for(|s| s.executor_draining),
    )
    .await?;
    assert!(!state.draining, "{state:?}");
    gate.add_permits(1);
    within("the executor drains", shutdown).await???;

    // The result was recorded before the executor left, and the worker is still there.
    let state = within(
        "the worker lets go of the stream",
        handle.wait_for(|s| !s.connected),
    )
    .await?;
    assert_eq!(state.in_flight(), 0, "{state:?}");
    assert!(!run.is_finished(), "the worker exited with its executor");

    // The same port and database, as a restarted process would have.
    let mesh = start_mesh(&addr.to_string(), &database_url).await?;
    let state = within("the worker reconnects", handle.wait_for(|s| s.connected)).await?;
    assert!(state.sessions >= 2, "{state:?}");

    let client = Client::connect(mesh.url()).await?;
    let first = client.get_run(&first.run_id).await?;
    assert_eq!(first.state(), RunState::Succeeded, "{first:?}");
    let second = client.submit(one_step("restart-echo", "echo@^1")).await?;
    let second = within("the new step runs", client.wait_for_run(&second.run_id)).await??;
    assert_eq!(second.state(), RunState::Succeeded, "{second:?}");
    assert_eq!(second.steps[0].worker, handle.instance_id());

    handle.drain();
    within("the worker stops", run).await???;
    mesh.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_its_executor_drains_exits_after_its_result_is_recorded()
-> anyhow::Result<()> {
    let Started {
        dir: _dir,
        database_url,
        mesh,
        handle,
        run,
        gate,
        ..
    } = start().await?;
    let client = Client::connect(mesh.url()).await?;
    let submitted = client.submit(one_step("stop-hold", "hold@^1")).await?;
    within("the step starts", handle.wait_for(|s| s.running == 1)).await?;

    let shutdown = tokio::spawn(mesh.shutdown());
    within(
        "the worker hears the drain",
        handle.wait_for(|s| s.executor_draining),
    )
    .await?;
    // Its own SIGTERM arrives during the executor's drain.
    handle.drain();
    gate.add_permits(1);
    within("the worker exits", run).await???;
    let state = handle.state();
    assert_eq!(
        state.in_flight(),
        0,
        "exited with work unrecorded: {state:?}"
    );
    assert_eq!(state.sessions, 1, "it must not reconnect: {state:?}");
    within("the executor drains", shutdown).await???;

    // The executor recorded the result before it went.
    let mesh = start_mesh("127.0.0.1:0", &database_url).await?;
    let client = Client::connect(mesh.url()).await?;
    let done = client.get_run(&submitted.run_id).await?;
    assert_eq!(done.state(), RunState::Succeeded, "{done:?}");
    mesh.shutdown().await?;
    Ok(())
}

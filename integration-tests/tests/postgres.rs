//! The mesh on PostgreSQL, the store users move to when they outgrow one machine.
//!
//! Runs against a fresh database on the server of `DAGMESH_TEST_DATABASE_URL` (created and
//! dropped by each test). Without that variable the tests print that they were skipped, except
//! under CI, where a missing URL fails them.

use std::time::Duration;

use anyhow::Context as _;
use dagmesh::mesh::{Mesh, MeshOptions};
use dagmesh_integration_tests::{
    Database, PATIENCE, Sandbox, all_events, assert_succeeded, connected, fast_config, step,
    step_states, wait_for_run, workflow,
};
use dagmesh_proto::v1::{
    ListRunsRequest, RetryPolicy, Run, StepState, SubmitRunRequest,
    run_service_client::RunServiceClient,
};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker, WorkerHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Drops the test's PostgreSQL database when the test ends, also when it fails halfway.
struct DropDatabase(Option<(String, String)>);

impl DropDatabase {
    fn of(database: &Database) -> Self {
        match database {
            Database::Postgres { admin_url, name } => Self(Some((admin_url.clone(), name.clone()))),
            Database::Sqlite(_) => Self(None),
        }
    }
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.0.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot block on another future: use a
        // thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(Database::Postgres { admin_url, name }.cleanup())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop the test database: {error:#}"),
            Err(_) => eprintln!("could not drop the test database: cleanup panicked"),
        }
    }
}

/// A fresh PostgreSQL database and its drop guard, or None (printed) when there is no server.
async fn postgres() -> anyhow::Result<Option<(Database, DropDatabase)>> {
    let Some(database) = Database::postgres().await? else {
        eprintln!("skipped: set DAGMESH_TEST_DATABASE_URL to run the PostgreSQL tests");
        return Ok(None);
    };
    let guard = DropDatabase::of(&database);
    Ok(Some((database, guard)))
}

#[derive(Deserialize)]
struct TextInput {
    text: String,
}

/// `pg.upper` upper-cases text; `pg.flaky` fails its first attempt (retryably) and appends "!".
fn worker(
    url: &str,
    instance: &str,
) -> anyhow::Result<(
    WorkerHandle,
    JoinHandle<Result<(), dagmesh_sdk::WorkerError>>,
)> {
    let worker = Worker::builder(url)
        .name("pg")
        .instance_id(instance)
        .slots(4)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .task(
            "pg.upper",
            "1.0.0",
            |_ctx: TaskContext, input: TextInput| async move {
                Ok::<_, TaskError>(json!({ "text": input.text.to_uppercase() }))
            },
        )
        .task(
            "pg.flaky",
            "1.0.0",
            |ctx: TaskContext, input: TextInput| async move {
                if ctx.attempt() == 1 {
                    return Err(TaskError::retryable("warehouse busy"));
                }
                Ok(json!({ "text": format!("{}!", input.text), "attempt": ctx.attempt() }))
            },
        )
        .build()?;
    let handle = worker.handle();
    let task = tokio::spawn(worker.run_until(std::future::pending()));
    Ok((handle, task))
}

fn step_of<'a>(run: &'a Run, step_id: &str) -> &'a dagmesh_proto::v1::Step {
    run.steps
        .iter()
        .find(|s| s.step_id == step_id)
        .unwrap_or_else(|| panic!("run {} has no step {step_id}", run.run_id))
}

fn output(run: &Run, step_id: &str, key: &str) -> Value {
    dagmesh_proto::json::from_struct(step_of(run, step_id).outputs.as_ref())
        .get(key)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_runs_pass_data_retry_and_dedupe_submits() -> anyhow::Result<()> {
    let Some((database, _drop_database)) = postgres().await? else {
        return Ok(());
    };
    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    let (handle, worker_task) = worker(&sandbox.url(), "pg-1")?;
    connected(&handle).await?;

    // upper -> flaky (one retry) -> upper: the text goes through all three.
    let mut flaky = step(
        "exclaim",
        "pg.flaky@^1",
        &["shout"],
        &[("text", "shout.text")],
    );
    flaky.retry = Some(RetryPolicy {
        max_attempts: 3,
        initial_backoff: "50ms".into(),
        ..RetryPolicy::default()
    });
    let spec = workflow(
        "pg-pipeline",
        vec![
            step("shout", "pg.upper@^1", &[], &[("text", "inputs.name")]),
            flaky,
            step(
                "finish",
                "pg.upper@^1",
                &["exclaim"],
                &[("text", "exclaim.text + ' done'")],
            ),
        ],
    );

    // The same idempotency key, submitted five times at once: one run.
    let request = SubmitRun::inline(spec)
        .inputs(json!({ "name": "alice" }))
        .idempotency_key("upload-42")
        .into_request()?;
    let channel = sandbox.channel().await?;
    let submits = (0..5).map(|_| {
        let mut runs = RunServiceClient::new(channel.clone());
        let request: SubmitRunRequest = request.clone();
        async move {
            runs.submit_run(request)
                .await
                .map(tonic::Response::into_inner)
        }
    });
    let responses = futures::future::try_join_all(submits).await?;
    let created = responses.iter().filter(|r| r.created).count();
    assert_eq!(created, 1, "one submit creates the run, the others find it");
    let run_id = responses[0].run.as_ref().context("no run")?.run_id.clone();
    for response in &responses {
        assert_eq!(
            response.run.as_ref().map(|r| r.run_id.as_str()),
            Some(run_id.as_str())
        );
    }

    let client = sandbox.client().await?;
    let run = wait_for_run(&client, &run_id).await?;
    assert_succeeded(&run);
    assert_eq!(output(&run, "finish", "text"), json!("ALICE! DONE"));
    let exclaim = step_of(&run, "exclaim");
    assert_eq!(
        exclaim.attempt, 2,
        "exclaim should succeed on its second attempt"
    );
    assert_eq!(exclaim.state(), StepState::Succeeded);
    let events = all_events(sandbox.channel().await?, &run_id).await?;
    let states = step_states(&events, "exclaim");
    assert!(
        states.contains(&"RETRY_WAIT".to_owned())
            && states.last().map(String::as_str) == Some("SUCCEEDED"),
        "exclaim went through {states:?}"
    );

    // A retried submit after the run ended still returns it, and no second run exists.
    let again = client
        .submit(SubmitRun::workflow("pg-pipeline").idempotency_key("upload-42"))
        .await?;
    assert_eq!(again.run_id, run_id);
    let listed = client
        .list_runs(ListRunsRequest {
            workflow: "pg-pipeline".into(),
            ..ListRunsRequest::default()
        })
        .await?;
    assert_eq!(listed.runs.len(), 1, "runs: {:?}", listed.runs);

    handle.drain();
    tokio::time::timeout(PATIENCE, worker_task).await???;
    sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_run_survives_a_mesh_restart() -> anyhow::Result<()> {
    let Some((database, _drop_database)) = postgres().await? else {
        return Ok(());
    };
    let database_url = database.url();
    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    let Sandbox { mesh, database, .. } = sandbox;
    let url = mesh.url();

    // The first step runs; the second is taken by a worker that hangs, and the mesh dies.
    let (upper, upper_task) = worker(&url, "pg-before")?;
    let hanging = Worker::builder(&url)
        .name("pg-hang")
        .task(
            "pg.slow",
            "1.0.0",
            |_ctx: TaskContext, _input: Value| async move {
                std::future::pending::<()>().await;
                Ok::<_, TaskError>(json!({}))
            },
        )
        .build()?;
    let hanging_handle = hanging.handle();
    let hanging_task = tokio::spawn(hanging.run_until(std::future::pending()));
    connected(&upper).await?;
    connected(&hanging_handle).await?;

    let spec = workflow(
        "pg-restart",
        vec![
            step("shout", "pg.upper@^1", &[], &[("text", "inputs.name")]),
            step("wait", "pg.slow@^1", &["shout"], &[("text", "shout.text")]),
        ],
    );
    let client = Client::connect(&url).await?;
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({ "name": "bob" })))
        .await?;
    tokio::time::timeout(
        PATIENCE,
        hanging_handle.wait_for(|state| state.running == 1),
    )
    .await
    .context("the second step never reached its worker")?;

    mesh.abort();
    upper.abort();
    hanging_handle.abort();
    let _ = upper_task.await;
    let _ = hanging_task.await;

    // A new mesh on the same database, and a healthy worker for the second step.
    let mesh = Mesh::start(MeshOptions {
        listen: "127.0.0.1:0".into(),
        database_url,
        executor: fast_config(),
        security: Default::default(),
    })
    .await?;
    let url = mesh.url();
    let finisher = Worker::builder(&url)
        .name("pg-after")
        .task(
            "pg.slow",
            "1.0.0",
            |_ctx: TaskContext, input: TextInput| async move {
                Ok::<_, TaskError>(json!({ "text": format!("{} waited", input.text) }))
            },
        )
        .build()?;
    let finisher_handle = finisher.handle();
    let finisher_task = tokio::spawn(finisher.run_until(std::future::pending()));
    connected(&finisher_handle).await?;

    let client = Client::connect(&url).await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(output(&run, "wait", "text"), json!("BOB waited"));
    let shout = step_of(&run, "shout");
    assert_eq!(shout.attempt, 1, "the finished step ran again: {shout:?}");
    let wait = step_of(&run, "wait");
    assert!(
        wait.lost_attempts >= 1,
        "the attempt held by the dead worker should count as lost: {wait:?}"
    );
    let events = all_events(dagmesh_integration_tests::channel(&url).await?, &run.run_id).await?;
    for step_id in ["shout", "wait"] {
        let states = step_states(&events, step_id);
        assert_eq!(
            states.iter().filter(|s| *s == "SUCCEEDED").count(),
            1,
            "{step_id} went through {states:?}"
        );
    }

    finisher_handle.drain();
    tokio::time::timeout(PATIENCE, finisher_task).await???;
    mesh.shutdown().await?;
    database.cleanup().await
}

/// The store over TLS to PostgreSQL (`sslmode` in the URL, as libpq spells it): `require`
/// encrypts; `verify-full` with a CA that did not sign the server's certificate refuses to
/// connect, with the reason. Skipped (with a message) when the server has TLS off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reaches_postgresql_over_tls() -> anyhow::Result<()> {
    use dagmesh_metastore::{MetadataStore as _, PostgresStore};
    let Some(database) = Database::postgres().await? else {
        return Ok(());
    };
    let _drop = DropDatabase::of(&database);
    let url = database.url();
    let with = |params: &str| {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}{params}")
    };
    let plain = PostgresStore::connect(&url).await?;
    let tls = plain.postgres_tls().await?.context("a PostgreSQL store")?;
    if !tls.server_enabled {
        eprintln!("skipping: the PostgreSQL server has ssl=off");
        return Ok(());
    }
    let store = PostgresStore::connect(&with("sslmode=require"))
        .await
        .context("sslmode=require")?;
    let tls = store.postgres_tls().await?.context("a PostgreSQL store")?;
    assert!(
        tls.connection_encrypted,
        "sslmode=require gave an unencrypted connection"
    );
    store.list_workflows().await?;

    let dir = tempfile::tempdir()?;
    let pki = dagmesh_integration_tests::pki::TestPki::create(dir.path(), "")?;
    let refused = PostgresStore::connect(&with(&format!(
        "sslmode=verify-full&sslrootcert={}",
        pki.ca.display()
    )))
    .await
    .err()
    .expect("a server certificate from another CA is refused");
    let text = refused.to_string();
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "the refusal says why: {text}"
    );
    Ok(())
}

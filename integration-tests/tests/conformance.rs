//! One conformance suite for every SDK: the same protocol scenarios against a Rust, a Python and
//! a C++ worker *process* (each SDK ships a conformance worker with the same task types; see
//! `src/bin/dagmesh-conformance-worker.rs`).
//!
//! Where the workers come from:
//! - Rust: built with this package.
//! - Python: `DAGMESH_PYTHON` names an interpreter with `./sdk/python` installed
//!   (`scripts/test.sh` sets it up).
//! - C++: `DAGMESH_CPP_CONFORMANCE_WORKER` names the built `dagmesh_conformance_worker`.
//!
//! A language whose worker is not available is skipped with a message, except under CI (env
//! `CI`), where that is a failure.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dagmesh::mesh::MeshSecurity;
use dagmesh_integration_tests::pki::TestPki;
use dagmesh_integration_tests::*;
use dagmesh_proto::connect::ClientSettings;
use dagmesh_proto::v1::token_service_client::TokenServiceClient;
use dagmesh_proto::v1::{self as pb, RetryPolicy, RunState, StepState, run_event};
use dagmesh_runtime::tls::{ServerTls, TlsFiles};
use dagmesh_sdk::{Client, SubmitRun};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug)]
enum Language {
    Rust,
    Python,
    Cpp,
}

impl Language {
    /// The command that starts this language's conformance worker, or None to skip.
    fn command(self) -> anyhow::Result<Option<Command>> {
        let from_env = |var: &str| -> anyhow::Result<Option<String>> {
            match std::env::var(var) {
                Ok(value) if !value.is_empty() => Ok(Some(value)),
                _ if std::env::var_os("CI").is_some() => {
                    bail!("{var} is not set, and CI must run the {self:?} conformance worker")
                }
                _ => {
                    eprintln!("skipping {self:?}: {var} is not set (scripts/test.sh sets it)");
                    Ok(None)
                }
            }
        };
        Ok(match self {
            Language::Rust => Some(Command::new(env!(
                "CARGO_BIN_EXE_dagmesh-conformance-worker"
            ))),
            Language::Python => from_env("DAGMESH_PYTHON")?.map(|python| {
                let mut command = Command::new(python);
                command.args(["-m", "dagmesh.conformance"]);
                command
            }),
            Language::Cpp => from_env("DAGMESH_CPP_CONFORMANCE_WORKER")?.map(Command::new),
        })
    }
}

/// A conformance worker process; killed when dropped.
struct WorkerProcess {
    instance_id: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl WorkerProcess {
    async fn start(
        language: Language,
        env: &[(String, String)],
        server: &str,
        instance_id: &str,
        slots: u32,
    ) -> anyhow::Result<Option<Self>> {
        let Some(mut command) = language.command()? else {
            return Ok(None);
        };
        command.envs(env.iter().map(|(k, v)| (k, v)));
        command
            .args(["--server", server, "--instance-id", instance_id])
            .args(["--slots", &slots.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting the {language:?} conformance worker"))?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Some(Self {
            instance_id: instance_id.to_owned(),
            child,
            lines,
        }))
    }

    /// Waits for the stdout line `EVENT <what> <task_id> <attempt>`.
    async fn event(&mut self, what: &str, task_id: &str, attempt: u32) -> anyhow::Result<()> {
        let expected = format!("EVENT {what} {task_id} {attempt}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .with_context(|| format!("{}: no `{expected}` in time", self.instance_id))?
                .with_context(|| format!("{}: exited before `{expected}`", self.instance_id))?;
            if line.trim() == expected {
                return Ok(());
            }
        }
    }

    /// Every `EVENT started` line printed so far, without waiting.
    fn started_so_far(&mut self) -> Vec<String> {
        let mut started = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            if line.starts_with("EVENT started") {
                started.push(line);
            }
        }
        started
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("worker already exited")?;
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    async fn exit_code(&mut self) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit in time", self.instance_id))??;
        Ok(status.code())
    }
}

/// A TCP proxy in front of the executor that can cut every connection through it, to make a
/// live worker lose its stream without killing the worker.
struct Proxy {
    addr: std::net::SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().expect("proxy").push(task);
            }
        });
        Ok(Self {
            addr,
            connections,
            acceptor,
        })
    }

    /// TLS passes through the proxy; the test certificate names 127.0.0.1.
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Drops every open connection; new ones are still accepted.
    fn cut(&self) {
        for task in self.connections.lock().expect("proxy").drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.acceptor.abort();
    }
}

/// Every scenario runs the way production does: over TLS, with a worker token that allows
/// only `conformance.*`, given to the worker process through the environment
/// (`DAGMESH_TOKEN`, `DAGMESH_TLS_CA`) as every SDK documents.
async fn secure_sandbox(config: dagmesh_executor::ExecutorConfig) -> anyhow::Result<Sandbox> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), "")?;
    let tls = ServerTls::load(TlsFiles {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: None,
    })?;
    let mut sandbox = Sandbox::start_full(
        Database::sqlite()?,
        config,
        MeshSecurity {
            auth: true,
            internal_token: None,
            jwt: None,
            tls: Some(tls),
            admin_token_file: Some(dir.path().join("admin.token")),
        },
    )
    .await?;
    let admin = sandbox
        .mesh
        .admin_token()
        .context("admin token")?
        .to_owned();
    sandbox.settings = ClientSettings {
        tls_ca: Some(pki.ca.clone()),
        ..ClientSettings::default().with_token(admin)
    };
    let mut tokens = TokenServiceClient::new(sandbox.channel().await?);
    let worker_token = tokens
        .create_token(pb::CreateTokenRequest {
            name: "conformance-workers".into(),
            scopes: vec![pb::Scope::Worker as i32],
            task_patterns: vec!["conformance.*".into()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    sandbox.worker_env = vec![
        ("DAGMESH_TOKEN".into(), worker_token),
        ("DAGMESH_TLS_CA".into(), pki.ca.display().to_string()),
    ];
    sandbox.keep = Some(dir);
    Ok(sandbox)
}

fn conformance_step(id: &str, task: &str, inputs: &[(&str, &str)]) -> pb::StepSpec {
    step(id, &format!("{task}@^1"), &[], inputs)
}

async fn submit_one(client: &Client, spec: pb::WorkflowSpec) -> anyhow::Result<(String, String)> {
    let step_id = spec.steps[0].id.clone();
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let task_id = format!("{}/{step_id}", run.run_id);
    Ok((run.run_id, task_id))
}

async fn run_state(client: &Client, run_id: &str) -> anyhow::Result<pb::Run> {
    Ok(client.get_run(run_id).await?)
}

macro_rules! scenario_tests {
    ($($name:ident),* $(,)?) => {
        mod rust { $( #[tokio::test] async fn $name() -> anyhow::Result<()> { super::$name(super::Language::Rust).await } )* }
        mod python { $( #[tokio::test] async fn $name() -> anyhow::Result<()> { super::$name(super::Language::Python).await } )* }
        mod cpp { $( #[tokio::test] async fn $name() -> anyhow::Result<()> { super::$name(super::Language::Cpp).await } )* }
    };
}

scenario_tests!(
    progress_reaches_watchers_in_order,
    cancel_reaches_the_handler,
    a_task_on_a_killed_worker_runs_elsewhere,
    a_stale_result_is_refused_and_the_worker_carries_on,
    sigterm_drains_in_flight_work_and_takes_no_more,
    an_output_over_the_payload_limit_fails_clearly,
    reconnecting_within_the_lease_keeps_the_task,
);

async fn progress_reaches_watchers_in_order(language: Language) -> anyhow::Result<()> {
    let sandbox = secure_sandbox(fast_config()).await?;
    let Some(_worker) = WorkerProcess::start(
        language,
        &sandbox.worker_env,
        &sandbox.url(),
        "progress-1",
        1,
    )
    .await?
    else {
        return sandbox.stop().await;
    };
    let client = sandbox.client().await?;
    let spec = workflow(
        "conformance-progress",
        vec![conformance_step(
            "p",
            "conformance.progress",
            &[("steps", "5")],
        )],
    );
    let (run_id, _) = submit_one(&client, spec).await?;
    let events = all_events(sandbox.channel().await?, &run_id).await?;
    let progress: Vec<(f32, String)> = events
        .iter()
        .filter_map(|event| match &event.event {
            Some(run_event::Event::StepProgress(p)) => Some((p.fraction, p.message.clone())),
            _ => None,
        })
        .collect();
    assert!(
        !progress.is_empty(),
        "{language:?}: no progress reached the watcher"
    );
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{language:?}: progress out of order: {progress:?}"
    );
    assert_eq!(
        progress.last().map(|p| p.1.as_str()),
        Some("step 5"),
        "{language:?}"
    );
    assert_eq!(progress.last().map(|p| p.0), Some(1.0), "{language:?}");
    let run = wait_for_run(&client, &run_id).await?;
    assert_succeeded(&run);
    let outputs = Value::Object(dagmesh_proto::json::from_struct(
        run.steps[0].outputs.as_ref(),
    ));
    assert_eq!(outputs, json!({"done": 5}), "{language:?}");
    sandbox.stop().await
}

async fn cancel_reaches_the_handler(language: Language) -> anyhow::Result<()> {
    let sandbox = secure_sandbox(fast_config()).await?;
    let Some(mut worker) =
        WorkerProcess::start(language, &sandbox.worker_env, &sandbox.url(), "cancel-1", 1).await?
    else {
        return sandbox.stop().await;
    };
    let client = sandbox.client().await?;
    let spec = workflow(
        "conformance-cancel",
        vec![conformance_step("w", "conformance.wait_cancel", &[])],
    );
    let (run_id, task_id) = submit_one(&client, spec).await?;
    worker.event("started", &task_id, 1).await?;
    let run = client.cancel_run(&run_id, "test").await?;
    assert_eq!(run.state(), RunState::Cancelled);
    worker.event("cancelled", &task_id, 1).await?;
    sandbox.stop().await
}

async fn a_task_on_a_killed_worker_runs_elsewhere(language: Language) -> anyhow::Result<()> {
    let sandbox = secure_sandbox(fast_config()).await?;
    let Some(mut doomed) =
        WorkerProcess::start(language, &sandbox.worker_env, &sandbox.url(), "doomed-1", 1).await?
    else {
        return sandbox.stop().await;
    };
    let client = sandbox.client().await?;
    let spec = workflow(
        "conformance-killed",
        vec![conformance_step(
            "s",
            "conformance.sleep",
            &[("ms", "1500")],
        )],
    );
    let (run_id, task_id) = submit_one(&client, spec).await?;
    doomed.event("started", &task_id, 1).await?;
    doomed.signal("-KILL")?;
    let Some(mut survivor) = WorkerProcess::start(
        language,
        &sandbox.worker_env,
        &sandbox.url(),
        "survivor-1",
        1,
    )
    .await?
    else {
        unreachable!("the language was available a moment ago");
    };
    survivor.event("started", &task_id, 2).await?;
    let run = wait_for_run(&client, &run_id).await?;
    assert_succeeded(&run);
    assert_eq!(
        run.steps[0].attempt, 2,
        "{language:?}: redelivered as attempt 2"
    );
    assert_eq!(run.steps[0].worker, "survivor-1");
    sandbox.stop().await
}

async fn a_stale_result_is_refused_and_the_worker_carries_on(
    language: Language,
) -> anyhow::Result<()> {
    let sandbox = secure_sandbox(fast_config()).await?;
    let Some(mut worker) =
        WorkerProcess::start(language, &sandbox.worker_env, &sandbox.url(), "stale-1", 2).await?
    else {
        return sandbox.stop().await;
    };
    let client = sandbox.client().await?;
    let mut slow = conformance_step(
        "s",
        "conformance.sleep",
        &[("ms", "10"), ("first_attempt_ms", "1500")],
    );
    slow.timeout = "400ms".into();
    slow.retry = Some(RetryPolicy {
        max_attempts: 2,
        initial_backoff: "10ms".into(),
        ..RetryPolicy::default()
    });
    let (run_id, task_id) = submit_one(&client, workflow("conformance-stale", vec![slow])).await?;
    worker.event("started", &task_id, 1).await?;
    worker.event("started", &task_id, 2).await?;
    let run = wait_for_run(&client, &run_id).await?;
    assert_succeeded(&run);
    let outputs = Value::Object(dagmesh_proto::json::from_struct(
        run.steps[0].outputs.as_ref(),
    ));
    assert_eq!(
        outputs["attempt"],
        json!(2),
        "{language:?}: the current attempt's result"
    );
    // Attempt 1's result arrives late, is answered STALE, and the worker keeps working.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (echo_run, echo_task) = submit_one(
        &client,
        workflow(
            "conformance-after-stale",
            vec![conformance_step("e", "conformance.echo", &[("x", "1")])],
        ),
    )
    .await?;
    worker.event("started", &echo_task, 1).await?;
    assert_succeeded(&wait_for_run(&client, &echo_run).await?);
    let events = all_events(sandbox.channel().await?, &run_id).await?;
    let succeeded = step_states(&events, "s")
        .iter()
        .filter(|s| *s == "SUCCEEDED")
        .count();
    assert_eq!(succeeded, 1, "{language:?}: recorded once");
    sandbox.stop().await
}

async fn sigterm_drains_in_flight_work_and_takes_no_more(language: Language) -> anyhow::Result<()> {
    let sandbox = secure_sandbox(fast_config()).await?;
    let Some(mut worker) =
        WorkerProcess::start(language, &sandbox.worker_env, &sandbox.url(), "drain-1", 2).await?
    else {
        return sandbox.stop().await;
    };
    let client = sandbox.client().await?;
    let spec = workflow(
        "conformance-drain",
        vec![conformance_step(
            "s",
            "conformance.sleep",
            &[("ms", "1000")],
        )],
    );
    let (run_id, task_id) = submit_one(&client, spec).await?;
    worker.event("started", &task_id, 1).await?;
    worker.signal("-TERM")?;
    // Submitted after the drain began: the draining worker must not take it.
    let (late_run, _) = submit_one(
        &client,
        workflow(
            "conformance-late",
            vec![conformance_step("e", "conformance.echo", &[])],
        ),
    )
    .await?;
    assert_eq!(
        worker.exit_code().await?,
        Some(0),
        "{language:?}: drained and exited 0"
    );
    let run = wait_for_run(&client, &run_id).await?;
    assert_succeeded(&run);
    assert_eq!(
        run.steps[0].attempt, 1,
        "{language:?}: in-flight work finished, not redone"
    );
    let started = worker.started_so_far();
    assert!(
        started.iter().all(|line| !line.contains(&late_run)),
        "{language:?}: a draining worker took new work: {started:?}"
    );
    let late = run_state(&client, &late_run).await?;
    assert_eq!(
        late.steps[0].state(),
        StepState::Ready,
        "{language:?}: still queued"
    );
    sandbox.stop().await
}

async fn an_output_over_the_payload_limit_fails_clearly(language: Language) -> anyhow::Result<()> {
    let mut config = fast_config();
    config.max_payload_bytes = 4096;
    let sandbox = secure_sandbox(config).await?;
    let Some(_worker) =
        WorkerProcess::start(language, &sandbox.worker_env, &sandbox.url(), "big-1", 1).await?
    else {
        return sandbox.stop().await;
    };
    let client = sandbox.client().await?;
    let spec = workflow(
        "conformance-big",
        vec![conformance_step(
            "b",
            "conformance.big",
            &[("bytes", "10000")],
        )],
    );
    let (run_id, _) = submit_one(&client, spec).await?;
    let run = wait_for_run(&client, &run_id).await?;
    assert_eq!(run.state(), RunState::Failed, "{language:?}");
    let error = &run.steps[0].error;
    assert!(
        error.contains("4096-byte payload limit"),
        "{language:?}: the error names the limit: {error}"
    );
    assert_eq!(run.steps[0].attempt, 1, "{language:?}: not retried");
    sandbox.stop().await
}

async fn reconnecting_within_the_lease_keeps_the_task(language: Language) -> anyhow::Result<()> {
    let mut config = fast_config();
    config.lease = Duration::from_secs(10);
    let sandbox = secure_sandbox(config).await?;
    let proxy = Proxy::start(sandbox.mesh.addr()).await?;
    let Some(mut worker) = WorkerProcess::start(
        language,
        &sandbox.worker_env,
        &proxy.url(),
        "flaky-net-1",
        1,
    )
    .await?
    else {
        return sandbox.stop().await;
    };
    let client = sandbox.client().await?;
    let spec = workflow(
        "conformance-reconnect",
        vec![conformance_step(
            "s",
            "conformance.sleep",
            &[("ms", "1500")],
        )],
    );
    let (run_id, task_id) = submit_one(&client, spec).await?;
    worker.event("started", &task_id, 1).await?;
    proxy.cut();
    let run = wait_for_run(&client, &run_id).await?;
    assert_succeeded(&run);
    let step = &run.steps[0];
    assert_eq!(
        step.attempt, 1,
        "{language:?}: the task stayed with its worker"
    );
    assert_eq!(step.lost_attempts, 0, "{language:?}");
    assert_eq!(step.worker, "flaky-net-1");
    drop(worker);
    sandbox.stop().await
}

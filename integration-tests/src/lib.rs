//! The test sandbox: the whole mesh on real sockets, plus helpers to drive it.
//!
//! [`Sandbox`] starts store + executor in-process (as `dagmesh up` does) on an ephemeral port
//! with a short lease, on a SQLite file (or a fresh PostgreSQL database, see [`Database`]).
//! [`RawWorker`] speaks the worker protocol message by message, for tests that need to send
//! exactly what a misbehaving worker would; the SDK's `Worker` covers the well-behaved cases.

pub use dagmesh::pki;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dagmesh::mesh::{Mesh, MeshOptions};
use dagmesh_executor::ExecutorConfig;
use dagmesh_proto::connect::{AuthChannel, ClientSettings};
use dagmesh_proto::v1::{
    self as pb, Run, RunEvent, RunState, ServerMessage, StepSpec, WatchRunRequest, WorkerMessage,
    WorkflowSpec, run_event, run_service_client::RunServiceClient, server_message,
    watch_run_response, worker_message, worker_service_client::WorkerServiceClient,
};
use dagmesh_sdk::{Client, WorkerBuilder, WorkerHandle};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

/// How long a test waits for something that should happen quickly before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Test timings: a worker that goes silent is noticed within a second.
pub fn fast_config() -> ExecutorConfig {
    ExecutorConfig {
        lease: Duration::from_millis(1000),
        heartbeat_interval: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(5),
        // A sandbox restarted on the same database after a crash takes over within this.
        executor_lease_ttl: Duration::from_secs(2),
        ..ExecutorConfig::default()
    }
}

/// Where a sandbox keeps its data.
pub enum Database {
    /// A SQLite file in a temporary directory (kept for the sandbox's life).
    Sqlite(tempfile::TempDir),
    /// A database created on the PostgreSQL server of `DAGMESH_TEST_DATABASE_URL`, dropped at
    /// the end.
    Postgres { admin_url: String, name: String },
}

impl Database {
    pub fn sqlite() -> anyhow::Result<Self> {
        Ok(Self::Sqlite(tempfile::tempdir()?))
    }

    /// A fresh PostgreSQL database, or None when `DAGMESH_TEST_DATABASE_URL` is unset outside
    /// CI. Under CI (env `CI` set) a missing URL is an error: the suite must cover PostgreSQL.
    pub async fn postgres() -> anyhow::Result<Option<Self>> {
        let Ok(admin_url) = std::env::var("DAGMESH_TEST_DATABASE_URL") else {
            if std::env::var_os("CI").is_some() {
                bail!("DAGMESH_TEST_DATABASE_URL is not set, and CI must test PostgreSQL");
            }
            eprintln!("skipping PostgreSQL: DAGMESH_TEST_DATABASE_URL is not set");
            return Ok(None);
        };
        let name = format!("dagmesh_it_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx_connect(&admin_url).await?;
        // `name` is generated above from a UUID: safe to splice.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(Some(Self::Postgres { admin_url, name }))
    }

    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(dir) => format!("sqlite://{}", dir.path().join("dagmesh.db").display()),
            Self::Postgres { admin_url, name } => replace_database(admin_url, name),
        }
    }

    /// Drops a PostgreSQL database (SQLite directories go with the TempDir).
    pub async fn cleanup(self) -> anyhow::Result<()> {
        if let Self::Postgres { admin_url, name } = self {
            let mut admin = sqlx_connect(&admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await?;
        }
        Ok(())
    }
}

async fn sqlx_connect(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {url}"))
}

/// `postgres://u@h:p/db?x` with `db` replaced.
fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_end..]
        .find('/')
        .map_or(base.len(), |i| authority_end + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

pub struct Sandbox {
    pub mesh: Mesh,
    pub database: Database,
    /// What [`Sandbox::client`] and [`Sandbox::channel`] connect with (a token, a CA).
    pub settings: ClientSettings,
    /// Environment for worker processes (their token and CA), when the mesh is secured.
    pub worker_env: Vec<(String, String)>,
    /// Files that must live as long as the mesh (certificates).
    pub keep: Option<tempfile::TempDir>,
}

impl Sandbox {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Database::sqlite()?, fast_config()).await
    }

    pub async fn start_with(database: Database, config: ExecutorConfig) -> anyhow::Result<Self> {
        Self::start_full(database, config, Default::default()).await
    }

    /// With authentication and/or TLS.
    pub async fn start_secure(security: dagmesh::mesh::MeshSecurity) -> anyhow::Result<Self> {
        Self::start_full(Database::sqlite()?, fast_config(), security).await
    }

    pub async fn start_full(
        database: Database,
        config: ExecutorConfig,
        security: dagmesh::mesh::MeshSecurity,
    ) -> anyhow::Result<Self> {
        let mesh = Mesh::start(MeshOptions {
            listen: "127.0.0.1:0".into(),
            database_url: database.url(),
            executor: config,
            security,
        })
        .await?;
        Ok(Self {
            mesh,
            database,
            settings: ClientSettings::default(),
            worker_env: Vec::new(),
            keep: None,
        })
    }

    pub fn url(&self) -> String {
        self.mesh.url()
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect_with(self.url(), self.settings.clone()).await?)
    }

    pub async fn channel(&self) -> anyhow::Result<AuthChannel> {
        self.channel_with(&self.settings).await
    }

    /// A channel with a token and TLS settings.
    pub async fn channel_with(&self, settings: &ClientSettings) -> anyhow::Result<AuthChannel> {
        Ok(settings.connect(&self.url(), |endpoint| endpoint).await?)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.mesh.shutdown().await?;
        self.database.cleanup().await
    }

    /// Shuts the mesh down and starts a new one on the same database (an executor restart),
    /// with `config`.
    pub async fn restart(self, config: ExecutorConfig) -> anyhow::Result<Self> {
        let Sandbox {
            mesh,
            database,
            settings,
            worker_env,
            keep,
        } = self;
        mesh.shutdown().await?;
        let mesh = Mesh::start(MeshOptions {
            listen: "127.0.0.1:0".into(),
            database_url: database.url(),
            executor: config,
            security: Default::default(),
        })
        .await?;
        Ok(Sandbox {
            mesh,
            database,
            settings,
            worker_env,
            keep,
        })
    }
}

/// A channel without credentials (for servers without authentication).
pub async fn channel(url: &str) -> anyhow::Result<AuthChannel> {
    Ok(ClientSettings::default()
        .connect(url, |endpoint| endpoint)
        .await?)
}

/// Waits until a worker has a welcomed stream.
pub async fn connected(handle: &WorkerHandle) -> anyhow::Result<()> {
    tokio::time::timeout(PATIENCE, handle.wait_for(|state| state.connected))
        .await
        .with_context(|| format!("worker {} never connected", handle.instance_id()))?;
    Ok(())
}

/// Runs `builder`'s worker in the background for the rest of the test; returns once connected.
pub async fn spawn_worker(builder: WorkerBuilder) -> anyhow::Result<WorkerHandle> {
    let worker = builder.build()?;
    let handle = worker.handle();
    tokio::spawn(worker.run_until(std::future::pending()));
    connected(&handle).await?;
    Ok(handle)
}

/// The tick (seconds since the epoch) each run of a schedule was started for, read from its
/// idempotency key (`schedule/<id>/<tick>`), in the runs' order.
pub fn scheduled_ticks(runs: &[Run]) -> anyhow::Result<Vec<i64>> {
    runs.iter()
        .map(|run| {
            let tick = run.idempotency_key.rsplit('/').next().unwrap_or_default();
            tick.parse::<prost_types::Timestamp>()
                .map(|t| t.seconds)
                .map_err(|e| {
                    anyhow::anyhow!("run {} key {:?}: {e}", run.run_id, run.idempotency_key)
                })
        })
        .collect()
}

/// Waits for a run to end and returns it.
pub async fn wait_for_run(client: &Client, run_id: &str) -> anyhow::Result<Run> {
    tokio::time::timeout(PATIENCE, client.wait_for_run(run_id))
        .await
        .with_context(|| format!("run {run_id} did not end in time"))?
        .with_context(|| format!("waiting for run {run_id}"))
}

/// A step running `task` with the given needs and input expressions.
pub fn step(id: &str, task: &str, needs: &[&str], inputs: &[(&str, &str)]) -> StepSpec {
    StepSpec {
        id: id.into(),
        task: task.into(),
        needs: needs.iter().map(|s| (*s).to_owned()).collect(),
        inputs: inputs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..StepSpec::default()
    }
}

pub fn workflow(name: &str, steps: Vec<StepSpec>) -> WorkflowSpec {
    WorkflowSpec {
        name: name.into(),
        steps,
        ..WorkflowSpec::default()
    }
}

/// Every event of a run from the first, replayed and then followed through WatchRun until the
/// run ends.
pub async fn all_events(channel: AuthChannel, run_id: &str) -> anyhow::Result<Vec<RunEvent>> {
    let mut client = RunServiceClient::new(channel);
    let request = WatchRunRequest {
        run_id: run_id.into(),
        after_seq: Some(0),
    };
    let mut stream = tokio::time::timeout(PATIENCE, client.watch_run(request))
        .await??
        .into_inner();
    let mut events = Vec::new();
    while let Some(item) = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .context("watch stalled")?
    {
        if let Some(watch_run_response::Message::Event(event)) = item?.message {
            events.push(event);
        }
    }
    Ok(events)
}

/// The step state changes of `step_id`, in order, as names like "RUNNING".
pub fn step_states(events: &[RunEvent], step_id: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match &event.event {
            Some(run_event::Event::StepState(change)) if change.step_id == step_id => Some(
                change
                    .state()
                    .as_str_name()
                    .trim_start_matches("STEP_STATE_")
                    .to_owned(),
            ),
            _ => None,
        })
        .collect()
}

pub fn assert_succeeded(run: &Run) {
    assert_eq!(
        run.state(),
        RunState::Succeeded,
        "run {} ended {:?}: {}",
        run.run_id,
        run.state(),
        run.error
    );
}

/// A worker driven message by message.
pub struct RawWorker {
    pub instance_id: String,
    tx: mpsc::Sender<WorkerMessage>,
    rx: tonic::Streaming<ServerMessage>,
}

impl RawWorker {
    /// Connects and says Hello; returns the worker and the server's Welcome. A reconnect with
    /// the instance id of a stream the server has not yet seen end is refused (ALREADY_EXISTS),
    /// so this tries again for a while, as SDKs do with backoff.
    pub async fn connect(url: &str, hello: pb::Hello) -> anyhow::Result<(Self, pb::Welcome)> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match Self::connect_once(url, hello.clone()).await {
                Err(error)
                    if tokio::time::Instant::now() < deadline
                        && error
                            .downcast_ref::<tonic::Status>()
                            .is_some_and(|s| s.code() == tonic::Code::AlreadyExists) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                result => return result,
            }
        }
    }

    /// One try of [`RawWorker::connect`]: the server's refusal comes back as the error (a
    /// `tonic::Status` inside the `anyhow::Error`).
    pub async fn connect_once(url: &str, hello: pb::Hello) -> anyhow::Result<(Self, pb::Welcome)> {
        Self::connect_once_with(url, &ClientSettings::default(), hello).await
    }

    /// One try, with a token and TLS settings; the refusal comes back as a `tonic::Status`.
    pub async fn connect_once_with(
        url: &str,
        settings: &ClientSettings,
        hello: pb::Hello,
    ) -> anyhow::Result<(Self, pb::Welcome)> {
        let channel = settings.connect(url, |endpoint| endpoint).await?;
        let mut client = WorkerServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(64);
        let instance_id = hello.instance_id.clone();
        tx.send(msg(worker_message::Message::Hello(hello))).await?;
        let mut rx = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match next(&mut rx).await? {
            server_message::Message::Welcome(welcome) => welcome,
            other => bail!("expected Welcome, got {other:?}"),
        };
        Ok((
            Self {
                instance_id,
                tx,
                rx,
            },
            welcome,
        ))
    }

    pub fn hello(instance_id: &str, task: &str, version: &str, slots: u32) -> pb::Hello {
        pb::Hello {
            worker_name: "raw".into(),
            instance_id: instance_id.into(),
            task_types: vec![pb::TaskTypeVersion {
                name: task.into(),
                version: version.into(),
            }],
            slots,
            sdk_language: "test".into(),
            ..pb::Hello::default()
        }
    }

    pub async fn send(&self, message: worker_message::Message) -> anyhow::Result<()> {
        self.tx.send(msg(message)).await?;
        Ok(())
    }

    pub async fn next(&mut self) -> anyhow::Result<server_message::Message> {
        next(&mut self.rx).await
    }

    /// Waits for the next message and requires it to be an Assign (heartbeating meanwhile).
    pub async fn expect_assign(&mut self) -> anyhow::Result<pb::Assign> {
        match self.next().await? {
            server_message::Message::Assign(assign) => Ok(assign),
            other => bail!("expected Assign, got {other:?}"),
        }
    }

    pub async fn expect_recorded(&mut self) -> anyhow::Result<pb::Recorded> {
        match self.next().await? {
            server_message::Message::Recorded(recorded) => Ok(recorded),
            other => bail!("expected Recorded, got {other:?}"),
        }
    }

    pub async fn start(&self, assign: &pb::Assign) -> anyhow::Result<()> {
        self.send(worker_message::Message::Started(pb::TaskStarted {
            task_id: assign.task_id.clone(),
            attempt: assign.attempt,
        }))
        .await
    }

    pub async fn complete(
        &self,
        task_id: &str,
        attempt: u32,
        outputs: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.send(worker_message::Message::Completed(pb::TaskCompleted {
            task_id: task_id.into(),
            attempt,
            outputs: Some(dagmesh_proto::json::to_struct(&outputs)),
        }))
        .await
    }

    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        self.send(worker_message::Message::Heartbeat(pb::Heartbeat {}))
            .await
    }

    /// Ends the stream abruptly, like a crashed worker (no Draining, nothing more).
    pub fn crash(self) {
        drop(self);
    }
}

fn msg(message: worker_message::Message) -> WorkerMessage {
    WorkerMessage {
        message: Some(message),
    }
}

async fn next(rx: &mut tonic::Streaming<ServerMessage>) -> anyhow::Result<server_message::Message> {
    let message = tokio::time::timeout(PATIENCE, rx.message())
        .await
        .context("no message from the server in time")?
        .map_err(anyhow::Error::new)?
        .context("the server closed the stream")?;
    message.message.context("empty server message")
}

/// `cargo`, without the variables `cargo test` set for this package. Build scripts (ring's,
/// for one) watch `CARGO_MANIFEST_DIR`; inherited, it made every nested build and the next
/// outer one rebuild the TLS stack and everything above it.
pub fn cargo() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let per_package = ["CARGO_PKG_", "CARGO_BIN_EXE_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            );
        if per_package {
            command.env_remove(name);
        }
    }
    command
}

/// The `dagmesh` binary built next to this test. It is (re)built here once per test process:
/// cargo does not rebuild other packages' binaries for `cargo test -p`, and a stale binary would
/// test old code. When it is up to date this takes a fraction of a second.
pub fn dagmesh_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary has no target directory")?;
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = cargo()
                .args(["build", "-p", "dagmesh", "--bin", "dagmesh"])
                .status()
                .map_err(|e| e.to_string())?;
            if status.success() {
                Ok(())
            } else {
                Err("cargo build of the dagmesh binary failed".into())
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    Ok(profile_dir.join("dagmesh"))
}

/// A free TCP port on 127.0.0.1 (for child processes that must be told their port).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until a server at `url` reports SERVING on grpc.health.v1 (no sleeps for readiness).
pub async fn wait_healthy(url: &str) -> anyhow::Result<()> {
    wait_healthy_with(url, &ClientSettings::default()).await
}

/// [`wait_healthy`] with TLS settings (health needs no token).
pub async fn wait_healthy_with(url: &str, settings: &ClientSettings) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let attempt = async {
            let mut client = HealthClient::new(settings.connect(url, |e| e).await?);
            let response = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            anyhow::Ok(response.into_inner().status == 1)
        };
        if let Ok(true) = attempt.await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{url} did not become healthy in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `dagmesh` child process. Dropping it SIGKILLs and reaps the process, so a failing test
/// leaves nothing behind; while a test panics, the drop also prints the end of its log.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `dagmesh ARGS` with stdout and stderr appended to `DIR/NAME.log`, and with no
    /// `DAGMESH_*` variable inherited from the test's environment.
    pub fn spawn(name: &str, args: &[&str], log_dir: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_env(name, args, &[], log_dir)
    }

    /// Like [`ChildGuard::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_program(&dagmesh_binary()?, name, args, env, log_dir)
    }

    /// Another program (a Prometheus, a webhook receiver) under the same guard.
    pub fn spawn_program(
        program: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = OpenOptions::new().create(true).append(true).open(&log)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DAGMESH_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().copied());
        let child = command
            .spawn()
            .with_context(|| format!("starting {} {}", program.display(), args.join(" ")))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.child.as_ref().context("process already reaped")?.id())
    }

    /// Waits until `url` reports SERVING, failing at once (with the log) if the process exits.
    pub async fn wait_ready(&mut self, url: &str) -> anyhow::Result<()> {
        self.wait_ready_with(url, &ClientSettings::default()).await
    }

    /// [`ChildGuard::wait_ready`] over TLS.
    pub async fn wait_ready_with(
        &mut self,
        url: &str,
        settings: &ClientSettings,
    ) -> anyhow::Result<()> {
        tokio::select! {
            result = wait_healthy_with(url, settings) => result.with_context(|| self.context()),
            status = self.exited() => {
                bail!("{} exited before it was healthy ({:?}){}", self.name, status, self.context())
            }
        }
    }

    /// Resolves when the process has exited, reaping it.
    pub async fn exited(&mut self) -> anyhow::Result<ExitStatus> {
        loop {
            let child = self.child.as_mut().context("process already reaped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits at most `within` for the process to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(within, self.exited()).await {
            Ok(status) => status,
            Err(_) => bail!(
                "{} still running after {within:?}{}",
                self.name,
                self.context()
            ),
        }
    }

    /// SIGKILL, like a crash or an OOM kill: nothing is drained or flushed.
    pub fn sigkill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("process already reaped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM, what Kubernetes and systemd send first.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// SIGSTOP: the process freezes (a long GC pause, a stalled VM) until [`Self::sigcont`].
    pub fn sigstop(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    pub fn sigcont(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid()?.to_string()])
            .status()
            .with_context(|| format!("running kill -{name}"))?;
        anyhow::ensure!(status.success(), "kill -{name} {} failed", self.name);
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn context(&self) -> String {
        format!(
            "\n--- last lines of {} ---\n{}",
            self.log.display(),
            self.log_tail()
        )
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.context());
        }
    }
}

/// A plain HTTP/1.1 GET (for the metrics port and Prometheus's API): the status code and the
/// body, de-chunked.
pub async fn http_get(addr: &str, path_and_query: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let request =
        format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end in {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let chunked = head.lines().any(|line| {
        line.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut rest = body;
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("bad chunk header")?;
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            break;
        }
        out.push_str(after.get(..size).context("short chunk")?);
        rest = after.get(size + 2..).context("short chunk end")?;
    }
    Ok((status, out))
}

/// `text` percent-encoded for a URL query value.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

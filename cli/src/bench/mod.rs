//! `dagmesh bench`: the goals of BRIEF.md, measured. The mesh runs in-process on durable SQLite
//! (a file, WAL) with no-op Rust workers on real gRPC streams over loopback, so the numbers
//! include the store, the protocol and the engine, and nothing of step code.
//!
//! `abuse` (not part of `all`) measures the same mesh while hostile clients attack it; see
//! [`abuse`].

pub mod abuse;
mod replicas;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dagmesh_proto::v1::{
    RunState, StepSpec, SubmitRunRequest, WorkflowRef, WorkflowSpec, submit_run_request,
};
use dagmesh_runtime::telemetry;
use dagmesh_sdk::{TaskContext, TaskError, Worker, WorkerHandle};
use serde::Serialize;

use crate::commands::{Global, OutputFormat};
use crate::mesh::{Mesh, MeshOptions, MeshSecurity};
use dagmesh_proto::connect::ClientSettings;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A chain of dependent no-op steps: overhead per step.
    Chain,
    /// Many independent no-op steps plus a join: throughput.
    Fanout,
    /// One map step of many no-op items (`for_each` over a list of `--size`) plus a join: the
    /// same work as `fanout`, expanded at run time.
    Map,
    /// Many concurrent short runs: submit-to-done latency.
    Runs,
    /// Cold start to first dispatch, and resident memory at rest.
    Idle,
    /// Sequential unary calls (ListRuns) from a gRPC client: the cost of one request, which
    /// `--secure` shows with TLS and the token check.
    Rpc,
    /// All of the above.
    All,
    /// Victim runs' latency and the process memory while hostile clients attack the mesh, one
    /// abuse per phase (not part of `all`).
    Abuse,
    /// `fanout` and `runs` against 1, 2 and 3 executor processes on one database (with a
    /// metastore process; workers and clients spread over the replicas), with the CPU time of
    /// each process (not part of `all`).
    Replicas,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Repetitions of chain/fanout; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Steps in the chain (default 200) or fan-out (default 10000); runs in `runs` (default 1000).
    #[arg(long)]
    pub size: Option<usize>,
    /// Database URL; default: a fresh SQLite file in a temporary directory.
    #[arg(long, env = "DAGMESH_BENCH_DATABASE_URL")]
    pub database: Option<String>,
    /// `abuse`: seconds of each phase (baseline, each abuse, after).
    #[arg(long, env = "DAGMESH_BENCH_PHASE_SECONDS", default_value_t = 5)]
    pub phase_seconds: u64,
    /// `abuse`: the abuses to run, in this order (default: all of them).
    #[arg(long, env = "DAGMESH_BENCH_ABUSE", value_enum, value_delimiter = ',')]
    pub abuse: Vec<abuse::Abuse>,
    /// Serve TLS (throw-away certificates) with authentication on, workers connecting with a
    /// token: what production pays per step, to compare with the plaintext default.
    #[arg(long)]
    pub secure: bool,
    /// Record Prometheus metrics (as `--metrics-listen` does) while measuring: what the
    /// metrics cost per step, to compare with the default (off).
    #[arg(long)]
    pub metrics: bool,
    /// `replicas`: the executor counts to measure, e.g. `1,2,3` (the default).
    #[arg(long, value_delimiter = ',')]
    pub replicas: Vec<usize>,
    /// `replicas`: the executors share the runs (`dagmesh executor --share-partitions`): each
    /// drives a share of the partitions and one dispatches to the workers. Without it one
    /// executor drives every run and the others forward to it.
    #[arg(long)]
    pub share_partitions: bool,
    /// `chain` only: run the steps on this worker program instead of the built-in Rust no-op
    /// worker, to measure an SDK's own per-task overhead. It is started with `--server URL
    /// --instance-id bench-external --slots 1` appended, as the conformance workers take them,
    /// e.g. `--worker-command "python -m dagmesh.conformance" --task conformance.echo@^1`.
    #[arg(long)]
    pub worker_command: Option<String>,
    /// `chain` with `--worker-command`: the task every step runs.
    #[arg(long, default_value = "noop@^1")]
    pub task: String,
    /// `fanout`, `map` and `runs`: slots of each of the two built-in workers, the tasks they
    /// run at once (1 to the executor's limit on a worker's slots).
    #[arg(long, default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(dagmesh_proto::limits::MAX_SLOTS)))]
    pub slots: u32,
}

/// One result line; fields that do not apply to a scenario are null.
#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub scenario: &'static str,
    /// Served over TLS with authentication (`--secure`).
    pub secure: bool,
    /// Prometheus metrics recorded (`--metrics`).
    pub metrics: bool,
    pub steps: usize,
    pub wall_s: f64,
    pub per_step_ms: Option<f64>,
    pub steps_per_s: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub rss_mb: Option<f64>,
    /// `idle` only: process start of the mesh to the first Assign reaching a worker.
    pub cold_start_ms: Option<f64>,
    /// `abuse` only (absent elsewhere): the phase, `baseline`, an abuse, or `after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<&'static str>,
    /// `abuse`: victim runs submitted in the phase that ended, and how many of them did not
    /// succeed (failed, refused or timed out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_runs: Option<usize>,
    /// `abuse`: highest resident memory sampled during the phase (every 50 ms), in MB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_peak_mb: Option<f64>,
    /// `abuse`: size of the SQLite database (with its WAL) at the end of the phase, in MB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_mb: Option<f64>,
    /// `abuse`: what the hostile client did and what it got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub achieved: Option<String>,
    /// `replicas` only: how many executor processes served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    /// `replicas` only: whether they shared the partitions (`--share-partitions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_partitions: Option<bool>,
    /// `replicas` only: CPU seconds (user + system) each process spent on the scenario.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<std::collections::BTreeMap<String, f64>>,
}

pub async fn bench(global: &Global, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let _telemetry = telemetry::init_with("dagmesh-bench", "warn");
    if args.metrics {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        tokio::spawn(dagmesh_runtime::metrics::serve(
            listener,
            std::future::pending(),
        ));
    }
    let scenarios = match args.scenario {
        Scenario::All => vec![
            Scenario::Idle,
            Scenario::Chain,
            Scenario::Fanout,
            Scenario::Map,
            Scenario::Runs,
        ],
        one => vec![one],
    };
    for scenario in scenarios {
        if scenario == Scenario::Abuse {
            abuse::abuse(&args, global.output).await?;
            continue;
        }
        if scenario == Scenario::Replicas {
            replicas::replicas(&args, global.output).await?;
            continue;
        }
        let report = match scenario {
            Scenario::Chain => chain(&args).await?,
            Scenario::Fanout => fanout(&args).await?,
            Scenario::Map => map(&args).await?,
            Scenario::Runs => runs(&args).await?,
            Scenario::Idle => idle(&args).await?,
            Scenario::Rpc => rpc(&args).await?,
            Scenario::All | Scenario::Abuse | Scenario::Replicas => {
                unreachable!("handled above")
            }
        };
        let report = Report {
            secure: args.secure,
            metrics: args.metrics,
            ..report
        };
        print_report(global.output, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(output: OutputFormat, report: &Report) -> anyhow::Result<()> {
    if output == OutputFormat::Json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    if let Some(phase) = report.phase {
        println!("{}", abuse::text_line(phase, report));
        return Ok(());
    }
    let opt =
        |value: Option<f64>, unit: &str| value.map_or(String::new(), |v| format!(" {v:.3}{unit}"));
    println!(
        "{:<7}{} steps={:<6} wall={:.3}s{}{}{}{}{}{}",
        report.scenario,
        if report.secure { " [tls+auth]" } else { "" },
        report.steps,
        report.wall_s,
        opt(report.per_step_ms, "ms/step"),
        opt(report.steps_per_s.map(f64::round), " steps/s"),
        opt(report.p50_ms, "ms p50"),
        opt(report.p99_ms, "ms p99"),
        opt(report.rss_mb, "MB rss"),
        opt(report.cold_start_ms, "ms cold-start"),
    );
    if let (Some(replicas), Some(cpu)) = (report.replicas, &report.cpu_s) {
        let cpu: Vec<String> = cpu
            .iter()
            .map(|(name, s)| format!("{name} {s:.2}s"))
            .collect();
        let mode = match report.share_partitions {
            Some(true) => ", sharing the partitions",
            _ => "",
        };
        println!(
            "        {replicas} executor(s){mode}; CPU: {}",
            cpu.join(", ")
        );
    }
    Ok(())
}

/// No-op workers running in this process until [`NoopWorkers::stop`].
struct NoopWorkers {
    handles: Vec<WorkerHandle>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), dagmesh_sdk::WorkerError>>>,
}

impl NoopWorkers {
    /// `count` workers of `slots` slots, worker `i` connecting to `url(i)`; connected on return.
    async fn start(
        count: usize,
        slots: u32,
        settings: &ClientSettings,
        url: impl Fn(usize) -> String,
    ) -> anyhow::Result<Self> {
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for index in 0..count {
            let worker = Worker::builder(url(index))
                .client_settings(settings.clone())
                .name(format!("bench-{index}"))
                .slots(slots)
                .task("noop", "1.0.0", noop)
                .build()?;
            handles.push(worker.handle());
            tasks.push(tokio::spawn(worker.run_until(std::future::pending())));
        }
        for handle in &handles {
            handle.wait_for(|state| state.connected).await;
        }
        Ok(Self { handles, tasks })
    }

    /// Drains every worker and waits for them to end.
    async fn stop(self) -> anyhow::Result<()> {
        for worker in &self.handles {
            worker.drain();
        }
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

/// A mesh on a fresh durable SQLite file with `workers` no-op workers of `slots` slots each.
struct Bench {
    mesh: Mesh,
    /// How clients and workers connect (a token and the CA with `--secure`).
    settings: ClientSettings,
    workers: NoopWorkers,
    /// The SQLite file when the bench made it (no `--database`).
    db_path: Option<PathBuf>,
    _scratch: tempfile::TempDir,
}

async fn noop(_: TaskContext, _: serde_json::Value) -> Result<serde_json::Value, TaskError> {
    Ok(serde_json::json!({}))
}

impl Bench {
    async fn start(args: &BenchArgs, workers: usize, slots: u32) -> anyhow::Result<Self> {
        let scratch = tempfile::tempdir()?;
        let db_path = args
            .database
            .is_none()
            .then(|| scratch.path().join("bench.db"));
        let database_url = match &db_path {
            Some(path) => format!("sqlite://{}", path.display()),
            None => args.database.clone().unwrap_or_default(),
        };
        let (security, pki) = if args.secure {
            let pki = crate::pki::TestPki::create(scratch.path(), "")?;
            let tls = dagmesh_runtime::tls::ServerTls::load(dagmesh_runtime::tls::TlsFiles {
                cert: pki.server_cert.clone(),
                key: pki.server_key.clone(),
                client_ca: None,
            })?;
            let security = MeshSecurity {
                auth: true,
                internal_token: None,
                jwt: None,
                tls: Some(tls),
                admin_token_file: Some(scratch.path().join("admin.token")),
            };
            (security, Some(pki))
        } else {
            (MeshSecurity::default(), None)
        };
        let mesh = Mesh::start(MeshOptions {
            listen: "127.0.0.1:0".into(),
            database_url,
            executor: Default::default(),
            security,
        })
        .await?;
        let settings = ClientSettings {
            token: mesh.admin_token().map(str::to_owned),
            tls_ca: pki.map(|pki| pki.ca),
            ..ClientSettings::default()
        };
        let url = mesh.url();
        let workers = NoopWorkers::start(workers, slots, &settings, |_| url.clone()).await?;
        Ok(Self {
            mesh,
            settings,
            workers,
            db_path,
            _scratch: scratch,
        })
    }

    /// Registers `spec` (as a backend would, once) and returns a submit request for it.
    async fn register(&self, spec: WorkflowSpec) -> anyhow::Result<SubmitRunRequest> {
        let (workflow, _) = self.mesh.executor().apply_workflow(spec).await?;
        Ok(SubmitRunRequest {
            workflow_ref: Some(submit_run_request::WorkflowRef::Workflow(WorkflowRef {
                name: workflow.name,
                version: workflow.version,
            })),
            ..Default::default()
        })
    }

    /// Submits a run and waits for it; returns submit-to-done time.
    async fn run(&self, request: SubmitRunRequest) -> anyhow::Result<Duration> {
        let executor = self.mesh.executor();
        let started = Instant::now();
        let (run, _) = executor.submit(request).await?;
        let run = executor.wait_for_run(&run.run_id).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            run.state() == RunState::Succeeded,
            "benchmark run {} ended {:?}: {}",
            run.run_id,
            run.state(),
            run.error
        );
        Ok(elapsed)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.workers.stop().await?;
        self.mesh.shutdown().await
    }
}

fn noop_step(id: String, needs: Vec<String>) -> StepSpec {
    StepSpec {
        id,
        task: "noop@^1".into(),
        needs,
        ..Default::default()
    }
}

/// `length` no-op steps, each needing the one before.
fn chain_spec(name: &str, length: usize) -> WorkflowSpec {
    let steps = (0..length)
        .map(|i| {
            let needs = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            noop_step(format!("s{i}"), needs)
        })
        .collect();
    WorkflowSpec {
        name: name.into(),
        steps,
        ..Default::default()
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

async fn chain(args: &BenchArgs) -> anyhow::Result<Report> {
    let length = args.size.unwrap_or(200);
    let mut spec = chain_spec("bench-chain", length);
    let external = args.worker_command.as_deref();
    anyhow::ensure!(
        external.is_none() || !args.secure,
        "--worker-command does not combine with --secure"
    );
    for step in &mut spec.steps {
        step.task.clone_from(&args.task);
    }
    let bench = Bench::start(args, usize::from(external.is_none()), 1).await?;
    // Killed when dropped, however the bench ends.
    let worker = external
        .map(|command| start_external_worker(command, &bench.mesh.url()))
        .transpose()?;
    let spec = bench.register(spec).await?;
    bench.run(spec.clone()).await?; // warm-up: caches hot, and the external worker connected
    let mut walls = Vec::new();
    for _ in 0..args.repeat.max(1) {
        walls.push(bench.run(spec.clone()).await?);
    }
    if let Some(mut worker) = worker {
        // Before the mesh shuts down, which would otherwise wait for its stream to drain.
        worker.kill().await?;
    }
    bench.stop().await?;
    let wall = median(walls);
    Ok(Report {
        scenario: "chain",
        steps: length,
        wall_s: wall.as_secs_f64(),
        per_step_ms: Some(wall.as_secs_f64() * 1000.0 / length as f64),
        steps_per_s: Some(length as f64 / wall.as_secs_f64()),
        ..Default::default()
    })
}

/// Starts `command` (split on whitespace) as a worker of one slot connecting to `url`.
fn start_external_worker(command: &str, url: &str) -> anyhow::Result<tokio::process::Child> {
    let mut words = command.split_whitespace();
    let program = words
        .next()
        .ok_or_else(|| anyhow::anyhow!("--worker-command is empty"))?;
    tokio::process::Command::new(program)
        .args(words)
        .args([
            "--server",
            url,
            "--instance-id",
            "bench-external",
            "--slots",
            "1",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| anyhow::anyhow!("cannot start --worker-command {command:?}: {err}"))
}

async fn rpc(args: &BenchArgs) -> anyhow::Result<Report> {
    use dagmesh_proto::v1::ListRunsRequest;
    use dagmesh_proto::v1::run_service_client::RunServiceClient;
    let calls = args.size.unwrap_or(2000).max(1);
    let bench = Bench::start(args, 0, 1).await?;
    let channel = bench.settings.connect(&bench.mesh.url(), |e| e).await?;
    let mut client = RunServiceClient::new(channel);
    let request = ListRunsRequest {
        page_size: 1,
        ..Default::default()
    };
    for _ in 0..100 {
        client.list_runs(request.clone()).await?; // warm-up
    }
    let mut latencies = Vec::with_capacity(calls);
    let started = Instant::now();
    for _ in 0..calls {
        let call = Instant::now();
        client.list_runs(request.clone()).await?;
        latencies.push(call.elapsed().as_secs_f64() * 1000.0);
    }
    let wall = started.elapsed();
    bench.stop().await?;
    latencies.sort_by(f64::total_cmp);
    Ok(Report {
        scenario: "rpc",
        steps: calls,
        wall_s: wall.as_secs_f64(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        ..Default::default()
    })
}

async fn fanout(args: &BenchArgs) -> anyhow::Result<Report> {
    let width = args.size.unwrap_or(10_000);
    let mut steps: Vec<StepSpec> = (0..width)
        .map(|i| noop_step(format!("f{i}"), vec![]))
        .collect();
    steps.push(noop_step(
        "join".into(),
        (0..width).map(|i| format!("f{i}")).collect(),
    ));
    let spec = WorkflowSpec {
        name: "bench-fanout".into(),
        steps,
        ..Default::default()
    };
    throughput(args, "fanout", spec, None, width + 1).await
}

async fn map(args: &BenchArgs) -> anyhow::Result<Report> {
    let width = args.size.unwrap_or(10_000);
    let spec = WorkflowSpec {
        name: "bench-map".into(),
        steps: vec![
            StepSpec {
                for_each: "inputs.items".into(),
                ..noop_step("each".into(), vec![])
            },
            noop_step("join".into(), vec!["each".into()]),
        ],
        ..Default::default()
    };
    let items: Vec<usize> = (0..width).collect();
    let inputs = dagmesh_proto::json::to_struct(&serde_json::json!({ "items": items }));
    throughput(args, "map", spec, Some(inputs), width + 1).await
}

/// Runs `spec` (with `inputs`) `--repeat` times on two workers of `--slots`; the median run
/// over `steps` steps.
async fn throughput(
    args: &BenchArgs,
    scenario: &'static str,
    spec: WorkflowSpec,
    inputs: Option<prost_types::Struct>,
    steps: usize,
) -> anyhow::Result<Report> {
    let bench = Bench::start(args, 2, args.slots).await?;
    let request = SubmitRunRequest {
        inputs,
        ..bench.register(spec).await?
    };
    let mut walls = Vec::new();
    for _ in 0..args.repeat.max(1) {
        walls.push(bench.run(request.clone()).await?);
    }
    bench.stop().await?;
    let wall = median(walls);
    Ok(Report {
        scenario,
        steps,
        wall_s: wall.as_secs_f64(),
        per_step_ms: Some(wall.as_secs_f64() * 1000.0 / steps as f64),
        steps_per_s: Some(steps as f64 / wall.as_secs_f64()),
        ..Default::default()
    })
}

async fn runs(args: &BenchArgs) -> anyhow::Result<Report> {
    let count = args.size.unwrap_or(1000);
    let spec = chain_spec("bench-runs", 5);
    let bench = Bench::start(args, 2, args.slots).await?;
    let spec = bench.register(spec).await?;
    bench.run(spec.clone()).await?; // warm-up
    let started = Instant::now();
    let latencies =
        futures::future::try_join_all((0..count).map(|_| bench.run(spec.clone()))).await?;
    let wall = started.elapsed();
    bench.stop().await?;
    let mut millis: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    millis.sort_by(f64::total_cmp);
    let percentile = |p: f64| percentile(&millis, p).unwrap_or_default();
    Ok(Report {
        scenario: "runs",
        steps: count * 5,
        wall_s: wall.as_secs_f64(),
        steps_per_s: Some((count * 5) as f64 / wall.as_secs_f64()),
        p50_ms: Some(percentile(0.50)),
        p99_ms: Some(percentile(0.99)),
        ..Default::default()
    })
}

async fn idle(args: &BenchArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let bench = Bench::start(args, 1, 1).await?;
    let spec = WorkflowSpec {
        name: "bench-idle".into(),
        steps: vec![noop_step("only".into(), vec![])],
        ..Default::default()
    };
    let request = bench.register(spec).await?;
    bench.run(request).await?;
    let cold_start = started.elapsed();
    // At rest: let allocators and buffers settle, then read resident memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_mb = resident_mb();
    bench.stop().await?;
    Ok(Report {
        scenario: "idle",
        steps: 1,
        wall_s: cold_start.as_secs_f64(),
        rss_mb,
        cold_start_ms: Some(cold_start.as_secs_f64() * 1000.0),
        ..Default::default()
    })
}

/// The value at or below which a fraction `p` of `sorted` (ascending) lies (nearest rank);
/// `None` when empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    (!sorted.is_empty()).then(|| sorted[rank.clamp(1, sorted.len()) - 1])
}

/// VmRSS of this process (store, executor, one worker and the benchmark itself), in MB.
fn resident_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

//! `dagmesh bench replicas`: the fan-out and concurrent-runs scenarios against 1, 2, …
//! `dagmesh executor` processes on one database (one `dagmesh metastore` process in front of
//! it), with the workers and the clients spread over the replicas, and the CPU time each
//! process used. One executor drives the runs; the others forward to it (see README, "Several
//! executors on one database"), so this measures what the extra replicas cost, and will show
//! what they buy once runs are spread by partition.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dagmesh_proto::connect::ClientSettings;
use dagmesh_proto::v1::{RunState, StepSpec, WorkflowSpec};
use dagmesh_sdk::{Client, SubmitRun};
use tokio::process::{Child, Command};

use super::{BenchArgs, NoopWorkers, Report, chain_spec, noop_step, percentile, print_report};
use crate::commands::OutputFormat;

/// One child process of the cluster, killed when dropped.
struct Process {
    name: String,
    child: Child,
}

impl Process {
    fn spawn(name: &str, args: &[&str], dir: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut command = Command::new(std::env::current_exe()?);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DAGMESH_") {
                command.env_remove(key);
            }
        }
        command
            .args(args)
            .env("DAGMESH_NO_AUTH", "true")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// User + system CPU time so far, from /proc (Linux), in seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.child.id()?))
    }
}

/// utime + stime of a /proc/PID/stat file, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

async fn wait_serving(url: &str, process: &mut Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let serving = async {
            let channel = ClientSettings::default().connect(url, |e| e).await?;
            let status = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?
                .into_inner()
                .status();
            anyhow::Ok(status == tonic_health::pb::health_check_response::ServingStatus::Serving)
        };
        if let Ok(true) = serving.await {
            return Ok(());
        }
        if let Some(status) = process.child.try_wait()? {
            anyhow::bail!("{} exited ({status}) before it served", process.name);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} did not serve in time",
            process.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_addr() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

/// A metastore and `replicas` executors as processes, with workers and clients on each.
struct Cluster {
    processes: Vec<Process>,
    clients: Vec<Client>,
    workers: NoopWorkers,
}

impl Cluster {
    async fn start(
        database: &str,
        replicas: usize,
        share: bool,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let metastore_addr = free_addr()?;
        let mut metastore = Process::spawn(
            "metastore",
            &[
                "metastore",
                "--listen",
                &metastore_addr,
                "--database",
                database,
            ],
            dir,
        )?;
        wait_serving(&format!("http://{metastore_addr}"), &mut metastore).await?;
        let mut processes = vec![metastore];
        let mut urls = Vec::new();
        for index in 0..replicas {
            let addr = free_addr()?;
            let url = format!("http://{addr}");
            let metastore = format!("http://{metastore_addr}");
            let mut args = vec!["executor", "--listen", &addr, "--metastore", &metastore];
            if share {
                args.push("--share-partitions");
            }
            let mut executor = Process::spawn(&format!("executor-{index}"), &args, dir)?;
            wait_serving(&url, &mut executor).await?;
            if index == 0 {
                // The first one drives: wait until it does before the standbys start.
                let client = Client::connect(&url).await?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while client.list_runs(Default::default()).await.is_err() {
                    anyhow::ensure!(Instant::now() < deadline, "executor-0 never drove");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            processes.push(executor);
            urls.push(url);
        }
        if share {
            wait_spread(database, replicas).await?;
        }
        // Two workers of 128 slots (as the in-process benchmarks), on different replicas.
        let workers = NoopWorkers::start(2, 128, &ClientSettings::default(), |i| {
            urls[i % urls.len()].clone()
        })
        .await?;
        let mut clients = Vec::new();
        for url in &urls {
            clients.push(Client::connect_with(url, ClientSettings::default()).await?);
        }
        Ok(Self {
            processes,
            clients,
            workers,
        })
    }

    /// Registers `spec`; what to submit to run it.
    async fn register(&self, spec: WorkflowSpec) -> anyhow::Result<SubmitRun> {
        let workflow = self.clients[0].apply_workflow(spec).await?;
        Ok(SubmitRun::workflow(workflow.name).version(workflow.version))
    }

    /// Submits through replica `via` and waits through it; submit-to-done time.
    async fn run(&self, via: usize, request: SubmitRun) -> anyhow::Result<Duration> {
        let client = &self.clients[via % self.clients.len()];
        let started = Instant::now();
        let run = client.submit(request).await?;
        let run = client.wait_for_run(&run.run_id).await?;
        anyhow::ensure!(
            run.state() == RunState::Succeeded,
            "benchmark run {} ended {:?}: {}",
            run.run_id,
            run.state(),
            run.error
        );
        Ok(started.elapsed())
    }

    /// CPU seconds of each process (and of this one: the workers and clients) so far.
    fn cpu(&self) -> BTreeMap<String, f64> {
        let mut cpu: BTreeMap<String, f64> = self
            .processes
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.cpu_seconds()?)))
            .collect();
        if let Some(own) = cpu_seconds("/proc/self/stat") {
            cpu.insert("bench (workers, clients)".into(), own);
        }
        cpu
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.workers.stop().await?;
        drop(self.processes); // killed
        Ok(())
    }
}

/// Waits until every partition is leased and each of the `replicas` executors holds a share
/// (a reused database may still hold the leases of an earlier round's executors, which expire).
async fn wait_spread(database: &str, replicas: usize) -> anyhow::Result<()> {
    let store = dagmesh_metastore::connect(database).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owners: BTreeMap<String, usize> = BTreeMap::new();
        for lease in store.list_live_leases("executor/p-").await? {
            *owners.entry(lease.holder).or_default() += 1;
        }
        let total: usize = owners.values().sum();
        if owners.len() == replicas && total == dagmesh_executor::DEFAULT_PARTITIONS as usize {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the partitions did not spread over {replicas} executors: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spent(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(name, total)| {
            let used = total - before.get(name).copied().unwrap_or_default();
            (name.clone(), (used * 100.0).round() / 100.0)
        })
        .collect()
}

pub async fn replicas(args: &BenchArgs, output: OutputFormat) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let counts = if args.replicas.is_empty() {
        vec![1, 2, 3]
    } else {
        args.replicas.clone()
    };
    for replicas in counts {
        anyhow::ensure!(
            (1..=16).contains(&replicas),
            "--replicas: {replicas} is out of range (1 to 16)"
        );
        // A fresh database per count (SQLite: a new file; PostgreSQL: the one given, reused).
        let dir = scratch.path().join(format!("replicas-{replicas}"));
        std::fs::create_dir_all(&dir)?;
        let database = match &args.database {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", dir.join("bench.db").display()),
        };
        let cluster = Cluster::start(&database, replicas, args.share_partitions, &dir).await?;

        // Fan-out: one run of `width` no-op steps and a join, submitted through the last replica
        // (a standby when there are several).
        let width = args.size.unwrap_or(10_000);
        let mut steps: Vec<StepSpec> = (0..width)
            .map(|i| noop_step(format!("f{i}"), vec![]))
            .collect();
        steps.push(noop_step(
            "join".into(),
            (0..width).map(|i| format!("f{i}")).collect(),
        ));
        let fanout = cluster
            .register(WorkflowSpec {
                name: "bench-fanout".into(),
                steps,
                ..Default::default()
            })
            .await?;
        let mut walls = Vec::new();
        let before = cluster.cpu();
        for _ in 0..args.repeat.max(1) {
            walls.push(cluster.run(replicas - 1, fanout.clone()).await?);
        }
        let cpu = spent(&before, &cluster.cpu());
        let wall = super::median(walls);
        let steps = width + 1;
        print_report(
            output,
            &Report {
                scenario: "replicas-fanout",
                steps,
                wall_s: wall.as_secs_f64(),
                per_step_ms: Some(wall.as_secs_f64() * 1000.0 / steps as f64),
                steps_per_s: Some(steps as f64 / wall.as_secs_f64()),
                replicas: Some(replicas),
                share_partitions: Some(args.share_partitions),
                cpu_s: Some(cpu),
                ..Default::default()
            },
        )?;

        // Concurrent runs: 1000 five-step runs, submitted round-robin over the replicas.
        let count = 1000;
        let chain = cluster.register(chain_spec("bench-runs", 5)).await?;
        cluster.run(0, chain.clone()).await?; // warm-up
        let before = cluster.cpu();
        let started = Instant::now();
        let latencies = futures::future::try_join_all(
            (0..count).map(|index| cluster.run(index, chain.clone())),
        )
        .await?;
        let wall = started.elapsed();
        let cpu = spent(&before, &cluster.cpu());
        let mut millis: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        millis.sort_by(f64::total_cmp);
        print_report(
            output,
            &Report {
                scenario: "replicas-runs",
                steps: count * 5,
                wall_s: wall.as_secs_f64(),
                steps_per_s: Some((count * 5) as f64 / wall.as_secs_f64()),
                p50_ms: percentile(&millis, 0.50),
                p99_ms: percentile(&millis, 0.99),
                replicas: Some(replicas),
                share_partitions: Some(args.share_partitions),
                cpu_s: Some(cpu),
                ..Default::default()
            },
        )?;
        cluster.stop().await?;
    }
    Ok(())
}

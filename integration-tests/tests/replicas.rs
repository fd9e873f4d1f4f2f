//! Several `dagmesh executor` replicas on one database, in both modes: one drives the runs (it
//! holds the executor lease) and the others are standbys that forward every call and every
//! worker stream to it; or, with `--share-partitions`, each drives its share of the partitions
//! and the lease holder dispatches every task to the workers. Either way clients and workers
//! may use any replica. Real processes, real sockets; the chaos tests run on PostgreSQL with
//! schedulers too.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use dagmesh_integration_tests::{
    ChildGuard, Database, PATIENCE, assert_succeeded, connected, free_port, scheduled_ticks, step,
    step_states, wait_for_run, workflow,
};
use dagmesh_metastore::MetadataStore;
use dagmesh_metastore::ownership::holder_address;
use dagmesh_proto::v1::cluster_service_client::ClusterServiceClient;
use dagmesh_proto::v1::run_service_client::RunServiceClient;
use dagmesh_proto::v1::{
    DeliverEventRequest, ListWorkersRequest, Run, RunEvent, RunState, run_event,
};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use serde_json::{Value, json};

/// `dagmesh ARGS` without authentication (security.rs covers it; these tests are about
/// replicas and crashes).
fn spawn_open(name: &str, args: &[&str], dir: &Path) -> anyhow::Result<ChildGuard> {
    ChildGuard::spawn_with_env(name, args, &[("DAGMESH_NO_AUTH", "true")], dir)
}

fn url(addr: &str) -> String {
    format!("http://{addr}")
}

/// A `dagmesh metastore` on `database`, serving on return; its address and process.
async fn start_metastore(database: &str, dir: &Path) -> anyhow::Result<(String, ChildGuard)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut metastore = spawn_open(
        "metastore",
        &["metastore", "--listen", &addr, "--database", database],
        dir,
    )?;
    metastore.wait_ready(&url(&addr)).await?;
    Ok((addr, metastore))
}

/// One executor replica: its address and how to start it again after a kill.
struct Replica {
    name: String,
    addr: String,
    args: Vec<String>,
    child: Option<ChildGuard>,
    starts: u32,
}

impl Replica {
    fn new(name: &str, metastore: &str, lease_ttl: &str) -> anyhow::Result<Self> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let args = [
            "executor",
            "--listen",
            &addr,
            "--metastore",
            &url(metastore),
            "--executor-lease-ttl",
            lease_ttl,
            "--lease",
            "3s",
            "--heartbeat-interval",
            "300ms",
            "--reconnect-grace",
            "3s",
        ]
        .map(str::to_owned)
        .to_vec();
        Ok(Self {
            name: name.to_owned(),
            addr,
            args,
            child: None,
            starts: 0,
        })
    }

    fn url(&self) -> String {
        url(&self.addr)
    }

    /// Starts it (again); healthy on return (a standby serves at once: it forwards).
    async fn start(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.starts += 1;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let name = format!("{}-{}", self.name, self.starts);
        let mut child = spawn_open(&name, &args, dir)?;
        child.wait_ready(&self.url()).await?;
        self.child = Some(child);
        Ok(())
    }

    fn child(&mut self) -> anyhow::Result<&mut ChildGuard> {
        self.child.as_mut().context("replica not running")
    }
}

/// The address the current executor lease holder advertises, once there is one.
async fn lease_holder(store: &Arc<dyn MetadataStore>) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let leases = store.list_live_leases("executor").await?;
        if let Some(address) = leases
            .iter()
            .find(|lease| lease.name == "executor")
            .and_then(|lease| holder_address(&lease.holder))
        {
            return Ok(address.to_owned());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no executor took the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `double` returns `{"value": 2x}` after `ms` milliseconds.
fn doubling_worker(url: String, executed: Arc<AtomicU64>) -> dagmesh_sdk::WorkerBuilder {
    Worker::builder(url)
        .slots(8)
        .task("double", "1.0.0", move |_: TaskContext, input: Value| {
            let executed = executed.clone();
            async move {
                let ms = input["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                executed.fetch_add(1, Ordering::Relaxed);
                let x = input["x"].as_i64().unwrap_or_default();
                Ok::<_, TaskError>(json!({ "value": 2 * x }))
            }
        })
}

fn chain(name: &str, ms: u64) -> dagmesh_proto::v1::WorkflowSpec {
    let ms = ms.to_string();
    workflow(
        name,
        vec![
            step("a", "double@^1", &[], &[("x", "inputs.x"), ("ms", &ms)]),
            step("b", "double@^1", &["a"], &[("x", "a.value"), ("ms", &ms)]),
            step("c", "double@^1", &["b"], &[("x", "b.value"), ("ms", &ms)]),
        ],
    )
}

/// A standby answers the API and carries worker streams by forwarding them to the replica
/// that drives the runs; when that one dies, the standby takes over and the same clients and
/// workers go on without being told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_forwards_calls_and_worker_streams_to_the_executor_that_drives()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let database = format!("sqlite://{}", dir.path().join("meta.db").display());
    let (metastore_addr, metastore) = start_metastore(&database, dir.path()).await?;
    let mut first = Replica::new("executor-1", &metastore_addr, "1s")?;
    first.start(dir.path()).await?;
    let mut second = Replica::new("executor-2", &metastore_addr, "1s")?;
    second.start(dir.path()).await?;
    let store = dagmesh_metastore::connect(&database).await?;
    assert_eq!(lease_holder(&store).await?, first.url());

    // Everything through the standby: the workflow, the worker's stream, the submit, the watch.
    let executed = Arc::new(AtomicU64::new(0));
    let client = Client::connect(second.url()).await?;
    client.apply_workflow(chain("chain", 0)).await?;
    let worker =
        dagmesh_integration_tests::spawn_worker(doubling_worker(second.url(), executed.clone()))
            .await?;
    let run = client
        .submit(SubmitRun::workflow("chain").inputs(json!({"x": 1})))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(
        run.steps[2].outputs,
        Some(dagmesh_proto::json::to_struct(&json!({"value": 8})))
    );
    // The worker is registered where the runs are driven.
    let workers =
        ClusterServiceClient::new(dagmesh_integration_tests::channel(&first.url()).await?)
            .list_workers(ListWorkersRequest::default())
            .await?
            .into_inner()
            .workers;
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].instance_id, worker.instance_id());
    // A refusal comes back as the driving executor says it.
    let error = client
        .submit(SubmitRun::workflow("no-such-workflow"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("no-such-workflow"), "{error}");

    // The driving executor dies: the standby takes the lease and serves on its own; the same
    // client and the same worker (it reconnects to the same address) go on.
    first.child()?.sigkill()?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while lease_holder(&store).await? != second.url() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the standby never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    connected(&worker).await?;
    let run = submit_retrying(
        std::slice::from_ref(&client),
        0,
        SubmitRun::workflow("chain")
            .inputs(json!({"x": 2}))
            .idempotency_key("after-kill"),
    )
    .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);

    // The first comes back as a standby and forwards to the second.
    first.start(dir.path()).await?;
    let through_first = Client::connect(first.url()).await?;
    let run = through_first
        .submit(SubmitRun::workflow("chain").inputs(json!({"x": 3})))
        .await?;
    let run = wait_for_run(&through_first, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(lease_holder(&store).await?, second.url());
    assert_eq!(executed.load(Ordering::Relaxed), 9);
    drop((first, second, metastore));
    Ok(())
}

/// Submits through `clients[first]`, retrying — through the next replica, as a client of a
/// Service in front of them would — while no replica drives the runs (a handover) or the one
/// asked is down; the idempotency key makes a retried submit that did land the same run.
async fn submit_retrying(clients: &[Client], first: usize, run: SubmitRun) -> anyhow::Result<Run> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut next = first;
    loop {
        match clients[next % clients.len()].submit(run.clone()).await {
            Ok(run) => return Ok(run),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "submit refused; retrying");
                next += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Nothing recorded twice: each step of a `chain` run ended SUCCEEDED once in its stored log.
fn each_step_succeeded_once(run_id: &str, events: &[RunEvent]) -> anyhow::Result<()> {
    for step_id in ["a", "b", "c"] {
        let ended = step_states(events, step_id)
            .iter()
            .filter(|state| state.as_str() == "SUCCEEDED")
            .count();
        ensure!(
            ended == 1,
            "run {run_id} step {step_id} SUCCEEDED {ended} times"
        );
    }
    Ok(())
}

/// The events of one run straight from the store.
async fn stored_events(
    store: &Arc<dyn MetadataStore>,
    run_id: &str,
) -> anyhow::Result<Vec<RunEvent>> {
    let mut events = Vec::new();
    loop {
        let after = events.last().map_or(0, |e: &RunEvent| e.seq);
        let page = store.read_events(run_id, after, 1000).await?;
        if page.is_empty() {
            return Ok(events);
        }
        events.extend(page);
    }
}

/// Three executor replicas and two schedulers on one PostgreSQL database, workers and clients
/// on every replica, under chaos: the driving executor SIGKILLed and restarted again and again,
/// then frozen with SIGSTOP past its lease and resumed (a zombie owner must not write). Every
/// run completes, each step and each run is recorded ended exactly once, and every tick of a
/// per-second schedule is one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_executors_and_two_schedulers_on_postgres_behave_as_one_under_kills_and_pauses()
-> anyhow::Result<()> {
    chaos(false).await
}

/// The same chaos with executors that share the partitions (`--share-partitions`): the
/// replicas killed are the dispatcher (which also drives its share of the runs, so the kill
/// moves partitions and the dispatcher role at once) and, every other time, a replica that only
/// drives its share; the one frozen is the dispatcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_executors_sharing_partitions_and_two_schedulers_behave_as_one_under_kills_and_pauses()
-> anyhow::Result<()> {
    chaos(true).await
}

async fn chaos(sharing: bool) -> anyhow::Result<()> {
    use dagmesh_proto::v1::{
        CreateScheduleRequest, PauseScheduleRequest, Schedule,
        scheduler_service_client::SchedulerServiceClient,
    };
    let Some(database) = Database::postgres().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let database_url = database.url();
    let (metastore_addr, metastore) = start_metastore(&database_url, dir.path()).await?;
    let mut replicas = Vec::new();
    for n in 1..=3 {
        let mut replica = Replica::new(&format!("executor-{n}"), &metastore_addr, "2s")?;
        if sharing {
            replica.args.push("--share-partitions".into());
        }
        replica.start(dir.path()).await?;
        replicas.push(replica);
    }
    let store = dagmesh_metastore::connect(&database_url).await?;

    // Two schedulers, each talking to another replica.
    let mut schedulers = Vec::new();
    for n in 0..2 {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut scheduler = spawn_open(
            &format!("scheduler-{n}"),
            &[
                "scheduler",
                "--listen",
                &addr,
                "--metastore",
                &url(&metastore_addr),
                "--executor",
                &replicas[n + 1].url(),
                "--lease-ttl",
                "2s",
            ],
            dir.path(),
        )?;
        scheduler.wait_ready(&url(&addr)).await?;
        schedulers.push((addr, scheduler));
    }

    // A worker on every replica, and a client of every replica.
    let executed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for replica in &replicas {
        workers.push(
            dagmesh_integration_tests::spawn_worker(doubling_worker(
                replica.url(),
                executed.clone(),
            ))
            .await?,
        );
        clients.push(Client::connect_lazy(replica.url())?);
    }
    clients[0].apply_workflow(chain("chain", 20)).await?;
    clients[0]
        .apply_workflow(workflow(
            "ticking",
            vec![step("only", "double@^1", &[], &[("x", "1")])],
        ))
        .await?;
    let schedule = Schedule {
        name: "every-second".into(),
        cron: "* * * * * *".into(),
        workflow: "ticking".into(),
        catch_up: dagmesh_proto::v1::CatchUp::All as i32,
        ..Schedule::default()
    };
    SchedulerServiceClient::new(dagmesh_integration_tests::channel(&url(&schedulers[0].0)).await?)
        .create_schedule(CreateScheduleRequest {
            schedule: Some(schedule),
        })
        .await?;

    // Submitters: 240 keyed runs, spread over the replicas, while the chaos below goes on.
    const RUNS: usize = 240;
    let submitter = {
        let clients = clients.clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(RUNS);
            for n in 0..RUNS {
                let run = SubmitRun::workflow("chain")
                    .inputs(json!({"x": n}))
                    .idempotency_key(format!("chaos-{n}"));
                ids.push(submit_retrying(&clients, n, run).await?.run_id);
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            anyhow::Ok(ids)
        })
    };

    // Chaos: kill whoever drives, four times, restarting it each time. Sharing the partitions,
    // every other kill takes a replica that does not dispatch but drives its share (its tasks
    // on workers are declared to the dispatcher by the replicas that take its partitions).
    let index_of = |replicas: &[Replica], url: &str| replicas.iter().position(|r| r.url() == url);
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let holder = lease_holder(&store).await?;
        let mut victim =
            index_of(&replicas, &holder).context("the lease holder is none of ours")?;
        if sharing && round % 2 == 1 {
            victim = (victim + 1) % replicas.len();
        }
        replicas[victim].child()?.sigkill()?;
        tokio::time::sleep(Duration::from_millis(800)).await;
        replicas[victim].start(dir.path()).await?;
    }
    // A zombie: the driver freezes past its lease; when it wakes, the others have moved on,
    // its writes are refused and it stops by itself.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let holder = lease_holder(&store).await?;
    let zombie = index_of(&replicas, &holder).context("the lease holder is none of ours")?;
    replicas[zombie].child()?.sigstop()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(
        lease_holder(&store).await? != holder,
        "nobody took over from the frozen executor"
    );
    replicas[zombie].child()?.sigcont()?;
    let status = replicas[zombie]
        .child()?
        .wait_exit(Duration::from_secs(40))
        .await?;
    ensure!(
        !status.success(),
        "the deposed executor should stop with an error: {status:?}"
    );
    replicas[zombie].start(dir.path()).await?;

    let ids = tokio::time::timeout(Duration::from_secs(120), submitter)
        .await
        .context("submitting took too long")???;
    // Every run completes, read through any replica.
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for (n, id) in ids.iter().enumerate() {
        let run = wait_ended(&clients[n % 3], id).await?;
        *states
            .entry(run.state().as_str_name().to_owned())
            .or_default() += 1;
        if run.state() != RunState::Succeeded {
            bail!("run {id} ended {:?}: {}", run.state(), run.error);
        }
        ensure!(
            run.steps[2].outputs == Some(dagmesh_proto::json::to_struct(&json!({"value": 8 * n}))),
            "run {id}: {:?}",
            run.steps[2].outputs
        );
    }
    // Nothing recorded twice: one end per step and per run in the stored event logs.
    for id in &ids {
        let events = stored_events(&store, id).await?;
        each_step_succeeded_once(id, &events)?;
        let run_ends = events
            .iter()
            .filter(|event| {
                matches!(&event.event, Some(run_event::Event::RunState(change))
                    if change.state() == RunState::Succeeded)
            })
            .count();
        ensure!(run_ends == 1, "run {id} SUCCEEDED {run_ends} times");
    }
    // Keys deduplicated every retried submit.
    let listed = store
        .list_runs(&dagmesh_proto::v1::ListRunsRequest {
            workflow: "chain".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .runs;
    assert_eq!(listed.len(), RUNS, "{states:?}");

    // Every tick exactly once, none missed from the first to the last.
    SchedulerServiceClient::new(dagmesh_integration_tests::channel(&url(&schedulers[1].0)).await?)
        .pause_schedule(PauseScheduleRequest {
            schedule: "every-second".into(),
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticking = store
        .list_runs(&dagmesh_proto::v1::ListRunsRequest {
            workflow: "ticking".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .runs;
    let mut ticks = scheduled_ticks(&ticking)?;
    ticks.sort_unstable();
    let mut distinct = ticks.clone();
    distinct.dedup();
    assert_eq!(distinct, ticks, "a tick started two runs");
    ensure!(ticks.len() >= 15, "only {} ticks", ticks.len());
    let expected: Vec<i64> = (ticks[0]..ticks[0] + ticks.len() as i64).collect();
    assert_eq!(
        ticks, expected,
        "a tick between the first and the last was missed"
    );
    for run in &ticking {
        let run = wait_ended(&clients[0], &run.run_id).await?;
        assert_succeeded(&run);
    }
    eprintln!(
        "{} runs and {} ticks, {} task executions, states {states:?}",
        ids.len(),
        ticks.len(),
        executed.load(Ordering::Relaxed)
    );
    drop((replicas, schedulers, metastore));
    database.cleanup().await
}

/// Polls the run until it ends, through one replica, riding out handovers.
async fn wait_ended(client: &Client, run_id: &str) -> anyhow::Result<Run> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last: HashMap<&str, String> = HashMap::new();
    loop {
        match client.get_run(run_id).await {
            Ok(run)
                if matches!(
                    run.state(),
                    RunState::Succeeded | RunState::Failed | RunState::Cancelled
                ) =>
            {
                return Ok(run);
            }
            Ok(run) => {
                last.insert("state", format!("{:?}", run.state()));
            }
            Err(error) => {
                last.insert("error", error.to_string());
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "run {run_id} did not end: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that opens streams through a standby and stops reading them (each holding a big run
/// snapshot) stalls only itself: the standby gives every client connection its own upstream
/// connection, so other clients' calls and the workers behind the same standby go on. Over one
/// shared upstream connection, a few such streams fill its HTTP/2 window and every forwarded
/// call waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_through_a_standby_stalls_only_itself() -> anyhow::Result<()> {
    use dagmesh_proto::v1::run_service_client::RunServiceClient;
    use dagmesh_proto::v1::{ListRunsRequest, WatchRunRequest};
    let dir = tempfile::tempdir()?;
    let database = format!("sqlite://{}", dir.path().join("meta.db").display());
    let (metastore_addr, metastore) = start_metastore(&database, dir.path()).await?;
    let mut driver = Replica::new("executor-1", &metastore_addr, "2s")?;
    driver.start(dir.path()).await?;
    let mut standby = Replica::new("executor-2", &metastore_addr, "2s")?;
    standby.start(dir.path()).await?;

    // A run whose snapshot is ~1.9 MB (its step's output).
    let worker = dagmesh_integration_tests::spawn_worker(
        Worker::builder(standby.url())
            .slots(4)
            .task("big", "1.0.0", |_: TaskContext, _: Value| async move {
                Ok::<_, TaskError>(json!({ "blob": "x".repeat(1_900_000) }))
            })
            .task("small", "1.0.0", |_: TaskContext, _: Value| async move {
                Ok::<_, TaskError>(json!({ "ok": true }))
            }),
    )
    .await?;
    let client = Client::connect(driver.url()).await?;
    client
        .apply_workflow(workflow("big", vec![step("b", "big@^1", &[], &[])]))
        .await?;
    client
        .apply_workflow(workflow("small", vec![step("s", "small@^1", &[], &[])]))
        .await?;
    let big = client.submit(SubmitRun::workflow("big")).await?;
    assert_succeeded(&wait_for_run(&client, &big.run_id).await?);

    // The staller: ten snapshots of the big run through the standby, on one connection, never
    // read (its own windows take ~5 MB; the rest waits upstream).
    let staller_channel = dagmesh_integration_tests::channel(&standby.url()).await?;
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut runs = RunServiceClient::new(staller_channel.clone())
            .max_decoding_message_size(64 * 1024 * 1024);
        stalled.push(
            runs.watch_run(WatchRunRequest {
                run_id: big.run_id.clone(),
                after_seq: None,
            })
            .await?,
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Everyone else, through the same standby: a unary call, a submit and the worker's task.
    let others = Client::connect(standby.url()).await?;
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        RunServiceClient::new(dagmesh_integration_tests::channel(&standby.url()).await?)
            .list_runs(ListRunsRequest::default())
            .await?;
        let small = others.submit(SubmitRun::workflow("small")).await?;
        anyhow::Ok(wait_for_run(&others, &small.run_id).await?)
    })
    .await
    .context("calls through the standby stalled behind a client that stopped reading")??;
    assert_succeeded(&answered);
    drop((stalled, worker, driver, standby, metastore));
    Ok(())
}

/// The addresses of the replicas that hold executor partitions, with how many each holds.
async fn partition_owners(
    store: &Arc<dyn MetadataStore>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut owners = BTreeMap::new();
    for lease in store.list_live_leases("executor/p-").await? {
        if let Some(address) = holder_address(&lease.holder) {
            *owners.entry(address.to_owned()).or_default() += 1;
        }
    }
    Ok(owners)
}

/// Executors that share the partitions (`--share-partitions`): each drives its rendezvous share
/// of the runs, the one that holds the executor lease hands every task to the workers (whichever
/// replica they connected to), and any replica answers calls about any run by forwarding them
/// to the run's owner. When the dispatcher is SIGKILLed, another replica takes over dispatching
/// and the dead one's partitions, and every run still completes with each step run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_that_share_partitions_each_drive_a_share_and_one_dispatches()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let database = format!("sqlite://{}", dir.path().join("meta.db").display());
    let (metastore_addr, metastore) = start_metastore(&database, dir.path()).await?;
    let (mut replicas, store) = start_sharing(&database, &metastore_addr, &[], dir.path()).await?;
    let dispatcher = lease_holder(&store).await?;

    let clients: Vec<Client> = replicas
        .iter()
        .map(|replica| Client::connect_lazy(replica.url()))
        .collect::<Result<_, _>>()?;
    clients[0].apply_workflow(chain("chain", 0)).await?;
    clients[0].apply_workflow(chain("slow", 60_000)).await?;
    // Workers on the two replicas that do not dispatch: their streams go to the dispatcher.
    let executed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for replica in replicas.iter().filter(|r| r.url() != dispatcher) {
        workers.push(
            dagmesh_integration_tests::spawn_worker(doubling_worker(
                replica.url(),
                executed.clone(),
            ))
            .await?,
        );
    }

    // Keyed runs land in their key's partition, whoever drives it; unkeyed ones on the replica
    // asked. Submitted through every replica.
    let mut ids = Vec::new();
    for n in 0..30 {
        let mut run = SubmitRun::workflow("chain").inputs(json!({"x": n}));
        if n % 2 == 0 {
            run = run.idempotency_key(format!("shared-{n}"));
        }
        ids.push(clients[n % 3].submit(run).await?.run_id);
    }
    let mut drivers = BTreeMap::new();
    let owners = partition_lease_holders(&store).await?;
    for (n, id) in ids.iter().enumerate() {
        let run = wait_for_run(&clients[(n + 1) % 3], id).await?;
        assert_succeeded(&run);
        ensure!(
            run.steps[2].outputs == Some(dagmesh_proto::json::to_struct(&json!({"value": 8 * n}))),
            "run {id}: {:?}",
            run.steps[2].outputs
        );
        *drivers
            .entry(owners.get(&run.partition).cloned().unwrap_or_default())
            .or_insert(0) += 1;
    }
    ensure!(
        drivers.len() == 3,
        "the runs were not driven by every replica: {drivers:?}"
    );
    assert_eq!(executed.load(Ordering::Relaxed), 90);

    // A call about a run goes to the replica that drives it, whichever replica is asked.
    let slow = clients[0]
        .submit(
            SubmitRun::workflow("slow")
                .inputs(json!({"x": 1}))
                .idempotency_key("slow"),
        )
        .await?;
    let driver = owners
        .get(&slow.partition)
        .context("the slow run's partition has no owner")?;
    let other = replicas
        .iter()
        .position(|r| r.url() != *driver)
        .context("no other replica")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = clients[0].get_run(&slow.run_id).await?;
    ensure!(now.state() == RunState::Running, "the slow run: {now:?}");
    let cancelled = clients[other].cancel_run(&slow.run_id, "enough").await?;
    assert_eq!(cancelled.state(), RunState::Cancelled, "{cancelled:?}");

    // An event reaches the waiting steps of every replica's runs, whichever replica gets it.
    let waits = dagmesh_spec::parse_workflow(
        r#"
name: waits
steps:
  - {id: upload, wait_for: {topic: uploads, filter: "event.size > 0", timeout: 1h}}
  - {id: use, task: double@^1, needs: [upload], inputs: {x: upload.size}}
"#,
        dagmesh_spec::Format::Yaml,
    )?;
    clients[0].apply_workflow(waits).await?;
    let mut waiting = Vec::new();
    for n in 0..9 {
        let run = SubmitRun::workflow("waits").idempotency_key(format!("waits-{n}"));
        waiting.push(clients[n % 3].submit(run).await?.run_id);
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for id in &waiting {
        loop {
            let run = clients[0].get_run(id).await?;
            if run
                .steps
                .iter()
                .any(|s| s.step_id == "upload" && !s.waiting_for.is_empty())
            {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "run {id} never waited: {run:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let resumed =
        RunServiceClient::new(dagmesh_integration_tests::channel(&replicas[1].url()).await?)
            .deliver_event(DeliverEventRequest {
                topic: "uploads".into(),
                payload: Some(dagmesh_proto::json::to_struct(&json!({"size": 5}))),
            })
            .await?
            .into_inner()
            .resumed;
    assert_eq!(resumed.len(), 9, "{resumed:?}");
    for id in &waiting {
        let run = wait_for_run(&clients[2], id).await?;
        assert_succeeded(&run);
    }

    // The dispatcher dies: another replica dispatches, the dead one's partitions move, and the
    // same clients and workers go on.
    let victim = replicas
        .iter()
        .position(|r| r.url() == dispatcher)
        .context("the dispatcher is none of ours")?;
    replicas[victim].child()?.sigkill()?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let owners = partition_owners(&store).await?;
        if !owners.contains_key(&dispatcher) && owners.values().sum::<usize>() == 256 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the dead replica's partitions did not move: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(lease_holder(&store).await? != dispatcher);
    let alive: Vec<Client> = (0..3)
        .filter(|n| *n != victim)
        .map(|n| clients[n].clone())
        .collect();
    let mut after = Vec::new();
    for n in 0..10 {
        let run = SubmitRun::workflow("chain")
            .inputs(json!({"x": n}))
            .idempotency_key(format!("after-{n}"));
        after.push(submit_retrying(&alive, n, run).await?.run_id);
    }
    for id in &after {
        let run = wait_ended(&alive[0], id).await?;
        assert_succeeded(&run);
    }
    // Each step ran once, and ended once in the stored log.
    assert_eq!(executed.load(Ordering::Relaxed), 129);
    for id in ids.iter().chain(&after) {
        each_step_succeeded_once(id, &stored_events(&store, id).await?)?;
    }
    drop((workers, replicas, metastore));
    Ok(())
}

/// Three replicas with `--share-partitions` (and `extra` arguments), serving once every
/// partition is owned and each replica owns a share; with a store client of `database`.
async fn start_sharing(
    database: &str,
    metastore_addr: &str,
    extra: &[&str],
    dir: &Path,
) -> anyhow::Result<(Vec<Replica>, Arc<dyn MetadataStore>)> {
    let mut replicas = Vec::new();
    for n in 1..=3 {
        let mut replica = Replica::new(&format!("executor-{n}"), metastore_addr, "1s")?;
        replica.args.push("--share-partitions".into());
        replica
            .args
            .extend(extra.iter().map(|arg| (*arg).to_owned()));
        replica.start(dir).await?;
        replicas.push(replica);
    }
    let store = dagmesh_metastore::connect(database).await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let owners = partition_owners(&store).await?;
        if owners.len() == 3 && owners.values().sum::<usize>() == 256 {
            return Ok((replicas, store));
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the partitions did not spread over the replicas: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Partition → the address of the replica that holds its lease.
async fn partition_lease_holders(
    store: &Arc<dyn MetadataStore>,
) -> anyhow::Result<HashMap<u32, String>> {
    let mut holders = HashMap::new();
    for lease in store.list_live_leases("executor/p-").await? {
        let partition = lease.name.trim_start_matches("executor/p-").parse()?;
        if let Some(address) = holder_address(&lease.holder) {
            holders.insert(partition, address.to_owned());
        }
    }
    Ok(holders)
}

/// A run limit (`--limits`) counts the runs of every replica that shares the partitions: the
/// dispatcher admits them all, so three replicas never run more than the limit together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_limit_counts_the_runs_of_every_replica_that_shares_the_partitions()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let limits = dir.path().join("limits.yaml");
    std::fs::write(
        &limits,
        "runs:\n  - name: slowish\n    workflow: slowish\n    max: 2\n",
    )?;
    let database = format!("sqlite://{}", dir.path().join("meta.db").display());
    let (metastore_addr, metastore) = start_metastore(&database, dir.path()).await?;
    let limits = limits.display().to_string();
    let (replicas, store) = start_sharing(
        &database,
        &metastore_addr,
        &["--limits", &limits],
        dir.path(),
    )
    .await?;
    let clients: Vec<Client> = replicas
        .iter()
        .map(|replica| Client::connect_lazy(replica.url()))
        .collect::<Result<_, _>>()?;
    clients[0]
        .apply_workflow(workflow(
            "slowish",
            vec![step(
                "only",
                "double@^1",
                &[],
                &[("x", "inputs.x"), ("ms", "300")],
            )],
        ))
        .await?;
    let executed = Arc::new(AtomicU64::new(0));
    let _worker = dagmesh_integration_tests::spawn_worker(doubling_worker(
        replicas[1].url(),
        executed.clone(),
    ))
    .await?;
    let mut ids = Vec::new();
    for n in 0..12 {
        let run = SubmitRun::workflow("slowish")
            .inputs(json!({"x": n}))
            .idempotency_key(format!("limited-{n}"));
        ids.push(clients[n % 3].submit(run).await?.run_id);
    }
    // Never more than two RUNNING at once, across the replicas; all of them finish.
    let mut most = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let runs = store
            .list_runs(&dagmesh_proto::v1::ListRunsRequest {
                workflow: "slowish".into(),
                page_size: 100,
                ..Default::default()
            })
            .await?
            .runs;
        let running = runs
            .iter()
            .filter(|run| run.state() == RunState::Running)
            .count();
        ensure!(running <= 2, "{running} runs RUNNING under a limit of 2");
        most = most.max(running);
        if runs.len() == 12 && runs.iter().all(|run| run.state() == RunState::Succeeded) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the limited runs did not all finish"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(most, 2, "the limit's room was never used in full");
    assert_eq!(executed.load(Ordering::Relaxed), 12);
    // The runs were driven by more than one replica.
    let owners = partition_lease_holders(&store).await?;
    let mut drivers = std::collections::BTreeSet::new();
    for id in &ids {
        let run = store.get_run(id).await?;
        drivers.extend(owners.get(&run.partition).cloned());
    }
    ensure!(
        drivers.len() >= 2,
        "one replica drove every run: {drivers:?}"
    );
    drop((replicas, metastore));
    Ok(())
}

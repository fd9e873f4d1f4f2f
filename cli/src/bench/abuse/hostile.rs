//! The hostile clients, one per [`Abuse`], written from the proto: raw worker streams
//! ([`RawWorker`]), raw `RunService`/`ClusterService` calls and raw TCP. Each runs until its
//! phase ends (or its own count limit) and says what it did and what the server answered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dagmesh_proto::json::to_struct;
use dagmesh_proto::limits::MAX_LOG_LINE_BYTES;
use dagmesh_proto::v1::{
    self as pb, GetRunRequest, ListRunsRequest, ListWorkersRequest, RunState, StepSpec,
    SubmitRunRequest, WorkflowSpec, cluster_service_client::ClusterServiceClient,
    run_service_client::RunServiceClient, server_message, submit_run_request, worker_message,
};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::raw::RawWorker;
use super::{Abuse, Target, VICTIM_WORKFLOW};

type Stop = watch::Receiver<bool>;
type Runs = RunServiceClient<Channel>;

/// Runs one abuse until `stop` turns true; returns what it achieved, in a line.
pub(super) async fn attack(abuse: Abuse, target: Target, stop: Stop) -> anyhow::Result<String> {
    match abuse {
        Abuse::ProgressFlood => progress_flood(&target, &stop).await,
        Abuse::LogFlood => log_flood(&target, &stop).await,
        Abuse::ForgedResults => forged_results(&target, &stop).await,
        Abuse::OversizedOutput => oversized_output(&target, &stop).await,
        Abuse::DeepPayloads => deep_payloads(&target, &stop).await,
        Abuse::ExpressionBomb => expression_bomb(&target, &stop).await,
        Abuse::HugeWorkflow => huge_workflow(&target, &stop).await,
        Abuse::Garbage => garbage(&target, &stop).await,
        Abuse::Takeover => takeover(&target, &stop).await,
    }
}

fn stopped(stop: &Stop) -> bool {
    *stop.borrow()
}

/// The task type only hostile raw workers offer, so that victim steps never reach them.
const HOSTILE_TASK: &str = "hostile";

/// A one-step workflow for the hostile workers.
fn hostile_spec() -> WorkflowSpec {
    WorkflowSpec {
        name: "bench-hostile".into(),
        steps: vec![StepSpec {
            id: "h".into(),
            task: format!("{HOSTILE_TASK}@^1"),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn inline(spec: WorkflowSpec) -> Option<submit_run_request::WorkflowRef> {
    Some(submit_run_request::WorkflowRef::Spec(spec))
}

async fn submit_hostile(runs: &mut Runs) -> anyhow::Result<String> {
    let request = SubmitRunRequest {
        workflow_ref: inline(hostile_spec()),
        ..Default::default()
    };
    let run = runs.submit_run(request).await?.into_inner().run;
    Ok(run.context("SubmitRun answered no run")?.run_id)
}

/// The next task for `worker`: one left in the queue by an earlier attempt if one comes within
/// `wait`, otherwise a hostile run is submitted for it. Sends Started.
async fn next_task(
    worker: &mut RawWorker,
    runs: &mut Runs,
    wait: Duration,
) -> anyhow::Result<pb::Assign> {
    let assign = match worker.assign(wait).await? {
        Some(assign) => assign,
        None => {
            submit_hostile(runs).await?;
            worker
                .assign(Duration::from_secs(10))
                .await?
                .context("no Assign within 10 s of submitting a hostile run")?
        }
    };
    worker
        .send(worker_message::Message::Started(pb::TaskStarted {
            task_id: assign.task_id.clone(),
            attempt: assign.attempt,
        }))
        .await;
    Ok(assign)
}

/// Completes `assign` with empty outputs; returns the outcome the server recorded.
async fn complete(worker: &mut RawWorker, assign: &pb::Assign) -> String {
    let completed = worker_message::Message::Completed(pb::TaskCompleted {
        task_id: assign.task_id.clone(),
        attempt: assign.attempt,
        outputs: Some(to_struct(&json!({}))),
    });
    if !worker.send(completed).await {
        return "stream gone".into();
    }
    match worker
        .recorded(&assign.task_id, assign.attempt, Duration::from_secs(5))
        .await
    {
        Ok(Some(recorded)) => format!("{:?}", recorded.outcome()),
        Ok(None) => "no Recorded in 5 s".into(),
        Err(status) => format!("stream ended {:?}", status.code()),
    }
}

fn status_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// "A×3, B×1".
fn tally(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
    parts.join(", ")
}

/// The head of a server message, for the report.
fn head(text: &str) -> String {
    let mut end = text.len().min(140);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < text.len() { "…" } else { "" };
    format!("\"{}{cut}\"", &text[..end])
}

fn per_second(count: u64, since: Instant) -> u64 {
    (count as f64 / since.elapsed().as_secs_f64().max(1e-3)) as u64
}

async fn progress_flood(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let channel = target.channel().await?;
    let mut runs = RunServiceClient::new(channel.clone());
    let hello = RawWorker::hello("hostile-progress", HOSTILE_TASK, 1);
    let mut worker = RawWorker::connect(channel, hello).await?;
    let assign = next_task(&mut worker, &mut runs, Duration::from_millis(200)).await?;
    let started = Instant::now();
    let mut sent = 0u64;
    while !stopped(stop) && sent < 20_000_000 {
        let progress = worker_message::Message::Progress(pb::TaskProgress {
            task_id: assign.task_id.clone(),
            attempt: assign.attempt,
            fraction: (sent % 1000) as f32 / 1000.0,
            message: "flooding".into(),
            metrics: Default::default(),
        });
        if !worker.send(progress).await {
            break;
        }
        sent += 1;
    }
    let rate = per_second(sent, started);
    let outcome = complete(&mut worker, &assign).await;
    let run = runs
        .get_run(GetRunRequest {
            run_id: assign.run_id.clone(),
        })
        .await?
        .into_inner();
    Ok(format!(
        "{sent} Progress on one task ({rate}/s); the run logged {} events; result {outcome}",
        run.last_seq
    ))
}

async fn log_flood(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let channel = target.channel().await?;
    let mut runs = RunServiceClient::new(channel.clone());
    let hello = RawWorker::hello("hostile-logs", HOSTILE_TASK, 1);
    let mut worker = RawWorker::connect(channel, hello).await?;
    // As many maximum-size lines as fit under the stream limit (payload limit ×2 + 1 MiB).
    let limit = worker.welcome.max_payload_bytes as usize * 2 + (1 << 20);
    let per_message = ((limit - (64 << 10)) / (MAX_LOG_LINE_BYTES + 32)).min(1000);
    let line = pb::LogLine {
        at: None,
        level: "info".into(),
        text: "x".repeat(MAX_LOG_LINE_BYTES),
    };
    let lines = vec![line; per_message];
    let message_bytes = (per_message * MAX_LOG_LINE_BYTES) as u64;
    let started = Instant::now();
    let (mut sent, mut attempts) = (0u64, 0u64);
    let mut outcomes = BTreeMap::new();
    'attempts: while !stopped(stop) && attempts < 200 {
        let assign = next_task(&mut worker, &mut runs, Duration::from_millis(200)).await?;
        attempts += 1;
        // 32 MiB per attempt, 32 times the per-attempt cap.
        let mut this_attempt = 0u64;
        while this_attempt < 32 << 20 {
            if stopped(stop) {
                break;
            }
            let log = worker_message::Message::Log(pb::TaskLog {
                task_id: assign.task_id.clone(),
                attempt: assign.attempt,
                lines: lines.clone(),
            });
            if !worker.send(log).await {
                break 'attempts;
            }
            this_attempt += message_bytes;
            sent += message_bytes;
        }
        *outcomes
            .entry(complete(&mut worker, &assign).await)
            .or_insert(0) += 1;
    }
    Ok(format!(
        "{} MiB of 16 KiB log lines ({} MiB/s, {per_message} lines a message) over {attempts} \
         attempts; results {}",
        sent >> 20,
        per_second(sent, started) >> 20,
        tally(&outcomes)
    ))
}

async fn forged_results(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let channel = target.channel().await?;
    let hello = RawWorker::hello("hostile-forger", HOSTILE_TASK, 1);
    let worker = RawWorker::connect(channel.clone(), hello).await?;
    let (sender, mut replies) = worker.split();
    let answers: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let answered = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let (answers, answered) = (answers.clone(), answered.clone());
        async move {
            while let Ok(Some(message)) = replies.message().await {
                if let Some(server_message::Message::Recorded(recorded)) = message.message {
                    let outcome = format!("{:?}", recorded.outcome());
                    *answers.lock().expect("answers").entry(outcome).or_insert(0) += 1;
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let mut cluster = ClusterServiceClient::new(channel.clone());
    let mut runs = RunServiceClient::new(channel);
    let (mut sent, mut rounds) = (0u64, 0u64);
    while !stopped(stop) && sent < 500_000 {
        rounds += 1;
        // Tasks other workers hold, at their current attempt...
        let mut targets: Vec<(String, u32)> = Vec::new();
        let workers = cluster.list_workers(ListWorkersRequest {}).await?;
        for info in workers.into_inner().workers {
            if info.instance_id == "hostile-forger" {
                continue;
            }
            for task in info.tasks {
                if let Some((task_id, attempt)) = task.rsplit_once('#') {
                    targets.push((task_id.into(), attempt.parse().unwrap_or(1)));
                }
            }
        }
        // ...and the steps of running runs, dispatched or not yet.
        let running = runs
            .list_runs(ListRunsRequest {
                workflow: VICTIM_WORKFLOW.into(),
                state: RunState::Running as i32,
                page_size: 100,
                ..Default::default()
            })
            .await?;
        for run in running.into_inner().runs {
            targets.extend((0..5).map(|i| (format!("{}/s{i}", run.run_id), 1)));
        }
        if targets.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        for (i, (task_id, attempt)) in targets.into_iter().enumerate() {
            let forged = if (i as u64 + rounds).is_multiple_of(2) {
                worker_message::Message::Completed(pb::TaskCompleted {
                    task_id,
                    attempt,
                    outputs: Some(to_struct(&json!({"forged": true}))),
                })
            } else {
                worker_message::Message::Failed(pb::TaskFailed {
                    task_id,
                    attempt,
                    error: "forged".into(),
                    retryable: false,
                })
            };
            if !sender.send(forged).await {
                anyhow::bail!("the server ended the forger's stream after {sent} results");
            }
            sent += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while answered.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sender);
    reader.abort();
    let answers = answers.lock().expect("answers").clone();
    Ok(format!(
        "{sent} forged Completed/Failed for others' tasks in {rounds} rounds; answers: {} \
         ({} unanswered)",
        tally(&answers),
        sent.saturating_sub(answered.load(Ordering::Relaxed))
    ))
}

async fn oversized_output(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let mut runs = RunServiceClient::new(target.channel().await?);
    let mut blob = None;
    let mut ends = BTreeMap::new();
    let mut first_refusal = None;
    let mut run_ids = Vec::new();
    let mut sent = 0u64;
    let mut size = 0;
    // After the phase, the run in hand is still driven to its end (a few more attempts).
    let mut extra = 0;
    while sent < 100 && extra < 8 {
        if stopped(stop) {
            extra += 1;
        }
        // A new connection each time, as a worker that reconnects after each refusal.
        let hello = RawWorker::hello(&format!("hostile-big-{sent}"), HOSTILE_TASK, 1);
        let mut worker = RawWorker::connect(target.channel().await?, hello).await?;
        // Over the stream limit: payload limit ×2 + 1 MiB, and 1 MiB more.
        size = worker.welcome.max_payload_bytes as usize * 2 + (2 << 20);
        let outputs = blob
            .get_or_insert_with(|| to_struct(&json!({ "blob": "x".repeat(size) })))
            .clone();
        // The attempt the last connection lost comes back after the reconnect grace (1 s by
        // default): take it again, so that each run is driven to the lost-attempt cap.
        let wait = Duration::from_millis(2500);
        let assign = if extra == 0 {
            next_task(&mut worker, &mut runs, wait).await?
        } else {
            match worker.assign(wait).await? {
                Some(assign) => assign,
                None => break,
            }
        };
        if extra > 0 {
            let started = worker_message::Message::Started(pb::TaskStarted {
                task_id: assign.task_id.clone(),
                attempt: assign.attempt,
            });
            worker.send(started).await;
        }
        if !run_ids.contains(&assign.run_id) {
            run_ids.push(assign.run_id.clone());
        }
        let completed = worker_message::Message::Completed(pb::TaskCompleted {
            task_id: assign.task_id.clone(),
            attempt: assign.attempt,
            outputs: Some(outputs),
        });
        worker.send(completed).await;
        sent += 1;
        let end = loop {
            match worker.next(Duration::from_secs(10)).await {
                Ok(Some(server_message::Message::Recorded(recorded))) => {
                    break format!("Recorded {:?}", recorded.outcome());
                }
                Ok(Some(_)) => continue,
                Ok(None) => break "no answer in 10 s".into(),
                Err(status) => {
                    first_refusal.get_or_insert_with(|| head(status.message()));
                    break status_name(&status);
                }
            }
        };
        *ends.entry(end).or_insert(0) += 1;
    }
    // The hostile runs should fail, not loop: give them the reconnect grace to do so.
    let mut states = BTreeMap::new();
    let mut run_error = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for run_id in &run_ids {
        let state =
            match tokio::time::timeout_at(deadline, target.executor.wait_for_run(run_id)).await {
                Ok(Ok(run)) => {
                    if !run.error.is_empty() {
                        run_error.get_or_insert_with(|| head(&run.error));
                    }
                    format!("{:?}", run.state())
                }
                Ok(Err(error)) => format!("error {error}"),
                Err(_) => "still going".into(),
            };
        *states.entry(state).or_insert(0) += 1;
    }
    Ok(format!(
        "{sent} outputs of {} MiB on {} runs: streams ended {}; first reason {}; hostile runs: \
         {}; first run error {}",
        size >> 20,
        run_ids.len(),
        tally(&ends),
        first_refusal.unwrap_or_default(),
        tally(&states),
        run_error.unwrap_or_default()
    ))
}

/// Submits from `loops` concurrent loops until stopped or `limit` submits in all; each submit
/// is made by `request` and its outcome tallied by `outcome`.
async fn submit_loops(
    runs: Runs,
    loops: usize,
    limit: u64,
    stop: &Stop,
    request: impl Fn() -> SubmitRunRequest,
) -> (u64, BTreeMap<String, u64>, Option<String>, Vec<Duration>) {
    let count = AtomicU64::new(0);
    let results = std::sync::Mutex::new((BTreeMap::new(), None, Vec::new()));
    let one_loop = |mut runs: Runs| {
        let (count, results, request) = (&count, &results, &request);
        async move {
            while !stopped(stop) && count.fetch_add(1, Ordering::Relaxed) < limit {
                let started = Instant::now();
                let outcome = match runs.submit_run(request()).await {
                    Ok(_) => "accepted".to_owned(),
                    Err(status) => {
                        let mut results = results.lock().expect("results");
                        results.1.get_or_insert_with(|| head(status.message()));
                        status_name(&status)
                    }
                };
                let mut results = results.lock().expect("results");
                *results.0.entry(outcome).or_insert(0) += 1;
                results.2.push(started.elapsed());
            }
        }
    };
    futures::future::join_all((0..loops).map(|_| one_loop(runs.clone()))).await;
    let (counts, first, times) = results.into_inner().expect("results");
    (counts.values().sum(), counts, first, times)
}

fn slowest_ms(times: &[Duration]) -> u128 {
    times.iter().max().copied().unwrap_or_default().as_millis()
}

async fn deep_payloads(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let runs = RunServiceClient::new(target.channel().await?);
    let mut nested = json!(1);
    for _ in 0..30 {
        nested = json!({ "a": nested });
    }
    let inputs = to_struct(&nested);
    let (sent, counts, first, times) = submit_loops(runs, 2, 200_000, stop, || SubmitRunRequest {
        workflow_ref: inline(hostile_spec()),
        inputs: Some(inputs.clone()),
        ..Default::default()
    })
    .await;
    Ok(format!(
        "{sent} submits with inputs nested 30 levels: {}; slowest answer {} ms; first reason {}",
        tally(&counts),
        slowest_ms(&times),
        first.unwrap_or_default()
    ))
}

async fn expression_bomb(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let mut runs = RunServiceClient::new(target.channel().await?);
    let spec = WorkflowSpec {
        name: "bench-bomb".into(),
        steps: vec![StepSpec {
            id: "b".into(),
            task: "noop@^1".into(),
            inputs: [(
                "x".to_owned(),
                "inputs.xs.map(a, inputs.xs.map(b, inputs.xs))".to_owned(),
            )]
            .into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let inputs = to_struct(&json!({ "xs": (0..2000).collect::<Vec<u32>>() }));
    let mut outcomes = BTreeMap::new();
    let mut first_reason = None;
    let mut times = Vec::new();
    while !stopped(stop) && times.len() < 1000 {
        let started = Instant::now();
        let request = SubmitRunRequest {
            workflow_ref: inline(spec.clone()),
            inputs: Some(inputs.clone()),
            ..Default::default()
        };
        let outcome = match runs.submit_run(request).await {
            Err(status) => {
                first_reason.get_or_insert_with(|| head(status.message()));
                format!("refused {}", status_name(&status))
            }
            Ok(response) => {
                let run_id = response.into_inner().run.map(|r| r.run_id);
                let run_id = run_id.unwrap_or_default();
                let wait = target.executor.wait_for_run(&run_id);
                match tokio::time::timeout(Duration::from_secs(10), wait).await {
                    Ok(Ok(run)) => {
                        if !run.error.is_empty() {
                            first_reason.get_or_insert_with(|| head(&run.error));
                        }
                        format!("run {:?}", run.state())
                    }
                    Ok(Err(error)) => format!("error {error}"),
                    Err(_) => {
                        let _ = target.executor.cancel(&run_id, "bomb still going").await;
                        "still going after 10 s".into()
                    }
                }
            }
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
        times.push(started.elapsed());
    }
    Ok(format!(
        "{} bombs (2,000² × 2,000 elements): {}; slowest to its end {} ms; first reason {}",
        times.len(),
        tally(&outcomes),
        slowest_ms(&times),
        first_reason.unwrap_or_default()
    ))
}

async fn huge_workflow(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let runs = RunServiceClient::new(target.channel().await?);
    // A task no worker offers: the cost measured is submitting (validating, compiling, caching,
    // storing 10,000 steps), not running them. The runs are cancelled after the phase.
    let mut spec = super::super::chain_spec("bench-huge", 10_000);
    for step in &mut spec.steps {
        step.task = "unserved@^1".into();
    }
    // New content each time, so that nothing is served from a cache.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let counter = AtomicU64::new(0);
    let (sent, counts, first, mut times) = submit_loops(runs, 1, 100, stop, || {
        let mut spec = spec.clone();
        let n = counter.fetch_add(1, Ordering::Relaxed);
        spec.name = format!("bench-huge-{nonce}-{n}");
        SubmitRunRequest {
            workflow_ref: inline(spec),
            ..Default::default()
        }
    })
    .await;
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    Ok(format!(
        "{sent} new 10,000-step chain workflows submitted: {}; submit p50 {} ms, slowest {} ms{}",
        tally(&counts),
        median.as_millis(),
        slowest_ms(&times),
        first.map_or(String::new(), |f| format!("; first refusal {f}"))
    ))
}

/// xorshift64: random enough bytes for garbage, without a dependency.
fn garbage_bytes(state: &mut u64, buffer: &mut [u8]) {
    for chunk in buffer.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

async fn garbage(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    #[derive(Default)]
    struct Counts {
        connections: AtomicU64,
        bytes: AtomicU64,
        closed: AtomicU64,
        reset: AtomicU64,
        open: AtomicU64,
    }
    let counts = Counts::default();
    let addr = target.addr;
    // Writers: connect, write up to 64 KiB of random bytes, see what the server does.
    let writer = |seed: u64| {
        let counts = &counts;
        async move {
            let mut state = seed | 1;
            let mut buffer = [0u8; 8192];
            while !stopped(stop) && counts.connections.load(Ordering::Relaxed) < 20_000 {
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                counts.connections.fetch_add(1, Ordering::Relaxed);
                for _ in 0..8 {
                    garbage_bytes(&mut state, &mut buffer);
                    if stream.write_all(&buffer).await.is_err() {
                        break;
                    }
                    counts
                        .bytes
                        .fetch_add(buffer.len() as u64, Ordering::Relaxed);
                }
                let mut sink = [0u8; 4096];
                let end = tokio::time::timeout(Duration::from_secs(1), async {
                    loop {
                        match stream.read(&mut sink).await {
                            Ok(0) => return &counts.closed,
                            Ok(_) => {}
                            Err(_) => return &counts.reset,
                        }
                    }
                })
                .await;
                end.unwrap_or(&counts.open).fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    // Idle ones: connect and go silent, half of them after the start of an HTTP/2 preface.
    let idle = async {
        let mut held = Vec::new();
        while !stopped(stop) {
            if held.len() < 256
                && let Ok(mut stream) = TcpStream::connect(addr).await
            {
                if held.len().is_multiple_of(2) {
                    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n").await;
                }
                held.push(stream);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        held
    };
    let (_, _, _, _, held) = tokio::join!(writer(1), writer(2), writer(3), writer(4), idle);
    let mut idle_closed = 0;
    for stream in &held {
        let mut sink = [0u8; 4096];
        // Whatever the server sent (a GOAWAY) is read; then end of stream means it closed.
        let closed = loop {
            match stream.try_read(&mut sink) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        idle_closed += u64::from(closed);
    }
    let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
    Ok(format!(
        "{} connections wrote {} MiB of random bytes (server closed {}, reset {}, still open \
         after 1 s {}); {} idle connections held to the end, {idle_closed} closed by the server",
        load(&counts.connections),
        load(&counts.bytes) >> 20,
        load(&counts.closed),
        load(&counts.reset),
        load(&counts.open),
        held.len(),
    ))
}

async fn takeover(target: &Target, stop: &Stop) -> anyhow::Result<String> {
    let channel = target.channel().await?;
    let workers = ClusterServiceClient::new(channel.clone())
        .list_workers(ListWorkersRequest {})
        .await?
        .into_inner()
        .workers;
    let victims: Vec<String> = workers
        .into_iter()
        .filter(|w| w.connected && w.worker_name != "hostile")
        .map(|w| w.instance_id)
        .collect();
    anyhow::ensure!(!victims.is_empty(), "no live worker to impersonate");
    let attempts = AtomicU64::new(0);
    let results = std::sync::Mutex::new((BTreeMap::new(), None));
    let one_loop = |channel: Channel| {
        let (attempts, results, victims) = (&attempts, &results, &victims);
        async move {
            while !stopped(stop) {
                let n = attempts.fetch_add(1, Ordering::Relaxed);
                if n >= 100_000 {
                    break;
                }
                let id = &victims[n as usize % victims.len()];
                let hello = pb::Hello {
                    worker_name: "bench-impostor".into(),
                    instance_id: id.clone(),
                    task_types: vec![pb::TaskTypeVersion {
                        name: "noop".into(),
                        version: "1.0.0".into(),
                    }],
                    slots: 128,
                    sdk_language: "raw".into(),
                    ..Default::default()
                };
                let outcome = match RawWorker::connect(channel.clone(), hello).await {
                    // Welcomed: this impostor now stands for a live worker. Leave at once.
                    Ok(_) => "WELCOMED".to_owned(),
                    Err(status) => {
                        let mut results = results.lock().expect("results");
                        results.1.get_or_insert_with(|| head(status.message()));
                        status_name(&status)
                    }
                };
                *results
                    .lock()
                    .expect("results")
                    .0
                    .entry(outcome)
                    .or_insert(0) += 1;
            }
        }
    };
    futures::future::join_all((0..2).map(|_| one_loop(channel.clone()))).await;
    let (counts, first) = results.into_inner().expect("results");
    Ok(format!(
        "{} Hellos with the instance ids of {} live workers: {}; first refusal {}",
        counts.values().sum::<u64>(),
        victims.len(),
        tally(&counts),
        first.unwrap_or_default()
    ))
}

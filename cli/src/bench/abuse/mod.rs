//! `dagmesh bench abuse`: what a user of a shared mesh notices while someone attacks it.
//!
//! A **victim** keeps [`VICTIM_IN_FLIGHT`] small chain runs in flight for the whole scenario
//! (submitted over gRPC like a backend would, each timed from submit to done). The scenario goes
//! through phases of `--phase-seconds`: `baseline`, then one abuse at a time, each by a hostile
//! client written from the proto ([`hostile`]), then `after` (no abuse, to see what stays).
//! Each phase reports the victim runs submitted during it (count, failures, p50, p99), the
//! resident memory at its end and the highest sampled during it, the database size, and what
//! the abuse achieved. Between phases the hostile runs are cancelled and the mesh settles; victim
//! runs submitted then are not counted.
//!
//! Everything is bounded: each abuse stops at the end of its phase or at its own count limit,
//! is given a grace to wind down and is aborted after it; victim runs time out.

mod hostile;
mod raw;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dagmesh_executor::Executor;
use dagmesh_proto::v1::{
    ListRunsRequest, RunState, SubmitRunRequest, run_service_client::RunServiceClient,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{Bench, BenchArgs, Report, chain_spec, percentile, print_report, resident_mb};
use crate::commands::OutputFormat;

/// Victim runs kept in flight at once.
const VICTIM_IN_FLIGHT: usize = 4;
/// A victim run that takes longer than this counts as failed and the loop moves on.
const VICTIM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an abuse may take to wind down after its phase before it is aborted.
const ABUSE_GRACE: Duration = Duration::from_secs(10);
/// Pause between phases, after the hostile runs are cancelled.
const SETTLE: Duration = Duration::from_secs(1);
/// The victim's workflow.
const VICTIM_WORKFLOW: &str = "bench-victim";
/// No phase: victim runs submitted between phases are not counted.
const BETWEEN: usize = usize::MAX;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abuse {
    /// A raw worker holding a task sends Progress as fast as it can.
    ProgressFlood,
    /// A raw worker sends messages of maximum-size log lines, a new attempt every 32 MiB.
    LogFlood,
    /// A raw worker sends Completed/Failed for tasks it does not hold (found with ListWorkers
    /// and ListRuns).
    ForgedResults,
    /// A raw worker answers each task with outputs over the stream limit, reconnecting each time.
    OversizedOutput,
    /// Submits with inputs nested 30 levels.
    DeepPayloads,
    /// Submits a workflow whose step input is a nested comprehension over 2,000 elements.
    ExpressionBomb,
    /// Submits a new 10,000-step chain workflow each time.
    HugeWorkflow,
    /// TCP connections writing random bytes, and idle half-open ones held.
    Garbage,
    /// Hello with the instance id of a live worker.
    Takeover,
}

impl Abuse {
    const ALL: [Self; 9] = [
        Self::ProgressFlood,
        Self::LogFlood,
        Self::ForgedResults,
        Self::OversizedOutput,
        Self::DeepPayloads,
        Self::ExpressionBomb,
        Self::HugeWorkflow,
        Self::Garbage,
        Self::Takeover,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::ProgressFlood => "progress-flood",
            Self::LogFlood => "log-flood",
            Self::ForgedResults => "forged-results",
            Self::OversizedOutput => "oversized-output",
            Self::DeepPayloads => "deep-payloads",
            Self::ExpressionBomb => "expression-bomb",
            Self::HugeWorkflow => "huge-workflow",
            Self::Garbage => "garbage",
            Self::Takeover => "takeover",
        }
    }
}

/// What the hostile clients aim at: the mesh's address, and the in-process executor, used only to
/// observe (wait for a run's end), never to attack.
#[derive(Clone)]
struct Target {
    url: String,
    addr: std::net::SocketAddr,
    executor: Executor,
}

impl Target {
    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(tonic::transport::Endpoint::from_shared(self.url.clone())?
            .connect()
            .await?)
    }
}

/// One victim run: the phase it was submitted in, its submit-to-done time, and whether it
/// succeeded.
struct Sample {
    phase: usize,
    latency: Duration,
    succeeded: bool,
}

/// What was measured at the end of a phase; latencies are summarised once the victim stopped.
struct PhaseEnd {
    name: &'static str,
    wall: Duration,
    rss_mb: Option<f64>,
    rss_peak_mb: Option<f64>,
    db_mb: Option<f64>,
    achieved: Option<String>,
}

pub(super) async fn abuse(args: &BenchArgs, output: OutputFormat) -> anyhow::Result<()> {
    let abuses = if args.abuse.is_empty() {
        Abuse::ALL.to_vec()
    } else {
        args.abuse.clone()
    };
    let phase_length = Duration::from_secs(args.phase_seconds.max(1));
    let bench = Bench::start(args, 2, 128).await?;
    let victim_request = bench.register(chain_spec(VICTIM_WORKFLOW, 5)).await?;
    bench.run(victim_request.clone()).await?; // warm-up
    let target = Target {
        url: bench.mesh.url(),
        addr: bench.mesh.addr(),
        executor: bench.mesh.executor().clone(),
    };

    let phase = Arc::new(AtomicUsize::new(BETWEEN));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let (stop_victim, victim_stopped) = watch::channel(false);
    let victim_channel = target.channel().await?;
    let victims: Vec<_> = (0..VICTIM_IN_FLIGHT)
        .map(|_| {
            tokio::spawn(victim(
                target.executor.clone(),
                RunServiceClient::new(victim_channel.clone()),
                victim_request.clone(),
                phase.clone(),
                samples.clone(),
                victim_stopped.clone(),
            ))
        })
        .collect();
    let peak_kb = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_rss(peak_kb.clone()));

    let phases: Vec<(&'static str, Option<Abuse>)> = std::iter::once(("baseline", None))
        .chain(abuses.iter().map(|&abuse| (abuse.name(), Some(abuse))))
        .chain(std::iter::once(("after", None)))
        .collect();
    let mut ends = Vec::new();
    for (index, &(name, abuse)) in phases.iter().enumerate() {
        peak_kb.store(0, Ordering::Relaxed);
        let started = Instant::now();
        phase.store(index, Ordering::Relaxed);
        let (stop, stopped) = watch::channel(false);
        let attack =
            abuse.map(|abuse| tokio::spawn(hostile::attack(abuse, target.clone(), stopped)));
        tokio::time::sleep(phase_length).await;
        let _ = stop.send(true);
        let achieved = match attack {
            None => None,
            Some(mut attack) => Some(match tokio::time::timeout(ABUSE_GRACE, &mut attack).await {
                Ok(Ok(Ok(achieved))) => achieved,
                Ok(Ok(Err(error))) => format!("abuse error: {error:#}"),
                Ok(Err(join)) => format!("abuse panicked: {join}"),
                Err(_) => {
                    attack.abort();
                    format!("did not stop within {ABUSE_GRACE:?} of the phase end; aborted")
                }
            }),
        };
        let rss_mb = resident_mb();
        let sampled = peak_kb.load(Ordering::Relaxed) as f64 / 1024.0;
        ends.push(PhaseEnd {
            name,
            wall: started.elapsed(),
            rss_peak_mb: rss_mb.map(|rss| rss.max(sampled)),
            rss_mb,
            db_mb: bench.db_path.as_deref().map(database_mb),
            achieved,
        });
        phase.store(BETWEEN, Ordering::Relaxed);
        if abuse.is_some() {
            cancel_hostile_runs(&target).await;
        }
        tokio::time::sleep(SETTLE).await;
    }

    let _ = stop_victim.send(true);
    for victim in victims {
        if tokio::time::timeout(VICTIM_TIMEOUT + ABUSE_GRACE, victim)
            .await
            .is_err()
        {
            tracing::warn!("victim loop did not stop");
        }
    }
    sampler.abort();
    let samples = std::mem::take(&mut *samples.lock().expect("samples lock"));
    for (index, end) in ends.into_iter().enumerate() {
        print_report(output, &phase_report(index, end, &samples))?;
    }
    bench.stop().await
}

/// Submits victim runs one after the other until told to stop, recording each.
async fn victim(
    executor: Executor,
    mut client: RunServiceClient<Channel>,
    request: SubmitRunRequest,
    phase: Arc<AtomicUsize>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let submitted_in = phase.load(Ordering::Relaxed);
        let started = Instant::now();
        let outcome = tokio::time::timeout(VICTIM_TIMEOUT, async {
            let run = client.submit_run(request.clone()).await?.into_inner().run;
            let run_id = run.map(|run| run.run_id).unwrap_or_default();
            anyhow::Ok(executor.wait_for_run(&run_id).await?.state())
        })
        .await;
        let succeeded = matches!(outcome, Ok(Ok(RunState::Succeeded)));
        samples.lock().expect("samples lock").push(Sample {
            phase: submitted_in,
            latency: started.elapsed(),
            succeeded,
        });
        if !succeeded {
            tracing::warn!(?outcome, "victim run did not succeed");
            // A refused submit comes back at once: do not spin on it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Keeps the highest resident memory seen, in kB, sampled every 50 ms.
async fn sample_rss(peak_kb: Arc<AtomicU64>) {
    loop {
        if let Some(mb) = resident_mb() {
            peak_kb.fetch_max((mb * 1024.0) as u64, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cancels every run still going that is not the victim's, so that one abuse's leftovers do not
/// weigh on the next phase. Bounded: one page of each state, a deadline for all of it.
async fn cancel_hostile_runs(target: &Target) {
    let cancel = async {
        let mut client = RunServiceClient::new(target.channel().await?);
        for state in [RunState::Running, RunState::Queued] {
            let runs = client
                .list_runs(ListRunsRequest {
                    state: state as i32,
                    page_size: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .runs;
            for run in runs.iter().filter(|run| run.workflow != VICTIM_WORKFLOW) {
                let _ = target
                    .executor
                    .cancel(&run.run_id, "abuse phase over")
                    .await;
            }
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(30), cancel).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cancelling hostile runs"),
        Err(_) => tracing::warn!("cancelling hostile runs took over 30 s"),
    }
}

fn phase_report(index: usize, end: PhaseEnd, samples: &[Sample]) -> Report {
    let ours: Vec<&Sample> = samples.iter().filter(|s| s.phase == index).collect();
    let mut millis: Vec<f64> = ours
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    millis.sort_by(f64::total_cmp);
    Report {
        scenario: "abuse",
        steps: ours.len() * 5,
        wall_s: end.wall.as_secs_f64(),
        p50_ms: percentile(&millis, 0.50),
        p99_ms: percentile(&millis, 0.99),
        rss_mb: end.rss_mb,
        phase: Some(end.name),
        runs: Some(ours.len()),
        failed_runs: Some(ours.iter().filter(|s| !s.succeeded).count()),
        rss_peak_mb: end.rss_peak_mb,
        db_mb: end.db_mb,
        achieved: end.achieved,
        ..Default::default()
    }
}

/// The text form of one phase's report.
pub(super) fn text_line(phase: &str, report: &Report) -> String {
    let ms = |value: Option<f64>| value.map_or("-".into(), |v| format!("{v:.1}ms"));
    let mb = |value: Option<f64>| value.map_or("-".into(), |v| format!("{v:.1}MB"));
    format!(
        "abuse {phase:<16} wall={:<5.1}s runs={:<5} failed={:<3} p50={:<9} p99={:<9} rss={:<8} \
         peak={:<8} db={:<8} {}",
        report.wall_s,
        report.runs.unwrap_or_default(),
        report.failed_runs.unwrap_or_default(),
        ms(report.p50_ms),
        ms(report.p99_ms),
        mb(report.rss_mb),
        mb(report.rss_peak_mb),
        mb(report.db_mb),
        report.achieved.as_deref().unwrap_or(""),
    )
}

/// Size of the SQLite database with its WAL and shared memory files, in MB.
fn database_mb(path: &std::path::Path) -> f64 {
    let size = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::fs::metadata(name).map_or(0, |m| m.len())
    };
    (size("") + size("-wal") + size("-shm")) as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(phase: usize, millis: u64, succeeded: bool) -> Sample {
        Sample {
            phase,
            latency: Duration::from_millis(millis),
            succeeded,
        }
    }

    #[test]
    fn a_phase_counts_only_the_runs_submitted_during_it() {
        let mut samples: Vec<Sample> = (1..=100).map(|ms| sample(1, ms, true)).collect();
        samples.push(sample(0, 5000, true));
        samples.push(sample(BETWEEN, 9000, false));
        samples.push(sample(1, 10_000, false));
        let end = PhaseEnd {
            name: "takeover",
            wall: Duration::from_secs(5),
            rss_mb: Some(20.0),
            rss_peak_mb: Some(25.0),
            db_mb: None,
            achieved: Some("nothing".into()),
        };
        let report = phase_report(1, end, &samples);
        assert_eq!(report.runs, Some(101));
        assert_eq!(report.failed_runs, Some(1));
        assert_eq!(report.steps, 505);
        assert_eq!(report.p50_ms, Some(51.0));
        assert_eq!(report.p99_ms, Some(100.0));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["phase"], "takeover");
        assert_eq!(json["cold_start_ms"], serde_json::Value::Null);
    }

    #[test]
    fn a_phase_without_runs_has_no_percentiles() {
        let end = PhaseEnd {
            name: "garbage",
            wall: Duration::from_secs(5),
            rss_mb: None,
            rss_peak_mb: None,
            db_mb: None,
            achieved: None,
        };
        let report = phase_report(3, end, &[sample(1, 10, true)]);
        assert_eq!(
            (report.runs, report.p50_ms, report.p99_ms),
            (Some(0), None, None)
        );
    }

    #[test]
    fn other_scenarios_keep_their_json_fields() {
        let json = serde_json::to_string(&Report {
            scenario: "chain",
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"scenario":"chain","secure":false,"metrics":false,"steps":0,"wall_s":0.0,"per_step_ms":null,"steps_per_s":null,"p50_ms":null,"p99_ms":null,"rss_mb":null,"cold_start_ms":null}"#
        );
    }
}

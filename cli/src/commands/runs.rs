//! `dagmesh runs ...`: list, inspect, follow, cancel, retry and resubmit runs.

use std::process::ExitCode;
use std::time::SystemTime;

use dagmesh_api::{Caller, ExecutorApi, GrpcExecutor};
use dagmesh_proto::v1::{
    ApproveStepRequest, CancelRunRequest, GetStepLogsRequest, GetStepLogsResponse, ListRunsRequest,
    ResumeRunRequest, RetryRunRequest, Run, RunState, StepState, SubmitRunRequest,
    SuspendRunRequest, WorkflowRef, submit_run_request,
};
use futures::TryStreamExt;
use serde_json::Value;

use super::format::{self, Table};
use super::submit::{parse_input, parse_tag};
use super::{Global, OutputFormat, connect, json, print_json, run_exit_code, watch};

#[derive(clap::Subcommand, Debug)]
pub enum RunsCommand {
    /// List runs, newest first.
    List(ListArgs),
    /// Show a run and a table of its steps.
    Get {
        run_id: String,
        /// List every item of map steps (by default only the items that failed are listed;
        /// the map's line counts the rest).
        #[arg(long)]
        items: bool,
    },
    /// Print the log lines workers sent for a run's steps (all steps, or STEP and its items).
    Logs {
        run_id: String,
        /// Only this step (a map step includes its items).
        step: Option<String>,
        /// Only this attempt.
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing new lines until the run ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Follow a run live until it ends; exit 0 only if it succeeded.
    Watch {
        run_id: String,
        /// Replay the run's events after this sequence number (0: all of them) instead of
        /// starting from a snapshot.
        #[arg(long, value_name = "SEQ")]
        after_seq: Option<u64>,
        /// List the items of map steps under their map (by default a map is one line that
        /// counts its items).
        #[arg(long)]
        items: bool,
    },
    /// Cancel a run that has not ended.
    Cancel {
        run_id: String,
        /// Why; recorded as the run's error.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Approve a step that waits for an approval; it succeeds with the given values as outputs
    /// (plus `approved_by`).
    Approve {
        run_id: String,
        step_id: String,
        /// An output of the step, KEY=VALUE (repeatable); VALUE is JSON when it parses.
        #[arg(short = 'i', long = "value", value_name = "KEY=VALUE", value_parser = parse_input)]
        outputs: Vec<(String, Value)>,
        /// Kept with the approval as `comment`.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Deny a step that waits for an approval; it fails naming you and the reason.
    Deny {
        run_id: String,
        step_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Hold a running run: nothing more of it is handed to workers until `runs resume`.
    Suspend {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a suspended run go on.
    Resume { run_id: String },
    /// Re-run the failed and cancelled steps of an ended run (succeeded steps keep their
    /// outputs).
    Retry {
        run_id: String,
        /// Re-run this step and everything downstream of it too, even what succeeded (any ended
        /// run, succeeded ones included).
        #[arg(long, value_name = "STEP")]
        from: Option<String>,
        /// Follow the retried run live; exit 0 only if it succeeded.
        #[arg(long)]
        watch: bool,
    },
    /// Start a new run of the same workflow version with the same inputs, tags and priority.
    Resubmit {
        run_id: String,
        /// Reuse what can be reused: a step whose task and inputs equal those of a step that
        /// succeeded in RUN_ID takes its outputs instead of running (it shows "reused from").
        #[arg(long)]
        memoized: bool,
        /// Follow the new run live; exit 0 only if it succeeded.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only runs of this workflow (any version).
    #[arg(long, value_name = "NAME")]
    pub workflow: Option<String>,
    /// Only runs in this state.
    #[arg(long, value_enum, ignore_case = true)]
    pub state: Option<StateFilter>,
    /// Only runs carrying this tag, KEY=VALUE (repeatable: all must match).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// At most this many runs (server default 50, max 1000).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Continue a previous listing (the token it printed).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Only runs created within this long before now (e.g. `90m`, `2d`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
}

/// Run states for `runs list --state`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum StateFilter {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateFilter> for RunState {
    fn from(state: StateFilter) -> RunState {
        match state {
            StateFilter::Queued => RunState::Queued,
            StateFilter::Running => RunState::Running,
            StateFilter::Succeeded => RunState::Succeeded,
            StateFilter::Failed => RunState::Failed,
            StateFilter::Cancelled => RunState::Cancelled,
        }
    }
}

pub async fn run(global: &Global, command: RunsCommand) -> anyhow::Result<ExitCode> {
    let channel = connect(global).await?;
    let api = GrpcExecutor::new(channel.clone());
    // The server knows the actor from the token.
    let caller = Caller::default();
    match command {
        RunsCommand::List(args) => {
            let request = ListRunsRequest {
                workflow: args.workflow.unwrap_or_default(),
                state: args.state.map_or(RunState::Unspecified, RunState::from) as i32,
                tags: args.tags.into_iter().collect(),
                page_size: args.limit.unwrap_or(0),
                page_token: args.page_token.unwrap_or_default(),
                created_after: args.since.map(|since| {
                    prost_types::Timestamp::from(
                        SystemTime::now()
                            .checked_sub(since)
                            .unwrap_or(SystemTime::UNIX_EPOCH),
                    )
                }),
                created_before: None,
            };
            let response = api.list_runs(request).await?;
            match global.output {
                OutputFormat::Json => print_json(&json::list_runs_response(&response)),
                OutputFormat::Text => {
                    out!("{}", runs_table(&response.runs, SystemTime::now()));
                    if !response.next_page_token.is_empty() {
                        eprintln!("more: --page-token {}", response.next_page_token);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Get { run_id, items } => {
            let run = api.get_run(&run_id).await?;
            match global.output {
                OutputFormat::Json => print_json(&json::run(&run)),
                OutputFormat::Text => {
                    let mut text = describe_run(&run, SystemTime::now(), items);
                    let tail = log_tail(&api, &run.run_id, LOG_TAIL).await?;
                    if !tail.is_empty() {
                        text.push_str(&format!("\nLast {} log lines:\n", tail.len()));
                        for line in tail {
                            text.push_str(&line);
                            text.push('\n');
                        }
                    }
                    out!("{text}")
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Logs {
            run_id,
            step,
            attempt,
            follow,
        } => {
            let mut stream = api
                .get_step_logs(GetStepLogsRequest {
                    run_id,
                    step_id: step.unwrap_or_default(),
                    attempt: attempt.unwrap_or_default(),
                    follow,
                    after_seq: 0,
                })
                .await?;
            while let Some(batch) = stream.try_next().await? {
                match global.output {
                    OutputFormat::Json => {
                        for line in &batch.lines {
                            outln!("{}", log_line_json(&batch, line));
                        }
                    }
                    OutputFormat::Text => {
                        for line in &batch.lines {
                            outln!("{}", log_line_text(&batch, line));
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Watch {
            run_id,
            after_seq,
            items,
        } => {
            let run =
                watch::follow_after(channel, &run_id, after_seq, global.output, items).await?;
            Ok(run_exit_code(&run))
        }
        RunsCommand::Cancel { run_id, reason } => {
            let run = api
                .cancel_run(
                    &caller,
                    CancelRunRequest {
                        run_id,
                        reason: reason.unwrap_or_default(),
                    },
                )
                .await?;
            match global.output {
                OutputFormat::Json => print_json(&json::run(&run)),
                OutputFormat::Text => outln!(
                    "run {} {}",
                    run.run_id,
                    format::run_state(run.state).to_lowercase()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Approve {
            run_id,
            step_id,
            outputs,
            comment,
        } => {
            let outputs: serde_json::Map<String, Value> = outputs.into_iter().collect();
            let run = api
                .approve_step(
                    &caller,
                    ApproveStepRequest {
                        run_id,
                        step_id: step_id.clone(),
                        approve: true,
                        outputs: Some(dagmesh_proto::json::map_to_struct(&outputs)),
                        comment: comment.unwrap_or_default(),
                    },
                )
                .await?;
            print_changed(&run, &format!("step {step_id} approved"), global.output);
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Deny {
            run_id,
            step_id,
            reason,
        } => {
            let run = api
                .approve_step(
                    &caller,
                    ApproveStepRequest {
                        run_id,
                        step_id: step_id.clone(),
                        approve: false,
                        outputs: None,
                        comment: reason.unwrap_or_default(),
                    },
                )
                .await?;
            print_changed(&run, &format!("step {step_id} denied"), global.output);
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Suspend { run_id, reason } => {
            let run = api
                .suspend_run(
                    &caller,
                    SuspendRunRequest {
                        run_id,
                        reason: reason.unwrap_or_default(),
                    },
                )
                .await?;
            print_changed(&run, "suspended", global.output);
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Resume { run_id } => {
            let run = api.resume_run(&caller, ResumeRunRequest { run_id }).await?;
            print_changed(&run, "resumed", global.output);
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Retry {
            run_id,
            from,
            watch,
        } => {
            let run = api
                .retry_run(
                    &caller,
                    RetryRunRequest {
                        run_id,
                        from_step: from.unwrap_or_default(),
                    },
                )
                .await?;
            if watch {
                let last = watch::follow(channel, &run.run_id, global.output).await?;
                return Ok(run_exit_code(&last));
            }
            match global.output {
                OutputFormat::Json => print_json(&json::run(&run)),
                OutputFormat::Text => {
                    let retried = run
                        .steps
                        .iter()
                        .filter(|s| {
                            !matches!(StepState::try_from(s.state), Ok(StepState::Succeeded))
                        })
                        .count();
                    outln!(
                        "run {} {} ({retried} step(s) to run again)",
                        run.run_id,
                        format::run_state(run.state)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Resubmit {
            run_id,
            memoized,
            watch,
        } => {
            let old = api.get_run(&run_id).await?;
            let request = SubmitRunRequest {
                workflow_ref: Some(submit_run_request::WorkflowRef::Workflow(WorkflowRef {
                    name: old.workflow.clone(),
                    version: old.workflow_version,
                })),
                inputs: old.inputs.clone(),
                idempotency_key: String::new(),
                tags: old.tags.clone(),
                priority: old.priority,
                memoize_from: if memoized { run_id } else { String::new() },
                notifications: old.notifications.clone(),
            };
            let run = api
                .submit_run(&caller, request)
                .await?
                .run
                .ok_or_else(|| anyhow::anyhow!("server returned no run"))?;
            if watch {
                let last = watch::follow(channel, &run.run_id, global.output).await?;
                return Ok(run_exit_code(&last));
            }
            match global.output {
                OutputFormat::Json => print_json(&json::run(&run)),
                OutputFormat::Text => outln!("{}", run.run_id),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `run <id> RUNNING: step review approved` (or the run as JSON).
fn print_changed(run: &Run, what: &str, output: OutputFormat) {
    match output {
        OutputFormat::Json => print_json(&json::run(run)),
        OutputFormat::Text => outln!(
            "run {} {}: {what}",
            run.run_id,
            format::run_state(run.state)
        ),
    }
}

/// RUN ID, WORKFLOW, STATE, CREATED, DURATION, TAGS; one row per run.
pub(crate) fn runs_table(runs: &[Run], now: SystemTime) -> String {
    let mut table = Table::new(&["RUN ID", "WORKFLOW", "STATE", "CREATED", "DURATION", "TAGS"]);
    for run in runs {
        table.row(vec![
            run.run_id.clone(),
            format!("{}@{}", run.workflow, run.workflow_version),
            format::run_state(run.state),
            format::datetime(run.created_at.as_ref()),
            format::span(run.created_at.as_ref(), run.finished_at.as_ref(), now)
                .map_or_else(|| "-".to_owned(), format::duration),
            format::pairs(&run.tags),
        ]);
    }
    table.render()
}

/// The run's fields, then a table of its steps.
/// Log lines `runs get` shows.
const LOG_TAIL: usize = 10;

/// The last `keep` log lines of a run, as `runs logs` prints them.
async fn log_tail(api: &GrpcExecutor, run_id: &str, keep: usize) -> anyhow::Result<Vec<String>> {
    let mut stream = api
        .get_step_logs(GetStepLogsRequest {
            run_id: run_id.to_owned(),
            ..GetStepLogsRequest::default()
        })
        .await?;
    let mut tail = std::collections::VecDeque::with_capacity(keep + 1);
    while let Some(batch) = stream.try_next().await? {
        for line in &batch.lines {
            tail.push_back(log_line_text(&batch, line));
            if tail.len() > keep {
                tail.pop_front();
            }
        }
    }
    Ok(tail.into())
}

/// `2026-12-03T06:30:01.123Z mesh#1 INFO text` (one line; newlines in the text are escaped).
fn log_line_text(batch: &GetStepLogsResponse, line: &dagmesh_proto::v1::LogLine) -> String {
    let at = json::timestamp(line.at.as_ref());
    format!(
        "{} {}#{} {:<5} {}",
        at.as_str().unwrap_or("-"),
        batch.step_id,
        batch.attempt,
        line.level.to_uppercase(),
        line.text.replace('\n', "\\n")
    )
}

fn log_line_json(batch: &GetStepLogsResponse, line: &dagmesh_proto::v1::LogLine) -> Value {
    serde_json::json!({
        "at": json::timestamp(line.at.as_ref()),
        "step_id": batch.step_id,
        "attempt": batch.attempt,
        "level": line.level,
        "text": line.text,
        "seq": batch.seq,
    })
}

pub(crate) fn describe_run(run: &Run, now: SystemTime, all_items: bool) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        out.push_str(&format!("{:<17}{value}\n", format!("{name}:")));
    };
    field("Run", run.run_id.clone());
    field(
        "Workflow",
        format!("{}@{}", run.workflow, run.workflow_version),
    );
    let mut state = format::run_state(run.state);
    if run.suspended {
        state.push_str(" (suspended: nothing more is dispatched until `dagmesh runs resume`)");
    }
    field("State", state);
    if !run.error.is_empty() {
        field("Error", run.error.clone());
    }
    field("Created", format::datetime(run.created_at.as_ref()));
    if run.finished_at.is_some() {
        field("Finished", format::datetime(run.finished_at.as_ref()));
    }
    if let Some(took) = format::span(run.created_at.as_ref(), run.finished_at.as_ref(), now) {
        field("Duration", format::duration(took));
    }
    field(
        "Inputs",
        Value::Object(dagmesh_proto::json::from_struct(run.inputs.as_ref())).to_string(),
    );
    if !run.tags.is_empty() {
        field("Tags", format::pairs(&run.tags));
    }
    if !run.idempotency_key.is_empty() {
        field("Idempotency key", run.idempotency_key.clone());
    }
    if !run.parent_run_id.is_empty() {
        field(
            "Parent",
            format!(
                "run {} (step {}; depth {})",
                run.parent_run_id, run.parent_step_id, run.depth
            ),
        );
    }
    for (label, who) in [
        ("Submitted by", &run.submitted_by),
        ("Cancelled by", &run.cancelled_by),
        ("Retried by", &run.retried_by),
    ] {
        if !who.is_empty() {
            field(label, who.clone());
        }
    }
    out.push('\n');

    let maps = watch::map_counts(&run.steps);
    let mut table = Table::new(&["STEP", "STATE", "ATTEMPT", "WORKER", "DURATION", "ERROR"]);
    for step in &run.steps {
        let item = watch::item_key(&step.step_id).is_some();
        if item && !all_items && step.state != StepState::Failed as i32 {
            continue;
        }
        let mut state = format::step_state(step.state);
        if let Some(counts) = maps.get(step.step_id.as_str()) {
            state.push_str(&format!(" {}", counts.describe(format::Paint::PLAIN)));
        } else if step.state == StepState::Running as i32 {
            state.push_str(&format!(" {}%", format::percent(step.progress)));
        }
        let mut attempt = step.attempt.to_string();
        if step.lost_attempts > 0 {
            attempt.push_str(&format!(" (+{} lost)", step.lost_attempts));
        }
        table.row(vec![
            step.step_id.clone(),
            state,
            attempt,
            if step.worker.is_empty() {
                "-".to_owned()
            } else {
                step.worker.clone()
            },
            format::span(step.started_at.as_ref(), step.finished_at.as_ref(), now)
                .map_or_else(|| "-".to_owned(), format::duration),
            if step.state == StepState::Ready as i32 && !step.waiting_reason.is_empty() {
                format::one_line(&step.waiting_reason, 100)
            } else if step.state == StepState::Running as i32 && !step.waiting_for.is_empty() {
                format!("waiting for {}", format::one_line(&step.waiting_for, 100))
            } else if !step.cached_from.is_empty() {
                format!("reused from run {}", step.cached_from)
            } else if !step.child_run_id.is_empty() && step.error.is_empty() {
                format!("child run {}", step.child_run_id)
            } else {
                format::one_line(&step.error, 100)
            },
        ]);
    }
    out.push_str(&table.render());
    let outputs: Vec<&dagmesh_proto::v1::Step> = run
        .steps
        .iter()
        .filter(|step| step.outputs.as_ref().is_some_and(|o| !o.fields.is_empty()))
        .filter(|step| all_items || watch::item_key(&step.step_id).is_none())
        .collect();
    if !outputs.is_empty() {
        out.push_str("\nOutputs:\n");
        for step in outputs {
            let value = Value::Object(dagmesh_proto::json::from_struct(step.outputs.as_ref()));
            out.push_str(&format!(
                "  {}: {}\n",
                step.step_id,
                format::one_line(&value.to_string(), 200)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmesh_proto::v1::Step;
    use prost_types::Timestamp;

    fn ts(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn get_shows_the_run_then_its_steps() {
        let run = Run {
            run_id: "r1".into(),
            workflow: "room-scan".into(),
            workflow_version: 2,
            state: RunState::Failed as i32,
            error: "step mesh failed".into(),
            inputs: Some(dagmesh_proto::json::to_struct(
                &serde_json::json!({"room": "hall"}),
            )),
            created_at: ts(1_700_000_000),
            finished_at: ts(1_700_000_065),
            steps: vec![
                Step {
                    step_id: "fetch".into(),
                    state: StepState::Succeeded as i32,
                    attempt: 1,
                    worker: "cpu-1".into(),
                    started_at: ts(1_700_000_001),
                    finished_at: ts(1_700_000_003),
                    ..Step::default()
                },
                Step {
                    step_id: "mesh".into(),
                    state: StepState::Failed as i32,
                    attempt: 3,
                    lost_attempts: 1,
                    worker: "gpu-1".into(),
                    error: "out of memory\ntrace...".into(),
                    started_at: ts(1_700_000_004),
                    finished_at: ts(1_700_000_064),
                    ..Step::default()
                },
            ],
            ..Run::default()
        };
        let text = describe_run(&run, SystemTime::now(), false);
        assert_eq!(
            text,
            "Run:             r1\n\
             Workflow:        room-scan@2\n\
             State:           FAILED\n\
             Error:           step mesh failed\n\
             Created:         2023-11-14T22:13:20Z\n\
             Finished:        2023-11-14T22:14:25Z\n\
             Duration:        1m05s\n\
             Inputs:          {\"room\":\"hall\"}\n\
             \n\
             STEP   STATE      ATTEMPT      WORKER  DURATION  ERROR\n\
             fetch  SUCCEEDED  1            cpu-1   2.00s\n\
             mesh   FAILED     3 (+1 lost)  gpu-1   1m00s     out of memory …\n"
        );
    }
}

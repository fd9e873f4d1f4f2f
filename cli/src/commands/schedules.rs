//! `dagmesh schedules`, `dagmesh triggers`, `dagmesh events` and `dagmesh backfill`: the
//! scheduler's client commands (`dagmesh.v1.SchedulerService`).

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context as _;
use dagmesh_proto::connect::AuthChannel;
use dagmesh_proto::v1::scheduler_service_client::SchedulerServiceClient;
use dagmesh_proto::v1::{
    Backfill, CancelBackfillRequest, CatchUp, CreateBackfillRequest, CreateScheduleRequest,
    CreateTriggerRequest, DeleteScheduleRequest, DeleteTriggerRequest, GetBackfillRequest,
    GetScheduleRequest, ListBackfillsRequest, ListSchedulesRequest, ListTriggersRequest, Partition,
    PauseScheduleRequest, PublishEventRequest, PublishEventResponse, ResumeBackfillRequest,
    ResumeScheduleRequest, Schedule, Trigger,
};
use prost_types::Timestamp;
use serde_json::{Value, json};

use super::format::{self, Table};
use super::submit::parse_tag;
use super::{Global, OutputFormat, connect, print_json};

/// `--input NAME=EXPRESSION` (a CEL expression, kept as text).
fn parse_expression(text: &str) -> Result<(String, String), String> {
    parse_tag(text)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CatchUpArg {
    /// Missed ticks are skipped.
    Skip,
    /// Only the most recent missed tick runs.
    Latest,
    /// Every missed tick runs, up to --catch-up-limit.
    All,
}

#[derive(clap::Subcommand, Debug)]
pub enum SchedulesCommand {
    /// Create a cron schedule of a registered workflow.
    Create {
        /// Unique name of the schedule.
        name: String,
        /// Cron expression: 5 fields, or 6 with a leading seconds field.
        #[arg(long)]
        cron: String,
        /// Registered workflow, NAME or NAME@VERSION.
        #[arg(long)]
        workflow: String,
        /// IANA time zone the cron expression is read in (default UTC).
        #[arg(long = "time-zone", alias = "tz", default_value = "")]
        time_zone: String,
        /// A run input, NAME=CEL (repeatable); variables `tick` (RFC 3339) and `schedule`.
        #[arg(short = 'i', long = "input", value_name = "NAME=EXPR", value_parser = parse_expression)]
        inputs: Vec<(String, String)>,
        /// A tag on every run, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// What to do with ticks missed while the scheduler was down or the schedule paused.
        #[arg(long = "catch-up", value_enum, default_value = "skip")]
        catch_up: CatchUpArg,
        /// With --catch-up all: at most this many missed ticks run (0: 100).
        #[arg(long = "catch-up-limit", default_value_t = 0)]
        catch_up_limit: u32,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Every schedule with its next tick.
    List,
    /// One schedule, by name or id.
    Get { schedule: String },
    /// Stop firing ticks.
    Pause { schedule: String },
    /// Fire ticks again (missed ones follow the catch-up policy).
    Resume { schedule: String },
    /// Delete a schedule; its runs are kept.
    Delete { schedule: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum TriggersCommand {
    /// Subscribe a workflow to an event topic.
    Create {
        /// Unique name of the trigger.
        name: String,
        #[arg(long)]
        topic: String,
        /// Registered workflow, NAME or NAME@VERSION.
        #[arg(long)]
        workflow: String,
        /// CEL over `event` (the payload) and `topic`; the event starts a run only when true.
        #[arg(long, default_value = "")]
        filter: String,
        /// A run input, NAME=CEL over `event` and `topic` (repeatable). None: the payload is
        /// the inputs.
        #[arg(short = 'i', long = "input", value_name = "NAME=EXPR", value_parser = parse_expression)]
        inputs: Vec<(String, String)>,
        /// A tag on every run, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Every trigger (or those of one topic).
    List {
        #[arg(long, default_value = "")]
        topic: String,
    },
    /// Delete a trigger, by name or id.
    Delete { trigger: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum EventsCommand {
    /// Publish an event: starts a run of every trigger of TOPIC whose filter accepts it.
    Publish {
        topic: String,
        /// The payload, a JSON object.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Idempotency key of the event: publishing the same id again starts nothing new.
        #[arg(long = "event-id", default_value = "")]
        event_id: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PartitionArg {
    Hourly,
    Daily,
}

#[derive(clap::Subcommand, Debug)]
pub enum BackfillCommand {
    /// Run a workflow once per partition of [--start, --end); prints the backfill's id.
    Create {
        /// Registered workflow, NAME or NAME@VERSION.
        workflow: String,
        /// RFC 3339, e.g. 2025-01-01T00:00:00Z.
        #[arg(long)]
        start: String,
        /// RFC 3339, exclusive.
        #[arg(long)]
        end: String,
        #[arg(long, value_enum, default_value = "daily")]
        partition: PartitionArg,
        /// IANA zone of the partition boundaries (default UTC).
        #[arg(long = "time-zone", alias = "tz", default_value = "")]
        time_zone: String,
        /// At most this many partition runs at once.
        #[arg(long = "max-concurrency", default_value_t = 1)]
        max_concurrency: u32,
        /// A run input, NAME=CEL over `partition` (`start`, `end`, `index`) (repeatable).
        #[arg(short = 'i', long = "input", value_name = "NAME=EXPR", value_parser = parse_expression)]
        inputs: Vec<(String, String)>,
        /// A tag on every run, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Every backfill with its progress.
    List,
    /// One backfill's progress.
    Get { id: String },
    /// Stop submitting and cancel its running partitions.
    Cancel { id: String },
    /// Continue a cancelled or failed backfill.
    Resume { id: String },
}

async fn client(global: &Global) -> anyhow::Result<SchedulerServiceClient<AuthChannel>> {
    Ok(SchedulerServiceClient::new(connect(global).await?))
}

fn workflow_parts(text: &str) -> anyhow::Result<(String, u32)> {
    let reference = super::submit::parse_workflow_ref(text)?;
    Ok((reference.name, reference.version))
}

fn map(pairs: Vec<(String, String)>) -> HashMap<String, String> {
    pairs.into_iter().collect()
}

pub async fn run_schedules(global: &Global, command: SchedulesCommand) -> anyhow::Result<ExitCode> {
    let mut client = client(global).await?;
    let schedule = match command {
        SchedulesCommand::Create {
            name,
            cron,
            workflow,
            time_zone,
            inputs,
            tags,
            catch_up,
            catch_up_limit,
            paused,
        } => {
            let (workflow, workflow_version) = workflow_parts(&workflow)?;
            let catch_up = match catch_up {
                CatchUpArg::Skip => CatchUp::Skip,
                CatchUpArg::Latest => CatchUp::Latest,
                CatchUpArg::All => CatchUp::All,
            };
            let schedule = Schedule {
                name,
                cron,
                time_zone,
                workflow,
                workflow_version,
                inputs: map(inputs),
                tags: map(tags),
                paused,
                catch_up: catch_up as i32,
                catch_up_limit,
                ..Default::default()
            };
            let request = CreateScheduleRequest {
                schedule: Some(schedule),
            };
            client.create_schedule(request).await?.into_inner()
        }
        SchedulesCommand::List => {
            let schedules = client
                .list_schedules(ListSchedulesRequest {})
                .await?
                .into_inner()
                .schedules;
            match global.output {
                OutputFormat::Json => print_json(
                    &json!({"schedules": schedules.iter().map(schedule_json).collect::<Vec<_>>()}),
                ),
                OutputFormat::Text => out!("{}", schedules_table(&schedules)),
            }
            return Ok(ExitCode::SUCCESS);
        }
        SchedulesCommand::Get { schedule } => client
            .get_schedule(GetScheduleRequest { schedule })
            .await?
            .into_inner(),
        SchedulesCommand::Pause { schedule } => client
            .pause_schedule(PauseScheduleRequest { schedule })
            .await?
            .into_inner(),
        SchedulesCommand::Resume { schedule } => client
            .resume_schedule(ResumeScheduleRequest { schedule })
            .await?
            .into_inner(),
        SchedulesCommand::Delete { schedule } => {
            client
                .delete_schedule(DeleteScheduleRequest {
                    schedule: schedule.clone(),
                })
                .await?;
            match global.output {
                OutputFormat::Json => print_json(&json!({"deleted": schedule})),
                OutputFormat::Text => outln!("deleted schedule {schedule}"),
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    match global.output {
        OutputFormat::Json => print_json(&schedule_json(&schedule)),
        OutputFormat::Text => out!("{}", describe_schedule(&schedule)),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_triggers(global: &Global, command: TriggersCommand) -> anyhow::Result<ExitCode> {
    let mut client = client(global).await?;
    match command {
        TriggersCommand::Create {
            name,
            topic,
            workflow,
            filter,
            inputs,
            tags,
        } => {
            let (workflow, workflow_version) = workflow_parts(&workflow)?;
            let trigger = Trigger {
                name,
                topic,
                workflow,
                workflow_version,
                filter,
                inputs: map(inputs),
                tags: map(tags),
                ..Default::default()
            };
            let request = CreateTriggerRequest {
                trigger: Some(trigger),
            };
            let trigger = client.create_trigger(request).await?.into_inner();
            match global.output {
                OutputFormat::Json => print_json(&trigger_json(&trigger)),
                OutputFormat::Text => out!("{}", triggers_table(&[trigger])),
            }
        }
        TriggersCommand::List { topic } => {
            let triggers = client
                .list_triggers(ListTriggersRequest { topic })
                .await?
                .into_inner()
                .triggers;
            match global.output {
                OutputFormat::Json => print_json(
                    &json!({"triggers": triggers.iter().map(trigger_json).collect::<Vec<_>>()}),
                ),
                OutputFormat::Text => out!("{}", triggers_table(&triggers)),
            }
        }
        TriggersCommand::Delete { trigger } => {
            client
                .delete_trigger(DeleteTriggerRequest {
                    trigger: trigger.clone(),
                })
                .await?;
            match global.output {
                OutputFormat::Json => print_json(&json!({"deleted": trigger})),
                OutputFormat::Text => outln!("deleted trigger {trigger}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_events(global: &Global, command: EventsCommand) -> anyhow::Result<ExitCode> {
    let EventsCommand::Publish {
        topic,
        data,
        event_id,
    } = command;
    let payload: Value = serde_json::from_str(&data).context("--data: invalid JSON")?;
    if !payload.is_object() {
        anyhow::bail!("--data: must be a JSON object");
    }
    let mut client = client(global).await?;
    let response = client
        .publish_event(PublishEventRequest {
            topic,
            payload: Some(dagmesh_proto::json::to_struct(&payload)),
            event_id,
        })
        .await?
        .into_inner();
    match global.output {
        OutputFormat::Json => print_json(&publish_json(&response)),
        OutputFormat::Text => {
            for started in &response.runs {
                let run_id = started.run.as_ref().map_or("", |r| r.run_id.as_str());
                let verb = if started.created {
                    "started"
                } else {
                    "already started"
                };
                outln!("{}: {verb} run {run_id}", started.trigger);
            }
            for skipped in &response.skipped_triggers {
                outln!("{skipped}: filter did not match");
            }
            for step in &response.resumed_steps {
                outln!("resumed waiting step {step}");
            }
            if response.runs.is_empty()
                && response.skipped_triggers.is_empty()
                && response.resumed_steps.is_empty()
            {
                outln!("no trigger subscribes to this topic and no step waits for it");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_time(flag: &str, text: &str) -> anyhow::Result<Timestamp> {
    text.parse::<Timestamp>().map_err(|err| {
        anyhow::anyhow!("{flag}: expected RFC 3339, e.g. 2025-01-01T00:00:00Z: {err}")
    })
}

pub async fn run_backfill(global: &Global, command: BackfillCommand) -> anyhow::Result<ExitCode> {
    let mut client = client(global).await?;
    let backfill = match command {
        BackfillCommand::Create {
            workflow,
            start,
            end,
            partition,
            time_zone,
            max_concurrency,
            inputs,
            tags,
        } => {
            let (workflow, workflow_version) = workflow_parts(&workflow)?;
            let partition = match partition {
                PartitionArg::Hourly => Partition::Hourly,
                PartitionArg::Daily => Partition::Daily,
            };
            let backfill = Backfill {
                workflow,
                workflow_version,
                start: Some(parse_time("--start", &start)?),
                end: Some(parse_time("--end", &end)?),
                partition: partition as i32,
                time_zone,
                max_concurrency,
                inputs: map(inputs),
                tags: map(tags),
                ..Default::default()
            };
            let request = CreateBackfillRequest {
                backfill: Some(backfill),
            };
            let backfill = client.create_backfill(request).await?.into_inner();
            // Like `submit`: the id alone, so that `ID=$(dagmesh backfill create ...)` works.
            match global.output {
                OutputFormat::Json => print_json(&backfill_json(&backfill)),
                OutputFormat::Text => outln!("{}", backfill.id),
            }
            return Ok(ExitCode::SUCCESS);
        }
        BackfillCommand::List => {
            let backfills = client
                .list_backfills(ListBackfillsRequest {})
                .await?
                .into_inner()
                .backfills;
            match global.output {
                OutputFormat::Json => print_json(
                    &json!({"backfills": backfills.iter().map(backfill_json).collect::<Vec<_>>()}),
                ),
                OutputFormat::Text => out!("{}", backfills_table(&backfills)),
            }
            return Ok(ExitCode::SUCCESS);
        }
        BackfillCommand::Get { id } => client
            .get_backfill(GetBackfillRequest { id })
            .await?
            .into_inner(),
        BackfillCommand::Cancel { id } => client
            .cancel_backfill(CancelBackfillRequest { id })
            .await?
            .into_inner(),
        BackfillCommand::Resume { id } => client
            .resume_backfill(ResumeBackfillRequest { id })
            .await?
            .into_inner(),
    };
    match global.output {
        OutputFormat::Json => print_json(&backfill_json(&backfill)),
        OutputFormat::Text => out!("{}", describe_backfill(&backfill)),
    }
    Ok(ExitCode::SUCCESS)
}

fn string_map(map: &HashMap<String, String>) -> Value {
    let sorted: std::collections::BTreeMap<_, _> = map.iter().collect();
    json!(sorted)
}

fn schedule_json(s: &Schedule) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "cron": s.cron,
        "time_zone": s.time_zone,
        "workflow": s.workflow,
        "workflow_version": s.workflow_version,
        "inputs": string_map(&s.inputs),
        "tags": string_map(&s.tags),
        "paused": s.paused,
        "catch_up": s.catch_up().as_str_name(),
        "catch_up_limit": s.catch_up_limit,
        "last_tick": super::json::timestamp(s.last_tick.as_ref()),
        "next_tick": super::json::timestamp(s.next_tick.as_ref()),
        "created_at": super::json::timestamp(s.created_at.as_ref()),
    })
}

fn trigger_json(t: &Trigger) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "topic": t.topic,
        "workflow": t.workflow,
        "workflow_version": t.workflow_version,
        "filter": t.filter,
        "inputs": string_map(&t.inputs),
        "tags": string_map(&t.tags),
        "created_at": super::json::timestamp(t.created_at.as_ref()),
    })
}

fn publish_json(response: &PublishEventResponse) -> Value {
    json!({
        "runs": response.runs.iter().map(|r| json!({
            "trigger": r.trigger,
            "run": r.run.as_ref().map_or(Value::Null, super::json::run),
            "created": r.created,
        })).collect::<Vec<_>>(),
        "skipped_triggers": response.skipped_triggers,
        "resumed_steps": response.resumed_steps,
    })
}

fn backfill_json(b: &Backfill) -> Value {
    json!({
        "id": b.id,
        "workflow": b.workflow,
        "workflow_version": b.workflow_version,
        "start": super::json::timestamp(b.start.as_ref()),
        "end": super::json::timestamp(b.end.as_ref()),
        "partition": b.partition().as_str_name(),
        "time_zone": b.time_zone,
        "max_concurrency": b.max_concurrency,
        "inputs": string_map(&b.inputs),
        "tags": string_map(&b.tags),
        "state": b.state().as_str_name(),
        "total": b.total,
        "done": b.done,
        "running": b.running,
        "failed": b.failed,
        "queued": b.queued,
        "created_at": super::json::timestamp(b.created_at.as_ref()),
    })
}

fn catch_up_name(s: &Schedule) -> String {
    s.catch_up()
        .as_str_name()
        .trim_start_matches("CATCH_UP_")
        .replace("UNSPECIFIED", "SKIP")
        .to_lowercase()
}

/// `running`, `succeeded`...: the state without its enum prefix.
fn backfill_state_name(b: &Backfill) -> String {
    b.state()
        .as_str_name()
        .trim_start_matches("BACKFILL_STATE_")
        .to_lowercase()
}

/// `hourly` or `daily`.
fn partition_name(b: &Backfill) -> String {
    b.partition()
        .as_str_name()
        .trim_start_matches("PARTITION_")
        .to_lowercase()
}

fn zone_name(zone: &str) -> String {
    if zone.is_empty() { "UTC" } else { zone }.to_owned()
}

fn workflow_name(workflow: &str, version: u32) -> String {
    match version {
        0 => format!("{workflow} (latest version)"),
        v => format!("{workflow}@{v}"),
    }
}

/// `inputs.room_id = 'nightly-' + tick` lines: the expressions as given.
fn expressions(map: &HashMap<String, String>) -> String {
    let sorted: std::collections::BTreeMap<_, _> = map.iter().collect();
    sorted
        .iter()
        .map(|(name, expr)| format!("{name} = {expr}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One schedule in full, for `schedules get` (and what create, pause and resume return).
fn describe_schedule(s: &Schedule) -> String {
    format::details(&[
        ("Schedule", s.name.clone()),
        ("Id", s.id.clone()),
        ("Cron", s.cron.clone()),
        ("Time zone", zone_name(&s.time_zone)),
        ("Workflow", workflow_name(&s.workflow, s.workflow_version)),
        ("Inputs", expressions(&s.inputs)),
        ("Tags", format::pairs(&s.tags)),
        (
            "State",
            if s.paused { "paused" } else { "active" }.to_owned(),
        ),
        (
            "Catch-up",
            match s.catch_up_limit {
                0 => catch_up_name(s),
                limit => format!("{} (at most {limit} ticks)", catch_up_name(s)),
            },
        ),
        ("Last tick", format::datetime(s.last_tick.as_ref())),
        ("Next tick", format::datetime(s.next_tick.as_ref())),
        ("Created", format::datetime(s.created_at.as_ref())),
    ])
}

/// One backfill in full, for `backfill get` (and what create, cancel and resume return).
fn describe_backfill(b: &Backfill) -> String {
    let state = backfill_state_name(b);
    let partition = partition_name(b);
    let ended = b.done.saturating_add(b.failed);
    let percent = if b.total == 0 {
        100
    } else {
        u64::from(ended) * 100 / u64::from(b.total)
    };
    format::details(&[
        ("Backfill", b.id.clone()),
        ("Workflow", workflow_name(&b.workflow, b.workflow_version)),
        (
            "Range",
            format!(
                "{} to {} ({} {partition} partitions, {})",
                format::datetime(b.start.as_ref()),
                format::datetime(b.end.as_ref()),
                b.total,
                zone_name(&b.time_zone)
            ),
        ),
        ("Inputs", expressions(&b.inputs)),
        ("Tags", format::pairs(&b.tags)),
        ("State", state),
        ("Error", b.error.clone()),
        (
            "Progress",
            format!(
                "{ended}/{} ended ({percent}%): {} done, {} failed, {} running, {} queued",
                b.total, b.done, b.failed, b.running, b.queued
            ),
        ),
        (
            "Concurrency",
            match b.max_concurrency {
                1 => "one run at a time".to_owned(),
                n => format!("at most {n} runs at once"),
            },
        ),
        ("Running runs", b.active_run_ids.join(", ")),
        ("Created", format::datetime(b.created_at.as_ref())),
    ])
}

fn or_dash(text: &str) -> String {
    if text.is_empty() { "-" } else { text }.to_owned()
}

fn schedules_table(schedules: &[Schedule]) -> String {
    let mut table = Table::new(&[
        "NAME",
        "CRON",
        "ZONE",
        "WORKFLOW",
        "STATE",
        "CATCH-UP",
        "LAST TICK",
        "NEXT TICK",
    ]);
    for s in schedules {
        table.row(vec![
            s.name.clone(),
            s.cron.clone(),
            zone_name(&s.time_zone),
            s.workflow.clone(),
            if s.paused { "paused" } else { "active" }.to_owned(),
            catch_up_name(s),
            format::datetime(s.last_tick.as_ref()),
            format::datetime(s.next_tick.as_ref()),
        ]);
    }
    table.render()
}

fn triggers_table(triggers: &[Trigger]) -> String {
    let mut table = Table::new(&["NAME", "TOPIC", "WORKFLOW", "FILTER", "INPUTS"]);
    for t in triggers {
        table.row(vec![
            t.name.clone(),
            t.topic.clone(),
            t.workflow.clone(),
            or_dash(&t.filter),
            or_dash(&format::pairs(&t.inputs)),
        ]);
    }
    table.render()
}

fn backfills_table(backfills: &[Backfill]) -> String {
    let mut table = Table::new(&[
        "ID",
        "WORKFLOW",
        "STATE",
        "PARTITIONS",
        "DONE",
        "RUNNING",
        "FAILED",
        "QUEUED",
    ]);
    for b in backfills {
        table.row(vec![
            b.id.clone(),
            b.workflow.clone(),
            backfill_state_name(b),
            format!("{} {}", b.total, partition_name(b)),
            b.done.to_string(),
            b.running.to_string(),
            b.failed.to_string(),
            b.queued.to_string(),
        ]);
    }
    table.render()
}

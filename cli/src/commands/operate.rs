//! `dagmesh health`, `dagmesh queues` and `dagmesh webhooks`: is the server up, what waits for
//! workers, and what became of the webhooks — for scripts and the on-call engineer.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use dagmesh_api::{ExecutorApi, GrpcExecutor};
use dagmesh_proto::v1::webhook_service_client::WebhookServiceClient;
use dagmesh_proto::v1::{
    DeliveryState, ListDeliveriesRequest, ListQueuesRequest, QueueInfo, WebhookDelivery,
};
use serde_json::json;

use super::format::{self, Table};
use super::{Global, OutputFormat, connect, json as pbjson, print_json};

#[derive(clap::Args, Debug)]
pub struct QueuesArgs {
    /// Only the queues of this task type.
    #[arg(long = "task-type", value_name = "NAME")]
    pub task_type: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Webhook deliveries with their attempts and the receivers' last answers, newest first.
    Deliveries {
        /// Only this run's deliveries.
        #[arg(long = "run", value_name = "RUN_ID")]
        run_id: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// Print the address of this run's page instead of the run list.
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<String>,
}

/// Prints the web console's address on the server, with the client's token in the fragment
/// (browsers never send the fragment to the server; the console stores the token and drops it
/// from the address bar), so that opening it logs in as the CLI does.
pub async fn console(global: &Global, args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let base = global.server.trim_end_matches('/');
    let mut page = match &args.run {
        Some(run_id) => format!("#/runs/{}", fragment_escape(run_id)),
        None => "#/runs".to_owned(),
    };
    if let Some(token) = global.client.resolve_token()? {
        page.push_str("?token=");
        page.push_str(&fragment_escape(&token));
    }
    println!("{base}/{page}");
    Ok(ExitCode::SUCCESS)
}

/// Percent-escapes everything but unreserved URL characters.
pub(crate) fn fragment_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// Keep asking for this long (e.g. `30s`, at most 24h) while the server is not up yet — for
    /// scripts that start `dagmesh up` in the background.
    #[arg(long, value_name = "DURATION", value_parser = super::wait_duration)]
    pub wait: Option<Duration>,
}

/// Asks the server's standard health service (no token needed); exits 0 when it serves.
pub async fn health(global: &Global, args: HealthArgs) -> anyhow::Result<ExitCode> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let deadline = tokio::time::Instant::now() + args.wait.unwrap_or_default();
    let status = loop {
        let answer = match connect(global).await {
            Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(|response| response.into_inner().status())
                .map_err(anyhow::Error::from),
            Err(err) => Err(err),
        };
        match answer {
            Ok(ServingStatus::Serving) => break ServingStatus::Serving,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(status) => break status,
            Err(err) => return Err(err),
        }
    };
    let name = status.as_str_name();
    match global.output {
        OutputFormat::Json => print_json(&json!({"server": global.server, "status": name})),
        OutputFormat::Text => outln!("{} is {}", global.server, name.to_lowercase()),
    }
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn queues(global: &Global, args: QueuesArgs) -> anyhow::Result<ExitCode> {
    let client = GrpcExecutor::new(connect(global).await?);
    let queues = client
        .list_queues(ListQueuesRequest {
            task_type: args.task_type.unwrap_or_default(),
        })
        .await?
        .queues;
    match global.output {
        OutputFormat::Json => print_json(&json!({
            "queues": queues.iter().map(queue_json).collect::<Vec<_>>()
        })),
        OutputFormat::Text if queues.is_empty() => outln!("no task is queued or running"),
        OutputFormat::Text => out!("{}", queues_table(&queues)),
    }
    Ok(ExitCode::SUCCESS)
}

fn age(queue: &QueueInfo) -> Option<Duration> {
    queue
        .oldest_age
        .and_then(|age| Duration::try_from(age).ok())
}

fn queue_json(queue: &QueueInfo) -> serde_json::Value {
    json!({
        "task_type": queue.task_type,
        "version_requirement": queue.version_requirement,
        "labels": queue.labels,
        "slots_per_task": queue.slots_per_task,
        "queued": queue.queued,
        "oldest_age_seconds": age(queue).map(|age| age.as_secs_f64()),
        "running": queue.running,
        "matching_workers": queue.matching_workers,
        "free_slots": queue.free_slots,
    })
}

pub(crate) fn queues_table(queues: &[QueueInfo]) -> String {
    let mut table = Table::new(&[
        "TASK TYPE",
        "VERSION",
        "LABELS",
        "QUEUED",
        "OLDEST",
        "RUNNING",
        "WORKERS",
        "FREE SLOTS",
    ]);
    for queue in queues {
        table.row(vec![
            queue.task_type.clone(),
            queue.version_requirement.clone(),
            if queue.labels.is_empty() {
                "-".to_owned()
            } else {
                format::pairs(&queue.labels)
            },
            queue.queued.to_string(),
            age(queue).map_or("-".to_owned(), format::duration),
            queue.running.to_string(),
            queue.matching_workers.to_string(),
            queue.free_slots.to_string(),
        ]);
    }
    table.render()
}

pub async fn webhooks(global: &Global, command: WebhooksCommand) -> anyhow::Result<ExitCode> {
    let WebhooksCommand::Deliveries { run_id, limit } = command;
    if !(1..=1000).contains(&limit) {
        anyhow::bail!("--limit: {limit} is out of range (1 to 1000)");
    }
    let mut client = WebhookServiceClient::new(connect(global).await?);
    let deliveries = client
        .list_deliveries(ListDeliveriesRequest {
            run_id: run_id.unwrap_or_default(),
            limit,
        })
        .await?
        .into_inner()
        .deliveries;
    match global.output {
        OutputFormat::Json => print_json(&json!({
            "deliveries": deliveries.iter().map(delivery_json).collect::<Vec<_>>()
        })),
        OutputFormat::Text if deliveries.is_empty() => outln!("no webhook deliveries"),
        OutputFormat::Text => out!("{}", deliveries_table(&deliveries, SystemTime::now())),
    }
    Ok(ExitCode::SUCCESS)
}

fn state_name(state: i32) -> String {
    DeliveryState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("DELIVERY_STATE_")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("UNKNOWN({state})"))
}

fn delivery_json(delivery: &WebhookDelivery) -> serde_json::Value {
    json!({
        "delivery_id": delivery.delivery_id,
        "run_id": delivery.run_id,
        "event": delivery.event,
        "step_id": delivery.step_id,
        "url": delivery.url,
        "state": state_name(delivery.state),
        "attempts": delivery.attempts,
        "created_at": pbjson::timestamp(delivery.created_at.as_ref()),
        "last_attempt_at": pbjson::timestamp(delivery.last_attempt_at.as_ref()),
        "next_attempt_at": pbjson::timestamp(delivery.next_attempt_at.as_ref()),
        "delivered_at": pbjson::timestamp(delivery.delivered_at.as_ref()),
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "last_response": delivery.last_response,
        "body": serde_json::from_str::<serde_json::Value>(&delivery.body).unwrap_or_default(),
    })
}

fn deliveries_table(deliveries: &[WebhookDelivery], now: SystemTime) -> String {
    let mut table = Table::new(&[
        "DELIVERY",
        "RUN",
        "EVENT",
        "URL",
        "STATE",
        "ATTEMPTS",
        "LAST ANSWER",
        "NEXT",
        "CREATED",
    ]);
    for delivery in deliveries {
        let answer = match (delivery.last_status, delivery.last_error.as_str()) {
            (0, "") => "-".to_owned(),
            (0, error) => format::one_line(error, 48),
            (status, "") => format!("HTTP {status}"),
            (_, error) => format::one_line(error, 48),
        };
        let next = match delivery
            .next_attempt_at
            .as_ref()
            .and_then(format::to_system_time)
        {
            Some(at) if at > now => format!("in {}", format::duration(format::between(now, at))),
            Some(_) => "now".to_owned(),
            None => "-".to_owned(),
        };
        table.row(vec![
            delivery.delivery_id.clone(),
            delivery.run_id.clone(),
            if delivery.step_id.is_empty() {
                delivery.event.clone()
            } else {
                format!("{} ({})", delivery.event, delivery.step_id)
            },
            format::one_line(&delivery.url, 48),
            state_name(delivery.state),
            delivery.attempts.to_string(),
            answer,
            next,
            format::ago(delivery.created_at.as_ref(), now),
        ]);
    }
    table.render()
}

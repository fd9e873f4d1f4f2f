//! `dagmesh workers list`: the workers the executor knows, for the on-call engineer.

use std::process::ExitCode;
use std::time::SystemTime;

use dagmesh_api::{ExecutorApi, GrpcExecutor};
use dagmesh_proto::v1::{ListWorkersRequest, WorkerInfo};

use super::format::{self, Table};
use super::{Global, OutputFormat, connect, json, print_json};

#[derive(clap::Subcommand, Debug)]
pub enum WorkersCommand {
    /// Connected workers, and disconnected ones whose lease still runs.
    List {
        /// Also the full instance ids and the tasks each worker holds.
        #[arg(long)]
        wide: bool,
    },
}

pub async fn run(global: &Global, command: WorkersCommand) -> anyhow::Result<ExitCode> {
    match command {
        WorkersCommand::List { wide } => {
            let client = GrpcExecutor::new(connect(global).await?);
            let response = client.list_workers(ListWorkersRequest {}).await?;
            match global.output {
                OutputFormat::Json => print_json(&json::list_workers_response(&response)),
                OutputFormat::Text => {
                    out!(
                        "{}",
                        workers_table(&response.workers, SystemTime::now(), wide)
                    )
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first `len` characters and an ellipsis: ids are UUIDs, too long for a table, and a
/// prefix still tells them apart in practice.
fn prefix(id: &str, len: usize) -> String {
    match id.char_indices().nth(len) {
        Some((end, _)) => format!("{}…", &id[..end]),
        None => id.to_owned(),
    }
}

/// The instance id without what the NAME column already says: SDKs make ids such as
/// `room-scan-cpu-c2ade5af6d2c` (name and a random suffix) or plain UUIDs; 12 characters of
/// either still tell instances apart.
fn short_instance(worker: &WorkerInfo) -> String {
    let id = worker.instance_id.as_str();
    let own = id
        .strip_prefix(worker.worker_name.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(id);
    prefix(own, 12)
}

/// `<run id prefix>/<step>#<attempt>`: task ids are `<run uuid>/<step>#<attempt>`.
fn short_task(task: &str) -> String {
    match task.split_once('/') {
        Some((run, rest)) => format!("{}/{rest}", prefix(run, 8)),
        None => task.to_owned(),
    }
}

fn or_dash(items: Vec<String>) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// One column for what CONNECTED and DRAINING said: the state an operator acts on.
fn state(worker: &WorkerInfo) -> &'static str {
    match (worker.connected, worker.draining) {
        (false, _) => "gone",
        (true, true) => "draining",
        (true, false) => "ready",
    }
}

/// `rust 0.1.0`: which SDK, so a worker that misbehaves points at the right code.
fn sdk(worker: &WorkerInfo) -> String {
    match (worker.sdk_language.as_str(), worker.sdk_version.as_str()) {
        ("", _) => "-".to_owned(),
        (language, "") => language.to_owned(),
        (language, version) => format!("{language} {version}"),
    }
}

/// The workers as a table that fits a terminal: names, SDK, what they serve and their
/// capacity; `wide` adds the full instance ids and the held tasks.
pub(crate) fn workers_table(workers: &[WorkerInfo], now: SystemTime, wide: bool) -> String {
    let mut headers = vec![
        "NAME",
        "INSTANCE",
        "SDK",
        "TASK TYPES",
        "LABELS",
        "SLOTS",
        "STATE",
        "SEEN",
    ];
    if wide {
        headers.push("TASKS");
    }
    let mut table = Table::new(&headers);
    for worker in workers {
        let task_types = worker
            .task_types
            .iter()
            .map(|t| format!("{}@{}", t.name, t.version))
            .collect();
        let mut row = vec![
            worker.worker_name.clone(),
            if wide {
                worker.instance_id.clone()
            } else {
                short_instance(worker)
            },
            sdk(worker),
            or_dash(task_types),
            format::pairs(&worker.labels),
            format!("{}/{}", worker.used_slots, worker.slots),
            state(worker).to_owned(),
            format::ago(worker.last_seen.as_ref(), now),
        ];
        if wide {
            row.push(or_dash(
                worker.tasks.iter().map(|t| short_task(t)).collect(),
            ));
        }
        table.row(row);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmesh_proto::v1::TaskTypeVersion;
    use prost_types::Timestamp;
    use std::time::Duration;

    #[test]
    fn table_shows_capacity_health_and_held_tasks() {
        let worker = WorkerInfo {
            instance_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            sdk_language: "rust".into(),
            sdk_version: "0.1.0".into(),
            worker_name: "gpu-box".into(),
            task_types: vec![
                TaskTypeVersion {
                    name: "mesh.build".into(),
                    version: "1.3.0".into(),
                },
                TaskTypeVersion {
                    name: "thumbnail".into(),
                    version: "2.0.0".into(),
                },
            ],
            labels: [("gpu".to_owned(), "true".to_owned())].into(),
            slots: 4,
            used_slots: 1,
            connected: true,
            draining: false,
            last_seen: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            tasks: vec!["0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/mesh#2".into()],
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_003);
        assert_eq!(
            workers_table(std::slice::from_ref(&worker), now, false),
            "NAME     INSTANCE       SDK         TASK TYPES                        LABELS    SLOTS  STATE  SEEN\n\
             gpu-box  0190a1b2-c3d…  rust 0.1.0  mesh.build@1.3.0,thumbnail@2.0.0  gpu=true  1/4    ready  3s ago\n"
        );
        let wide = workers_table(&[worker], now, true);
        assert!(
            wide.contains("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b  rust 0.1.0"),
            "{wide}"
        );
        assert!(wide.ends_with("3s ago  0190a1b2…/mesh#2\n"), "{wide}");
    }
}

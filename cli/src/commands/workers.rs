//! `dagmesh workers list`: the workers the executor knows, for the on-call engineer.

use std::process::ExitCode;
use std::time::SystemTime;

use dagmesh_proto::v1::cluster_service_client::ClusterServiceClient;
use dagmesh_proto::v1::{ListWorkersRequest, WorkerInfo};

use super::format::{self, Table};
use super::{Global, OutputFormat, connect, json, print_json};

#[derive(clap::Subcommand, Debug)]
pub enum WorkersCommand {
    /// Connected workers, and disconnected ones whose lease still runs.
    List,
}

pub async fn run(global: &Global, command: WorkersCommand) -> anyhow::Result<ExitCode> {
    match command {
        WorkersCommand::List => {
            let mut client = ClusterServiceClient::new(connect(global).await?);
            let response = client
                .list_workers(ListWorkersRequest {})
                .await?
                .into_inner();
            match global.output {
                OutputFormat::Json => print_json(&json::list_workers_response(&response)),
                OutputFormat::Text => {
                    out!("{}", workers_table(&response.workers, SystemTime::now()))
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `<run id prefix>/<step>#<attempt>`: task ids are `<run uuid>/<step>#<attempt>`, too long for
/// a table; eight characters of a UUIDv7 still tell runs apart in practice.
fn short_task(task: &str) -> String {
    match task.split_once('/') {
        Some((run, rest)) if run.len() > 8 => format!("{}…/{rest}", &run[..8]),
        _ => task.to_owned(),
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

pub(crate) fn workers_table(workers: &[WorkerInfo], now: SystemTime) -> String {
    let mut table = Table::new(&[
        "INSTANCE",
        "NAME",
        "TASK TYPES",
        "LABELS",
        "SLOTS",
        "CONNECTED",
        "DRAINING",
        "LAST SEEN",
        "TASKS",
    ]);
    for worker in workers {
        let task_types = worker
            .task_types
            .iter()
            .map(|t| format!("{}@{}", t.name, t.version))
            .collect::<Vec<_>>();
        let tasks = worker
            .tasks
            .iter()
            .map(|t| short_task(t))
            .collect::<Vec<_>>();
        table.row(vec![
            worker.instance_id.clone(),
            worker.worker_name.clone(),
            if task_types.is_empty() {
                "-".to_owned()
            } else {
                task_types.join(",")
            },
            format::pairs(&worker.labels),
            format!("{}/{}", worker.used_slots, worker.slots),
            yes_no(worker.connected),
            yes_no(worker.draining),
            format::ago(worker.last_seen.as_ref(), now),
            if tasks.is_empty() {
                "-".to_owned()
            } else {
                tasks.join(",")
            },
        ]);
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
            instance_id: "w-7f3a".into(),
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
            ..WorkerInfo::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_003);
        assert_eq!(
            workers_table(&[worker], now),
            "INSTANCE  NAME     TASK TYPES                        LABELS    SLOTS  CONNECTED  DRAINING  LAST SEEN  TASKS\n\
             w-7f3a    gpu-box  mesh.build@1.3.0,thumbnail@2.0.0  gpu=true  1/4    yes        no        3s ago     0190a1b2…/mesh#2\n"
        );
    }
}

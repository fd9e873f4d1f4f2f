//! Proto messages as JSON for `-o json`.
//!
//! The mapping follows the protobuf JSON mapping with two choices made for shell scripts and
//! `jq`: field names are the proto (snake_case) names, as in workflow files, and every field is
//! printed, defaults included. Enums are their names (`"RUN_STATE_SUCCEEDED"`), timestamps RFC
//! 3339 strings (null when absent), `Struct`s plain JSON objects (null when absent), integers
//! JSON numbers, and a `oneof` is the one field that is set.

use dagmesh_proto::json::from_struct;
use dagmesh_proto::v1::{
    ApplyWorkflowResponse, ListRunsResponse, ListWorkersResponse, ListWorkflowsResponse, LogLine,
    Run, RunEvent, RunState, Step, StepState, SubmitRunResponse, WatchRunResponse, WorkerInfo,
    Workflow, WorkflowSpec, run_event, watch_run_response,
};
use prost_types::{Struct, Timestamp};
use serde_json::{Map, Value, json};
use std::collections::HashMap;

fn run_state(state: i32) -> Value {
    match RunState::try_from(state) {
        Ok(state) => Value::from(state.as_str_name()),
        Err(_) => Value::from(state),
    }
}

fn step_state(state: i32) -> Value {
    match StepState::try_from(state) {
        Ok(state) => Value::from(state.as_str_name()),
        Err(_) => Value::from(state),
    }
}

pub fn timestamp(ts: Option<&Timestamp>) -> Value {
    ts.map_or(Value::Null, |ts| Value::String(ts.to_string()))
}

fn payload(s: Option<&Struct>) -> Value {
    s.map_or(Value::Null, |s| Value::Object(from_struct(Some(s))))
}

fn string_map(map: &HashMap<String, String>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect::<Map<_, _>>(),
    )
}

pub fn run(run: &Run) -> Value {
    json!({
        "run_id": run.run_id,
        "workflow": run.workflow,
        "workflow_version": run.workflow_version,
        "state": run_state(run.state),
        "inputs": payload(run.inputs.as_ref()),
        "tags": string_map(&run.tags),
        "idempotency_key": run.idempotency_key,
        "submitted_by": run.submitted_by,
        "cancelled_by": run.cancelled_by,
        "retried_by": run.retried_by,
        "steps": run.steps.iter().map(step).collect::<Vec<_>>(),
        "error": run.error,
        "created_at": timestamp(run.created_at.as_ref()),
        "finished_at": timestamp(run.finished_at.as_ref()),
        "last_seq": run.last_seq,
        "priority": run.priority,
        "queue_position": run.queue_position,
        "suspended": run.suspended,
        "parent_run_id": run.parent_run_id,
        "parent_step_id": run.parent_step_id,
        "depth": run.depth,
    })
}

pub fn step(step: &Step) -> Value {
    json!({
        "run_id": step.run_id,
        "step_id": step.step_id,
        "task_id": step.task_id,
        "state": step_state(step.state),
        "attempt": step.attempt,
        "task": step.task,
        "inputs": payload(step.inputs.as_ref()),
        "outputs": payload(step.outputs.as_ref()),
        "error": step.error,
        "worker": step.worker,
        "progress": step.progress,
        "progress_message": step.progress_message,
        "started_at": timestamp(step.started_at.as_ref()),
        "finished_at": timestamp(step.finished_at.as_ref()),
        "task_version": step.task_version,
        "lost_attempts": step.lost_attempts,
        "map_step": step.map_step,
        "item_index": step.item_index,
        "item_count": step.item_count,
        "waiting_for": step.waiting_for,
        "wake_at": timestamp(step.wake_at.as_ref()),
        "child_run_id": step.child_run_id,
        "cached_from": step.cached_from,
    })
}

pub fn event(event: &RunEvent) -> Value {
    let mut object = json!({
        "run_id": event.run_id,
        "seq": event.seq,
        "at": timestamp(event.at.as_ref()),
    });
    let (name, body) = match &event.event {
        Some(run_event::Event::RunState(e)) => (
            "run_state",
            json!({
                "state": run_state(e.state),
                "error": e.error,
                "actor": e.actor,
                "suspended": e.suspended,
            }),
        ),
        Some(run_event::Event::StepState(e)) => (
            "step_state",
            json!({
                "step_id": e.step_id,
                "state": step_state(e.state),
                "attempt": e.attempt,
                "worker": e.worker,
                "error": e.error,
                "item_count": e.item_count,
            }),
        ),
        Some(run_event::Event::StepProgress(e)) => {
            let metrics: Map<String, Value> = e
                .metrics
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
                    )
                })
                .collect();
            (
                "step_progress",
                json!({
                    "step_id": e.step_id,
                    "attempt": e.attempt,
                    "fraction": e.fraction,
                    "message": e.message,
                    "metrics": metrics,
                }),
            )
        }
        Some(run_event::Event::StepLog(e)) => (
            "step_log",
            json!({
                "step_id": e.step_id,
                "attempt": e.attempt,
                "lines": e.lines.iter().map(log_line).collect::<Vec<_>>(),
            }),
        ),
        Some(run_event::Event::Unreadable(e)) => ("unreadable", json!({ "reason": e.reason })),
        None => return object,
    };
    object
        .as_object_mut()
        .expect("built as an object")
        .insert(name.to_owned(), body);
    object
}

fn log_line(line: &LogLine) -> Value {
    json!({
        "at": timestamp(line.at.as_ref()),
        "level": line.level,
        "text": line.text,
    })
}

pub fn watch_response(response: &WatchRunResponse) -> Value {
    match &response.message {
        Some(watch_run_response::Message::Snapshot(snapshot)) => {
            json!({ "snapshot": run(snapshot) })
        }
        Some(watch_run_response::Message::Event(e)) => json!({ "event": event(e) }),
        None => json!({}),
    }
}

pub fn submit_response(response: &SubmitRunResponse) -> Value {
    json!({
        "run": response.run.as_ref().map_or(Value::Null, run),
        "created": response.created,
    })
}

pub fn list_runs_response(response: &ListRunsResponse) -> Value {
    json!({
        "runs": response.runs.iter().map(run).collect::<Vec<_>>(),
        "next_page_token": response.next_page_token,
    })
}

/// A spec in the shape of a workflow file (every field a file may have, empty ones left out), so
/// `-o json` output can be applied again as a file.
pub fn workflow_spec(spec: &WorkflowSpec) -> Value {
    let text = dagmesh_spec::render_workflow(spec, dagmesh_spec::Format::Json);
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

pub fn workflow(workflow: &Workflow) -> Value {
    json!({
        "name": workflow.name,
        "version": workflow.version,
        "spec": workflow.spec.as_ref().map_or(Value::Null, workflow_spec),
        "content_hash": workflow.content_hash,
        "created_at": timestamp(workflow.created_at.as_ref()),
    })
}

pub fn apply_response(response: &ApplyWorkflowResponse) -> Value {
    json!({
        "workflow": response.workflow.as_ref().map_or(Value::Null, workflow),
        "created": response.created,
    })
}

pub fn list_workflows_response(response: &ListWorkflowsResponse) -> Value {
    json!({ "workflows": response.workflows.iter().map(workflow).collect::<Vec<_>>() })
}

pub fn worker(worker: &WorkerInfo) -> Value {
    json!({
        "instance_id": worker.instance_id,
        "worker_name": worker.worker_name,
        "task_types": worker
            .task_types
            .iter()
            .map(|t| json!({ "name": t.name, "version": t.version }))
            .collect::<Vec<_>>(),
        "labels": string_map(&worker.labels),
        "slots": worker.slots,
        "used_slots": worker.used_slots,
        "connected": worker.connected,
        "draining": worker.draining,
        "sdk_language": worker.sdk_language,
        "sdk_version": worker.sdk_version,
        "last_seen": timestamp(worker.last_seen.as_ref()),
        "tasks": worker.tasks,
    })
}

pub fn list_workers_response(response: &ListWorkersResponse) -> Value {
    json!({ "workers": response.workers.iter().map(worker).collect::<Vec<_>>() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmesh_proto::v1::StepStateChanged;

    fn sample_run() -> Run {
        Run {
            run_id: "0190-run".into(),
            workflow: "room-scan".into(),
            workflow_version: 3,
            state: RunState::Succeeded as i32,
            inputs: Some(dagmesh_proto::json::to_struct(
                &json!({"room": "kitchen", "n": 3}),
            )),
            tags: [("team".to_owned(), "vision".to_owned())].into(),
            steps: vec![Step {
                run_id: "0190-run".into(),
                step_id: "fetch".into(),
                state: StepState::Succeeded as i32,
                attempt: 1,
                outputs: Some(dagmesh_proto::json::to_struct(
                    &json!({"images": ["a.jpg"]}),
                )),
                started_at: Some(Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                ..Step::default()
            }],
            created_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            last_seq: 7,
            ..Run::default()
        }
    }

    #[test]
    fn run_prints_enums_by_name_timestamps_as_rfc3339_and_structs_as_json() {
        let value = run(&sample_run());
        assert_eq!(value["state"], "RUN_STATE_SUCCEEDED");
        assert_eq!(value["created_at"], "2023-11-14T22:13:20.500Z");
        assert_eq!(value["finished_at"], Value::Null);
        assert_eq!(value["inputs"], json!({"room": "kitchen", "n": 3}));
        assert_eq!(value["tags"], json!({"team": "vision"}));
        assert_eq!(value["last_seq"], 7);
        let step = &value["steps"][0];
        assert_eq!(step["state"], "STEP_STATE_SUCCEEDED");
        assert_eq!(step["outputs"], json!({"images": ["a.jpg"]}));
        assert_eq!(step["inputs"], Value::Null);
        assert_eq!(step["started_at"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn events_name_their_oneof_field() {
        let response = WatchRunResponse {
            message: Some(watch_run_response::Message::Event(RunEvent {
                run_id: "r".into(),
                seq: 4,
                at: None,
                event: Some(run_event::Event::StepState(StepStateChanged {
                    step_id: "mesh".into(),
                    state: StepState::Running as i32,
                    attempt: 2,
                    worker: "gpu-1".into(),
                    error: String::new(),
                    item_count: 0,
                    cached_from: String::new(),
                })),
            })),
        };
        let value = watch_response(&response);
        assert_eq!(value["event"]["seq"], 4);
        assert_eq!(value["event"]["step_state"]["state"], "STEP_STATE_RUNNING");
        assert_eq!(value["event"]["step_state"]["worker"], "gpu-1");
        assert!(value["event"].get("step_progress").is_none());
    }
}

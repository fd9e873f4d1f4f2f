//! What the scheduler's tests share: a store in a temporary directory, an executor stand-in and
//! a manual clock.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use dagmesh_metastore::MetadataStore;
use dagmesh_proto::v1::{ListRunsRequest, ListRunsResponse, Run, RunState, SubmitRunRequest};
use dagmesh_scheduler::{ManualClock, RunStarter, SchedError, Scheduler, SchedulerConfig};
use serde_json::Value;

/// The schedulers' lease TTL in these tests.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// An executor stand-in: keeps runs in memory and honours idempotency keys like the real one.
#[derive(Default)]
pub struct FakeStarter {
    pub runs: Mutex<Vec<Run>>,
    pub submits: Mutex<usize>,
    /// The most runs one `list_runs` call returned, over all calls.
    pub largest_listing: Mutex<usize>,
    pub changed: tokio::sync::Notify,
    /// Topics of the events delivered to waiting steps.
    pub delivered: Mutex<Vec<String>>,
    /// When set, the next submit says so on the first channel and waits on the second: a
    /// scheduler's pass held between reading a record and writing it back.
    pub pause_next_submit: Mutex<Option<Pause>>,
}

pub type Pause = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

impl FakeStarter {
    pub fn runs(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }

    /// `input` of every run, in submit order.
    pub fn inputs(&self, input: &str) -> Vec<Value> {
        self.runs()
            .iter()
            .map(|r| dagmesh_proto::json::from_struct(r.inputs.as_ref())[input].clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl RunStarter for FakeStarter {
    async fn submit(&self, request: SubmitRunRequest) -> Result<(Run, bool), SchedError> {
        let pause = self.pause_next_submit.lock().unwrap().take();
        if let Some((reached, release)) = pause {
            let _ = reached.send(());
            let _ = release.await;
        }
        *self.submits.lock().unwrap() += 1;
        let mut runs = self.runs.lock().unwrap();
        if !request.idempotency_key.is_empty()
            && let Some(run) = runs
                .iter()
                .find(|r| r.idempotency_key == request.idempotency_key)
        {
            return Ok((run.clone(), false));
        }
        let run = Run {
            run_id: uuid::Uuid::now_v7().to_string(),
            state: RunState::Running as i32,
            inputs: request.inputs,
            tags: request.tags,
            idempotency_key: request.idempotency_key,
            ..Default::default()
        };
        runs.push(run.clone());
        drop(runs);
        self.changed.notify_waiters();
        Ok((run, true))
    }

    async fn cancel(&self, run_id: &str, _reason: &str) -> Result<(), SchedError> {
        for run in self.runs.lock().unwrap().iter_mut() {
            if run.run_id == run_id {
                run.state = RunState::Cancelled as i32;
            }
        }
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, SchedError> {
        self.runs()
            .into_iter()
            .find(|r| r.run_id == run_id)
            .ok_or_else(|| SchedError::NotFound(run_id.to_owned()))
    }

    async fn deliver_event(
        &self,
        topic: &str,
        _payload: prost_types::Struct,
    ) -> Result<Vec<String>, SchedError> {
        self.delivered.lock().unwrap().push(topic.to_owned());
        Ok(Vec::new())
    }

    /// Filters by tags and state, pages like the store (page_size, at most 1000).
    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, SchedError> {
        let size = match request.page_size {
            0 => 50,
            n => n.min(1000) as usize,
        };
        let skip: usize = request.page_token.parse().unwrap_or(0);
        let matching: Vec<Run> = self
            .runs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| request.tags.iter().all(|(k, v)| r.tags.get(k) == Some(v)))
            .filter(|r| request.state == 0 || r.state == request.state)
            .skip(skip)
            .take(size + 1)
            .cloned()
            .collect();
        let more = matching.len() > size;
        let runs: Vec<Run> = matching.into_iter().take(size).collect();
        let mut largest = self.largest_listing.lock().unwrap();
        *largest = (*largest).max(runs.len());
        Ok(ListRunsResponse {
            next_page_token: if more {
                (skip + size).to_string()
            } else {
                String::new()
            },
            runs,
        })
    }
}

pub fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

pub struct Harness {
    pub _dir: tempfile::TempDir,
    pub store: Arc<dyn MetadataStore>,
    pub starter: Arc<FakeStarter>,
    pub clock: ManualClock,
}

impl Harness {
    pub async fn new(start: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("meta.db").display());
        let store = dagmesh_metastore::connect(&url).await.unwrap();
        // The workflows these tests schedule must be registered, as they would be in production.
        for name in ["report", "ingest", "audit", "w", "daily-load"] {
            let spec = dagmesh_proto::v1::WorkflowSpec {
                name: name.into(),
                steps: vec![dagmesh_proto::v1::StepSpec {
                    id: "only".into(),
                    task: "noop".into(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            store
                .put_workflow(spec, format!("hash-{name}"))
                .await
                .unwrap();
        }
        Harness {
            _dir: dir,
            store,
            starter: Arc::new(FakeStarter::default()),
            clock: ManualClock::new(utc(start)),
        }
    }

    /// A scheduler process over the shared store, starter and clock.
    pub fn scheduler(&self) -> Scheduler {
        Scheduler::new(
            self.store.clone(),
            self.starter.clone(),
            Arc::new(self.clock.clone()),
            SchedulerConfig {
                // Short, so that a scheduler that "crashed" (dropped without releasing its
                // partitions) is replaced within a test.
                lease_ttl: LEASE_TTL,
                ..SchedulerConfig::default()
            },
        )
    }
}

impl FakeStarter {
    /// Ends up to `n` running runs, oldest first, in `state`; returns how many it ended.
    pub fn end_running(&self, n: usize, state: RunState) -> usize {
        let mut ended = 0;
        for run in self.runs.lock().unwrap().iter_mut() {
            if ended < n && run.state == RunState::Running as i32 {
                run.state = state as i32;
                ended += 1;
            }
        }
        ended
    }
}

/// A timestamp from RFC 3339 text.
pub fn ts(text: &str) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: utc(text).timestamp(),
        nanos: 0,
    }
}

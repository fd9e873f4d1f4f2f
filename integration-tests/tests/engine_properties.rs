//! Property tests of the engine as a whole. Each case starts a sandbox on a SQLite file, submits
//! a few small workflows (chains and fan-outs with retries, some holding a limited resource),
//! connects two or three raw workers (exact protocol messages, no SDK) and drives a random
//! sequence of actions: honest results, repeated results, results for the wrong attempt or for a
//! task another worker holds, Started/Progress/Log about tasks not held, a second stream that
//! claims a live worker's instance id, worker crashes, reconnects with or without `in_flight`,
//! silences past the lease, and executor restarts (drained, or aborted like a crash) on the same
//! database file. Then honest workers finish everything, and the invariants of ARCHITECTURE.md
//! are checked from GetRun, ListRuns, the event log and what each worker received:
//!
//! 1. write before act: every Assign a worker got is an ASSIGNED event, every ACCEPTED result
//!    is in the log, and a step's inputs are the outputs that were recorded upstream;
//! 2. one current attempt: a (task, attempt) is assigned once and recorded at most once, only
//!    from the worker it was assigned to; a result from anyone else is STALE (with a reason) and
//!    changes nothing; a repeat of a recorded result is DUPLICATE; an honest holder's result is
//!    refused only for an attempt it was told to cancel; a second stream for a live instance is
//!    refused with ALREADY_EXISTS;
//! 3. credit flow, checked at the worker: it never holds more Assigns than its slots;
//! 4. nothing lost, nothing loops: every run ends, SUCCEEDED unless a worker said a step failed
//!    or a step lost `max_lost_attempts` attempts in a row; lost attempts do not use up retries;
//! 5. events are gap-free 1..=last_seq, each step succeeds at most once in the log, progress is
//!    rate-limited, and no forged value reaches outputs, errors, progress or logs;
//! 6. runs keep the workflow version they were submitted with;
//! 8. at most 2 runs are RUNNING at once (a run limit) and at most one step of a run holds the
//!    `db` resource (a step limit), sampled after every action.
//!
//! (7, "only the metastore touches the database", is a property of the code, not of behaviour.)
//!
//! `PROPTEST_CASES` sets the number of cases (default 8); each run prints its seed, and
//! `DAGMESH_PROPERTY_SEED=<seed>` replays it (timing still varies). A failure is shrunk to a
//! short action list and printed with the trace of what the workers saw.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use dagmesh_executor::{ExecutorConfig, Limits};
use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{
    self as pb, ListRunsRequest, RecordOutcome, RetryPolicy, RunState, StepState, run_event,
    server_message, worker_message,
};
use dagmesh_sdk::{Client, SubmitRun};
use futures::FutureExt as _;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tokio::time::Instant;

const TASK: &str = "work";
const VERSION: &str = "1.0.0";
const LEASE: Duration = Duration::from_millis(600);
const HEARTBEAT: Duration = Duration::from_millis(100);
const RECONNECT_GRACE: Duration = Duration::from_millis(200);
const MAX_LOST_ATTEMPTS: u32 = 4;
/// Runs RUNNING at once (limit "everything").
const RUN_LIMIT: usize = 2;
/// The step resource held by keyed steps, and its limit.
const RESOURCE: &str = "db";
/// How long honest workers get to finish everything at the end of a case.
const FINISH_WITHIN: Duration = Duration::from_secs(30);
/// Progress events kept per step attempt in any one second ("about five a second"), with slack.
const MAX_PROGRESS_PER_SECOND: usize = 7;
/// Progress messages a worker sends in one burst.
const PROGRESS_BURST: u32 = 30;

fn config() -> ExecutorConfig {
    let limits =
        format!("runs:\n  - {{name: everything, max: {RUN_LIMIT}}}\nsteps:\n  {RESOURCE}: 1\n");
    ExecutorConfig {
        lease: LEASE,
        heartbeat_interval: HEARTBEAT,
        reconnect_grace: RECONNECT_GRACE,
        max_lost_attempts: MAX_LOST_ATTEMPTS,
        drain_timeout: Duration::from_millis(300),
        executor_lease_ttl: Duration::from_millis(500),
        limits: Arc::new(Limits::from_yaml(&limits).expect("valid limits")),
        ..fast_config()
    }
}

// ---- what a case is made of ----

#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    /// s0 -> s1 -> ...
    Chain(usize),
    /// root -> b0..bN -> join
    FanOut(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RunPlan {
    shape: Shape,
    max_attempts: u32,
    /// Whether the middle steps hold the limited resource.
    keyed: bool,
}

/// Worker and victim indices are taken modulo the number of workers; `pick` modulo the number
/// of candidates (no candidate: the action does nothing).
#[derive(Debug, Clone)]
enum Action {
    /// The honest result of a task the worker holds.
    Complete {
        worker: usize,
        pick: usize,
    },
    Fail {
        worker: usize,
        pick: usize,
        retryable: bool,
    },
    /// Started, a burst of Progress and a Log for a task the worker holds.
    Report {
        worker: usize,
        pick: usize,
    },
    /// Sends one of the worker's earlier results again.
    Repeat {
        worker: usize,
        pick: usize,
    },
    /// A result for a task it holds, naming another attempt.
    WrongAttempt {
        worker: usize,
        pick: usize,
        delta: i64,
    },
    /// A result for a task another worker holds (victim == worker: a task that does not exist).
    Forge {
        worker: usize,
        victim: usize,
        pick: usize,
        complete: bool,
    },
    /// Started/Progress/Log for a task another worker holds.
    Meddle {
        worker: usize,
        victim: usize,
        pick: usize,
    },
    /// A second stream with the instance id (and the tasks) of a connected worker.
    Hijack {
        victim: usize,
    },
    /// The stream is dropped; the worker keeps its tasks in memory.
    Crash {
        worker: usize,
    },
    /// A disconnected worker connects again with the same instance id.
    Reconnect {
        worker: usize,
        in_flight: bool,
    },
    /// The worker sends nothing for a third of the lease, or for longer than the lease.
    Silence {
        worker: usize,
        long: bool,
    },
    /// The executor stops (drained, or aborted like a crash) and a new one starts on the file.
    Restart {
        crash: bool,
    },
    Submit {
        plan: RunPlan,
    },
    Wait {
        ms: u64,
    },
}

#[derive(Debug, Clone)]
struct Case {
    slots: Vec<u32>,
    runs: Vec<RunPlan>,
    actions: Vec<Action>,
}

fn run_plan() -> impl Strategy<Value = RunPlan> {
    let shape = prop_oneof![
        (1usize..=3).prop_map(Shape::Chain),
        (1usize..=3).prop_map(Shape::FanOut),
    ];
    (shape, 1u32..=3, any::<bool>()).prop_map(|(shape, max_attempts, keyed)| RunPlan {
        shape,
        max_attempts,
        keyed,
    })
}

fn action() -> impl Strategy<Value = Action> {
    let w = || 0usize..3;
    let pick = || 0usize..8;
    prop_oneof![
        8 => (w(), pick()).prop_map(|(worker, pick)| Action::Complete { worker, pick }),
        2 => (w(), pick(), any::<bool>())
            .prop_map(|(worker, pick, retryable)| Action::Fail { worker, pick, retryable }),
        2 => (w(), pick()).prop_map(|(worker, pick)| Action::Report { worker, pick }),
        2 => (w(), pick()).prop_map(|(worker, pick)| Action::Repeat { worker, pick }),
        2 => (w(), pick(), prop_oneof![Just(-1i64), Just(1), Just(7)])
            .prop_map(|(worker, pick, delta)| Action::WrongAttempt { worker, pick, delta }),
        3 => (w(), w(), pick(), any::<bool>()).prop_map(|(worker, victim, pick, complete)| {
            Action::Forge { worker, victim, pick, complete }
        }),
        2 => (w(), w(), pick())
            .prop_map(|(worker, victim, pick)| Action::Meddle { worker, victim, pick }),
        1 => w().prop_map(|victim| Action::Hijack { victim }),
        2 => w().prop_map(|worker| Action::Crash { worker }),
        3 => (w(), any::<bool>())
            .prop_map(|(worker, in_flight)| Action::Reconnect { worker, in_flight }),
        1 => (w(), any::<bool>()).prop_map(|(worker, long)| Action::Silence { worker, long }),
        1 => any::<bool>().prop_map(|crash| Action::Restart { crash }),
        1 => run_plan().prop_map(|plan| Action::Submit { plan }),
        2 => (10u64..300).prop_map(|ms| Action::Wait { ms }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(1u32..=3, 2..=3),
        prop::collection::vec(run_plan(), 1..=3),
        prop::collection::vec(action(), 4..=24),
    )
        .prop_map(|(slots, runs, actions)| Case {
            slots,
            runs,
            actions,
        })
}

impl RunPlan {
    /// Steps with (id, needs, keyed). Each step's inputs name its parents' `by` output.
    fn steps(&self) -> Vec<(String, Vec<String>, bool)> {
        match self.shape {
            Shape::Chain(n) => (0..n)
                .map(|i| {
                    let needs = if i == 0 {
                        vec![]
                    } else {
                        vec![format!("s{}", i - 1)]
                    };
                    (format!("s{i}"), needs, self.keyed)
                })
                .collect(),
            Shape::FanOut(n) => {
                let branches: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
                let mut steps = vec![("root".to_owned(), vec![], false)];
                for branch in &branches {
                    steps.push((branch.clone(), vec!["root".to_owned()], self.keyed));
                }
                steps.push(("join".to_owned(), branches, false));
                steps
            }
        }
    }

    fn spec(&self) -> pb::WorkflowSpec {
        let steps = self
            .steps()
            .into_iter()
            .map(|(id, needs, keyed)| {
                let inputs: Vec<(String, String)> = needs
                    .iter()
                    .map(|parent| (format!("from_{parent}"), format!("{parent}.by")))
                    .collect();
                let inputs: Vec<(&str, &str)> = inputs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let needs: Vec<&str> = needs.iter().map(String::as_str).collect();
                let mut spec = step(&id, TASK, &needs, &inputs);
                spec.retry = Some(RetryPolicy {
                    max_attempts: self.max_attempts,
                    initial_backoff: "10ms".into(),
                    max_backoff: "40ms".into(),
                    ..RetryPolicy::default()
                });
                if keyed {
                    spec.concurrency_key = RESOURCE.into();
                }
                spec
            })
            .collect();
        // One workflow name for all shapes: each new shape is a new version of it.
        workflow("prop", steps)
    }
}

// ---- the simulation ----

type Key = (String, u32);

struct SimWorker {
    id: String,
    slots: u32,
    stream: Option<RawWorker>,
    last_beat: Instant,
    /// Assigned and not yet answered, as the server counts them against the slots.
    held: BTreeMap<Key, pb::Assign>,
    /// Honest results whose Recorded has not come: sent again after a reconnect, as SDKs do.
    unacked: BTreeMap<Key, worker_message::Message>,
    /// Every result this worker sent, for repeats.
    sent: Vec<(Key, worker_message::Message)>,
    /// On the current stream: honest results of attempts the worker held when it sent them...
    awaiting: HashSet<Key>,
    /// ...and the attempts it was told to cancel (only those may be refused).
    cancelled: HashSet<Key>,
}

struct SubmittedRun {
    run_id: String,
    plan: RunPlan,
    version: u32,
}

/// What every worker saw, across streams and executor restarts.
#[derive(Default)]
struct Ledger {
    /// (task, attempt) -> (worker, Assign).
    assigned: HashMap<Key, (String, pb::Assign)>,
    /// (task, attempt) -> the worker whose result was ACCEPTED.
    accepted: HashMap<Key, String>,
    /// (worker, (task, attempt)) -> results sent.
    sends: HashMap<(String, Key), Vec<worker_message::Message>>,
    /// (worker, (task, attempt)) -> outcomes received, in order.
    outcomes: HashMap<(String, Key), Vec<RecordOutcome>>,
}

struct Sim {
    sandbox: Option<Sandbox>,
    client: Client,
    workers: Vec<SimWorker>,
    runs: Vec<SubmittedRun>,
    ledger: Ledger,
    started: Instant,
    trace: Vec<String>,
    /// Progress events in the logs of all runs (for the summary).
    progress_events: usize,
}

fn is_already_exists(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::AlreadyExists)
}

fn completed(task_id: &str, attempt: u32, outputs: Value) -> worker_message::Message {
    worker_message::Message::Completed(pb::TaskCompleted {
        task_id: task_id.into(),
        attempt,
        outputs: Some(dagmesh_proto::json::to_struct(&outputs)),
    })
}

fn failed(task_id: &str, attempt: u32, error: String, retryable: bool) -> worker_message::Message {
    worker_message::Message::Failed(pb::TaskFailed {
        task_id: task_id.into(),
        attempt,
        error,
        retryable,
    })
}

impl Sim {
    async fn start(case: &Case) -> anyhow::Result<Self> {
        let sandbox = Sandbox::start_with(Database::sqlite()?, config()).await?;
        let client = sandbox.client().await?;
        let now = Instant::now();
        let workers = case
            .slots
            .iter()
            .enumerate()
            .map(|(i, &slots)| SimWorker {
                id: format!("w{i}"),
                slots,
                stream: None,
                last_beat: now,
                held: BTreeMap::new(),
                unacked: BTreeMap::new(),
                sent: Vec::new(),
                awaiting: HashSet::new(),
                cancelled: HashSet::new(),
            })
            .collect();
        let mut sim = Self {
            sandbox: Some(sandbox),
            client,
            workers,
            runs: Vec::new(),
            ledger: Ledger::default(),
            started: now,
            trace: Vec::new(),
            progress_events: 0,
        };
        for i in 0..sim.workers.len() {
            sim.connect(i, true).await?;
        }
        for plan in &case.runs {
            sim.submit(plan.clone()).await?;
        }
        Ok(sim)
    }

    fn note(&mut self, line: String) {
        let ms = self.started.elapsed().as_millis();
        self.trace.push(format!("{ms:>6}ms {line}"));
    }

    /// A property broke: the error carries the end of the trace.
    fn violation(&self, what: String) -> anyhow::Error {
        let tail = &self.trace[self.trace.len().saturating_sub(60)..];
        anyhow::anyhow!(
            "{what}\n--- trace (last {} lines) ---\n{}",
            tail.len(),
            tail.join("\n")
        )
    }

    fn url(&self) -> String {
        self.sandbox.as_ref().expect("sandbox running").url()
    }

    async fn submit(&mut self, plan: RunPlan) -> anyhow::Result<()> {
        let run = self.client.submit(SubmitRun::inline(plan.spec())).await?;
        self.note(format!(
            "submitted {} ({:?}, max_attempts {}, keyed {}) as version {}",
            run.run_id, plan.shape, plan.max_attempts, plan.keyed, run.workflow_version
        ));
        self.runs.push(SubmittedRun {
            run_id: run.run_id,
            plan,
            version: run.workflow_version,
        });
        Ok(())
    }

    /// Connects worker `i` with its instance id. With `in_flight` it lists what it holds and
    /// has not had acknowledged, and sends those results again; without, it is a fresh process
    /// that remembers nothing. Waits out ALREADY_EXISTS while the server sees the old stream end.
    async fn connect(&mut self, i: usize, in_flight: bool) -> anyhow::Result<()> {
        let url = self.url();
        let worker = &mut self.workers[i];
        worker.stream = None;
        worker.awaiting.clear();
        worker.cancelled.clear();
        if !in_flight {
            worker.held.clear();
            worker.unacked.clear();
        }
        let mut hello = RawWorker::hello(&worker.id, TASK, VERSION, worker.slots);
        let listed: BTreeSet<Key> = worker
            .held
            .keys()
            .chain(worker.unacked.keys())
            .cloned()
            .collect();
        hello.in_flight = listed
            .iter()
            .map(|(task_id, attempt)| pb::TaskRef {
                task_id: task_id.clone(),
                attempt: *attempt,
            })
            .collect();
        let id = worker.id.clone();
        let deadline = Instant::now() + PATIENCE;
        let (raw, welcome) = loop {
            match RawWorker::connect_once(&url, hello.clone()).await {
                Ok(pair) => break pair,
                Err(error) if is_already_exists(&error) && Instant::now() < deadline => {
                    self.settle(Duration::from_millis(20), None).await?;
                }
                Err(error) => return Err(error.context(format!("connecting {id}"))),
            }
        };
        let resumed: HashSet<Key> = welcome
            .resumed
            .iter()
            .map(|t| (t.task_id.clone(), t.attempt))
            .collect();
        if let Some(extra) = resumed.iter().find(|key| !listed.contains(*key)) {
            return Err(self.violation(format!(
                "{id} was told it resumed {extra:?}, which it did not list in Hello.in_flight"
            )));
        }
        ensure!(
            welcome.lease_ms == LEASE.as_millis() as u32,
            "Welcome.lease_ms {}",
            welcome.lease_ms
        );
        self.note(format!(
            "{id} connected (in_flight {}, resumed {:?})",
            listed.len(),
            sorted(&resumed)
        ));
        let worker = &mut self.workers[i];
        // Tasks the server did not resume are no longer this worker's: they do not take slots.
        worker.held.retain(|key, _| resumed.contains(key));
        worker.stream = Some(raw);
        worker.last_beat = Instant::now();
        let unacked: Vec<(Key, worker_message::Message)> = worker
            .unacked
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        for (key, message) in unacked {
            // Resumed: the server still waits for this result, so it must take it.
            self.send_result(i, key.clone(), message, resumed.contains(&key), "resent")
                .await;
        }
        Ok(())
    }

    /// Reads whatever the server has sent, without waiting.
    fn pump(&mut self) -> anyhow::Result<()> {
        for i in 0..self.workers.len() {
            while let Some(stream) = self.workers[i].stream.as_mut() {
                let Some(result) = stream.next().now_or_never() else {
                    break;
                };
                match result {
                    Ok(message) => self.on_message(i, message)?,
                    Err(error) => {
                        let id = self.workers[i].id.clone();
                        self.note(format!("{id}: stream ended ({error:#})"));
                        let worker = &mut self.workers[i];
                        worker.stream = None;
                        worker.awaiting.clear();
                        worker.cancelled.clear();
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn beat(&mut self, except: Option<usize>) {
        for (i, worker) in self.workers.iter_mut().enumerate() {
            if Some(i) == except || worker.last_beat.elapsed() < HEARTBEAT / 2 {
                continue;
            }
            if let Some(stream) = &worker.stream {
                // A failed send means the stream ended; the pump notices.
                let _ = stream.heartbeat().await;
                worker.last_beat = Instant::now();
            }
        }
    }

    /// Lets `duration` pass while every worker but `except` reads and heartbeats.
    async fn settle(&mut self, duration: Duration, except: Option<usize>) -> anyhow::Result<()> {
        let end = Instant::now() + duration;
        loop {
            self.pump()?;
            self.beat(except).await;
            if Instant::now() >= end {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn on_message(&mut self, i: usize, message: server_message::Message) -> anyhow::Result<()> {
        let id = self.workers[i].id.clone();
        match message {
            server_message::Message::Assign(assign) => {
                let key = (assign.task_id.clone(), assign.attempt);
                self.note(format!("{id} <- Assign {key:?}"));
                if let Some((other, _)) = self.ledger.assigned.get(&key) {
                    return Err(self.violation(format!(
                        "invariant 2: attempt {key:?} was assigned to {id} after it had been \
                         assigned to {other}"
                    )));
                }
                let worker = &self.workers[i];
                let used: u32 = worker.held.values().map(|a| a.slots.max(1)).sum();
                if used + assign.slots.max(1) > worker.slots {
                    return Err(self.violation(format!(
                        "invariant 3 (credit flow): {id} has {} slots and holds {:?}, and was \
                         assigned {key:?} too",
                        worker.slots,
                        worker.held.keys().collect::<Vec<_>>()
                    )));
                }
                if assign.task_id != format!("{}/{}", assign.run_id, assign.step_id) {
                    return Err(self.violation(format!(
                        "Assign {key:?} names run {} step {}",
                        assign.run_id, assign.step_id
                    )));
                }
                self.ledger
                    .assigned
                    .insert(key.clone(), (id.clone(), assign.clone()));
                self.workers[i].held.insert(key, assign);
            }
            server_message::Message::Recorded(recorded) => {
                let key = (recorded.task_id.clone(), recorded.attempt);
                let outcome = recorded.outcome();
                self.note(format!(
                    "{id} <- Recorded {key:?} {} {}",
                    outcome.as_str_name(),
                    recorded.detail
                ));
                let sends = self
                    .ledger
                    .sends
                    .get(&(id.clone(), key.clone()))
                    .map_or(0, Vec::len);
                if sends == 0 {
                    return Err(self.violation(format!(
                        "{id} got Recorded for {key:?}, which it never sent"
                    )));
                }
                let assigned_to_it = self
                    .ledger
                    .assigned
                    .get(&key)
                    .is_some_and(|(holder, _)| *holder == id);
                match outcome {
                    RecordOutcome::Accepted => {
                        if !assigned_to_it {
                            return Err(self.violation(format!(
                                "invariant 2: {id}'s result for {key:?} was ACCEPTED, but that \
                                 attempt was assigned to {:?}",
                                self.ledger.assigned.get(&key).map(|(w, _)| w)
                            )));
                        }
                        if let Some(first) = self.ledger.accepted.insert(key.clone(), id.clone()) {
                            return Err(self.violation(format!(
                                "invariant 2: a result for {key:?} was ACCEPTED twice (first \
                                 from {first}, now from {id})"
                            )));
                        }
                    }
                    RecordOutcome::Duplicate => {
                        if !assigned_to_it || sends < 2 {
                            return Err(self.violation(format!(
                                "invariant 2: {id}'s result for {key:?} was answered DUPLICATE, \
                                 but it was not assigned to {id} or not sent before ({sends} \
                                 sends)"
                            )));
                        }
                    }
                    RecordOutcome::Stale => {
                        if recorded.detail.is_empty() {
                            return Err(self.violation(format!(
                                "a STALE answer to {id} for {key:?} gives no reason"
                            )));
                        }
                        let worker = &self.workers[i];
                        if worker.awaiting.contains(&key) && !worker.cancelled.contains(&key) {
                            return Err(self.violation(format!(
                                "invariant 2: {id} held {key:?}, was never told to cancel it, \
                                 and its result was refused STALE: {}",
                                recorded.detail
                            )));
                        }
                    }
                    RecordOutcome::Unspecified => {
                        return Err(self.violation(format!(
                            "{id} got Recorded for {key:?} without an outcome"
                        )));
                    }
                }
                self.ledger
                    .outcomes
                    .entry((id, key.clone()))
                    .or_default()
                    .push(outcome);
                let worker = &mut self.workers[i];
                worker.awaiting.remove(&key);
                worker.unacked.remove(&key);
            }
            server_message::Message::Cancel(cancel) => {
                let key = (cancel.task_id.clone(), cancel.attempt);
                self.note(format!("{id} <- Cancel {key:?} {}", cancel.reason));
                // The task keeps its slot until the worker answers it.
                self.workers[i].cancelled.insert(key);
            }
            server_message::Message::Drain(drain) => {
                self.note(format!("{id} <- Drain {}", drain.reason));
            }
            server_message::Message::Welcome(_) => {
                return Err(self.violation(format!("{id} got a second Welcome on one stream")));
            }
        }
        Ok(())
    }

    /// Sends a result from worker `i`. `held`: the worker holds the attempt (its result must be
    /// taken unless the attempt is cancelled).
    async fn send_result(
        &mut self,
        i: usize,
        key: Key,
        message: worker_message::Message,
        held: bool,
        what: &str,
    ) {
        let id = self.workers[i].id.clone();
        let Some(stream) = &self.workers[i].stream else {
            return;
        };
        // A failed send means the stream ended: the result stays unacknowledged.
        let _ = stream.send(message.clone()).await;
        self.note(format!("{id} -> {what} {key:?}"));
        self.ledger
            .sends
            .entry((id, key.clone()))
            .or_default()
            .push(message.clone());
        let worker = &mut self.workers[i];
        if held {
            worker.awaiting.insert(key.clone());
        }
        worker.sent.push((key, message));
    }

    /// The honest answer to a held task: removes it from the held set (the slot is free as far
    /// as this worker counts) and keeps it until Recorded.
    async fn answer(&mut self, i: usize, key: Key, message: worker_message::Message, what: &str) {
        if self.workers[i].stream.is_none() {
            return;
        }
        let worker = &mut self.workers[i];
        worker.held.remove(&key);
        worker.unacked.insert(key.clone(), message.clone());
        self.send_result(i, key, message, true, what).await;
    }

    fn held_pick(&self, i: usize, pick: usize) -> Option<Key> {
        let held: Vec<&Key> = self.workers[i].held.keys().collect();
        (!held.is_empty()).then(|| held[pick % held.len()].clone())
    }

    fn connected(&self, i: usize) -> bool {
        self.workers[i].stream.is_some()
    }

    async fn act(&mut self, action: &Action) -> anyhow::Result<()> {
        let n = self.workers.len();
        self.note(format!("action {action:?}"));
        match *action {
            Action::Complete { worker, pick } => {
                let i = worker % n;
                if let (true, Some(key)) = (self.connected(i), self.held_pick(i, pick)) {
                    let outputs = json!({
                        "by": self.workers[i].id,
                        "task": key.0,
                        "attempt": key.1.to_string(),
                    });
                    let message = completed(&key.0, key.1, outputs);
                    self.answer(i, key, message, "Completed").await;
                }
            }
            Action::Fail {
                worker,
                pick,
                retryable,
            } => {
                let i = worker % n;
                if let (true, Some(key)) = (self.connected(i), self.held_pick(i, pick)) {
                    let error = format!("honest failure by {}", self.workers[i].id);
                    let message = failed(&key.0, key.1, error, retryable);
                    self.answer(i, key, message, "Failed").await;
                }
            }
            Action::Report { worker, pick } => {
                let i = worker % n;
                if let (Some(stream), Some((task_id, attempt))) =
                    (&self.workers[i].stream, self.held_pick(i, pick))
                {
                    let id = &self.workers[i].id;
                    let _ = stream
                        .send(worker_message::Message::Started(pb::TaskStarted {
                            task_id: task_id.clone(),
                            attempt,
                        }))
                        .await;
                    for k in 1..=PROGRESS_BURST {
                        let _ = stream
                            .send(worker_message::Message::Progress(pb::TaskProgress {
                                task_id: task_id.clone(),
                                attempt,
                                fraction: k as f32 / PROGRESS_BURST as f32,
                                message: format!("{k}/{PROGRESS_BURST} by {id}"),
                                ..pb::TaskProgress::default()
                            }))
                            .await;
                    }
                    let _ = stream
                        .send(worker_message::Message::Log(pb::TaskLog {
                            task_id: task_id.clone(),
                            attempt,
                            lines: vec![log_line(format!("working, says {id}"))],
                        }))
                        .await;
                    let line = format!("{id} -> progress burst {:?}", (&task_id, attempt));
                    self.note(line);
                }
            }
            Action::Repeat { worker, pick } => {
                let i = worker % n;
                let sent = &self.workers[i].sent;
                if self.connected(i) && !sent.is_empty() {
                    let (key, message) = sent[pick % sent.len()].clone();
                    self.send_result(i, key, message, false, "repeat").await;
                }
            }
            Action::WrongAttempt {
                worker,
                pick,
                delta,
            } => {
                let i = worker % n;
                if let (true, Some((task_id, attempt))) =
                    (self.connected(i), self.held_pick(i, pick))
                {
                    let wrong = (i64::from(attempt) + delta).max(0) as u32;
                    let key = (task_id, wrong);
                    if !self.workers[i].held.contains_key(&key) {
                        let outputs = json!({
                            "by": self.workers[i].id,
                            "task": key.0,
                            "attempt": wrong.to_string(),
                            "forged": "wrong attempt",
                        });
                        let message = completed(&key.0, wrong, outputs);
                        self.send_result(i, key, message, false, "wrong attempt")
                            .await;
                    }
                }
            }
            Action::Forge {
                worker,
                victim,
                pick,
                complete,
            } => {
                let (i, v) = (worker % n, victim % n);
                let key = if i == v {
                    let run = self.runs.first().map_or("none", |r| r.run_id.as_str());
                    Some((format!("{run}/ghost"), 1))
                } else {
                    self.held_pick(v, pick)
                };
                if let (true, Some(key)) = (self.connected(i), key) {
                    let id = self.workers[i].id.clone();
                    let message = if complete {
                        let outputs = json!({
                            "by": id,
                            "task": key.0,
                            "attempt": key.1.to_string(),
                            "forged": true,
                        });
                        completed(&key.0, key.1, outputs)
                    } else {
                        failed(&key.0, key.1, format!("forged failure by {id}"), false)
                    };
                    self.send_result(i, key, message, false, "forged").await;
                }
            }
            Action::Meddle {
                worker,
                victim,
                pick,
            } => {
                let (i, v) = (worker % n, victim % n);
                if i != v
                    && let (Some(stream), Some((task_id, attempt))) =
                        (&self.workers[i].stream, self.held_pick(v, pick))
                {
                    let id = &self.workers[i].id;
                    let _ = stream
                        .send(worker_message::Message::Started(pb::TaskStarted {
                            task_id: task_id.clone(),
                            attempt,
                        }))
                        .await;
                    let _ = stream
                        .send(worker_message::Message::Progress(pb::TaskProgress {
                            task_id: task_id.clone(),
                            attempt,
                            fraction: 0.99,
                            message: format!("forged by {id}"),
                            ..pb::TaskProgress::default()
                        }))
                        .await;
                    let _ = stream
                        .send(worker_message::Message::Log(pb::TaskLog {
                            task_id,
                            attempt,
                            lines: vec![log_line(format!("forged by {id}"))],
                        }))
                        .await;
                }
            }
            Action::Hijack { victim } => {
                let v = victim % n;
                if self.connected(v) {
                    // The victim is connected and heartbeating: its session is live.
                    self.beat(None).await;
                    let worker = &self.workers[v];
                    let mut hello = RawWorker::hello(&worker.id, TASK, VERSION, 3);
                    hello.worker_name = "thief".into();
                    hello.in_flight = worker
                        .held
                        .keys()
                        .map(|(task_id, attempt)| pb::TaskRef {
                            task_id: task_id.clone(),
                            attempt: *attempt,
                        })
                        .collect();
                    match RawWorker::connect_once(&self.url(), hello).await {
                        Err(error) if is_already_exists(&error) => {}
                        Err(error) => return Err(error.context("the second stream")),
                        Ok((_thief, welcome)) => {
                            let id = self.workers[v].id.clone();
                            return Err(self.violation(format!(
                                "invariant 2: a second stream claiming live instance {id} was \
                                 welcomed (resumed {:?}) instead of refused ALREADY_EXISTS",
                                welcome.resumed
                            )));
                        }
                    }
                }
            }
            Action::Crash { worker } => {
                let i = worker % n;
                let worker = &mut self.workers[i];
                if let Some(stream) = worker.stream.take() {
                    stream.crash();
                    worker.awaiting.clear();
                    worker.cancelled.clear();
                }
            }
            Action::Reconnect { worker, in_flight } => {
                let i = worker % n;
                if !self.connected(i) {
                    self.connect(i, in_flight).await?;
                }
            }
            Action::Silence { worker, long } => {
                let i = worker % n;
                if !long {
                    self.settle(LEASE / 3, Some(i)).await?;
                } else if self.connected(i) {
                    self.settle(LEASE, Some(i)).await?;
                    // The lease ran out: the executor must close the stream.
                    let deadline = Instant::now() + 2 * LEASE;
                    while self.connected(i) {
                        if Instant::now() > deadline {
                            let id = self.workers[i].id.clone();
                            return Err(self.violation(format!(
                                "failure model: {id} sent nothing for three times the lease \
                                 ({LEASE:?}) and its stream is still open, so it never learns \
                                 that its session and tasks are gone"
                            )));
                        }
                        self.settle(Duration::from_millis(10), Some(i)).await?;
                    }
                }
            }
            Action::Restart { crash } => self.restart(crash).await?,
            Action::Submit { ref plan } => self.submit(plan.clone()).await?,
            Action::Wait { ms } => self.settle(Duration::from_millis(ms), None).await?,
        }
        self.settle(Duration::from_millis(15), None).await?;
        self.check_limits().await
    }

    /// Stops the executor (a drain, or an abort like a crash) and starts a new one on the same
    /// database file; connected workers reconnect with what they hold, as SDKs do.
    async fn restart(&mut self, crash: bool) -> anyhow::Result<()> {
        let was_connected: Vec<usize> = (0..self.workers.len())
            .filter(|&i| self.workers[i].stream.is_some())
            .collect();
        let Sandbox { mesh, database, .. } = self.sandbox.take().expect("sandbox running");
        if crash {
            mesh.abort();
        } else {
            let shutdown = mesh.shutdown();
            tokio::pin!(shutdown);
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Some(result) = (&mut shutdown).now_or_never() {
                    result?;
                    break;
                }
                ensure!(Instant::now() < deadline, "the drain did not end");
                self.settle(Duration::from_millis(5), None).await?;
            }
        }
        for worker in &mut self.workers {
            worker.stream = None;
            worker.awaiting.clear();
            worker.cancelled.clear();
        }
        let sandbox = Sandbox::start_with(database, config()).await?;
        self.client = sandbox.client().await?;
        self.sandbox = Some(sandbox);
        self.note(format!("executor restarted (crash: {crash})"));
        for i in was_connected {
            self.connect(i, true).await?;
        }
        Ok(())
    }

    /// Invariant 8, sampled: the run limit and the step resource limit.
    async fn check_limits(&mut self) -> anyhow::Result<()> {
        let running = self
            .client
            .list_runs(ListRunsRequest {
                state: RunState::Running as i32,
                page_size: 1000,
                ..ListRunsRequest::default()
            })
            .await?
            .runs;
        if running.len() > RUN_LIMIT {
            let ids: Vec<&str> = running.iter().map(|r| r.run_id.as_str()).collect();
            return Err(self.violation(format!(
                "invariant 8: {} runs RUNNING with a limit of {RUN_LIMIT}: {ids:?}",
                running.len()
            )));
        }
        for run in &running {
            let Some(submitted) = self.runs.iter().find(|r| r.run_id == run.run_id) else {
                continue;
            };
            let keyed: HashSet<String> = submitted
                .plan
                .steps()
                .into_iter()
                .filter(|(_, _, keyed)| *keyed)
                .map(|(id, _, _)| id)
                .collect();
            if keyed.is_empty() {
                continue;
            }
            let run = self.client.get_run(run.run_id.clone()).await?;
            let holding: Vec<&str> = run
                .steps
                .iter()
                .filter(|s| keyed.contains(&s.step_id))
                .filter(|s| matches!(s.state(), StepState::Assigned | StepState::Running))
                .map(|s| s.step_id.as_str())
                .collect();
            if holding.len() > 1 {
                return Err(self.violation(format!(
                    "invariant 8: steps {holding:?} of run {} hold resource {RESOURCE:?} at \
                     once (limit 1)",
                    run.run_id
                )));
            }
        }
        Ok(())
    }

    /// Honest workers connect and answer everything until every run has ended.
    async fn finish(&mut self) -> anyhow::Result<Vec<pb::Run>> {
        self.note("finishing: honest workers answer everything".into());
        let deadline = Instant::now() + FINISH_WITHIN;
        let mut next_check = Instant::now();
        loop {
            for i in 0..self.workers.len() {
                if !self.connected(i) {
                    self.connect(i, true).await?;
                }
                let held: Vec<Key> = self.workers[i].held.keys().cloned().collect();
                for key in held {
                    let outputs = json!({
                        "by": self.workers[i].id,
                        "task": key.0,
                        "attempt": key.1.to_string(),
                    });
                    let message = completed(&key.0, key.1, outputs);
                    self.answer(i, key, message, "Completed").await;
                }
            }
            self.settle(Duration::from_millis(10), None).await?;
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_millis(100);
                let mut runs = Vec::new();
                for submitted in &self.runs {
                    runs.push(self.client.get_run(submitted.run_id.clone()).await?);
                }
                if runs
                    .iter()
                    .all(|r| dagmesh_sdk::client::is_terminal(r.state()))
                {
                    // Let the last acknowledgements arrive.
                    self.settle(Duration::from_millis(100), None).await?;
                    return Ok(runs);
                }
                if Instant::now() > deadline {
                    let stuck: Vec<String> = runs
                        .iter()
                        .filter(|r| !dagmesh_sdk::client::is_terminal(r.state()))
                        .map(|r| {
                            let steps: Vec<String> = r
                                .steps
                                .iter()
                                .map(|s| {
                                    format!(
                                        "{}={}#{}{}",
                                        s.step_id,
                                        s.state().as_str_name(),
                                        s.attempt,
                                        if s.worker.is_empty() {
                                            String::new()
                                        } else {
                                            format!("@{}", s.worker)
                                        }
                                    )
                                })
                                .collect();
                            format!(
                                "{} {}: {}",
                                r.run_id,
                                r.state().as_str_name(),
                                steps.join(" ")
                            )
                        })
                        .collect();
                    return Err(self.violation(format!(
                        "invariant 4 (nothing lost, nothing loops): with honest workers these \
                         runs did not end within {FINISH_WITHIN:?}: {stuck:#?}"
                    )));
                }
            }
        }
    }

    /// The checks after every run ended.
    async fn check(&mut self, runs: &[pb::Run]) -> anyhow::Result<()> {
        let channel = self
            .sandbox
            .as_ref()
            .expect("sandbox running")
            .channel()
            .await?;
        let mut problems = Vec::new();
        // Invariant 6: one version per distinct definition, and a run keeps its version.
        for a in &self.runs {
            for b in &self.runs {
                // (Equal definitions may get a new version when another came in between.)
                if a.version == b.version && a.plan.spec() != b.plan.spec() {
                    problems.push(format!(
                        "invariant 6: runs {} and {} of different definitions ({:?}, {:?}) \
                         share version {}",
                        a.run_id, b.run_id, a.plan, b.plan, a.version
                    ));
                }
            }
        }
        for (submitted, run) in self.runs.iter().zip(runs) {
            let events = all_events(channel.clone(), &run.run_id).await?;
            self.progress_events += events
                .iter()
                .filter(|e| matches!(e.event, Some(run_event::Event::StepProgress(_))))
                .count();
            self.check_run(submitted, run, &events, &mut problems);
        }
        // Invariant 2: a repeat of a recorded Completed is DUPLICATE, never STALE.
        for ((worker, key), outcomes) in &self.ledger.outcomes {
            let sends = &self.ledger.sends[&(worker.clone(), key.clone())];
            let one_completed = sends
                .iter()
                .all(|m| m == &sends[0] && matches!(m, worker_message::Message::Completed(_)));
            if one_completed
                && outcomes.contains(&RecordOutcome::Accepted)
                && outcomes
                    .iter()
                    .any(|o| !matches!(o, RecordOutcome::Accepted | RecordOutcome::Duplicate))
            {
                problems.push(format!(
                    "invariant 2: {worker} sent the same Completed for {key:?} {} times; it was \
                     recorded, yet the answers were {outcomes:?}",
                    sends.len()
                ));
            }
        }
        if !problems.is_empty() {
            return Err(self.violation(problems.join("\n")));
        }
        Ok(())
    }

    fn check_run(
        &self,
        submitted: &SubmittedRun,
        run: &pb::Run,
        events: &[pb::RunEvent],
        problems: &mut Vec<String>,
    ) {
        let run_id = &run.run_id;
        let mut problem = |text: String| problems.push(format!("run {run_id}: {text}"));

        // Invariant 5: gap-free and complete.
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        if seqs != expected {
            problem(format!("invariant 5: event seqs are {seqs:?}"));
        }
        if run.last_seq != seqs.len() as u64 {
            problem(format!(
                "invariant 5: last_seq {} with {} events",
                run.last_seq,
                seqs.len()
            ));
        }

        // Invariant 6.
        let plan_steps = submitted.plan.steps();
        let ids: Vec<&str> = run.steps.iter().map(|s| s.step_id.as_str()).collect();
        let planned: Vec<&str> = plan_steps.iter().map(|(id, _, _)| id.as_str()).collect();
        if run.workflow_version != submitted.version || ids != planned {
            problem(format!(
                "invariant 6: submitted as version {} with steps {planned:?}, now version {} \
                 with {ids:?}",
                submitted.version, run.workflow_version
            ));
        }

        // Invariant 4: the run ended for a reason a worker gave, or after too many losses.
        match run.state() {
            RunState::Succeeded => {
                for step in &run.steps {
                    if step.state() != StepState::Succeeded {
                        problem(format!(
                            "run SUCCEEDED with step {} {}",
                            step.step_id,
                            step.state().as_str_name()
                        ));
                    }
                }
            }
            RunState::Failed => {
                let explained = run.steps.iter().any(|s| {
                    s.state() == StepState::Failed
                        && (s.error.contains("honest failure by")
                            || (s.error.contains("attempts in a row")
                                && s.lost_attempts >= MAX_LOST_ATTEMPTS))
                });
                if !explained {
                    problem(format!(
                        "invariant 4: run FAILED ({}) though no worker reported a failure and \
                         no step lost {MAX_LOST_ATTEMPTS} attempts: {:?}",
                        run.error,
                        run.steps
                            .iter()
                            .map(|s| (&s.step_id, s.state().as_str_name(), &s.error))
                            .collect::<Vec<_>>()
                    ));
                }
            }
            other => problem(format!("ended {}", other.as_str_name())),
        }

        let max_attempts = submitted.plan.max_attempts;
        let outputs_of: HashMap<&str, Value> = run
            .steps
            .iter()
            .map(|s| {
                let outputs = Value::Object(dagmesh_proto::json::from_struct(s.outputs.as_ref()));
                (s.step_id.as_str(), outputs)
            })
            .collect();
        for step in &run.steps {
            let sid = step.step_id.as_str();
            if !matches!(
                step.state(),
                StepState::Succeeded
                    | StepState::Failed
                    | StepState::Skipped
                    | StepState::Cancelled
            ) {
                problem(format!(
                    "invariant 4: step {sid} is {} in an ended run",
                    step.state().as_str_name()
                ));
            }
            // Lost attempts do not use up the retry policy.
            let counted = step.attempt.saturating_sub(step.lost_attempts);
            if counted > max_attempts {
                problem(format!(
                    "step {sid} made {} attempts ({} lost) with max_attempts {max_attempts}",
                    step.attempt, step.lost_attempts
                ));
            }
            let successes: Vec<u32> = events
                .iter()
                .filter_map(|e| match &e.event {
                    Some(run_event::Event::StepState(c))
                        if c.step_id == sid && c.state() == StepState::Succeeded =>
                    {
                        Some(c.attempt)
                    }
                    _ => None,
                })
                .collect();
            let succeeded = step.state() == StepState::Succeeded;
            if successes.len() != usize::from(succeeded) {
                problem(format!(
                    "invariant 2: step {sid} is {} and SUCCEEDED {} times in the log",
                    step.state().as_str_name(),
                    successes.len()
                ));
            }
            if succeeded {
                // Outputs carry who made them: only the holder of the recorded attempt.
                let outputs = &outputs_of[sid];
                let by = outputs["by"].as_str().unwrap_or_default();
                let key = (step.task_id.clone(), step.attempt);
                let holder = self.ledger.assigned.get(&key).map(|(w, _)| w.as_str());
                if outputs.get("forged").is_some()
                    || by != step.worker
                    || outputs["attempt"] != json!(step.attempt.to_string())
                    || outputs["task"] != json!(step.task_id)
                    || holder != Some(by)
                {
                    problem(format!(
                        "invariant 2: step {sid} attempt {} by {} (assigned to {holder:?}) \
                         recorded outputs {outputs}",
                        step.attempt, step.worker
                    ));
                }
            }
        }

        // Invariant 1: what workers were told is in the log.
        let assigned_events: HashSet<(String, u32, String)> = events
            .iter()
            .filter_map(|e| match &e.event {
                Some(run_event::Event::StepState(c)) if c.state() == StepState::Assigned => {
                    Some((c.step_id.clone(), c.attempt, c.worker.clone()))
                }
                _ => None,
            })
            .collect();
        let ends: HashSet<(String, u32, StepState)> = events
            .iter()
            .filter_map(|e| match &e.event {
                Some(run_event::Event::StepState(c)) => {
                    Some((c.step_id.clone(), c.attempt, c.state()))
                }
                _ => None,
            })
            .collect();
        let steps_of: HashMap<&str, &Vec<String>> = plan_steps
            .iter()
            .map(|(id, needs, _)| (id.as_str(), needs))
            .collect();
        for ((task_id, attempt), (worker, assign)) in &self.ledger.assigned {
            if assign.run_id != *run_id {
                continue;
            }
            let sid = assign.step_id.clone();
            if !assigned_events.contains(&(sid.clone(), *attempt, worker.clone())) {
                problem(format!(
                    "invariant 1: {worker} was sent Assign {task_id}#{attempt}, which is not an \
                     ASSIGNED event"
                ));
            }
            // Inputs are the outputs recorded upstream.
            let inputs = Value::Object(dagmesh_proto::json::from_struct(assign.inputs.as_ref()));
            for parent in steps_of.get(sid.as_str()).copied().into_iter().flatten() {
                let recorded = &outputs_of[parent.as_str()]["by"];
                if inputs[format!("from_{parent}")] != *recorded {
                    problem(format!(
                        "invariant 1: Assign {task_id}#{attempt} has input from_{parent} = {}, \
                         but {parent} recorded by = {recorded}",
                        inputs[format!("from_{parent}")]
                    ));
                }
            }
            if let Some(by) = self.ledger.accepted.get(&(task_id.clone(), *attempt)) {
                let sends = &self.ledger.sends[&(by.clone(), (task_id.clone(), *attempt))];
                let all_completed = sends
                    .iter()
                    .all(|m| matches!(m, worker_message::Message::Completed(_)));
                let all_failed = sends
                    .iter()
                    .all(|m| matches!(m, worker_message::Message::Failed(_)));
                let logged = |state| ends.contains(&(sid.clone(), *attempt, state));
                if all_completed && !logged(StepState::Succeeded) {
                    problem(format!(
                        "invariant 1: {by}'s Completed for {task_id}#{attempt} was ACCEPTED, \
                         but no SUCCEEDED event has that attempt"
                    ));
                }
                if all_failed && !logged(StepState::Failed) && !logged(StepState::RetryWait) {
                    problem(format!(
                        "invariant 1: {by}'s Failed for {task_id}#{attempt} was ACCEPTED, but \
                         no FAILED or RETRY_WAIT event has that attempt"
                    ));
                }
            }
        }

        // Invariants 2 and 5: nothing forged got in; progress is rate-limited.
        let forged = |text: &str| text.contains("forged");
        if forged(&run.error) {
            problem(format!("invariant 2: run error {:?}", run.error));
        }
        let mut progress: BTreeMap<(String, u32), Vec<f64>> = BTreeMap::new();
        for event in events {
            let at = event
                .at
                .as_ref()
                .map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9);
            match &event.event {
                Some(run_event::Event::StepState(c)) if forged(&c.error) => {
                    problem(format!(
                        "invariant 2: event {} has error {:?}",
                        event.seq, c.error
                    ));
                }
                Some(run_event::Event::StepProgress(p)) => {
                    if forged(&p.message) {
                        problem(format!(
                            "invariant 2: event {} has progress {:?}",
                            event.seq, p.message
                        ));
                    }
                    progress
                        .entry((p.step_id.clone(), p.attempt))
                        .or_default()
                        .push(at);
                }
                Some(run_event::Event::StepLog(log)) => {
                    for line in &log.lines {
                        if forged(&line.text) {
                            problem(format!(
                                "invariant 2: event {} has log line {:?}",
                                event.seq, line.text
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        for step in &run.steps {
            if forged(&step.error) || forged(&step.progress_message) {
                problem(format!(
                    "invariant 2: step {} has error {:?}, progress {:?}",
                    step.step_id, step.error, step.progress_message
                ));
            }
        }
        for ((sid, attempt), times) in progress {
            for (i, start) in times.iter().enumerate() {
                let within = times[i..].iter().take_while(|t| **t < start + 1.0).count();
                if within > MAX_PROGRESS_PER_SECOND {
                    problem(format!(
                        "progress of step {sid} attempt {attempt}: {within} events within one \
                         second (at most about 5 are kept)"
                    ));
                    break;
                }
            }
        }
    }

    /// What the case exercised, so that a passing run shows it tested something.
    fn summary(&self, runs: &[pb::Run]) -> String {
        let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
        for list in self.ledger.outcomes.values() {
            for outcome in list {
                *outcomes.entry(outcome.as_str_name()).or_default() += 1;
            }
        }
        let count = |needle: &str| self.trace.iter().filter(|l| l.contains(needle)).count();
        let states: Vec<&str> = runs.iter().map(|r| r.state().as_str_name()).collect();
        format!(
            "runs {states:?}; {} assigns; outcomes {outcomes:?}; {} cancels; {} restarts; {} \
             reconnects resuming tasks; {} progress events kept of {} sent",
            self.ledger.assigned.len(),
            count("<- Cancel"),
            count("executor restarted"),
            self.trace
                .iter()
                .filter(|l| l.contains("connected (") && !l.contains("resumed []"))
                .count(),
            self.progress_events,
            count("-> progress burst") * PROGRESS_BURST as usize,
        )
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            worker.stream = None;
        }
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.stop().await?;
        }
        Ok(())
    }
}

fn log_line(text: String) -> pb::LogLine {
    pb::LogLine {
        at: None,
        level: "info".into(),
        text,
    }
}

fn sorted(keys: &HashSet<Key>) -> Vec<&Key> {
    let mut keys: Vec<&Key> = keys.iter().collect();
    keys.sort();
    keys
}

/// Runs one case on a fresh runtime (the sandbox and everything it spawned go with it).
fn run_on_runtime(case: &Case) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run_case(case));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run_case(case: &Case) -> anyhow::Result<()> {
    let mut sim = Sim::start(case).await.context("starting the case")?;
    for action in &case.actions {
        sim.act(action).await?;
    }
    let runs = sim.finish().await?;
    sim.check(&runs).await?;
    if std::env::var_os("DAGMESH_PROPERTY_TRACE").is_some() {
        eprintln!("{}", sim.trace.join("\n"));
    }
    eprintln!("  {}", sim.summary(&runs));
    sim.stop().await
}

#[test]
fn the_engine_keeps_its_invariants_under_random_workers_crashes_and_restarts() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed = std::env::var("DAGMESH_PROPERTY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    eprintln!("engine properties: {cases} cases, DAGMESH_PROPERTY_SEED={seed}");
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: std::env::var("PROPTEST_MAX_SHRINK_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let failures = AtomicUsize::new(0);
    let result = runner.run(&case(), |case| {
        let started = std::time::Instant::now();
        let result = run_on_runtime(&case);
        if let Err(error) = &result {
            // Shrinking reruns failing cases: print the first failure whole, then one line.
            let text = format!("{error:#}");
            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("first failure: {text}");
            } else {
                eprintln!("failure: {}", text.lines().next().unwrap_or_default());
            }
        }
        eprintln!(
            "case: {} workers, {} runs, {} actions: {} in {:.1?}",
            case.slots.len(),
            case.runs.len(),
            case.actions.len(),
            if result.is_ok() { "ok" } else { "FAILED" },
            started.elapsed()
        );
        result.map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    if let Err(error) = result {
        panic!("{error}\n(replay with DAGMESH_PROPERTY_SEED={seed})");
    }
}

// ---- cases that once failed, kept as plain tests ----

fn run_fixed(case: Case) {
    if let Err(error) = run_on_runtime(&case) {
        panic!("{error:#}\ncase: {case:#?}");
    }
}

/// A worker silent past the lease loses its session; its stream must end too, or the worker
/// keeps heartbeating into a session that no longer exists: it is never given work again and
/// its results are never answered.
#[test]
fn a_worker_silent_past_the_lease_loses_its_stream() {
    run_fixed(Case {
        slots: vec![1],
        runs: vec![],
        actions: vec![Action::Silence {
            worker: 0,
            long: true,
        }],
    });
}

/// A result refused after its run ended (here a repeat of a result for an attempt the worker
/// never held) is answered STALE, and STALE always says why.
#[test]
fn a_stale_answer_after_the_run_ended_gives_its_reason() {
    run_fixed(Case {
        slots: vec![1],
        runs: vec![RunPlan {
            shape: Shape::Chain(1),
            max_attempts: 1,
            keyed: false,
        }],
        actions: vec![
            Action::Wait { ms: 50 },
            Action::WrongAttempt {
                worker: 0,
                pick: 0,
                delta: 1,
            },
            Action::Complete { worker: 0, pick: 0 },
            Action::Wait { ms: 50 },
            Action::Repeat { worker: 0, pick: 0 },
        ],
    });
}

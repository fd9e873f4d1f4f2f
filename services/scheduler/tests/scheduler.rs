//! The scheduler under a manual clock: no sleeps, every tick decided by moving time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use dagmesh_metastore::{MetadataStore, SqlStore};
use dagmesh_proto::v1::{
    CatchUp, ListRunsRequest, ListRunsResponse, Run, RunState, Schedule, SubmitRunRequest, Trigger,
};
use dagmesh_scheduler::{ManualClock, RunStarter, SchedError, Scheduler, SchedulerConfig};
use serde_json::{Value, json};

/// An executor stand-in: keeps runs in memory and honours idempotency keys like the real one.
#[derive(Default)]
struct FakeStarter {
    runs: Mutex<Vec<Run>>,
    submits: Mutex<usize>,
    changed: tokio::sync::Notify,
}

impl FakeStarter {
    fn runs(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }

    /// `input` of every run, in submit order.
    fn inputs(&self, input: &str) -> Vec<Value> {
        self.runs()
            .iter()
            .map(|r| dagmesh_proto::json::from_struct(r.inputs.as_ref())[input].clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl RunStarter for FakeStarter {
    async fn submit(&self, request: SubmitRunRequest) -> Result<(Run, bool), SchedError> {
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

    async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResponse, SchedError> {
        let runs = self
            .runs()
            .into_iter()
            .filter(|r| request.tags.iter().all(|(k, v)| r.tags.get(k) == Some(v)))
            .collect();
        Ok(ListRunsResponse {
            runs,
            next_page_token: String::new(),
        })
    }
}

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<dyn MetadataStore>,
    starter: Arc<FakeStarter>,
    clock: ManualClock,
}

impl Harness {
    async fn new(start: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("meta.db").display());
        let store: Arc<dyn MetadataStore> = Arc::new(SqlStore::connect(&url).await.unwrap());
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
    fn scheduler(&self) -> Scheduler {
        Scheduler::new(
            self.store.clone(),
            self.starter.clone(),
            Arc::new(self.clock.clone()),
            SchedulerConfig::default(),
        )
    }
}

fn schedule(name: &str, cron: &str, zone: &str, catch_up: CatchUp, limit: u32) -> Schedule {
    Schedule {
        name: name.into(),
        cron: cron.into(),
        time_zone: zone.into(),
        workflow: "report".into(),
        inputs: [
            ("tick".to_owned(), "tick".to_owned()),
            ("who".to_owned(), "schedule + '!'".to_owned()),
        ]
        .into(),
        catch_up: catch_up as i32,
        catch_up_limit: limit,
        ..Default::default()
    }
}

/// Moves the clock in `step`s up to `until`, with a scheduler pass after each step: what the
/// loop does when it wakes on time.
async fn walk(h: &Harness, scheduler: &Scheduler, step: Duration, until: &str) {
    let until = utc(until);
    while h.clock.now_utc() < until {
        h.clock.advance(step);
        scheduler.run_due().await.unwrap();
    }
}

trait NowUtc {
    fn now_utc(&self) -> DateTime<Utc>;
}

impl NowUtc for ManualClock {
    fn now_utc(&self) -> DateTime<Utc> {
        dagmesh_scheduler::Clock::now(self)
    }
}

#[tokio::test]
async fn daylight_saving_days_in_berlin() {
    let h = Harness::new("2025-03-28T12:00:00Z").await;
    let scheduler = h.scheduler();
    let created = scheduler
        .create_schedule(schedule(
            "nightly",
            "30 2 * * *",
            "Europe/Berlin",
            CatchUp::Skip,
            0,
        ))
        .await
        .unwrap();
    assert_eq!(
        created.next_tick.unwrap().seconds,
        utc("2025-03-29T01:30:00Z").timestamp()
    );
    walk(
        &h,
        &scheduler,
        Duration::minutes(15),
        "2025-04-01T00:00:00Z",
    )
    .await;
    // Spring forward: 02:30 does not exist on the 30th; the run comes right after the gap.
    assert_eq!(
        h.starter.inputs("tick"),
        [
            json!("2025-03-29T02:30:00+01:00"),
            json!("2025-03-30T03:00:00+02:00"),
            json!("2025-03-31T02:30:00+02:00"),
        ]
    );
    assert_eq!(h.starter.inputs("who")[0], json!("nightly!"));
    let run = &h.starter.runs()[1];
    assert_eq!(run.tags["dagmesh.schedule"], "nightly");
    assert_eq!(
        run.idempotency_key,
        format!("schedule/{}/2025-03-30T01:00:00Z", created.id)
    );

    // Fall back: 02:30 happens twice on Oct 26th; the job runs once.
    let h = Harness::new("2025-10-24T12:00:00Z").await;
    let scheduler = h.scheduler();
    scheduler
        .create_schedule(schedule(
            "nightly",
            "30 2 * * *",
            "Europe/Berlin",
            CatchUp::Skip,
            0,
        ))
        .await
        .unwrap();
    walk(
        &h,
        &scheduler,
        Duration::minutes(15),
        "2025-10-28T00:00:00Z",
    )
    .await;
    assert_eq!(
        h.starter.inputs("tick"),
        [
            json!("2025-10-25T02:30:00+02:00"),
            json!("2025-10-26T02:30:00+02:00"),
            json!("2025-10-27T02:30:00+01:00"),
        ]
    );
}

#[tokio::test]
async fn catch_up_policies_after_downtime() {
    for (policy, limit, expected) in [
        (CatchUp::Skip, 0, vec![]),
        (CatchUp::Latest, 0, vec!["2025-01-01T05:00:00+00:00"]),
        (
            CatchUp::All,
            3,
            vec![
                "2025-01-01T03:00:00+00:00",
                "2025-01-01T04:00:00+00:00",
                "2025-01-01T05:00:00+00:00",
            ],
        ),
        (
            CatchUp::All,
            0,
            vec![
                "2025-01-01T01:00:00+00:00",
                "2025-01-01T02:00:00+00:00",
                "2025-01-01T03:00:00+00:00",
                "2025-01-01T04:00:00+00:00",
                "2025-01-01T05:00:00+00:00",
            ],
        ),
    ] {
        let h = Harness::new("2025-01-01T00:10:00Z").await;
        let scheduler = h.scheduler();
        scheduler
            .create_schedule(schedule("hourly", "0 * * * *", "", policy, limit))
            .await
            .unwrap();
        // Down from 00:10 to 05:20: ticks 01:00..05:00 were missed.
        h.clock.set(utc("2025-01-01T05:20:00Z"));
        scheduler.run_due().await.unwrap();
        assert_eq!(
            h.starter.inputs("tick"),
            expected,
            "{policy:?} limit {limit}"
        );
        let after = scheduler.get_schedule("hourly").await.unwrap();
        assert_eq!(
            after.last_tick.unwrap().seconds,
            utc("2025-01-01T05:00:00Z").timestamp(),
            "{policy:?}: missed ticks are handled either way"
        );
        // Back to normal: the next tick runs on time, whatever the policy.
        let before = h.starter.runs().len();
        h.clock.set(utc("2025-01-01T06:00:00Z"));
        scheduler.run_due().await.unwrap();
        assert_eq!(h.starter.runs().len(), before + 1, "{policy:?}");
    }
}

#[tokio::test]
async fn restart_and_two_schedulers_neither_miss_nor_double_ticks() {
    let h = Harness::new("2025-01-01T00:00:30Z").await;
    let first = h.scheduler();
    let created = first
        .create_schedule(schedule("minutely", "0 * * * * *", "", CatchUp::All, 0))
        .await
        .unwrap();
    walk(&h, &first, Duration::minutes(1), "2025-01-01T00:03:30Z").await;
    assert_eq!(h.starter.runs().len(), 3);
    drop(first);

    // "Crash" after the 00:03 run started but before last_tick moved: wind it back.
    let store = h.store.clone();
    let last = store.get_schedule("minutely").await.unwrap().last_tick;
    let earlier = prost_types::Timestamp {
        seconds: utc("2025-01-01T00:02:00Z").timestamp(),
        nanos: 0,
    };
    assert!(
        store
            .advance_schedule(&created.id, last, earlier)
            .await
            .unwrap()
    );

    // A new process, and a second one beside it, both over the same store.
    let (a, b) = (h.scheduler(), h.scheduler());
    for _ in 0..3 {
        h.clock.advance(Duration::minutes(1));
        let (ra, rb) = tokio::join!(a.run_due(), b.run_due());
        ra.unwrap();
        rb.unwrap();
    }
    let ticks: Vec<Value> = h.starter.inputs("tick");
    let expected: Vec<Value> = (1..=6)
        .map(|m| json!(format!("2025-01-01T00:{m:02}:00+00:00")))
        .collect();
    assert_eq!(ticks, expected, "every minute exactly once");
    assert!(
        *h.starter.submits.lock().unwrap() > 6,
        "re-submits happened and were absorbed"
    );
}

#[tokio::test]
async fn paused_schedules_do_not_tick_and_resume_follows_the_policy() {
    let h = Harness::new("2025-01-01T00:00:30Z").await;
    let scheduler = h.scheduler();
    scheduler
        .create_schedule(schedule("m", "0 * * * * *", "", CatchUp::Latest, 0))
        .await
        .unwrap();
    let paused = scheduler.pause_schedule("m").await.unwrap();
    assert!(paused.paused);
    walk(&h, &scheduler, Duration::minutes(1), "2025-01-01T00:05:30Z").await;
    assert!(h.starter.runs().is_empty());
    scheduler.resume_schedule("m").await.unwrap();
    scheduler.run_due().await.unwrap();
    assert_eq!(
        h.starter.inputs("tick"),
        [json!("2025-01-01T00:05:00+00:00")]
    );
    scheduler.delete_schedule("m").await.unwrap();
    let err = scheduler.get_schedule("m").await.unwrap_err();
    assert!(matches!(err, SchedError::Store(_)), "{err:?}");
}

#[tokio::test]
async fn invalid_schedules_name_the_field() {
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let scheduler = h.scheduler();
    let cases = [
        (schedule("a", "61 * * * *", "", CatchUp::Skip, 0), "cron: "),
        (
            schedule("a", "0 * * * *", "Mars/Base", CatchUp::Skip, 0),
            "time_zone: unknown zone \"Mars/Base\"",
        ),
        (
            Schedule {
                inputs: [("day".to_owned(), "tick +".to_owned())].into(),
                ..schedule("a", "0 * * * *", "", CatchUp::Skip, 0)
            },
            "inputs.day: ",
        ),
    ];
    for (bad, prefix) in cases {
        match scheduler.create_schedule(bad).await {
            Err(SchedError::InvalidArgument(message)) => {
                assert!(message.starts_with(prefix), "{message}")
            }
            other => panic!("expected InvalidArgument {prefix}, got {other:?}"),
        }
    }
    scheduler
        .create_schedule(schedule("a", "0 * * * *", "", CatchUp::Skip, 0))
        .await
        .unwrap();
    let err = scheduler
        .create_schedule(schedule("a", "0 * * * *", "", CatchUp::Skip, 0))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SchedError::Store(e) if tonic::Status::from(e.clone()).code() == tonic::Code::AlreadyExists),
        "{err:?}"
    );

    // Nothing is set up to start a workflow that does not exist.
    let unknown = Schedule {
        workflow: "nope".into(),
        ..schedule("b", "0 * * * *", "", CatchUp::Skip, 0)
    };
    match scheduler.create_schedule(unknown).await {
        Err(SchedError::NotFound(message)) => {
            assert_eq!(
                message,
                "workflow: \"nope\" is not registered (apply it first)"
            )
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn the_loop_wakes_for_ticks_and_new_schedules() {
    let h = Harness::new("2025-01-01T00:00:30Z").await;
    let scheduler = h.scheduler();
    let task = scheduler.spawn();
    scheduler
        .create_schedule(schedule("m", "0 * * * * *", "", CatchUp::Skip, 0))
        .await
        .unwrap();
    for expected in 1..=3 {
        let changed = h.starter.changed.notified();
        h.clock.advance(Duration::minutes(1));
        tokio::time::timeout(std::time::Duration::from_secs(10), changed)
            .await
            .expect("the loop fired the tick");
        assert_eq!(h.starter.runs().len(), expected);
    }
    task.abort();
}

#[tokio::test]
async fn events_filter_and_map_inputs() {
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let scheduler = h.scheduler();
    scheduler
        .create_trigger(Trigger {
            name: "big-uploads".into(),
            topic: "uploads".into(),
            workflow: "ingest".into(),
            filter: "event.size > 100 && topic == 'uploads'".into(),
            inputs: [
                (
                    "path".to_owned(),
                    "'s3://' + event.bucket + '/' + event.key".to_owned(),
                ),
                ("kb".to_owned(), "event.size / 1024".to_owned()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    scheduler
        .create_trigger(Trigger {
            name: "all-uploads".into(),
            topic: "uploads".into(),
            workflow: "audit".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let event = |size: i64| {
        json!({"bucket": "b", "key": "k.jpg", "size": size})
            .as_object()
            .unwrap()
            .clone()
    };

    let small = scheduler
        .publish_event("uploads", event(10), "")
        .await
        .unwrap();
    assert_eq!(small.skipped_triggers, ["big-uploads"]);
    assert_eq!(small.runs.len(), 1);
    assert_eq!(small.runs[0].trigger, "all-uploads");

    let big = scheduler
        .publish_event("uploads", event(4096), "e-1")
        .await
        .unwrap();
    assert_eq!(big.runs.len(), 2);
    let run = big
        .runs
        .iter()
        .find(|r| r.trigger == "big-uploads")
        .unwrap();
    let inputs = dagmesh_proto::json::from_struct(run.run.as_ref().unwrap().inputs.as_ref());
    assert_eq!(
        Value::Object(inputs),
        json!({"path": "s3://b/k.jpg", "kb": 4})
    );
    assert_eq!(
        run.run.as_ref().unwrap().tags["dagmesh.trigger"],
        "big-uploads"
    );

    // The same event id again starts nothing new.
    let again = scheduler
        .publish_event("uploads", event(4096), "e-1")
        .await
        .unwrap();
    assert!(again.runs.iter().all(|r| !r.created));
    assert_eq!(h.starter.runs().len(), 3);

    // Other topics reach no trigger; a bad filter is refused at creation with its field.
    let none = scheduler
        .publish_event("deletes", event(1), "")
        .await
        .unwrap();
    assert!(none.runs.is_empty());
    let err = scheduler
        .create_trigger(Trigger {
            name: "bad".into(),
            topic: "t".into(),
            workflow: "w".into(),
            filter: "event.size >".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SchedError::InvalidArgument(m) if m.starts_with("filter: ")),
        "{err:?}"
    );
}

#[tokio::test]
async fn backfill_respects_concurrency_and_reports_progress() {
    use dagmesh_proto::v1::{Backfill, BackfillState, Partition};
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let scheduler = h.scheduler();
    let ts = |t: &str| prost_types::Timestamp {
        seconds: utc(t).timestamp(),
        nanos: 0,
    };
    let backfill = scheduler
        .create_backfill(Backfill {
            workflow: "daily-load".into(),
            start: Some(ts("2024-12-01T00:00:00Z")),
            end: Some(ts("2024-12-11T00:00:00Z")),
            partition: Partition::Daily as i32,
            max_concurrency: 3,
            inputs: [("day".to_owned(), "partition.start".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((backfill.total, backfill.queued), (10, 10));
    let finish = |n: usize| {
        let mut runs = h.starter.runs.lock().unwrap();
        let mut finished = 0;
        for run in runs.iter_mut() {
            if run.state == RunState::Running as i32 && finished < n {
                // Partition 4 fails, the others succeed.
                let day4 = run.idempotency_key.ends_with("2024-12-05T00:00:00Z");
                run.state = if day4 {
                    RunState::Failed
                } else {
                    RunState::Succeeded
                } as i32;
                finished += 1;
            }
        }
    };
    let mut passes = 0;
    loop {
        scheduler.run_due().await.unwrap();
        let active = h
            .starter
            .runs()
            .iter()
            .filter(|r| r.state == RunState::Running as i32)
            .count();
        assert!(active <= 3, "{active} partition runs at once");
        let now = scheduler.get_backfill(&backfill.id).await.unwrap();
        assert_eq!(now.done + now.running + now.failed + now.queued, 10);
        if now.state() != BackfillState::Running {
            assert_eq!(now.state(), BackfillState::Failed);
            assert_eq!(
                (now.done, now.failed, now.running, now.queued),
                (9, 1, 0, 0)
            );
            break;
        }
        finish(2);
        passes += 1;
        assert!(passes < 20, "backfill never ended");
    }
    assert_eq!(
        h.starter.inputs("day")[0],
        json!("2024-12-01T00:00:00+00:00")
    );
    assert_eq!(h.starter.runs().len(), 10, "one run per partition");

    // Cancel and resume.
    let second = scheduler
        .create_backfill(Backfill {
            workflow: "daily-load".into(),
            start: Some(ts("2024-11-01T00:00:00Z")),
            end: Some(ts("2024-11-06T00:00:00Z")),
            partition: Partition::Daily as i32,
            max_concurrency: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    scheduler.run_due().await.unwrap();
    let cancelled = scheduler.cancel_backfill(&second.id).await.unwrap();
    assert_eq!(cancelled.state(), BackfillState::Cancelled);
    assert_eq!(
        (cancelled.failed, cancelled.queued, cancelled.running),
        (2, 3, 0)
    );
    scheduler.run_due().await.unwrap();
    assert_eq!(
        scheduler.get_backfill(&second.id).await.unwrap().queued,
        3,
        "no submits after cancel"
    );
    let resumed = scheduler.resume_backfill(&second.id).await.unwrap();
    assert_eq!(resumed.state(), BackfillState::Running);
    scheduler.run_due().await.unwrap();
    let progress = scheduler.get_backfill(&second.id).await.unwrap();
    assert_eq!((progress.running, progress.queued), (2, 1));
    let _ = HashMap::<(), ()>::new();
}

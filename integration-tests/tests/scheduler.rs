//! The scheduler end to end: triggers and backfills through `SchedulerService` on the
//! one-process mesh with real workers, and two scheduler instances sharing one PostgreSQL
//! database.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use dagmesh::dagmesh_scheduler::{
    ExecutorStarter, ManualClock, RunStarter, SCHEDULE_TAG, Scheduler, SchedulerConfig, SystemClock,
};
use dagmesh_integration_tests::*;
use dagmesh_proto::connect::ClientSettings;
use dagmesh_proto::v1::scheduler_service_client::SchedulerServiceClient;
use dagmesh_proto::v1::{
    Backfill, BackfillState, CancelBackfillRequest, CatchUp, CreateBackfillRequest,
    CreateTriggerRequest, GetBackfillRequest, ListRunsRequest, Partition, PublishEventRequest,
    ResumeBackfillRequest, Schedule, Trigger,
};
use dagmesh_sdk::{TaskContext, TaskError, Worker};
use serde_json::{Value, json};

fn ts(text: &str) -> prost_types::Timestamp {
    text.parse().expect("RFC 3339")
}

#[tokio::test]
async fn events_start_runs_through_filters_and_input_mappings() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(Worker::builder(sandbox.url()).slots(4).task(
        "echo",
        "1.0.0",
        |_: TaskContext, input: Value| async move { Ok::<_, TaskError>(input) },
    ))
    .await?;
    sandbox
        .mesh
        .executor()
        .apply_workflow(workflow(
            "thumbnail",
            vec![step(
                "echo",
                "echo@^1",
                &[],
                &[("path", "inputs.path"), ("px", "inputs.px")],
            )],
        ))
        .await?;
    let mut scheduler = SchedulerServiceClient::new(sandbox.channel().await?);
    scheduler
        .create_trigger(CreateTriggerRequest {
            trigger: Some(Trigger {
                name: "photos".into(),
                topic: "uploads".into(),
                workflow: "thumbnail".into(),
                filter: "event.type == 'image' && event.size > 1000".into(),
                inputs: [
                    (
                        "path".to_owned(),
                        "event.bucket + '/' + event.key".to_owned(),
                    ),
                    (
                        "px".to_owned(),
                        "event.size > 1000000 ? 512 : 256".to_owned(),
                    ),
                ]
                .into(),
                ..Default::default()
            }),
        })
        .await?;
    let publish = |payload: Value, event_id: &str| PublishEventRequest {
        topic: "uploads".into(),
        payload: Some(dagmesh_proto::json::to_struct(&payload)),
        event_id: event_id.into(),
    };

    let skipped = scheduler
        .publish_event(publish(json!({"type": "video", "size": 5000}), ""))
        .await?
        .into_inner();
    assert!(skipped.runs.is_empty());
    assert_eq!(skipped.skipped_triggers, ["photos"]);

    let event = json!({"type": "image", "size": 2_000_000, "bucket": "rooms", "key": "k1.jpg"});
    let started = scheduler
        .publish_event(publish(event.clone(), "upload-1"))
        .await?
        .into_inner();
    assert_eq!(started.runs.len(), 1);
    let run_id = started.runs[0].run.as_ref().unwrap().run_id.clone();
    let run = wait_for_run(&sandbox.client().await?, &run_id).await?;
    assert_succeeded(&run);
    let outputs = dagmesh_proto::json::from_struct(run.steps[0].outputs.as_ref());
    assert_eq!(
        Value::Object(outputs),
        json!({"path": "rooms/k1.jpg", "px": 512})
    );
    assert_eq!(run.tags["dagmesh.trigger"], "photos");

    // A redelivered event (same id) starts nothing new.
    let again = scheduler
        .publish_event(publish(event, "upload-1"))
        .await?
        .into_inner();
    assert_eq!(again.runs[0].run.as_ref().unwrap().run_id, run_id);
    assert!(!again.runs[0].created);

    // Errors name the field.
    let err = scheduler
        .create_trigger(CreateTriggerRequest {
            trigger: Some(Trigger {
                name: "bad".into(),
                topic: "uploads".into(),
                workflow: "thumbnail".into(),
                inputs: [("px".to_owned(), "event.size >".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("inputs.px: "),
        "{}",
        err.message()
    );
    sandbox.stop().await
}

#[tokio::test]
async fn backfill_runs_partitions_at_most_n_at_a_time_with_cancel_and_resume() -> anyhow::Result<()>
{
    let sandbox = Sandbox::start().await?;
    let active = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (a, p) = (active.clone(), peak.clone());
    spawn_worker(Worker::builder(sandbox.url()).slots(10).task(
        "load",
        "1.0.0",
        move |_: TaskContext, input: Value| {
            let (active, peak) = (a.clone(), p.clone());
            async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // The step's own work, so that partitions overlap.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                active.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, TaskError>(input)
            }
        },
    ))
    .await?;
    sandbox
        .mesh
        .executor()
        .apply_workflow(workflow(
            "daily-load",
            vec![step("load", "load@^1", &[], &[("day", "inputs.day")])],
        ))
        .await?;
    let mut scheduler = SchedulerServiceClient::new(sandbox.channel().await?);
    let backfill = scheduler
        .create_backfill(CreateBackfillRequest {
            backfill: Some(Backfill {
                workflow: "daily-load".into(),
                start: Some(ts("2025-01-01T00:00:00Z")),
                end: Some(ts("2025-01-11T00:00:00Z")),
                partition: Partition::Daily as i32,
                max_concurrency: 3,
                inputs: [("day".to_owned(), "partition.start".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    assert_eq!((backfill.total, backfill.queued), (10, 10));
    let store = sandbox.mesh.executor().store().clone();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let done = loop {
        let now = scheduler
            .get_backfill(GetBackfillRequest {
                id: backfill.id.clone(),
            })
            .await?
            .into_inner();
        assert!(
            now.running <= 3,
            "{} partitions running at once",
            now.running
        );
        assert_eq!(now.done + now.running + now.failed + now.queued, 10);
        let active_runs = store
            .list_runs(&ListRunsRequest {
                tags: [("dagmesh.backfill".to_owned(), backfill.id.clone())].into(),
                page_size: 100,
                ..Default::default()
            })
            .await?
            .runs
            .iter()
            .filter(|r| r.state == 1 || r.state == 2)
            .count();
        assert!(active_runs <= 3, "{active_runs} partition runs not ended");
        if now.state() != BackfillState::Running {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backfill never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(done.state(), BackfillState::Succeeded);
    assert_eq!((done.done, done.failed, done.queued), (10, 0, 0));
    assert!(peak.load(Ordering::SeqCst) <= 3);

    // A second backfill, cancelled at once and then resumed.
    let second = scheduler
        .create_backfill(CreateBackfillRequest {
            backfill: Some(Backfill {
                workflow: "daily-load".into(),
                start: Some(ts("2024-12-01T00:00:00Z")),
                end: Some(ts("2024-12-05T00:00:00Z")),
                partition: Partition::Daily as i32,
                max_concurrency: 1,
                inputs: [("day".to_owned(), "partition.start".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let cancelled = scheduler
        .cancel_backfill(CancelBackfillRequest {
            id: second.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.state(), BackfillState::Cancelled);
    assert_eq!(cancelled.running, 0);
    let err = scheduler
        .cancel_backfill(CancelBackfillRequest {
            id: second.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    scheduler
        .resume_backfill(ResumeBackfillRequest {
            id: second.id.clone(),
        })
        .await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let resumed = loop {
        let now = scheduler
            .get_backfill(GetBackfillRequest {
                id: second.id.clone(),
            })
            .await?
            .into_inner();
        if now.state() != BackfillState::Running {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "resumed backfill never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // Every partition has a run that ended; those cancelled before the resume stay failed.
    assert_eq!(resumed.done + resumed.failed, 4);
    assert_eq!(resumed.queued, 0);
    sandbox.stop().await
}

/// A partition starts when the previous one's run ends, not at the next poll: a scheduler whose
/// poll is an hour away still drives twenty one-at-a-time partitions to the end — through the
/// in-process executor (`dagmesh up`) and through `RunService` (split mode). Its backfill lives
/// in a store of its own, so the mesh's scheduler (which polls every second) never sees it.
#[tokio::test]
async fn backfill_partitions_start_as_soon_as_a_slot_frees() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    spawn_worker(Worker::builder(sandbox.url()).slots(2).task(
        "load",
        "1.0.0",
        |_: TaskContext, input: Value| async move { Ok::<_, TaskError>(input) },
    ))
    .await?;
    let spec = workflow(
        "hourly-load",
        vec![step("load", "load@^1", &[], &[("hour", "inputs.hour")])],
    );
    sandbox.mesh.executor().apply_workflow(spec.clone()).await?;
    let remote = ExecutorStarter::connect(&sandbox.url(), &ClientSettings::default())?;
    let starters: [(&str, Arc<dyn RunStarter>); 2] = [
        (
            "in-process",
            Arc::new(ExecutorStarter::new(Arc::new(
                sandbox.mesh.executor().clone(),
            ))),
        ),
        ("RunService", Arc::new(remote)),
    ];
    for (how, starter) in starters {
        let database = Database::sqlite()?;
        let store = dagmesh_metastore::connect(&database.url()).await?;
        // The scheduler checks the workflow's declared inputs in its own store.
        store.put_workflow(spec.clone(), "hash".into()).await?;
        let scheduler = Scheduler::new(
            store,
            starter,
            Arc::new(SystemClock),
            SchedulerConfig {
                backfill_poll: Duration::from_secs(3600),
                recheck_interval: Duration::from_secs(3600),
                ..SchedulerConfig::default()
            },
        );
        let task = scheduler.spawn();
        let backfill = scheduler
            .create_backfill(Backfill {
                workflow: "hourly-load".into(),
                start: Some(ts("2025-01-01T00:00:00Z")),
                end: Some(ts("2025-01-01T20:00:00Z")),
                partition: Partition::Hourly as i32,
                max_concurrency: 1,
                inputs: [("hour".to_owned(), "partition.start".to_owned())].into(),
                ..Default::default()
            })
            .await?;
        assert_eq!(backfill.total, 20);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let done = loop {
            let now = scheduler.get_backfill(&backfill.id).await?;
            if now.state() != BackfillState::Running {
                break now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{how}: the backfill stalled at {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        task.abort();
        assert_eq!(done.state(), BackfillState::Succeeded, "{how}");
        assert_eq!((done.done, done.failed), (20, 0), "{how}");
    }
    sandbox.stop().await
}

#[tokio::test]
async fn two_schedulers_on_one_postgres_database_start_one_run_per_tick() -> anyhow::Result<()> {
    let Some(database) = Database::postgres().await? else {
        return Ok(());
    };
    let url = database.url();
    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    sandbox
        .mesh
        .executor()
        .apply_workflow(workflow("tick", vec![step("a", "noop@^1", &[], &[])]))
        .await?;
    // The schedulers below share the database's schedules with any other; the mesh's own
    // (wall-clock) scheduler would take a share it never finds due.
    sandbox.mesh.stop_scheduler().await;
    let clock = ManualClock::new("2100-01-01T00:00:30Z".parse()?);
    let process = || async {
        let store = dagmesh_metastore::connect(&url).await?;
        anyhow::Ok(Scheduler::new(
            store,
            Arc::new(ExecutorStarter::new(Arc::new(
                sandbox.mesh.executor().clone(),
            ))),
            Arc::new(clock.clone()),
            SchedulerConfig::default(),
        ))
    };
    let (a, b) = (process().await?, process().await?);
    a.create_schedule(Schedule {
        name: "every-minute".into(),
        cron: "0 * * * * *".into(),
        workflow: "tick".into(),
        catch_up: CatchUp::All as i32,
        ..Default::default()
    })
    .await?;
    for _ in 0..5 {
        clock.advance(dagmesh::dagmesh_scheduler::chrono::Duration::minutes(1));
        let (ra, rb) = tokio::join!(a.run_due(), b.run_due());
        ra?;
        rb?;
    }
    // Whichever of the two owns the schedule fired every tick once; the other fired nothing.
    let runs = sandbox
        .mesh
        .executor()
        .store()
        .list_runs(&ListRunsRequest {
            tags: [(SCHEDULE_TAG.to_owned(), "every-minute".to_owned())].into(),
            page_size: 100,
            ..Default::default()
        })
        .await?
        .runs;
    let mut keys: Vec<_> = runs.iter().map(|r| r.idempotency_key.clone()).collect();
    keys.sort();
    assert_eq!(keys.len(), 5, "{keys:?}");
    keys.dedup();
    assert_eq!(keys.len(), 5);
    assert!(keys[0].ends_with("/2100-01-01T00:01:00Z"), "{keys:?}");
    sandbox.stop().await
}

//! The scheduler under a manual clock: no sleeps, every tick decided by moving time.

mod common;

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use common::{Harness, utc};
use dagmesh_proto::v1::{CatchUp, RunState, Schedule, Trigger};
use dagmesh_scheduler::{ManualClock, SchedError, Scheduler};
use serde_json::{Value, json};

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
async fn skip_runs_late_ticks_within_the_grace_and_skips_older_ones() {
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let scheduler = h.scheduler();
    scheduler
        .create_schedule(schedule("tens", "*/10 * * * * *", "", CatchUp::Skip, 0))
        .await
        .unwrap();
    // A pause of 40 s (a handover between schedulers, a restart): every tick is under a minute
    // late, so every one runs.
    h.clock.set(utc("2025-01-01T00:00:40Z"));
    scheduler.run_due().await.unwrap();
    let seconds = |h: &Harness| -> Vec<String> {
        h.starter
            .inputs("tick")
            .iter()
            .map(|t| t.as_str().unwrap()[14..19].to_owned())
            .collect()
    };
    assert_eq!(seconds(&h), ["00:10", "00:20", "00:30", "00:40"]);
    // Down for five minutes: what is more than the grace (a minute) late is skipped.
    h.clock.set(utc("2025-01-01T00:05:40Z"));
    scheduler.run_due().await.unwrap();
    let ran = seconds(&h);
    assert_eq!(
        &ran[4..],
        [
            "04:40", "04:50", "05:00", "05:10", "05:20", "05:30", "05:40"
        ]
    );
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

    // A new process, and a second one beside it, both over the same store. The crashed one's
    // partitions stay leased until its leases expire: its ticks wait, none is lost.
    let (a, b) = (h.scheduler(), h.scheduler());
    h.clock.advance(Duration::minutes(1));
    let (ra, rb) = tokio::join!(a.run_due(), b.run_due());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        h.starter.runs().len(),
        3,
        "the crashed scheduler still owns the schedule"
    );
    // Waiting for the lease's time to pass: the database's clock decides.
    tokio::time::sleep(common::LEASE_TTL * 2).await;
    for _ in 0..3 {
        let (ra, rb) = tokio::join!(a.run_due(), b.run_due());
        ra.unwrap();
        rb.unwrap();
        // Let both refresh again: the second to join takes its share only after the first
        // hands it over.
        tokio::time::sleep(common::LEASE_TTL / 2).await;
    }
    for _ in 0..2 {
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
    // One owner at a time: besides the wound-back 00:03 (absorbed by its idempotency key),
    // no tick was submitted twice.
    assert_eq!(*h.starter.submits.lock().unwrap(), 7);
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

fn hourly(start: &str, end: &str, max_concurrency: u32) -> dagmesh_proto::v1::Backfill {
    dagmesh_proto::v1::Backfill {
        workflow: "daily-load".into(),
        start: Some(common::ts(start)),
        end: Some(common::ts(end)),
        partition: dagmesh_proto::v1::Partition::Hourly as i32,
        max_concurrency,
        inputs: [
            ("hour".to_owned(), "partition.start".to_owned()),
            ("index".to_owned(), "partition.index".to_owned()),
        ]
        .into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_million_hourly_partitions_start_without_being_listed() {
    use dagmesh_proto::v1::BackfillState;
    use prost::Message as _;
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let scheduler = h.scheduler();
    // 1,000,000 hours from 2000-01-01.
    let backfill = scheduler
        .create_backfill(hourly("2000-01-01T00:00:00Z", "2114-01-29T16:00:00Z", 2))
        .await
        .unwrap();
    assert_eq!((backfill.total, backfill.queued), (1_000_000, 1_000_000));
    for _ in 0..3 {
        scheduler.run_due().await.unwrap();
        h.starter.end_running(2, RunState::Succeeded);
    }
    scheduler.run_due().await.unwrap();
    let now = scheduler.get_backfill(&backfill.id).await.unwrap();
    assert_eq!(now.state(), BackfillState::Running);
    assert_eq!(
        (now.done, now.running, now.failed, now.queued),
        (6, 2, 0, 999_992)
    );
    assert_eq!(h.starter.runs().len(), 8, "one run per partition started");
    assert_eq!(
        h.starter.inputs("hour")[7],
        json!("2000-01-01T07:00:00+00:00")
    );
    assert_eq!(h.starter.inputs("index")[7], json!(7));
    // What the scheduler keeps and reads does not grow with the range: the stored record holds
    // a cursor and the active runs, and each look lists only the active runs.
    assert!(
        now.encoded_len() < 1024,
        "{} bytes stored",
        now.encoded_len()
    );
    assert!(*h.starter.largest_listing.lock().unwrap() <= 2);
}

#[tokio::test]
async fn a_lost_record_write_and_a_second_scheduler_start_each_partition_once() {
    use dagmesh_proto::v1::BackfillState;
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let (a, b) = (h.scheduler(), h.scheduler());
    let backfill = a
        .create_backfill(hourly("2024-12-01T00:00:00Z", "2024-12-01T20:00:00Z", 3))
        .await
        .unwrap();
    a.run_due().await.unwrap();
    let before = h.store.get_backfill(&backfill.id).await.unwrap();
    h.starter.end_running(2, RunState::Succeeded);
    a.run_due().await.unwrap();
    // A crash after the second pass's submits but before its record write: the store still
    // holds the first pass's record (written here over the current revision).
    let current = h.store.get_backfill(&backfill.id).await.unwrap().revision;
    h.store
        .put_backfill(dagmesh_proto::v1::Backfill {
            revision: current,
            ..before
        })
        .await
        .unwrap();
    let mut passes = 0;
    loop {
        let (ra, rb) = tokio::join!(a.run_due(), b.run_due());
        ra.unwrap();
        rb.unwrap();
        let now = a.get_backfill(&backfill.id).await.unwrap();
        assert_eq!(
            now.done + now.running + now.failed + now.queued,
            20,
            "{now:?}"
        );
        if now.state() != BackfillState::Running {
            assert_eq!(now.state(), BackfillState::Succeeded);
            assert_eq!(
                (now.done, now.failed, now.running, now.queued),
                (20, 0, 0, 0)
            );
            break;
        }
        h.starter.end_running(3, RunState::Succeeded);
        passes += 1;
        assert!(passes < 40, "backfill never ended");
    }
    let mut keys: Vec<String> = h
        .starter
        .runs()
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 20);
    assert_eq!(h.starter.runs().len(), 20, "one run per partition");
}

#[tokio::test]
async fn a_cancel_through_another_scheduler_is_never_overwritten_by_the_driver() {
    use dagmesh_proto::v1::BackfillState;
    use tokio::sync::oneshot;
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    // The driver owns every partition; the other scheduler only answers the API (it never
    // runs a pass, so it never joins the group).
    let (driver, other) = (h.scheduler(), h.scheduler());
    let backfill = driver
        .create_backfill(hourly("2024-12-01T00:00:00Z", "2024-12-01T20:00:00Z", 2))
        .await
        .unwrap();
    driver.run_due().await.unwrap();
    assert_eq!(h.starter.runs().len(), 2);
    h.starter.end_running(2, RunState::Succeeded);

    // Hold the driver's next pass after it read the record, while it submits.
    let (reached_tx, reached) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    *h.starter.pause_next_submit.lock().unwrap() = Some((reached_tx, release_rx));
    let pass = tokio::spawn({
        let driver = driver.clone();
        async move { driver.run_due().await }
    });
    reached.await.unwrap();
    let cancelled = other.cancel_backfill(&backfill.id).await.unwrap();
    assert_eq!(cancelled.state(), BackfillState::Cancelled);
    release.send(()).unwrap();
    pass.await.unwrap().unwrap();

    // The driver's write of what it read before the cancel was refused: the cancel stands,
    // and the next passes submit nothing more.
    let now = driver.get_backfill(&backfill.id).await.unwrap();
    assert_eq!(now.state(), BackfillState::Cancelled, "{now:?}");
    let after = h.starter.runs().len();
    for _ in 0..3 {
        driver.run_due().await.unwrap();
    }
    assert_eq!(
        h.starter.runs().len(),
        after,
        "the driver went on after the cancel"
    );
    let now = driver.get_backfill(&backfill.id).await.unwrap();
    assert_eq!(now.state(), BackfillState::Cancelled, "{now:?}");
}

#[tokio::test]
async fn bad_records_in_the_store_are_skipped_and_everything_else_keeps_running() {
    use dagmesh_proto::v1::{Backfill, BackfillState};
    let h = Harness::new("2025-01-01T00:00:30Z").await;
    let scheduler = h.scheduler();
    // Written straight into the store, as another version (or a hand edit) could have.
    for (id, name, cron, zone) in [
        ("bad-1", "bad-cron", "every now and then", ""),
        ("bad-2", "bad-zone", "0 * * * * *", "Mars/Base"),
    ] {
        h.store
            .create_schedule(Schedule {
                id: id.into(),
                name: name.into(),
                cron: cron.into(),
                time_zone: zone.into(),
                workflow: "report".into(),
                created_at: Some(common::ts("2025-01-01T00:00:00Z")),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    h.store
        .create_trigger(Trigger {
            id: "bad-3".into(),
            name: "huge-filter".into(),
            topic: "uploads".into(),
            workflow: "ingest".into(),
            filter: format!("true{}", " && true".repeat(1000)),
            ..Default::default()
        })
        .await
        .unwrap();
    let bad_backfill = Backfill {
        id: "bad-4".into(),
        state: BackfillState::Running as i32,
        time_zone: "Mars/Base".into(),
        max_concurrency: 1,
        ..hourly("2024-12-01T00:00:00Z", "2024-12-01T02:00:00Z", 1)
    };
    h.store.put_backfill(bad_backfill).await.unwrap();

    scheduler
        .create_schedule(schedule("good", "0 * * * * *", "", CatchUp::Skip, 0))
        .await
        .unwrap();
    scheduler
        .create_trigger(Trigger {
            name: "good-trigger".into(),
            topic: "uploads".into(),
            workflow: "ingest".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let good_backfill = scheduler
        .create_backfill(hourly("2024-12-01T00:00:00Z", "2024-12-01T02:00:00Z", 2))
        .await
        .unwrap();

    h.clock.advance(Duration::minutes(1));
    scheduler.run_due().await.unwrap();
    let ticks: Vec<_> = h
        .starter
        .runs()
        .into_iter()
        .filter_map(|r| r.tags.get("dagmesh.schedule").cloned())
        .collect();
    assert_eq!(ticks, ["good"], "only the valid schedule fired");
    let failed = scheduler.get_backfill("bad-4").await.unwrap();
    assert_eq!(failed.state(), BackfillState::Failed);
    assert_eq!(
        failed.error,
        "invalid backfill record: time_zone: unknown zone \"Mars/Base\""
    );
    let good = scheduler.get_backfill(&good_backfill.id).await.unwrap();
    assert_eq!((good.running, good.queued), (2, 0));
    // The listing shows the bad records too, so that they can be found and deleted.
    let listed = scheduler.get_schedule("bad-cron").await.unwrap();
    assert_eq!(listed.next_tick, None);

    let event = json!({"size": 1}).as_object().unwrap().clone();
    let published = scheduler
        .publish_event("uploads", event, "e-1")
        .await
        .unwrap();
    assert_eq!(published.skipped_triggers, ["huge-filter"]);
    assert_eq!(published.runs.len(), 1);
    assert_eq!(published.runs[0].trigger, "good-trigger");
}

#[tokio::test]
async fn definitions_over_a_limit_are_refused_with_field_size_and_limit() {
    use dagmesh_proto::v1::{Backfill, Partition};
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let scheduler = h.scheduler();
    let long = |n: usize| "x".repeat(n);
    let base = || schedule("s", "0 * * * *", "", CatchUp::Skip, 0);
    let schedules = [
        (
            Schedule {
                name: long(129),
                ..base()
            },
            "name: 129 bytes, over the limit of 128".to_owned(),
        ),
        (
            Schedule {
                cron: format!("0 * * * *{}", " ".repeat(300)),
                ..base()
            },
            "cron: 309 bytes, over the limit of 256".to_owned(),
        ),
        (
            Schedule {
                time_zone: long(200),
                ..base()
            },
            "time_zone: 200 bytes, over the limit of 128".to_owned(),
        ),
        (
            Schedule {
                inputs: [("day".to_owned(), format!("'{}'", long(5000)))].into(),
                ..base()
            },
            "inputs.day: 5002 bytes, over the limit of 4096".to_owned(),
        ),
        (
            Schedule {
                inputs: (0..65).map(|i| (format!("i{i}"), "1".to_owned())).collect(),
                ..base()
            },
            "inputs: 65 entries, over the limit of 64".to_owned(),
        ),
        (
            Schedule {
                tags: [(long(129), "v".to_owned())].into(),
                ..base()
            },
            "tags: a key of 129 bytes, over the limit of 128".to_owned(),
        ),
        (
            Schedule {
                catch_up: CatchUp::All as i32,
                catch_up_limit: 5000,
                ..base()
            },
            "catch_up_limit: 5000 ticks, over the limit of 1000".to_owned(),
        ),
    ];
    for (bad, expected) in schedules {
        match scheduler.create_schedule(bad).await {
            Err(SchedError::InvalidArgument(message)) => assert_eq!(message, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
    }
    match scheduler
        .create_trigger(Trigger {
            name: "t".into(),
            topic: "uploads".into(),
            workflow: "ingest".into(),
            filter: format!("true{}", " && true".repeat(1000)),
            ..Default::default()
        })
        .await
    {
        Err(SchedError::InvalidArgument(message)) => {
            assert_eq!(message, "filter: 8004 bytes, over the limit of 4096")
        }
        other => panic!("{other:?}"),
    }
    let day = |start: &str, end: &str| Backfill {
        workflow: "daily-load".into(),
        start: Some(common::ts(start)),
        end: Some(common::ts(end)),
        partition: Partition::Daily as i32,
        ..Default::default()
    };
    let backfills = [
        (
            day("2025-01-02T00:00:00Z", "2025-01-01T00:00:00Z"),
            "end: 2025-01-01T00:00:00Z is not after start 2025-01-02T00:00:00Z",
        ),
        (
            Backfill {
                start: Some(prost_types::Timestamp {
                    seconds: i64::MIN,
                    nanos: 0,
                }),
                ..day("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z")
            },
            "start: -9223372036854775808 seconds is outside 0001-01-01T00:00:00Z..=9999-12-31T23:59:59Z",
        ),
        (
            Backfill {
                end: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..day("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z")
            },
            "end: nanos -1 outside 0..=999999999",
        ),
        (
            Backfill {
                partition: Partition::Hourly as i32,
                ..day("0001-01-01T00:00:00Z", "9999-12-31T00:00:00Z")
            },
            "end: the range holds 87649392 hourly partitions, over the limit of 10000000",
        ),
        (
            Backfill {
                max_concurrency: 10_001,
                ..day("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z")
            },
            "max_concurrency: 10001 is outside 1..=10000",
        ),
        (
            Backfill {
                start: None,
                ..day("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z")
            },
            "start: required",
        ),
    ];
    for (bad, expected) in backfills {
        match scheduler.create_backfill(bad).await {
            Err(SchedError::InvalidArgument(message)) => assert_eq!(message, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
    }
    // The longest range that is allowed is accepted, and costs nothing to create.
    let widest = scheduler
        .create_backfill(day("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"))
        .await
        .unwrap();
    assert_eq!(widest.total, 3_652_059);

    // Event payloads deeper than the payload limit are refused before any trigger sees them.
    let mut deep = json!(1);
    for _ in 0..25 {
        deep = json!({ "a": deep });
    }
    match scheduler
        .publish_event("uploads", deep.as_object().unwrap().clone(), "")
        .await
    {
        Err(SchedError::InvalidArgument(message)) => {
            assert!(message.starts_with("payload.a.a."), "{message}");
            assert!(message.contains("limit of 20 levels"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_partition_whose_inputs_fail_fails_the_backfill_with_the_reason() {
    use dagmesh_proto::v1::BackfillState;
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let scheduler = h.scheduler();
    let backfill = scheduler
        .create_backfill(dagmesh_proto::v1::Backfill {
            // Fails on the third partition only: 1 / (index - 2).
            inputs: [("x".to_owned(), "1 / (partition.index - 2)".to_owned())].into(),
            ..hourly("2024-12-01T00:00:00Z", "2024-12-01T05:00:00Z", 5)
        })
        .await
        .unwrap();
    scheduler.run_due().await.unwrap();
    let failed = scheduler.get_backfill(&backfill.id).await.unwrap();
    assert_eq!(failed.state(), BackfillState::Failed);
    assert!(
        failed
            .error
            .starts_with("partition 2 (2024-12-01T02:00:00Z): inputs.x: "),
        "{}",
        failed.error
    );
    // The partitions before it ran and are still counted as they end.
    assert_eq!((failed.running, failed.queued), (2, 3));
    h.starter.end_running(2, RunState::Succeeded);
    scheduler.run_due().await.unwrap();
    let later = scheduler.get_backfill(&backfill.id).await.unwrap();
    assert_eq!(
        (later.done, later.running, later.state()),
        (2, 0, BackfillState::Failed)
    );
}

fn invalid<T: std::fmt::Debug>(result: Result<T, SchedError>) -> String {
    match result {
        Err(SchedError::InvalidArgument(message)) => message,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// A workflow that declares its inputs: schedules, triggers, backfills and events that do not
/// fit are refused when they are created (or, for an event, before any run starts), naming
/// the input.
#[tokio::test]
async fn declared_workflow_inputs_are_checked_at_the_door() {
    let h = Harness::new("2025-01-01T00:00:00Z").await;
    let spec: dagmesh_proto::v1::WorkflowSpec = dagmesh_spec::parse_workflow(
        "name: typed\ninputs:\n  room_id: {type: string}\n  count: {type: int, default: 1}\n\
         steps: [{id: a, task: t, inputs: {r: inputs.room_id}}]\n",
        dagmesh_spec::Format::Yaml,
    )
    .unwrap();
    h.store
        .put_workflow(spec, "hash-typed".into())
        .await
        .unwrap();
    let scheduler = h.scheduler();

    let typed = |inputs: &[(&str, &str)]| Schedule {
        workflow: "typed".into(),
        inputs: inputs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..schedule("typed", "0 * * * *", "", CatchUp::Skip, 0)
    };
    let message = invalid(
        scheduler
            .create_schedule(typed(&[("count", "'many'"), ("day", "tick")]))
            .await,
    );
    assert!(
        message.contains("inputs.count: the string \"many\" is not of type int")
            && message.contains("inputs.room_id: required input of type string is missing")
            && message.contains("inputs.day: the workflow declares no input \"day\""),
        "{message}"
    );
    scheduler
        .create_schedule(typed(&[("room_id", "'nightly-' + tick")]))
        .await
        .unwrap();

    let trigger = |inputs: &[(&str, &str)]| Trigger {
        name: "t".into(),
        topic: "uploads".into(),
        workflow: "typed".into(),
        inputs: inputs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    let message = invalid(
        scheduler
            .create_trigger(trigger(&[("rooom", "event.room")]))
            .await,
    );
    assert!(
        message.contains("inputs.room_id: required input of type string is not mapped")
            && message.contains("inputs.rooom: workflow typed declares no such input"),
        "{message}"
    );
    scheduler
        .create_trigger(trigger(&[("room_id", "event.room")]))
        .await
        .unwrap();
    let payload = json!({"room": 7}).as_object().unwrap().clone();
    let message = invalid(scheduler.publish_event("uploads", payload, "e1").await);
    assert!(
        message.contains("trigger \"t\"")
            && message.contains("inputs.room_id: the number 7 is not of type string"),
        "{message}"
    );
    assert!(h.starter.runs().is_empty(), "nothing started");
    let payload = json!({"room": "kitchen"}).as_object().unwrap().clone();
    scheduler
        .publish_event("uploads", payload, "e2")
        .await
        .unwrap();
    assert_eq!(h.starter.inputs("room_id"), [json!("kitchen")]);

    let backfill = dagmesh_proto::v1::Backfill {
        workflow: "typed".into(),
        inputs: [("day".to_owned(), "partition.start".to_owned())].into(),
        ..hourly("2025-01-01T00:00:00Z", "2025-01-01T03:00:00Z", 1)
    };
    let message = invalid(scheduler.create_backfill(backfill).await);
    assert!(
        message.contains("the first partition")
            && message.contains("inputs.room_id: required input of type string is missing"),
        "{message}"
    );
}

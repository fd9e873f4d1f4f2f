//! Random definitions and clocks thrown at the public API: nothing panics, every refusal is
//! INVALID_ARGUMENT naming a field, and the loop keeps passing whatever was accepted.

mod common;

use chrono::DateTime;
use common::Harness;
use dagmesh_proto::limits::{MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS};
use dagmesh_proto::v1::{Backfill, Schedule};
use dagmesh_scheduler::SchedError;
use proptest::prelude::*;
use prost_types::Timestamp;

fn seconds() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 1_500_000_000i64..2_000_000_000,
        2 => MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => any::<i64>(),
    ]
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    let nanos = prop_oneof![12 => Just(0i32), 1 => Just(-1), 1 => any::<i32>()];
    (seconds(), nanos).prop_map(|(seconds, nanos)| Timestamp { seconds, nanos })
}

fn zone() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        3 => Just("Europe/Berlin".to_owned()),
        3 => Just("Asia/Kathmandu".to_owned()),
        1 => Just("Mars/Base".to_owned()),
        1 => "[A-Za-z/_]{0,200}",
    ]
}

fn cron() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("0 * * * *".to_owned()),
        3 => Just("*/20 * * * * *".to_owned()),
        3 => Just("30 2 * * *".to_owned()),
        3 => Just("0 0 29 2 *".to_owned()),
        2 => "[0-9*/, -]{0,300}",
    ]
}

/// A refusal a user can act on: INVALID_ARGUMENT whose message starts with a field.
fn assert_names_a_field(error: &SchedError) {
    let SchedError::InvalidArgument(message) = error else {
        panic!("expected InvalidArgument, got {error:?}");
    };
    let field = message.split(':').next().unwrap_or_default();
    assert!(
        [
            "start",
            "end",
            "time_zone",
            "cron",
            "max_concurrency",
            "catch_up_limit",
            "partition"
        ]
        .contains(&field),
        "{message}"
    );
}

#[test]
fn random_definitions_and_clocks_get_clear_errors_and_no_panics() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = runtime.block_on(Harness::new("2025-01-01T00:00:00Z"));
    let scheduler = h.scheduler();
    let cases = std::sync::atomic::AtomicUsize::new(0);
    proptest!(ProptestConfig::with_cases(48), |(
        start in timestamp(),
        end in timestamp(),
        hours in proptest::option::weighted(0.7, 1i64..10_000),
        partition in prop_oneof![6 => 1..=2i32, 1 => Just(0)],
        backfill_zone in zone(),
        max_concurrency in prop_oneof![6 => 1u32..4, 1 => Just(0), 1 => any::<u32>()],
        cron in cron(),
        schedule_zone in zone(),
        catch_up in 0..4i32,
        catch_up_limit in prop_oneof![6 => 0u32..4, 1 => any::<u32>()],
        now in seconds(),
    )| {
        let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let end = match hours {
            Some(h) => Timestamp { seconds: start.seconds.saturating_add(h * 3600), nanos: 0 },
            None => end,
        };
        runtime.block_on(async {
            let backfill = Backfill {
                workflow: "daily-load".into(),
                start: Some(start),
                end: Some(end),
                partition,
                time_zone: backfill_zone,
                max_concurrency,
                inputs: [("p".to_owned(), "partition.start".to_owned())].into(),
                ..Default::default()
            };
            if let Err(error) = scheduler.create_backfill(backfill).await {
                assert_names_a_field(&error);
            }
            let schedule = Schedule {
                name: format!("s{case}"),
                cron,
                time_zone: schedule_zone,
                workflow: "report".into(),
                catch_up,
                catch_up_limit,
                inputs: [("t".to_owned(), "tick".to_owned())].into(),
                ..Default::default()
            };
            match scheduler.create_schedule(schedule).await {
                Ok(_) => {}
                // A valid cron that never comes again after the clock's time.
                Err(SchedError::InvalidArgument(m)) if m == "cron: never matches" => {}
                Err(error) => assert_names_a_field(&error),
            }
            // The loop at any time, even at the ends of the supported range, passes.
            let at = DateTime::from_timestamp(
                now.clamp(MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS),
                0,
            )
            .unwrap_or_default();
            h.clock.set(at);
            scheduler.run_due().await.expect("a pass over accepted definitions");
        });
    });
    assert_eq!(cases.into_inner(), 48, "every case ran");
}

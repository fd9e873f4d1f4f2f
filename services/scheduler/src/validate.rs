//! Limits on schedule, trigger and backfill definitions, checked when they are created and again
//! when they are read back from the store (a record written by another version, or edited in the
//! database, must not stop the loop). Each check returns the definition in the form the scheduler
//! works with (a parsed zone and cron, a partition plan), so nothing downstream re-parses or
//! re-checks. Errors are field messages: `field: size, over the limit of N`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use dagmesh_proto::limits::{
    self, MAX_BACKFILL_CONCURRENCY, MAX_BACKFILL_PARTITIONS, MAX_CATCH_UP_TICKS, MAX_ENTRIES,
    MAX_EXPRESSION_LEN, MAX_NAME_LEN, MAX_TIMESTAMP_SECONDS, MAX_VALUE_LEN, MIN_TIMESTAMP_SECONDS,
};
use dagmesh_proto::v1::{Backfill, CatchUp, Partition, Schedule, Trigger};
use prost_types::Timestamp;

use crate::ticks::{self, Grain, Partitions};

/// `catch_up_limit` when the schedule says 0.
pub const DEFAULT_CATCH_UP_LIMIT: u32 = 100;

/// A schedule's cron and zone, parsed.
pub(crate) struct ScheduleDef {
    pub zone: Tz,
    pub cron: Cron,
    /// How many missed ticks run at most (1 unless CATCH_UP_ALL).
    pub catch_up_limit: usize,
}

/// A backfill's partition plan, parsed.
pub(crate) struct BackfillDef {
    pub zone: Tz,
    pub partitions: Partitions,
}

/// A timestamp within [`MIN_TIMESTAMP_SECONDS`]..=[`MAX_TIMESTAMP_SECONDS`] with valid nanos.
pub(crate) fn timestamp(field: &str, ts: &Timestamp) -> Result<DateTime<Utc>, String> {
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| format!("{field}: nanos {} outside 0..=999999999", ts.nanos))?;
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds) {
        return Err(format!(
            "{field}: {} seconds is outside 0001-01-01T00:00:00Z..=9999-12-31T23:59:59Z",
            ts.seconds
        ));
    }
    DateTime::from_timestamp(ts.seconds, nanos)
        .ok_or_else(|| format!("{field}: {} seconds is not a valid time", ts.seconds))
}

fn optional_timestamp(field: &str, ts: Option<&Timestamp>) -> Result<(), String> {
    ts.map_or(Ok(()), |ts| timestamp(field, ts).map(|_| ()))
}

fn required(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field}: required"));
    }
    limits::check_len(field, value, max)
}

fn entries(field: &str, count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!("{field}: {count} entries, over the limit of {max}"));
    }
    Ok(())
}

/// Input name -> CEL expression. A name over the limit is not echoed back in the path.
fn inputs(map: &HashMap<String, String>) -> Result<(), String> {
    entries("inputs", map.len(), MAX_ENTRIES)?;
    let mut names: Vec<_> = map.keys().collect();
    names.sort();
    for name in names {
        if name.len() > MAX_NAME_LEN {
            return Err(format!(
                "inputs: a name of {} bytes, over the limit of {MAX_NAME_LEN}",
                name.len()
            ));
        }
        let text = map.get(name).map_or("", String::as_str);
        limits::check_len(&format!("inputs.{name}"), text, MAX_EXPRESSION_LEN)?;
    }
    Ok(())
}

/// Tags added to every run; one entry of the run's tags is the scheduler's own.
fn tags(map: &HashMap<String, String>) -> Result<(), String> {
    let max = MAX_ENTRIES - 1;
    if map.len() > max {
        return Err(format!(
            "tags: {} entries, over the limit of {max} (the scheduler adds one)",
            map.len()
        ));
    }
    let mut keys: Vec<_> = map.keys().collect();
    keys.sort();
    for key in keys {
        if key.len() > MAX_NAME_LEN {
            return Err(format!(
                "tags: a key of {} bytes, over the limit of {MAX_NAME_LEN}",
                key.len()
            ));
        }
        let value = map.get(key).map_or("", String::as_str);
        limits::check_len(&format!("tags.{key}"), value, MAX_VALUE_LEN)?;
    }
    Ok(())
}

fn workflow(name: &str) -> Result<(), String> {
    required("workflow", name, MAX_NAME_LEN)
}

pub(crate) fn zone(name: &str) -> Result<Tz, String> {
    limits::check_len("time_zone", name, MAX_NAME_LEN)?;
    ticks::parse_zone(name)
}

/// A schedule's definition, and its `last_tick`/`created_at` when set (records read back).
pub(crate) fn schedule(schedule: &Schedule) -> Result<ScheduleDef, String> {
    required("name", &schedule.name, MAX_NAME_LEN)?;
    workflow(&schedule.workflow)?;
    limits::check_len("cron", &schedule.cron, MAX_VALUE_LEN)?;
    let zone = zone(&schedule.time_zone)?;
    let cron = ticks::parse_cron(&schedule.cron)?;
    inputs(&schedule.inputs)?;
    tags(&schedule.tags)?;
    if schedule.catch_up_limit > MAX_CATCH_UP_TICKS {
        return Err(format!(
            "catch_up_limit: {} ticks, over the limit of {MAX_CATCH_UP_TICKS}",
            schedule.catch_up_limit
        ));
    }
    let catch_up_limit = match schedule.catch_up() {
        CatchUp::All => match schedule.catch_up_limit {
            0 => DEFAULT_CATCH_UP_LIMIT,
            n => n,
        },
        _ => 1,
    };
    optional_timestamp("last_tick", schedule.last_tick.as_ref())?;
    optional_timestamp("created_at", schedule.created_at.as_ref())?;
    Ok(ScheduleDef {
        zone,
        cron,
        catch_up_limit: usize::try_from(catch_up_limit).unwrap_or(1),
    })
}

pub(crate) fn trigger(trigger: &Trigger) -> Result<(), String> {
    required("name", &trigger.name, MAX_NAME_LEN)?;
    required("topic", &trigger.topic, MAX_NAME_LEN)?;
    workflow(&trigger.workflow)?;
    limits::check_len("filter", &trigger.filter, MAX_EXPRESSION_LEN)?;
    inputs(&trigger.inputs)?;
    tags(&trigger.tags)?;
    optional_timestamp("created_at", trigger.created_at.as_ref())
}

fn grain(partition: Partition) -> Result<Grain, String> {
    match partition {
        Partition::Hourly => Ok(Grain::Hourly),
        Partition::Daily => Ok(Grain::Daily),
        Partition::Unspecified => Err("partition: HOURLY or DAILY required".into()),
    }
}

/// A backfill's definition: workflow, range, partitioning, concurrency, inputs and tags.
pub(crate) fn backfill(backfill: &Backfill) -> Result<BackfillDef, String> {
    workflow(&backfill.workflow)?;
    let start = backfill.start.as_ref().ok_or("start: required")?;
    let end = backfill.end.as_ref().ok_or("end: required")?;
    let (start, end) = (timestamp("start", start)?, timestamp("end", end)?);
    let grain = grain(Partition::try_from(backfill.partition).unwrap_or_default())?;
    let zone = zone(&backfill.time_zone)?;
    if !(1..=MAX_BACKFILL_CONCURRENCY).contains(&backfill.max_concurrency) {
        return Err(format!(
            "max_concurrency: {} is outside 1..={MAX_BACKFILL_CONCURRENCY}",
            backfill.max_concurrency
        ));
    }
    inputs(&backfill.inputs)?;
    tags(&backfill.tags)?;
    let partitions = Partitions::new(grain, zone, start, end, MAX_BACKFILL_PARTITIONS)?;
    Ok(BackfillDef { zone, partitions })
}

/// A backfill read back from the store: its definition and its progress fields.
pub(crate) fn stored_backfill(record: &Backfill) -> Result<BackfillDef, String> {
    let def = backfill(record)?;
    let total = def.partitions.total();
    if record.total != total {
        return Err(format!(
            "total: {} recorded, but the range holds {total} partitions",
            record.total
        ));
    }
    if record.next_partition > total {
        return Err(format!(
            "next_partition: {} is past the last partition ({total})",
            record.next_partition
        ));
    }
    let active = record.active_run_ids.len();
    if active > record.max_concurrency as usize {
        return Err(format!(
            "active_run_ids: {active} entries, over max_concurrency {}",
            record.max_concurrency
        ));
    }
    if let Some(id) = record
        .active_run_ids
        .iter()
        .find(|id| id.len() > MAX_VALUE_LEN)
    {
        return Err(format!(
            "active_run_ids: an id of {} bytes, over the limit of {MAX_VALUE_LEN}",
            id.len()
        ));
    }
    let ended = u64::from(record.done) + u64::from(record.failed);
    if ended > u64::from(total) {
        return Err(format!(
            "done, failed: {ended} partitions ended, more than the {total} in the range"
        ));
    }
    optional_timestamp("created_at", record.created_at.as_ref())?;
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Seconds around the edges of every range involved, and anything else.
    fn seconds() -> impl Strategy<Value = i64> {
        prop_oneof![
            // Mostly valid, so that the partition and tick arithmetic is reached.
            6 => MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS,
            6 => 1_500_000_000i64..2_000_000_000,
            1 => Just(i64::MIN),
            1 => Just(i64::MAX),
            1 => Just(MIN_TIMESTAMP_SECONDS),
            1 => Just(MAX_TIMESTAMP_SECONDS),
            1 => Just(MIN_TIMESTAMP_SECONDS - 1),
            1 => Just(MAX_TIMESTAMP_SECONDS + 1),
            1 => Just(0i64),
            1 => any::<i64>(),
        ]
    }

    fn nanos() -> impl Strategy<Value = i32> {
        prop_oneof![
            8 => 0..1_000_000_000,
            1 => Just(-1),
            1 => Just(i32::MIN),
            1 => Just(999_999_999),
            1 => Just(1_000_000_000),
            1 => any::<i32>()
        ]
    }

    fn zones() -> impl Strategy<Value = String> {
        let known = [
            "",
            "UTC",
            "Europe/Berlin",
            "Asia/Kathmandu",
            "Pacific/Kiritimati",
            "Pacific/Apia",
            "Etc/GMT+12",
            "America/St_Johns",
            "Australia/Lord_Howe",
        ];
        prop_oneof![
            6 => proptest::sample::select(known.to_vec()).prop_map(str::to_owned),
            1 => "[A-Za-z/_+-]{0,40}",
        ]
    }

    fn crons() -> impl Strategy<Value = String> {
        // Valid ones of every kind croner knows, then anything.
        let known = [
            "* * * * *",
            "*/7 * * * * *",
            "0 30 2 * * *",
            "30 2 * * *",
            "0 * * * *",
            "59 23 31 12 *",
            "0 0 29 2 *",
            "0 0 29 2 1",
            "0 0 L * *",
            "0 0 1W * *",
            "0 0 * * 5#3",
            "0 0 * * FRI#L",
            "15,45 9-17 * JAN-MAR MON-FRI",
            "0 0 31 4 *",
        ];
        prop_oneof![
            6 => proptest::sample::select(known.to_vec()).prop_map(str::to_owned),
            1 => "[0-9*/,LW#? A-Z-]{0,30}",
            1 => ".{0,20}",
        ]
    }

    fn timestamp_strategy() -> impl Strategy<Value = Timestamp> {
        (seconds(), nanos()).prop_map(|(seconds, nanos)| Timestamp { seconds, nanos })
    }

    /// The first word of an error names a field of the definition.
    fn names_a_field(error: &str) -> bool {
        let fields = [
            "name:",
            "workflow:",
            "cron:",
            "time_zone:",
            "inputs",
            "tags",
            "catch_up_limit:",
            "last_tick:",
            "created_at:",
            "start:",
            "end:",
            "partition:",
            "max_concurrency:",
        ];
        fields.iter().any(|f| error.starts_with(f))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_backfills_are_checked_without_panics(
            start in proptest::option::weighted(0.95, timestamp_strategy()),
            end in proptest::option::weighted(0.95, timestamp_strategy()),
            hours in proptest::option::weighted(0.8, prop_oneof![0i64..100, 0i64..20_000_000]),
            partition in prop_oneof![4 => 1..=2i32, 1 => any::<i32>()],
            zone in zones(),
            max_concurrency in prop_oneof![1 => Just(0u32), 6 => 1u32..=10, 1 => any::<u32>()],
            probe in any::<u32>(),
        ) {
            // Sometimes a range of a plausible length, to reach the partition arithmetic.
            let end = match (hours, &start) {
                (Some(h), Some(s)) => Some(Timestamp { seconds: s.seconds.saturating_add(h * 3600), nanos: s.nanos }),
                _ => end,
            };
            let record = Backfill {
                workflow: "w".into(),
                start,
                end,
                partition,
                time_zone: zone,
                max_concurrency,
                ..Default::default()
            };
            match backfill(&record) {
                Ok(def) => {
                    let total = def.partitions.total();
                    prop_assert!((1..=MAX_BACKFILL_PARTITIONS).contains(&total));
                    for k in [0, probe % total, total - 1] {
                        let (s, e) = def.partitions.get(k).expect("every partition in range exists");
                        prop_assert!(s < e);
                    }
                    prop_assert_eq!(def.partitions.get(total), None);
                    prop_assert_eq!(def.partitions.get(u32::MAX), None);
                }
                Err(error) => prop_assert!(names_a_field(&error), "{}", error),
            }
        }

        #[test]
        fn random_schedules_and_clocks_never_panic_the_tick_functions(
            cron in crons(),
            zone in zones(),
            catch_up in prop_oneof![0..=3i32, any::<i32>()],
            catch_up_limit in prop_oneof![4 => 0u32..5, 1 => any::<u32>()],
            last_tick in proptest::option::weighted(0.3, timestamp_strategy()),
            after in MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS,
            span in prop_oneof![0i64..100_000, any::<i64>()],
        ) {
            let record = Schedule {
                name: "s".into(),
                workflow: "w".into(),
                cron,
                time_zone: zone,
                catch_up,
                catch_up_limit,
                last_tick,
                ..Default::default()
            };
            match schedule(&record) {
                Ok(def) => {
                    let clamp = |s: i64| s.clamp(MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS);
                    let after = DateTime::from_timestamp(after, 0).unwrap_or_default();
                    let now = DateTime::from_timestamp(clamp(after.timestamp().saturating_add(span)), 0)
                        .unwrap_or_default();
                    let limit = def.catch_up_limit.min(5);
                    let due = ticks::due_ticks(&def.cron, def.zone, after, now, limit);
                    prop_assert!(due.len() <= limit);
                    prop_assert!(due.windows(2).all(|w| w[0] < w[1]));
                    prop_assert!(due.iter().all(|t| *t > after && *t <= now));
                    if let Some(next) = ticks::next_tick(&def.cron, def.zone, now) {
                        prop_assert!(next > now);
                    }
                }
                Err(error) => prop_assert!(names_a_field(&error), "{}", error),
            }
        }
    }

    #[test]
    fn timestamps_outside_the_protobuf_range_are_refused_with_the_field() {
        let at = |seconds, nanos| timestamp("start", &Timestamp { seconds, nanos });
        assert_eq!(
            at(i64::MAX, 0).unwrap_err(),
            "start: 9223372036854775807 seconds is outside 0001-01-01T00:00:00Z..=9999-12-31T23:59:59Z"
        );
        assert_eq!(
            at(0, -1).unwrap_err(),
            "start: nanos -1 outside 0..=999999999"
        );
        assert!(at(MAX_TIMESTAMP_SECONDS, 999_999_999).is_ok());
        assert!(at(MIN_TIMESTAMP_SECONDS, 0).is_ok());
    }
}

//! Cron ticks in a time zone, and backfill partitions: pure functions of time.
//!
//! Cron expressions are read by `croner` in the schedule's IANA zone (`chrono-tz`), so
//! daylight-saving changes follow croner's rules: a fixed-time job whose wall-clock time falls
//! in a spring-forward gap runs at the first instant after the gap (02:30 -> 03:00); one whose
//! time occurs twice on a fall-back day runs once, at the first occurrence; interval jobs run at
//! every real instant that matches.

use std::str::FromStr;

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// Parses an IANA zone name; empty means UTC. The error is the field message.
pub(crate) fn parse_zone(name: &str) -> Result<Tz, String> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| format!("time_zone: unknown zone {name:?}"))
}

/// Parses a cron expression (5 fields, or 6 with seconds first). The error is the field message.
pub(crate) fn parse_cron(text: &str) -> Result<Cron, String> {
    if text.trim().is_empty() {
        return Err("cron: required".to_owned());
    }
    Cron::from_str(text).map_err(|err| format!("cron: {}", explain_cron_error(text, &err)))
}

/// Names the field croner refused ("Component error: Number out of bounds." names none): the
/// first value outside its field's range, or else croner's message with the expected shape.
fn explain_cron_error(text: &str, err: &impl std::fmt::Display) -> String {
    const SHAPE: &str = "expected 5 fields `minute hour day-of-month month day-of-week`, \
                         or 6 with `second` first";
    let fields: Vec<&str> = text.split_whitespace().collect();
    let ranges: &[(&str, u32, u32)] = match fields.len() {
        5 => &[
            ("minute", 0, 59),
            ("hour", 0, 23),
            ("day-of-month", 1, 31),
            ("month", 1, 12),
            ("day-of-week", 0, 7),
        ],
        6 => &[
            ("second", 0, 59),
            ("minute", 0, 59),
            ("hour", 0, 23),
            ("day-of-month", 1, 31),
            ("month", 1, 12),
            ("day-of-week", 0, 7),
        ],
        n => return format!("{n} fields in {text:?}; {SHAPE}"),
    };
    for (position, (field, (name, min, max))) in fields.iter().zip(ranges).enumerate() {
        // Values are the numbers of lists and ranges; what follows `/` is a step, not a value.
        for part in field.split(',') {
            let values = part.split('/').next().unwrap_or_default();
            for value in values.split('-') {
                if let Ok(number) = value.parse::<u32>()
                    && !(*min..=*max).contains(&number)
                {
                    return format!(
                        "field {} ({name}) is {field:?}: {number} is outside {min}-{max}",
                        position + 1
                    );
                }
            }
        }
    }
    format!("{err} in {text:?}; {SHAPE}")
}

/// The ticks of `cron` in `zone` that are due at `now` and come after `after`: at most `limit`
/// of them, the most recent ones, oldest first.
pub(crate) fn due_ticks(
    cron: &Cron,
    zone: Tz,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
    limit: usize,
) -> Vec<DateTime<Utc>> {
    let mut due = Vec::new();
    if now <= after || limit == 0 {
        return due;
    }
    // Walking back from `now` costs at most `limit` steps, however long the scheduler was down.
    let Ok(latest) = cron.find_previous_occurrence(&now.with_timezone(&zone), true) else {
        return due;
    };
    let latest = latest.with_timezone(&Utc);
    if latest <= after {
        return due;
    }
    due.push(latest);
    for tick in cron.iter_before(latest.with_timezone(&zone)) {
        let tick = tick.with_timezone(&Utc);
        if tick <= after || due.len() >= limit {
            break;
        }
        due.push(tick);
    }
    due.reverse();
    due
}

/// The first tick of `cron` in `zone` strictly after `after`.
pub(crate) fn next_tick(cron: &Cron, zone: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after.with_timezone(&zone), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// How long a backfill's partitions are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grain {
    Hourly,
    Daily,
}

/// One partition: `[start, end)`.
pub(crate) type Span = (DateTime<Utc>, DateTime<Utc>);

/// The partitions `[start, end)` covering `[from, to)`: hours, or calendar days in `zone`.
/// Partition `k` is computed from the first one and `k`, so a range of millions of partitions
/// costs nothing until its partitions are asked for, one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Partitions {
    grain: Grain,
    zone: Tz,
    /// Hourly: the start of the first partition.
    first_hour: DateTime<Utc>,
    /// Daily: the first partition's day in `zone`.
    first_day: NaiveDate,
    total: u32,
}

impl Partitions {
    /// The partitions of `[from, to)`; the error is the field message. Fails when the range is
    /// empty or holds more than `max` partitions.
    pub(crate) fn new(
        grain: Grain,
        zone: Tz,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        max: u32,
    ) -> Result<Partitions, String> {
        if to <= from {
            return Err(format!(
                "end: {} is not after start {}",
                utc_rfc3339(to),
                utc_rfc3339(from)
            ));
        }
        let out_of_range = || "start: out of the supported time range".to_owned();
        let local = from.with_timezone(&zone);
        // Round down to the hour in the zone (the same instant as in UTC for whole-hour offsets;
        // zones with half-hour offsets get their own hour boundaries).
        let into_hour = Duration::seconds(i64::from(local.minute() * 60 + local.second()))
            + Duration::nanoseconds(i64::from(local.nanosecond()));
        let first_hour = from
            .checked_sub_signed(into_hour)
            .ok_or_else(out_of_range)?;
        let first_day = local.date_naive();
        let count: i64 = match grain {
            Grain::Hourly => {
                let span = to.signed_duration_since(first_hour);
                let whole = span.num_seconds() / 3600;
                let partial = span.num_seconds() % 3600 != 0 || span.subsec_nanos() != 0;
                whole + i64::from(partial)
            }
            Grain::Daily => {
                // The last partition is the day holding the instant just before `to`.
                let last = to
                    .checked_sub_signed(Duration::nanoseconds(1))
                    .ok_or_else(out_of_range)?
                    .with_timezone(&zone)
                    .date_naive();
                last.signed_duration_since(first_day).num_days() + 1
            }
        };
        let unit = match grain {
            Grain::Hourly => "hourly",
            Grain::Daily => "daily",
        };
        let total = u32::try_from(count)
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                format!("end: the range holds {count} {unit} partitions, over the limit of {max}")
            })?;
        Ok(Partitions {
            grain,
            zone,
            first_hour,
            first_day,
            total,
        })
    }

    pub(crate) fn total(&self) -> u32 {
        self.total
    }

    /// Partition `index` (0-based), or `None` past the end.
    pub(crate) fn get(&self, index: u32) -> Option<Span> {
        if index >= self.total {
            return None;
        }
        match self.grain {
            Grain::Hourly => {
                let start = self
                    .first_hour
                    .checked_add_signed(Duration::hours(i64::from(index)))?;
                Some((start, start.checked_add_signed(Duration::hours(1))?))
            }
            Grain::Daily => {
                let day = self
                    .first_day
                    .checked_add_days(chrono::Days::new(u64::from(index)))?;
                Some((
                    midnight(self.zone, day)?,
                    midnight(self.zone, day.succ_opt()?)?,
                ))
            }
        }
    }
}

/// The first instant of `day` in `zone` (midnight, or the end of a gap that swallows it).
fn midnight(zone: Tz, day: NaiveDate) -> Option<DateTime<Utc>> {
    let mut time = day.and_time(NaiveTime::MIN);
    for _ in 0..=24 * 4 {
        if let Some(t) = zone.from_local_datetime(&time).earliest() {
            return Some(t.with_timezone(&Utc));
        }
        time = time.checked_add_signed(Duration::minutes(15))?;
    }
    Some(Utc.from_utc_datetime(&day.and_time(NaiveTime::MIN)))
}

/// RFC 3339 in `zone`, whole seconds: what expressions see as `tick` and partition bounds.
pub(crate) fn local_rfc3339(at: DateTime<Utc>, zone: Tz) -> String {
    at.with_timezone(&zone)
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// RFC 3339 in UTC (`...Z`): the form used in idempotency keys.
pub(crate) fn utc_rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cron_error_names_the_field() {
        let error = super::parse_cron("0 25 * * *").unwrap_err();
        assert_eq!(error, "cron: field 2 (hour) is \"25\": 25 is outside 0-23");
        let error = super::parse_cron("0 0 0 30 2-13 *").unwrap_err();
        assert_eq!(
            error,
            "cron: field 5 (month) is \"2-13\": 13 is outside 1-12"
        );
        let error = super::parse_cron("* * *").unwrap_err();
        assert!(
            error.starts_with("cron: 3 fields in \"* * *\"; expected 5 fields"),
            "{error}"
        );
        let error = super::parse_cron("0 0 * * mondy").unwrap_err();
        assert!(error.ends_with("or 6 with `second` first"), "{error}");
    }

    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn all_between(cron: &str, zone: &str, from: &str, to: &str) -> Vec<String> {
        let zone = parse_zone(zone).unwrap();
        due_ticks(&parse_cron(cron).unwrap(), zone, utc(from), utc(to), 1000)
            .into_iter()
            .map(|t| local_rfc3339(t, zone))
            .collect()
    }

    #[test]
    fn spring_forward_runs_a_skipped_time_right_after_the_gap() {
        // Europe/Berlin jumps from 02:00 to 03:00 on 2025-03-30.
        assert_eq!(
            all_between(
                "30 2 * * *",
                "Europe/Berlin",
                "2025-03-28T12:00:00Z",
                "2025-03-31T12:00:00Z"
            ),
            [
                "2025-03-29T02:30:00+01:00",
                "2025-03-30T03:00:00+02:00",
                "2025-03-31T02:30:00+02:00",
            ]
        );
    }

    #[test]
    fn fall_back_runs_a_repeated_time_once() {
        // Europe/Berlin goes from 03:00 back to 02:00 on 2025-10-26; 02:30 happens twice.
        assert_eq!(
            all_between(
                "30 2 * * *",
                "Europe/Berlin",
                "2025-10-24T12:00:00Z",
                "2025-10-27T12:00:00Z"
            ),
            [
                "2025-10-25T02:30:00+02:00",
                "2025-10-26T02:30:00+02:00",
                "2025-10-27T02:30:00+01:00",
            ]
        );
        // An hourly job runs in both copies of the repeated hour: 25 ticks that day.
        let ticks = all_between(
            "0 * * * *",
            "Europe/Berlin",
            "2025-10-25T21:59:00Z",
            "2025-10-26T22:59:00Z",
        );
        assert_eq!(ticks.len(), 25, "{ticks:?}");
    }

    #[test]
    fn seconds_field_and_limits() {
        let ticks = all_between(
            "*/20 * * * * *",
            "",
            "2025-01-01T00:00:00Z",
            "2025-01-01T00:01:00Z",
        );
        assert_eq!(
            ticks,
            [
                "2025-01-01T00:00:20+00:00",
                "2025-01-01T00:00:40+00:00",
                "2025-01-01T00:01:00+00:00",
            ]
        );
        let cron = parse_cron("* * * * * *").unwrap();
        let limited = due_ticks(
            &cron,
            Tz::UTC,
            utc("2020-01-01T00:00:00Z"),
            utc("2025-01-01T00:00:00Z"),
            3,
        );
        assert_eq!(
            limited,
            [
                utc("2024-12-31T23:59:58Z"),
                utc("2024-12-31T23:59:59Z"),
                utc("2025-01-01T00:00:00Z")
            ]
        );
    }

    #[test]
    fn bad_cron_and_zone_name_the_field() {
        assert!(parse_cron("61 * * * *").unwrap_err().starts_with("cron: "));
        assert_eq!(
            parse_zone("Mars/Base").unwrap_err(),
            "time_zone: unknown zone \"Mars/Base\""
        );
    }

    #[test]
    fn daily_partitions_follow_the_zone() {
        let zone = parse_zone("Europe/Berlin").unwrap();
        let days = Partitions::new(
            Grain::Daily,
            zone,
            utc("2025-03-29T10:00:00Z"),
            utc("2025-03-31T00:00:00Z"),
            100,
        )
        .unwrap();
        let parts: Vec<Span> = (0..days.total()).filter_map(|k| days.get(k)).collect();
        let lengths: Vec<i64> = parts.iter().map(|(s, e)| (*e - *s).num_hours()).collect();
        // 29th (24 h), 30th (23 h: spring forward), 31st starts at 22:00Z on the 30th.
        assert_eq!(lengths, [24, 23, 24]);
        assert_eq!(local_rfc3339(parts[1].0, zone), "2025-03-30T00:00:00+01:00");
        assert_eq!(days.get(3), None);
        let hours = Partitions::new(
            Grain::Hourly,
            Tz::UTC,
            utc("2025-01-01T00:30:00Z"),
            utc("2025-01-01T03:00:00Z"),
            100,
        )
        .unwrap();
        assert_eq!(hours.total(), 3);
        assert_eq!(hours.get(0).unwrap().0, utc("2025-01-01T00:00:00Z"));
        assert_eq!(hours.get(2).unwrap().1, utc("2025-01-01T03:00:00Z"));
    }

    #[test]
    fn a_partial_last_hour_is_a_partition_and_the_count_is_bounded() {
        let hours = |from: &str, to: &str, max: u32| {
            Partitions::new(Grain::Hourly, Tz::UTC, utc(from), utc(to), max).map(|p| p.total())
        };
        assert_eq!(
            hours("2025-01-01T00:00:00Z", "2025-01-01T02:00:00.5Z", 10),
            Ok(3)
        );
        assert_eq!(
            hours("2025-01-01T00:00:00Z", "2025-01-01T00:00:01Z", 10),
            Ok(1)
        );
        assert_eq!(
            hours("2025-01-01T00:00:00Z", "2025-01-01T11:00:00Z", 10).unwrap_err(),
            "end: the range holds 11 hourly partitions, over the limit of 10"
        );
        assert!(
            hours("2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z", 10)
                .unwrap_err()
                .starts_with("end: 2025-01-01T00:00:00Z is not after start")
        );
    }

    #[test]
    fn partition_k_is_computed_not_listed() {
        // A million hourly partitions: the millionth is found in one step.
        let plan = Partitions::new(
            Grain::Hourly,
            Tz::UTC,
            utc("2000-01-01T00:00:00Z"),
            utc("2114-01-29T16:00:00Z"),
            10_000_000,
        )
        .unwrap();
        assert_eq!(plan.total(), 1_000_000);
        let (start, end) = plan.get(999_999).unwrap();
        assert_eq!(start, utc("2114-01-29T15:00:00Z"));
        assert_eq!(end, utc("2114-01-29T16:00:00Z"));
        // Daily partitions agree with walking day by day, across DST changes.
        let zone = parse_zone("America/New_York").unwrap();
        let days = Partitions::new(
            Grain::Daily,
            zone,
            utc("2024-01-01T12:00:00Z"),
            utc("2026-01-01T05:00:00Z"),
            10_000,
        )
        .unwrap();
        assert_eq!(days.total(), 731);
        let mut previous_end = None;
        for k in 0..days.total() {
            let (start, end) = days.get(k).unwrap();
            assert!(start < end);
            if let Some(prev) = previous_end {
                assert_eq!(prev, start, "partition {k} follows the previous one");
            }
            previous_end = Some(end);
        }
        assert_eq!(
            local_rfc3339(days.get(730).unwrap().0, zone),
            "2025-12-31T00:00:00-05:00"
        );
    }
}

//! Text rendering shared by the commands: state names, times, durations, tables, colours.

use std::time::{Duration, SystemTime};

use dagmesh_proto::v1::{RunState, StepState};
use prost_types::Timestamp;

/// `SUCCEEDED` for `RUN_STATE_SUCCEEDED`; the number for a state this client does not know.
pub fn run_state(state: i32) -> String {
    match RunState::try_from(state) {
        Ok(state) => short(state.as_str_name(), "RUN_STATE_"),
        Err(_) => format!("STATE_{state}"),
    }
}

/// `RUNNING` for `STEP_STATE_RUNNING`.
pub fn step_state(state: i32) -> String {
    match StepState::try_from(state) {
        Ok(state) => short(state.as_str_name(), "STEP_STATE_"),
        Err(_) => format!("STATE_{state}"),
    }
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

pub fn run_is_final(state: i32) -> bool {
    matches!(
        RunState::try_from(state),
        Ok(RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    )
}

/// Whether the attempt is over (its duration no longer grows).
pub fn step_attempt_ended(state: i32) -> bool {
    matches!(
        StepState::try_from(state),
        Ok(StepState::Succeeded
            | StepState::Failed
            | StepState::Skipped
            | StepState::Cancelled
            | StepState::RetryWait)
    )
}

pub fn to_system_time(ts: &Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*ts).ok()
}

/// RFC 3339 with seconds, e.g. `2025-01-31T12:00:01Z`; `-` when absent.
pub fn datetime(ts: Option<&Timestamp>) -> String {
    ts.and_then(to_system_time)
        .map(|time| humantime::format_rfc3339_seconds(time).to_string())
        .unwrap_or_else(|| "-".to_owned())
}

/// Time of day in UTC with milliseconds, e.g. `12:00:01.234`, for event lines.
pub fn clock(time: SystemTime) -> String {
    // `YYYY-MM-DDTHH:MM:SS.mmmZ`: the time of day is at 11..23.
    let text = humantime::format_rfc3339_millis(time).to_string();
    text.get(11..23).unwrap_or(&text).to_owned()
}

/// `later - earlier`, zero if the clocks disagree.
pub fn between(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

/// Duration from `start` to `end`, or to `now` when `end` is absent; `None` without a start.
pub fn span(
    start: Option<&Timestamp>,
    end: Option<&Timestamp>,
    now: SystemTime,
) -> Option<Duration> {
    let start = start.and_then(to_system_time)?;
    let end = end.and_then(to_system_time).unwrap_or(now);
    Some(between(start, end))
}

/// `0.42s`, `12.30s`, `3m07s`, `2h05m`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.2}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// `4s ago`, `3m ago`, `2h ago`, `5d ago`.
pub fn ago(time: Option<&Timestamp>, now: SystemTime) -> String {
    let Some(time) = time.and_then(to_system_time) else {
        return "-".to_owned();
    };
    let secs = between(time, now).as_secs();
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// Progress fraction (0..1) as a whole percentage, clamped.
pub fn percent(fraction: f32) -> u32 {
    if fraction.is_nan() {
        return 0;
    }
    (fraction.clamp(0.0, 1.0) * 100.0).round() as u32
}

/// `k=v,k2=v2`, sorted by key; `-` when empty.
pub fn pairs<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<_> = map.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if pairs.is_empty() {
        return "-".to_owned();
    }
    pairs.sort();
    pairs.join(",")
}

/// `Label:  value` lines, values aligned after the longest label; empty values are left out.
pub fn details(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0)
        + 2;
    let mut out = String::new();
    for (label, value) in fields.iter().filter(|(_, value)| !value.is_empty()) {
        out.push_str(&format!("{:<width$}{value}\n", format!("{label}:")));
    }
    out
}

/// First line of `text`, cut to `max` characters with an ellipsis.
pub fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    let cut = line.chars().count() > max || text.lines().nth(1).is_some();
    if line.chars().count() > max {
        let kept: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{kept}…")
    } else if cut {
        format!("{line} …")
    } else {
        line.to_owned()
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[c] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// ANSI colours, or none (for `NO_COLOR`, pipes and tests).
#[derive(Clone, Copy, Debug)]
pub struct Paint {
    pub enabled: bool,
}

impl Paint {
    pub const PLAIN: Paint = Paint { enabled: false };

    /// Colours when `NO_COLOR` is unset (https://no-color.org).
    pub fn for_terminal() -> Paint {
        Paint {
            enabled: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }

    fn wrap(self, code: &str, text: &str) -> String {
        if self.enabled {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    pub fn bold(self, text: &str) -> String {
        self.wrap("1", text)
    }
    pub fn dim(self, text: &str) -> String {
        self.wrap("2", text)
    }
    pub fn red(self, text: &str) -> String {
        self.wrap("31", text)
    }
    pub fn green(self, text: &str) -> String {
        self.wrap("32", text)
    }
    pub fn yellow(self, text: &str) -> String {
        self.wrap("33", text)
    }
    pub fn blue(self, text: &str) -> String {
        self.wrap("34", text)
    }
    pub fn cyan(self, text: &str) -> String {
        self.wrap("36", text)
    }

    /// A run state in its colour.
    pub fn run_state(self, state: i32) -> String {
        let name = run_state(state);
        match RunState::try_from(state) {
            Ok(RunState::Succeeded) => self.green(&name),
            Ok(RunState::Failed) => self.red(&name),
            Ok(RunState::Cancelled) => self.yellow(&name),
            Ok(RunState::Running) => self.cyan(&name),
            _ => self.dim(&name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_every_scale() {
        assert_eq!(duration(Duration::from_millis(1234)), "1.23s");
        assert_eq!(duration(Duration::from_secs(187)), "3m07s");
        assert_eq!(
            duration(Duration::from_secs(2 * 3600 + 5 * 60 + 9)),
            "2h05m"
        );
    }

    #[test]
    fn clock_is_utc_time_of_day_with_millis() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(12 * 3600 * 1000 + 1234);
        assert_eq!(clock(time), "12:00:01.234");
    }

    #[test]
    fn states_print_without_their_prefix() {
        assert_eq!(run_state(RunState::Succeeded as i32), "SUCCEEDED");
        assert_eq!(step_state(StepState::RetryWait as i32), "RETRY_WAIT");
        assert_eq!(step_state(42), "STATE_42");
    }

    #[test]
    fn table_aligns_columns_and_leaves_the_last_unpadded() {
        let mut table = Table::new(&["STEP", "STATE", "ERROR"]);
        table.row(vec!["fetch".into(), "SUCCEEDED".into(), String::new()]);
        table.row(vec!["mesh_build".into(), "FAILED".into(), "boom".into()]);
        assert_eq!(
            table.render(),
            "STEP        STATE      ERROR\n\
             fetch       SUCCEEDED\n\
             mesh_build  FAILED     boom\n"
        );
    }

    #[test]
    fn percent_is_clamped_and_rounded() {
        assert_eq!(percent(0.404), 40);
        assert_eq!(percent(1.7), 100);
        assert_eq!(percent(-0.1), 0);
        assert_eq!(percent(f32::NAN), 0);
    }
}

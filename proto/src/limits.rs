//! The documented limits of the contract, in one place: every value that enters dagmesh (API
//! requests, worker messages, workflow files, schedules, records read back from the store) is
//! checked against these before anything acts on it. The README's table of limits and the proto
//! comments quote these numbers; a refusal names the field, the value's size and the limit.

use std::fmt;
use std::time::Duration;

use prost_types::{Struct, Value, value::Kind};

/// Nesting depth of a payload (run inputs, step inputs and outputs, event payloads), counted in
/// JSON levels: `{"a": {"b": 1}}` has depth 2. Protobuf decoders refuse messages nested deeper
/// than 100 message levels and every JSON level costs up to three (Value, Struct, map entry), so
/// 20 leaves room for the records that carry a payload (Run, Step, RunEvent, responses).
pub const MAX_PAYLOAD_DEPTH: usize = 20;
/// Default limit of one inline payload, protobuf-encoded bytes (the executor's
/// `--max-payload-bytes`).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;
/// gRPC messages may exceed the payload limit by this much (the envelope around the payload).
pub const MESSAGE_OVERHEAD_BYTES: usize = 1024 * 1024;

/// Names: workflow names, step ids, task names, input names, label and tag keys, resource names,
/// worker names and instance ids, schedule/trigger/backfill names.
pub const MAX_NAME_LEN: usize = 128;
/// Label and tag values, task texts (`name@requirement`), idempotency keys, run/task ids.
pub const MAX_VALUE_LEN: usize = 256;
/// One CEL expression (step inputs, `when`, trigger filters and mappings, limit keys).
pub const MAX_EXPRESSION_LEN: usize = 4096;
/// Short human texts: progress messages, cancel reasons, SDK names and versions.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Error texts from workers (TaskFailed.error); longer ones are cut and marked.
pub const MAX_ERROR_LEN: usize = 16 * 1024;

/// Steps of one workflow (a fan-out of 10,000 steps with its join fits, with room to spare).
pub const MAX_STEPS: usize = 20_000;
/// `needs` entries summed over all steps of one workflow (edges of the DAG).
pub const MAX_EDGES: usize = 100_000;
/// Inputs of one step; labels of one step or worker; tags of one run; metrics of one progress.
pub const MAX_ENTRIES: usize = 64;
/// Task types one worker registers; tasks it lists in `Hello.in_flight`.
pub const MAX_TASK_TYPES: usize = 256;
pub const MAX_IN_FLIGHT: usize = 10_000;
/// Attempts of one step's retry policy.
pub const MAX_ATTEMPTS: u32 = 100;
/// Items one map step (`for_each`) may expand to.
pub const MAX_MAP_ITEMS: usize = 10_000;
/// How deep child workflow runs nest (a run submitted directly is at depth 0).
pub const MAX_CHILD_DEPTH: u32 = 8;
/// Bytes of a declared input's description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Worker slots (`Hello.slots`, `StepSpec.slots`).
pub const MAX_SLOTS: u32 = 10_000;

/// One attempt's timeout (`StepSpec.timeout`), and the schedule-to-start timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// One retry backoff (`RetryPolicy.initial_backoff`, `max_backoff`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// One log line, bytes; longer lines are cut and marked.
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;
/// Lines in one TaskLog message; more are dropped and marked.
pub const MAX_LOG_LINES_PER_MESSAGE: usize = 1000;
/// Log bytes kept per attempt; past it lines are dropped and one marker line says how many.
pub const MAX_LOG_BYTES_PER_ATTEMPT: usize = 1024 * 1024;

/// A workflow file (YAML or JSON), bytes.
pub const MAX_WORKFLOW_FILE_BYTES: usize = 8 * 1024 * 1024;
/// Values a workflow file may expand to once YAML aliases are resolved, counted as nodes plus
/// string bytes: a file without aliases stays far below it, an alias bomb ("billion laughs")
/// is refused before it is built.
pub const MAX_WORKFLOW_FILE_EXPANSION: usize = 4 * MAX_WORKFLOW_FILE_BYTES;
/// Duration texts (`"1h 30m"`), bytes.
pub const MAX_DURATION_LEN: usize = 64;
/// Nodes of one compiled CEL expression (literals, variables, calls, macro expansions).
pub const MAX_EXPRESSION_NODES: usize = 1000;
/// Comprehensions (`map`, `filter`, `all`, `exists`, `exists_one`) nested in one another in one
/// expression: each level multiplies the work by the size of a list, so two is the most that
/// stays predictable.
pub const MAX_COMPREHENSION_DEPTH: usize = 2;
/// Work units one expression evaluation may cost, estimated before it runs from the sizes of
/// the values it reads (JSON nodes plus string bytes) and the shape of the expression; about a
/// tenth of a second of one core at most.
pub const MAX_EXPRESSION_COST: u64 = 20_000_000;

/// Partitions of one backfill (`Backfill.total`). Partitions are computed on demand, so this
/// bounds how long a backfill may take, not the scheduler's memory.
pub const MAX_BACKFILL_PARTITIONS: u32 = 10_000_000;
/// Partition runs of one backfill that may be QUEUED or RUNNING at once
/// (`Backfill.max_concurrency`).
pub const MAX_BACKFILL_CONCURRENCY: u32 = 10_000;
/// Missed ticks one schedule runs when it catches up (`Schedule.catch_up_limit`).
pub const MAX_CATCH_UP_TICKS: u32 = 1_000;
/// Timestamps taken from users and records: the range of `google.protobuf.Timestamp`,
/// 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z, with nanos in 0..1_000_000_000.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A payload that breaks a limit: which field, how big, and the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    TooDeep {
        /// Where, e.g. `outputs.a.b[3].c`.
        path: String,
        limit: usize,
    },
    TooLarge {
        field: String,
        size: usize,
        limit: usize,
    },
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::TooDeep { path, limit } => {
                write!(f, "{path}: nested deeper than the limit of {limit} levels")
            }
            PayloadError::TooLarge { field, size, limit } => write!(
                f,
                "{field}: {size} bytes, over the {limit}-byte payload limit"
            ),
        }
    }
}

impl std::error::Error for PayloadError {}

/// Checks a payload's encoded size against `max_bytes` and its nesting depth against
/// [`MAX_PAYLOAD_DEPTH`]. `field` names it in the error (`inputs`, `outputs`...).
pub fn check_payload(field: &str, payload: &Struct, max_bytes: usize) -> Result<(), PayloadError> {
    use prost::Message as _;
    check_depth(field, payload)?;
    let size = payload.encoded_len();
    if size > max_bytes {
        return Err(PayloadError::TooLarge {
            field: field.to_owned(),
            size,
            limit: max_bytes,
        });
    }
    Ok(())
}

/// Checks only the nesting depth of a payload (see [`MAX_PAYLOAD_DEPTH`]).
pub fn check_depth(field: &str, payload: &Struct) -> Result<(), PayloadError> {
    // Iterative, so that a payload decoded by something more lenient than prost cannot overflow
    // the stack here.
    let mut stack: Vec<(Item<'_>, usize, String)> =
        vec![(Item::Struct(payload), 1, field.to_owned())];
    while let Some((item, depth, path)) = stack.pop() {
        if depth > MAX_PAYLOAD_DEPTH {
            return Err(PayloadError::TooDeep {
                path,
                limit: MAX_PAYLOAD_DEPTH,
            });
        }
        match item {
            Item::Struct(s) => {
                for (key, value) in &s.fields {
                    if let Some(child) = nested(value) {
                        stack.push((child, depth + 1, format!("{path}.{key}")));
                    }
                }
            }
            Item::List(values) => {
                for (i, value) in values.iter().enumerate() {
                    if let Some(child) = nested(value) {
                        stack.push((child, depth + 1, format!("{path}[{i}]")));
                    }
                }
            }
        }
    }
    Ok(())
}

enum Item<'a> {
    Struct(&'a Struct),
    List(&'a [Value]),
}

fn nested(value: &Value) -> Option<Item<'_>> {
    match &value.kind {
        Some(Kind::StructValue(s)) => Some(Item::Struct(s)),
        Some(Kind::ListValue(list)) => Some(Item::List(&list.values)),
        _ => None,
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut, so that a text
/// echoed back (an error, a log line) stays bounded and says it was shortened.
pub fn truncate_marked(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let original = text.len();
    let marker = format!(" … [truncated: {original} bytes, limit {max}]");
    let mut cut = max.saturating_sub(marker.len());
    while cut > 0 && !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&marker);
}

/// Checks a string's length in bytes: `field: 300 bytes, over the limit of 128`.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field}: {} bytes, over the limit of {max}",
            value.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::to_struct;
    use serde_json::json;

    /// `levels` objects, one inside the other.
    fn nest(levels: usize) -> serde_json::Value {
        let mut value = json!(1);
        for _ in 0..levels {
            value = json!({ "a": value });
        }
        value
    }

    #[test]
    fn depth_at_the_limit_passes_and_one_more_is_refused_with_the_path() {
        let ok = to_struct(&nest(MAX_PAYLOAD_DEPTH));
        assert_eq!(check_depth("inputs", &ok), Ok(()));
        let deep = to_struct(&nest(MAX_PAYLOAD_DEPTH + 1));
        let err = check_depth("inputs", &deep).unwrap_err();
        assert!(err.to_string().starts_with("inputs.a.a."), "{err}");
        assert!(err.to_string().contains("limit of 20"), "{err}");
    }

    #[test]
    fn lists_count_as_levels() {
        let mut value = json!(1);
        for _ in 0..MAX_PAYLOAD_DEPTH {
            value = json!([value]);
        }
        let err = check_depth("outputs", &to_struct(&json!({ "x": value }))).unwrap_err();
        assert!(err.to_string().starts_with("outputs.x[0]"), "{err}");
    }

    #[test]
    fn size_is_checked_after_depth() {
        let big = to_struct(&json!({ "s": "x".repeat(100) }));
        let err = check_payload("outputs", &big, 50).unwrap_err();
        assert!(
            matches!(err, PayloadError::TooLarge { limit: 50, .. }),
            "{err}"
        );
    }

    #[test]
    fn truncation_is_bounded_marked_and_keeps_utf8() {
        let mut text = "é".repeat(10_000);
        truncate_marked(&mut text, 100);
        assert!(text.len() <= 100, "{}", text.len());
        assert!(text.contains("truncated: 20000 bytes"), "{text}");
        let mut short = "ok".to_owned();
        truncate_marked(&mut short, 100);
        assert_eq!(short, "ok");
    }
}

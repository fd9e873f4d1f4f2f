//! What both dialects share about records: encoding and decoding the stored proto messages,
//! assembling a run from its rows (leniently for readers, strictly for recovery), the
//! `list_runs` query and what `quarantine_run` writes.

use std::collections::HashMap;

use dagmesh_proto::v1::{
    ActiveRuns, EventUnreadable, ListRunsRequest, ListRunsResponse, Mutation, Run, RunEvent,
    RunState, RunStateChanged, Step, StepState, StepStateChanged, UnreadableRun, Workflow,
    WorkflowSpec, mutation, run_event,
};
use prost::Message;
use prost_types::Timestamp;
use sqlx::QueryBuilder;

use crate::StoreError;
use crate::store::page_size;

/// Decodes the `body` column of a row; `what` names the row in the error.
pub(super) fn decode<M: Message + Default>(
    body: &[u8],
    what: impl FnOnce() -> String,
) -> Result<M, StoreError> {
    M::decode(body).map_err(|err| StoreError::DataLoss(unreadable(&what(), &err)))
}

/// A webhook delivery read back. One that does not decode comes back GAVE_UP with the reason
/// (so the deliverer retires it) instead of failing the whole read: one damaged row must not
/// stop every other delivery.
pub(super) fn decode_delivery(
    id: &str,
    run_id: &str,
    body: &[u8],
) -> dagmesh_proto::v1::WebhookDelivery {
    use dagmesh_proto::v1::{DeliveryState, WebhookDelivery};
    WebhookDelivery::decode(body).unwrap_or_else(|err| WebhookDelivery {
        delivery_id: id.to_owned(),
        run_id: run_id.to_owned(),
        state: DeliveryState::GaveUp as i32,
        last_error: unreadable(&format!("webhook delivery {id:?}"), &err),
        ..WebhookDelivery::default()
    })
}

/// Why a record is unreadable, naming it.
fn unreadable(what: &str, err: &prost::DecodeError) -> String {
    format!("the stored record of {what} does not decode: {err}")
}

/// The stored form of a run: without its steps, which have rows of their own.
pub(super) fn encode_run(run: &Run) -> Vec<u8> {
    if run.steps.is_empty() {
        run.encode_to_vec()
    } else {
        Run {
            steps: Vec::new(),
            ..run.clone()
        }
        .encode_to_vec()
    }
}

/// The stored body of a step row: the record less what the row's key columns hold (the run
/// id, the step id and the task id made of the two), which [`StoredRun::push_step`] puts back.
/// Those strings were about half of a step row's bytes. The fields are taken out for the
/// encoding and put back.
pub(super) fn encode_step(step: &mut Step) -> Vec<u8> {
    let derived_task_id = is_derived_task_id(step);
    let run_id = std::mem::take(&mut step.run_id);
    let step_id = std::mem::take(&mut step.step_id);
    let task_id = if derived_task_id {
        std::mem::take(&mut step.task_id)
    } else {
        String::new()
    };
    let body = step.encode_to_vec();
    step.run_id = run_id;
    step.step_id = step_id;
    if derived_task_id {
        step.task_id = task_id;
    }
    body
}

/// Whether `task_id` is `<run_id>/<step_id>`, which the reader can rebuild.
fn is_derived_task_id(step: &Step) -> bool {
    step.task_id
        .strip_prefix(step.run_id.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(step.step_id.as_str())
}

/// The stored body of an event row: the record less its run id and sequence number, which the
/// row's key columns hold and [`event_from_row`] puts back.
pub(super) fn encode_event(event: &mut RunEvent) -> Vec<u8> {
    let run_id = std::mem::take(&mut event.run_id);
    let seq = std::mem::take(&mut event.seq);
    let body = event.encode_to_vec();
    event.run_id = run_id;
    event.seq = seq;
    body
}

/// The stored bodies of a batch's step and event rows ([`encode_step`], [`encode_event`]), by
/// position in the batch; empty for its other mutations.
pub(super) fn encode_row_bodies(mutations: &mut [Mutation]) -> Vec<Vec<u8>> {
    mutations
        .iter_mut()
        .map(|m| match &mut m.mutation {
            Some(mutation::Mutation::PutStep(step)) => encode_step(step),
            Some(mutation::Mutation::AppendEvent(event)) => encode_event(event),
            _ => Vec::new(),
        })
        .collect()
}

pub(super) fn new_workflow(spec: WorkflowSpec, content_hash: String, version: u32) -> Workflow {
    Workflow {
        name: spec.name.clone(),
        version,
        spec: Some(spec),
        content_hash,
        created_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
    }
}

pub(super) fn validate_spec(spec: &WorkflowSpec) -> Result<(), StoreError> {
    if spec.name.is_empty() {
        return Err(StoreError::InvalidArgument(
            "spec.name: must not be empty".to_owned(),
        ));
    }
    Ok(())
}

/// `after_seq` as a bound for the `seq` column. Sequence numbers beyond `i64::MAX` are never
/// stored (commit rejects them), so a larger bound simply matches nothing.
pub(super) fn seq_bound(after_seq: u64) -> i64 {
    i64::try_from(after_seq).unwrap_or(i64::MAX)
}

/// Whether a row of the run/step union queries is the run (kind 0) or one of its steps (1).
const KIND_RUN: i32 = 0;

/// A row of the "each run, then its steps in position order" union queries:
/// `(run_id, kind, position, step_id, workflow, state, body)`. `step_id` is empty on the run
/// row; `workflow` and `state` (the run's indexed columns) are empty and 0 on step rows.
pub(super) type UnionRow = (String, i32, i64, String, String, i32, Vec<u8>);

/// The identifying fields of a stored [`Run`], decoded on their own when the whole record does
/// not: prost skips the other fields (a too-deeply nested `inputs` included) without looking
/// inside them. The tags are those of `dagmesh.v1.Run` (a test checks they agree).
#[derive(Clone, PartialEq, prost::Message)]
struct RunHeader {
    #[prost(string, tag = "1")]
    run_id: String,
    #[prost(string, tag = "2")]
    workflow: String,
    #[prost(uint32, tag = "3")]
    workflow_version: u32,
    #[prost(map = "string, string", tag = "6")]
    tags: HashMap<String, String>,
    #[prost(string, tag = "7")]
    idempotency_key: String,
    #[prost(message, optional, tag = "10")]
    created_at: Option<Timestamp>,
    #[prost(int32, tag = "13")]
    priority: i32,
}

/// One run read back from its rows: each record decoded, or why it could not be.
pub(super) struct StoredRun {
    run_id: String,
    /// The indexed columns, which stay readable when the record does not.
    workflow: String,
    state: i32,
    run: Result<Run, (String, RunHeader)>,
    steps: Vec<(String, Result<Step, String>)>,
}

impl StoredRun {
    fn from_row(run_id: String, workflow: String, state: i32, body: &[u8]) -> StoredRun {
        let run = Run::decode(body).map_err(|err| {
            let reason = unreadable(&format!("run {run_id:?}"), &err);
            (reason, RunHeader::decode(body).unwrap_or_default())
        });
        StoredRun {
            run_id,
            workflow,
            state,
            run,
            steps: Vec::new(),
        }
    }

    /// A step row; the key fields its body leaves out (see [`encode_step`]) come from the
    /// columns. A body written before that keeps its own.
    fn push_step(&mut self, step_id: String, body: &[u8]) {
        let step = Step::decode(body)
            .map(|mut step| {
                if step.run_id.is_empty() {
                    step.run_id.clone_from(&self.run_id);
                }
                if step.step_id.is_empty() {
                    step.step_id.clone_from(&step_id);
                }
                if step.task_id.is_empty() {
                    step.task_id = format!("{}/{}", step.run_id, step.step_id);
                }
                step
            })
            .map_err(|err| unreadable(&format!("step {step_id:?} of run {:?}", self.run_id), &err));
        self.steps.push((step_id, step));
    }

    /// The reasons of every record that does not decode, run first.
    fn problems(&self) -> Vec<&str> {
        let run = self.run.as_ref().err().map(|(reason, _)| reason.as_str());
        let steps = self
            .steps
            .iter()
            .filter_map(|(_, step)| step.as_ref().err());
        run.into_iter().chain(steps.map(String::as_str)).collect()
    }

    /// The run with every step, if every record decodes.
    fn into_readable(self) -> Result<Run, UnreadableRun> {
        let problems = self.problems();
        if let Some(first) = problems.first() {
            let reason = match problems.len() {
                1 => (*first).to_owned(),
                n => format!("{first} (and {} more unreadable records)", n - 1),
            };
            return Err(UnreadableRun {
                run_id: self.run_id.clone(),
                workflow: self.workflow.clone(),
                workflow_version: self.header_version(),
                reason,
            });
        }
        let StoredRun { run, steps, .. } = self;
        // Every record decoded (checked just above).
        let mut run = run.unwrap_or_default();
        run.steps = steps.into_iter().filter_map(|(_, s)| s.ok()).collect();
        Ok(run)
    }

    fn header_version(&self) -> u32 {
        match &self.run {
            Ok(run) => run.workflow_version,
            Err((_, header)) => header.workflow_version,
        }
    }

    /// The run for a reader: an unreadable run record becomes a stand-in built from the
    /// indexed columns and the header, and an unreadable step record a placeholder step of
    /// state UNSPECIFIED; `error` says what was unreadable either way.
    fn into_lenient(self) -> Run {
        let mut run = match self.run {
            Ok(run) => run,
            Err((reason, header)) => {
                stand_in_run(&self.run_id, self.workflow, self.state, header, reason)
            }
        };
        let run_id = run.run_id.clone();
        run.steps = self
            .steps
            .into_iter()
            .map(|(step_id, step)| {
                step.unwrap_or_else(|reason| {
                    placeholder_step(&run_id, step_id, StepState::Unspecified, reason)
                })
            })
            .collect();
        run
    }
}

/// A decodable run rebuilt from what of an unreadable record survives.
fn stand_in_run(
    run_id: &str,
    workflow: String,
    state: i32,
    header: RunHeader,
    error: String,
) -> Run {
    Run {
        run_id: run_id.to_owned(),
        workflow,
        workflow_version: header.workflow_version,
        state,
        tags: header.tags,
        idempotency_key: header.idempotency_key,
        created_at: header.created_at,
        priority: header.priority,
        error,
        ..Default::default()
    }
}

fn placeholder_step(run_id: &str, step_id: String, state: StepState, error: String) -> Step {
    Step {
        run_id: run_id.to_owned(),
        task_id: format!("{run_id}/{step_id}"),
        step_id,
        state: state as i32,
        error,
        ..Default::default()
    }
}

/// Groups [`UnionRow`]s sorted by run, kind and position into runs. Steps whose run row is
/// absent are ignored.
pub(super) fn group_runs(rows: Vec<UnionRow>) -> Vec<StoredRun> {
    let mut runs: Vec<StoredRun> = Vec::new();
    for (run_id, kind, _, step_id, workflow, state, body) in rows {
        if kind == KIND_RUN {
            runs.push(StoredRun::from_row(run_id, workflow, state, &body));
        } else if let Some(run) = runs.last_mut().filter(|r| r.run_id == run_id) {
            run.push_step(step_id, &body);
        }
    }
    runs
}

/// The answer of `read_active_runs_checked` from the active runs' union rows.
pub(super) fn active_runs(rows: Vec<UnionRow>) -> ActiveRuns {
    let mut active = ActiveRuns::default();
    for stored in group_runs(rows) {
        match stored.into_readable() {
            Ok(run) => active.runs.push(run),
            Err(unreadable) => active.unreadable.push(unreadable),
        }
    }
    active
}

/// `read_active_runs`: all or nothing, as it always was, with the damaged run named.
pub(super) fn active_runs_strict(rows: Vec<UnionRow>) -> Result<Vec<Run>, StoreError> {
    let active = active_runs(rows);
    if let Some(bad) = active.unreadable.first() {
        return Err(StoreError::DataLoss(format!(
            "active run {:?} cannot be recovered: {}",
            bad.run_id, bad.reason
        )));
    }
    Ok(active.runs)
}

/// `get_run` from the run's union rows.
pub(super) fn one_run(run_id: &str, rows: Vec<UnionRow>) -> Result<Run, StoreError> {
    group_runs(rows)
        .pop()
        .map(StoredRun::into_lenient)
        .ok_or_else(|| crate::store::run_not_found(run_id))
}

/// An event row for a reader, its run id and sequence number from the columns (see
/// [`encode_event`]); an undecodable one keeps its place with `unreadable` set.
pub(super) fn event_from_row(run_id: &str, seq: i64, body: &[u8]) -> RunEvent {
    let decoded = RunEvent::decode(body).map(|mut event| {
        if event.run_id.is_empty() {
            run_id.clone_into(&mut event.run_id);
        }
        if event.seq == 0 {
            event.seq = u64::try_from(seq).unwrap_or(0);
        }
        event
    });
    decoded.unwrap_or_else(|err| RunEvent {
        run_id: run_id.to_owned(),
        seq: u64::try_from(seq).unwrap_or(0),
        at: None,
        event: Some(run_event::Event::Unreadable(EventUnreadable {
            reason: unreadable(&format!("event {seq} of run {run_id:?}"), &err),
        })),
    })
}

/// What `quarantine_run` writes, given the run's rows read inside its transaction: the run
/// FAILED with `reason`; unreadable steps replaced by FAILED ones and unfinished steps
/// CANCELLED, each with a StepStateChanged event; then RunStateChanged{FAILED, reason}, the
/// last event, numbered after `max_seq`.
pub(super) fn quarantine_mutations(
    stored: StoredRun,
    max_seq: i64,
    reason: &str,
) -> Result<Vec<Mutation>, StoreError> {
    // The reason becomes the run's error and is echoed back by every read: bounded like a
    // worker's error text.
    let mut reason = reason.to_owned();
    dagmesh_proto::limits::truncate_marked(&mut reason, dagmesh_proto::limits::MAX_ERROR_LEN);
    let reason = reason.as_str();
    let now = Timestamp::from(std::time::SystemTime::now());
    let run_id = stored.run_id.clone();
    let mut run = match stored.run {
        Ok(run) => run,
        Err((why, header)) => stand_in_run(&run_id, stored.workflow, stored.state, header, why),
    };
    let mut seq = u64::try_from(max_seq).unwrap_or(0).max(run.last_seq);
    let mut next_seq = || -> Result<u64, StoreError> {
        seq = seq
            .checked_add(1)
            .filter(|s| i64::try_from(*s).is_ok())
            .ok_or_else(|| {
                StoreError::InvalidArgument(format!("run {run_id:?} has no event numbers left"))
            })?;
        Ok(seq)
    };
    let mut mutations = Vec::new();
    for (step_id, step) in stored.steps {
        let step = match step {
            Err(why) => placeholder_step(
                &run.run_id,
                step_id,
                StepState::Failed,
                format!("quarantined: {why}"),
            ),
            Ok(step) if !is_step_finished(step.state()) => Step {
                state: StepState::Cancelled as i32,
                error: reason.to_owned(),
                finished_at: Some(now),
                ..step
            },
            Ok(_) => continue,
        };
        mutations.push(event_mutation(RunEvent {
            run_id: run.run_id.clone(),
            seq: next_seq()?,
            at: Some(now),
            event: Some(run_event::Event::StepState(StepStateChanged {
                step_id: step.step_id.clone(),
                state: step.state,
                attempt: step.attempt,
                worker: String::new(),
                error: step.error.clone(),
                item_count: 0,
                cached_from: String::new(),
            })),
        }));
        mutations.push(Mutation {
            mutation: Some(mutation::Mutation::PutStep(step)),
        });
    }
    let last = next_seq()?;
    mutations.push(event_mutation(RunEvent {
        run_id: run.run_id.clone(),
        seq: last,
        at: Some(now),
        event: Some(run_event::Event::RunState(RunStateChanged {
            state: RunState::Failed as i32,
            error: reason.to_owned(),
            actor: String::new(),
            suspended: false,
        })),
    }));
    run.state = RunState::Failed as i32;
    run.error = reason.to_owned();
    run.finished_at = Some(now);
    run.last_seq = last;
    run.queue_position = 0;
    run.steps.clear();
    mutations.push(Mutation {
        mutation: Some(mutation::Mutation::PutRun(run)),
    });
    Ok(mutations)
}

fn event_mutation(event: RunEvent) -> Mutation {
    Mutation {
        mutation: Some(mutation::Mutation::AppendEvent(event)),
    }
}

fn is_step_finished(state: StepState) -> bool {
    matches!(
        state,
        StepState::Succeeded | StepState::Failed | StepState::Skipped | StepState::Cancelled
    )
}

/// The `list_runs` query: filters as `AND` clauses, keyset pagination on `run_id`, one row more
/// than the page to learn whether another page follows. Selects `(run_id, workflow, state,
/// body)`.
pub(super) fn list_runs_query<DB>(req: &ListRunsRequest) -> QueryBuilder<DB>
where
    DB: sqlx::Database,
    DB::Arguments: Default,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut q =
        QueryBuilder::new("SELECT r.run_id, r.workflow, r.state, r.body FROM runs r WHERE 1 = 1");
    if !req.workflow.is_empty() {
        q.push(" AND r.workflow = ").push_bind(req.workflow.clone());
    }
    if req.state != 0 {
        q.push(" AND r.state = ").push_bind(req.state);
    }
    // Sorted so that the same filter always yields the same SQL text (and the cached statement).
    let mut tags: Vec<_> = req.tags.iter().collect();
    tags.sort();
    for (key, value) in tags {
        q.push(" AND EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = r.run_id AND t.key = ")
            .push_bind(key.clone())
            .push(" AND t.value = ")
            .push_bind(value.clone())
            .push(")");
    }
    // Run ids are UUIDv7 (the creation millisecond first), so a time range is an id range.
    // Out-of-range times (refused by the executor's checks) keep the filter's meaning: before
    // 1970 bounds nothing, past what an id can hold matches nothing.
    if let Some(after) = &req.created_after {
        match run_id_floor(after) {
            Some(floor) => {
                q.push(" AND r.run_id >= ").push_bind(floor);
            }
            None if after.seconds >= 0 => {
                q.push(" AND 1 = 0");
            }
            None => {}
        }
    }
    if let Some(before) = &req.created_before {
        match run_id_floor(before) {
            Some(floor) => {
                q.push(" AND r.run_id < ").push_bind(floor);
            }
            None if before.seconds < 0 => {
                q.push(" AND 1 = 0");
            }
            None => {}
        }
    }
    if !req.page_token.is_empty() {
        q.push(" AND r.run_id < ").push_bind(req.page_token.clone());
    }
    q.push(" ORDER BY r.run_id DESC LIMIT ")
        .push_bind(i64::from(page_size(req)) + 1);
    q
}

/// The smallest UUIDv7 run id of `time`'s millisecond (its 48-bit timestamp, the rest zero):
/// every run created at or after `time` has an id at least this. None when `time` is not a valid
/// timestamp (nanos outside 0..1e9) or outside what an id can hold (1970 to year 10889).
pub fn run_id_floor(time: &Timestamp) -> Option<String> {
    if !(0..1_000_000_000).contains(&time.nanos) {
        return None;
    }
    let ms = i128::from(time.seconds) * 1000 + i128::from(time.nanos / 1_000_000);
    if !(0..1i128 << 48).contains(&ms) {
        return None;
    }
    let ms = ms as u64;
    Some(format!(
        "{:08x}-{:04x}-0000-0000-000000000000",
        ms >> 16,
        ms & 0xffff
    ))
}

/// A row of [`list_runs_query`].
pub(super) type ListRow = (String, String, i32, Vec<u8>);

/// Turns the rows of [`list_runs_query`] into a page. An unreadable run is listed as a stand-in
/// whose `error` says so, rather than failing the page for every other run.
pub(super) fn runs_page(
    req: &ListRunsRequest,
    rows: Vec<ListRow>,
) -> Result<ListRunsResponse, StoreError> {
    let size = page_size(req) as usize;
    let more = rows.len() > size;
    let runs: Vec<Run> = rows
        .into_iter()
        .take(size)
        .map(|(run_id, workflow, state, body)| {
            StoredRun::from_row(run_id, workflow, state, &body).into_lenient()
        })
        .collect();
    let next_page_token = match runs.last() {
        Some(last) if more => last.run_id.clone(),
        _ => String::new(),
    };
    Ok(ListRunsResponse {
        runs,
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_step(run_id: &str, step_id: &str, body: &[u8]) -> Step {
        let mut run = StoredRun::from_row(run_id.into(), "w".into(), 1, &[]);
        run.push_step(step_id.into(), body);
        run.steps.pop().expect("pushed").1.expect("decodes")
    }

    #[test]
    fn step_rows_leave_their_keys_to_the_columns_and_read_back_whole() {
        let mut step = Step {
            run_id: "0f8e2b1c-run".into(),
            step_id: "fetch[3]".into(),
            task_id: "0f8e2b1c-run/fetch[3]".into(),
            state: StepState::Running as i32,
            attempt: 2,
            worker: "w-1".into(),
            ..Step::default()
        };
        let body = encode_step(&mut step);
        assert_eq!(
            step.run_id, "0f8e2b1c-run",
            "the caller's step is left as it was"
        );
        assert_eq!(step.task_id, "0f8e2b1c-run/fetch[3]");
        assert!(
            !body.windows(12).any(|w| w == b"0f8e2b1c-run"),
            "the run id is not in the body"
        );
        assert!(body.len() < step.encoded_len() / 2, "{} bytes", body.len());
        assert_eq!(stored_step("0f8e2b1c-run", "fetch[3]", &body), step);
        // A row written whole (by an earlier version) reads as it was written.
        assert_eq!(
            stored_step("0f8e2b1c-run", "fetch[3]", &step.encode_to_vec()),
            step
        );
        // A task id that is not made of the keys is kept in the body.
        let mut odd = Step {
            task_id: "elsewhere".into(),
            ..step.clone()
        };
        let body = encode_step(&mut odd);
        assert_eq!(stored_step("0f8e2b1c-run", "fetch[3]", &body), odd);
    }

    #[test]
    fn event_rows_leave_run_id_and_seq_to_the_columns_and_read_back_whole() {
        let mut event = RunEvent {
            run_id: "0f8e2b1c-run".into(),
            seq: 41,
            at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            event: Some(run_event::Event::StepState(StepStateChanged {
                step_id: "fetch".into(),
                state: StepState::Succeeded as i32,
                attempt: 1,
                ..Default::default()
            })),
        };
        let body = encode_event(&mut event);
        assert_eq!((event.run_id.as_str(), event.seq), ("0f8e2b1c-run", 41));
        assert!(!body.windows(12).any(|w| w == b"0f8e2b1c-run"));
        assert_eq!(event_from_row("0f8e2b1c-run", 41, &body), event);
        assert_eq!(
            event_from_row("0f8e2b1c-run", 41, &event.encode_to_vec()),
            event
        );
    }

    #[test]
    fn run_header_reads_the_fields_of_a_run() {
        let run = Run {
            run_id: "r".into(),
            workflow: "w".into(),
            workflow_version: 7,
            state: RunState::Running as i32,
            tags: [("team".to_owned(), "a".to_owned())].into(),
            idempotency_key: "k".into(),
            created_at: Some(Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            priority: -3,
            error: "e".into(),
            last_seq: 9,
            ..Default::default()
        };
        let header = RunHeader::decode(run.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            header,
            RunHeader {
                run_id: "r".into(),
                workflow: "w".into(),
                workflow_version: 7,
                tags: run.tags.clone(),
                idempotency_key: "k".into(),
                created_at: run.created_at,
                priority: -3,
            }
        );
    }

    #[test]
    fn run_header_survives_a_payload_too_deep_to_decode() {
        let mut value = prost_types::Value::default();
        for _ in 0..200 {
            value = prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                    fields: [("a".to_owned(), value)].into(),
                })),
            };
        }
        let run = Run {
            run_id: "r".into(),
            workflow_version: 3,
            inputs: Some(prost_types::Struct {
                fields: [("deep".to_owned(), value)].into(),
            }),
            ..Default::default()
        };
        let body = run.encode_to_vec();
        let stored = StoredRun::from_row("r".into(), "w".into(), RunState::Running as i32, &body);
        let Err((reason, header)) = &stored.run else {
            panic!("a 200-level payload must exceed prost's recursion limit");
        };
        assert!(reason.contains("run \"r\""), "{reason}");
        assert_eq!(header.workflow_version, 3);
        let lenient = stored.into_lenient();
        assert_eq!(
            (
                lenient.workflow.as_str(),
                lenient.workflow_version,
                lenient.state
            ),
            ("w", 3, RunState::Running as i32)
        );
        assert!(
            lenient.error.contains("does not decode"),
            "{}",
            lenient.error
        );
    }
}

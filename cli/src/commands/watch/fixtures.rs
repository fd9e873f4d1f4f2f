//! Events, steps and needs for the tests of the watch's parts.

use std::collections::HashMap;

use dagmesh_proto::v1::{RunEvent, Step, StepProgress, StepState, StepStateChanged, run_event};
use prost_types::Timestamp;

pub(super) fn at(millis: i64) -> Option<Timestamp> {
    // 2023-11-14T12:00:00Z plus `millis`.
    let base = 1_699_963_200_000_i64 + millis;
    Some(Timestamp {
        seconds: base / 1000,
        nanos: ((base % 1000) * 1_000_000) as i32,
    })
}

pub(super) fn event(seq: u64, millis: i64, event: run_event::Event) -> RunEvent {
    RunEvent {
        run_id: "r1".into(),
        seq,
        at: at(millis),
        event: Some(event),
    }
}

pub(super) fn step_state(
    step: &str,
    state: StepState,
    attempt: u32,
    worker: &str,
) -> run_event::Event {
    run_event::Event::StepState(StepStateChanged {
        step_id: step.into(),
        state: state as i32,
        attempt,
        worker: worker.into(),
        error: String::new(),
        item_count: 0,
        cached_from: String::new(),
    })
}

pub(super) fn progress(step: &str, attempt: u32, fraction: f32, message: &str) -> run_event::Event {
    run_event::Event::StepProgress(StepProgress {
        step_id: step.into(),
        attempt,
        fraction,
        message: message.into(),
        metrics: HashMap::new(),
    })
}

pub(super) fn steps(ids: &[&str]) -> Vec<Step> {
    ids.iter()
        .map(|id| Step {
            step_id: (*id).into(),
            state: StepState::Pending as i32,
            ..Step::default()
        })
        .collect()
}

pub(super) fn needs(pairs: &[(&str, &[&str])]) -> HashMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(id, needs)| {
            (
                (*id).to_owned(),
                needs.iter().map(|n| (*n).to_owned()).collect(),
            )
        })
        .collect()
}

//! The event reducer: what the client knows of a run, from WatchRun's snapshot plus every
//! event after it.

use std::collections::HashMap;

use dagmesh_proto::v1::{Run, RunEvent, Step, StepState, run_event};

use super::super::format;

/// What the client knows of a run: the snapshot with every event since applied to it.
#[derive(Debug, Default)]
pub(crate) struct RunView {
    pub run: Run,
    /// Step id -> the steps it needs, from the workflow spec; empty when unknown.
    pub needs: HashMap<String, Vec<String>>,
    /// Highest event seq applied (or contained in the snapshot).
    pub last_seq: u64,
    /// Step id -> position in `run.steps` (a map of 10,000 items must not cost a scan per
    /// event).
    index: HashMap<String, usize>,
}

impl RunView {
    pub(super) fn new(run_id: &str) -> Self {
        RunView {
            run: Run {
                run_id: run_id.to_owned(),
                ..Run::default()
            },
            ..RunView::default()
        }
    }

    pub fn snapshot(&mut self, run: Run) {
        self.last_seq = run.last_seq;
        self.run = run;
        self.reindex();
    }

    fn reindex(&mut self) {
        self.index = self
            .run
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| (step.step_id.clone(), i))
            .collect();
    }

    fn step_mut(&mut self, step_id: &str) -> &mut Step {
        if self.index.len() != self.run.steps.len() {
            self.reindex();
        }
        let index = match self.index.get(step_id) {
            Some(&index) => index,
            None => {
                let mut step = Step {
                    run_id: self.run.run_id.clone(),
                    step_id: step_id.to_owned(),
                    ..Step::default()
                };
                // An item first heard of by its event (the snapshot came before the expansion).
                if let Some((map, item)) = item_key(step_id) {
                    step.map_step = map.to_owned();
                    step.item_index = item;
                }
                self.run.steps.push(step);
                self.index
                    .insert(step_id.to_owned(), self.run.steps.len() - 1);
                self.run.steps.len() - 1
            }
        };
        &mut self.run.steps[index]
    }

    /// Applies one event; false (and nothing changes) when it was seen already.
    pub fn apply(&mut self, event: &RunEvent) -> bool {
        if event.seq != 0 && event.seq <= self.last_seq {
            return false;
        }
        self.last_seq = self.last_seq.max(event.seq);
        let at = event.at;
        match &event.event {
            Some(run_event::Event::RunState(e)) => {
                self.run.state = e.state;
                self.run.suspended = e.suspended;
                if format::run_is_final(e.state) {
                    self.run.finished_at = at.or(self.run.finished_at);
                    if !e.error.is_empty() {
                        self.run.error = e.error.clone();
                    }
                } else {
                    // RetryRun brings an ended run back.
                    self.run.finished_at = None;
                    self.run.error = e.error.clone();
                }
            }
            Some(run_event::Event::StepState(e)) => {
                let step = self.step_mut(&e.step_id);
                if e.attempt > step.attempt {
                    step.attempt = e.attempt;
                    step.progress = 0.0;
                    step.progress_message.clear();
                    step.error.clear();
                    step.started_at = None;
                    step.finished_at = None;
                }
                step.state = e.state;
                if e.item_count > 0 {
                    step.item_count = e.item_count;
                }
                if !e.worker.is_empty() {
                    step.worker = e.worker.clone();
                }
                if !e.cached_from.is_empty() {
                    step.cached_from = e.cached_from.clone();
                }
                // A READY event's text is why the step waits (see StepStateChanged.error).
                step.waiting_reason = if e.state == StepState::Ready as i32 {
                    e.error.clone()
                } else {
                    String::new()
                };
                if !e.error.is_empty() && e.state != StepState::Ready as i32 {
                    step.error = e.error.clone();
                }
                match StepState::try_from(e.state) {
                    // A new attempt, or the same one after a retry wait: its clock restarts.
                    Ok(StepState::Running)
                        if step.started_at.is_none() || step.finished_at.is_some() =>
                    {
                        step.started_at = at;
                        step.finished_at = None;
                    }
                    Ok(StepState::Pending | StepState::Ready) => {
                        step.started_at = None;
                        step.finished_at = None;
                    }
                    Ok(StepState::Succeeded) => {
                        step.progress = 1.0;
                        step.finished_at = at;
                    }
                    _ if format::step_attempt_ended(e.state) => step.finished_at = at,
                    _ => {}
                }
            }
            Some(run_event::Event::StepProgress(e)) => {
                let step = self.step_mut(&e.step_id);
                if e.attempt == 0 || e.attempt >= step.attempt {
                    step.progress = e.fraction;
                    step.progress_message = e.message.clone();
                }
            }
            Some(run_event::Event::StepLog(_) | run_event::Event::Unreadable(_)) | None => {}
        }
        true
    }
}

/// The map step and position of an item's step id (`extract[17]`).
pub(crate) fn item_key(step_id: &str) -> Option<(&str, u32)> {
    let (map, rest) = step_id.split_once('[')?;
    let digits = rest.strip_suffix(']')?;
    Some((map, digits.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use dagmesh_proto::v1::{RunState, RunStateChanged};

    use super::super::fixtures::{event, progress, step_state};
    use super::*;

    #[test]
    fn a_new_attempt_resets_progress_and_a_retried_run_reopens() {
        let mut view = RunView::new("r1");
        view.apply(&event(
            1,
            0,
            step_state("mesh", StepState::Running, 1, "gpu-1"),
        ));
        view.apply(&event(2, 10, progress("mesh", 1, 0.7, "half")));
        view.apply(&event(
            3,
            20,
            step_state("mesh", StepState::RetryWait, 1, ""),
        ));
        view.apply(&event(
            4,
            30,
            step_state("mesh", StepState::Assigned, 2, "gpu-2"),
        ));
        let mesh = &view.run.steps[0];
        assert_eq!(
            (mesh.attempt, mesh.progress, mesh.worker.as_str()),
            (2, 0.0, "gpu-2")
        );
        assert!(mesh.progress_message.is_empty());

        view.apply(&event(
            5,
            40,
            run_event::Event::RunState(RunStateChanged {
                state: RunState::Failed as i32,
                error: "mesh failed".into(),
                actor: String::new(),
                suspended: false,
            }),
        ));
        assert!(format::run_is_final(view.run.state) && view.run.finished_at.is_some());
        view.apply(&event(
            6,
            50,
            run_event::Event::RunState(RunStateChanged {
                state: RunState::Running as i32,
                error: String::new(),
                actor: String::new(),
                suspended: false,
            }),
        ));
        assert!(!format::run_is_final(view.run.state));
        assert!(view.run.finished_at.is_none() && view.run.error.is_empty());
    }
}

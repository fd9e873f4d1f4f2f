//! One plain line per event, for logs and pipes:
//! `12:00:01.234 mesh RUNNING attempt=1 worker=gpu-1`, times of day in UTC.

use std::collections::HashMap;
use std::time::SystemTime;

use dagmesh_proto::v1::{Run, RunEvent, StepState, run_event};

use super::super::format;

/// Plain lines for logs and pipes. Keeps the last progress printed per step so that a task
/// reporting every few milliseconds prints a line only when its percent or message changes.
#[derive(Debug, Default)]
pub(crate) struct PlainLines {
    progress: HashMap<String, (u32, u32, String)>,
}

impl PlainLines {
    /// The run and every step that has started, as the snapshot shows them. Each line carries
    /// the time its state began (the run's creation, a step's start or end), oldest first, so
    /// that the events after the snapshot — all of them later — never go back in time; `now`
    /// only stands in for a time the server did not send.
    pub fn snapshot(&mut self, run: &Run, now: SystemTime) -> Vec<String> {
        let at = |ts: Option<&prost_types::Timestamp>| ts.and_then(format::to_system_time);
        let created = at(run.created_at.as_ref()).unwrap_or(now);
        let mut lines = vec![format!(
            "{} run {} {}@{} {}",
            format::clock(created),
            run.run_id,
            run.workflow,
            run.workflow_version,
            format::run_state(run.state)
        )];
        let mut steps: Vec<_> = run
            .steps
            .iter()
            .filter(|step| {
                step.state != StepState::Pending as i32
                    && step.state != StepState::Unspecified as i32
            })
            .map(|step| {
                let since = at(step.finished_at.as_ref())
                    .or_else(|| at(step.started_at.as_ref()))
                    .unwrap_or(created)
                    .max(created);
                (since, step)
            })
            .collect();
        // Stable: steps that changed at the same moment keep the workflow's order.
        steps.sort_by_key(|(since, _)| *since);
        for (since, step) in steps {
            let time = format::clock(since);
            lines.push(format!(
                "{time} {}",
                step_line(
                    &step.step_id,
                    step.state,
                    step.attempt,
                    &step.worker,
                    &step.error,
                    &step.cached_from,
                )
            ));
            if step.state == StepState::Running as i32 && step.progress > 0.0 {
                lines.extend(self.progress(
                    &time,
                    &step.step_id,
                    step.attempt,
                    step.progress,
                    &step.progress_message,
                ));
            }
        }
        lines
    }

    /// The lines for one event (none for a progress report that changes nothing visible).
    pub fn event(&mut self, event: &RunEvent, now: SystemTime) -> Vec<String> {
        let when = event
            .at
            .as_ref()
            .and_then(format::to_system_time)
            .unwrap_or(now);
        let time = format::clock(when);
        match &event.event {
            Some(run_event::Event::RunState(e)) => {
                let mut line = format!("{time} run {}", format::run_state(e.state));
                if !e.error.is_empty() {
                    line.push_str(&format!(" error={:?}", e.error));
                }
                if !e.actor.is_empty() {
                    line.push_str(&format!(" by={}", e.actor));
                }
                vec![line]
            }
            Some(run_event::Event::StepState(e)) => {
                let line = step_line(
                    &e.step_id,
                    e.state,
                    e.attempt,
                    &e.worker,
                    &e.error,
                    &e.cached_from,
                );
                vec![format!("{time} {line}")]
            }
            Some(run_event::Event::StepProgress(e)) => {
                self.progress(&time, &e.step_id, e.attempt, e.fraction, &e.message)
            }
            Some(run_event::Event::StepLog(e)) => e
                .lines
                .iter()
                .flat_map(|line| {
                    let time = line
                        .at
                        .as_ref()
                        .and_then(format::to_system_time)
                        .map_or_else(|| time.clone(), format::clock);
                    let level = if line.level.is_empty() {
                        "info"
                    } else {
                        &line.level
                    };
                    line.text
                        .lines()
                        .map(move |text| format!("{time} {} LOG {level} {text}", e.step_id))
                        .collect::<Vec<_>>()
                })
                .collect(),
            Some(run_event::Event::Unreadable(e)) => {
                vec![format!(
                    "{time} event {} unreadable: {}",
                    event.seq, e.reason
                )]
            }
            None => Vec::new(),
        }
    }

    fn progress(
        &mut self,
        time: &str,
        step_id: &str,
        attempt: u32,
        fraction: f32,
        message: &str,
    ) -> Vec<String> {
        let percent = format::percent(fraction);
        let key = (attempt, percent, message.to_owned());
        if self.progress.get(step_id) == Some(&key) {
            return Vec::new();
        }
        self.progress.insert(step_id.to_owned(), key);
        let mut line = format!("{time} {step_id} PROGRESS {percent}%");
        if !message.is_empty() {
            line.push(' ');
            line.push_str(message);
        }
        vec![line]
    }
}

fn step_line(
    step_id: &str,
    state: i32,
    attempt: u32,
    worker: &str,
    error: &str,
    reused_from: &str,
) -> String {
    let mut line = format!("{step_id} {}", format::step_state(state));
    if attempt > 0 {
        line.push_str(&format!(" attempt={attempt}"));
    }
    if !worker.is_empty() {
        line.push_str(&format!(" worker={worker}"));
    }
    if !reused_from.is_empty() {
        line.push_str(&format!(" reused_from={reused_from}"));
    }
    if !error.is_empty() {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dagmesh_proto::v1::{LogLine, RunState, RunStateChanged, StepLog, StepStateChanged};

    use super::super::fixtures::{at, event, progress, step_state, steps};
    use super::*;

    #[test]
    fn plain_lines_print_one_line_per_event() {
        let mut plain = PlainLines::default();
        let now = SystemTime::UNIX_EPOCH;
        let events = [
            event(
                1,
                1234,
                step_state("fetch_images", StepState::Running, 1, "cpu-1"),
            ),
            event(2, 1500, progress("fetch_images", 1, 0.4, "meshing")),
            // Same percent and message: nothing new to say.
            event(3, 1600, progress("fetch_images", 1, 0.401, "meshing")),
            event(
                4,
                1700,
                run_event::Event::StepLog(StepLog {
                    step_id: "fetch_images".into(),
                    attempt: 1,
                    lines: vec![LogLine {
                        at: at(1650),
                        level: "warn".into(),
                        text: "slow disk".into(),
                    }],
                }),
            ),
            event(
                5,
                2000,
                run_event::Event::StepState(StepStateChanged {
                    step_id: "fetch_images".into(),
                    state: StepState::Failed as i32,
                    attempt: 1,
                    worker: String::new(),
                    error: "no images".into(),
                    item_count: 0,
                    cached_from: String::new(),
                }),
            ),
            event(
                6,
                2010,
                run_event::Event::RunState(RunStateChanged {
                    state: RunState::Failed as i32,
                    error: "step fetch_images failed".into(),
                    actor: String::new(),
                    suspended: false,
                }),
            ),
        ];
        let lines: Vec<String> = events.iter().flat_map(|e| plain.event(e, now)).collect();
        assert_eq!(
            lines,
            [
                "12:00:01.234 fetch_images RUNNING attempt=1 worker=cpu-1",
                "12:00:01.500 fetch_images PROGRESS 40% meshing",
                "12:00:01.650 fetch_images LOG warn slow disk",
                "12:00:02.000 fetch_images FAILED attempt=1 error=\"no images\"",
                "12:00:02.010 run FAILED error=\"step fetch_images failed\"",
            ]
        );
    }

    #[test]
    fn plain_snapshot_shows_started_steps_only() {
        let mut run_steps = steps(&["fetch", "mesh"]);
        run_steps[0].state = StepState::Running as i32;
        run_steps[0].attempt = 2;
        run_steps[0].worker = "cpu-1".into();
        run_steps[0].progress = 0.5;
        let run = Run {
            run_id: "r1".into(),
            workflow: "room-scan".into(),
            workflow_version: 3,
            state: RunState::Running as i32,
            steps: run_steps,
            ..Run::default()
        };
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
        assert_eq!(
            PlainLines::default().snapshot(&run, time),
            [
                "00:00:05.000 run r1 room-scan@3 RUNNING",
                "00:00:05.000 fetch RUNNING attempt=2 worker=cpu-1",
                "00:00:05.000 fetch PROGRESS 50%",
            ]
        );
    }

    /// The snapshot arrives after it was taken (here 5 s later), and events that happened in
    /// between follow it: with the receive time on the snapshot's lines the watch would go
    /// back in time; with each state's own time it never does.
    #[test]
    fn plain_times_never_go_back() {
        let mut run_steps = steps(&["mesh", "fetch", "notify"]);
        run_steps[0].state = StepState::Running as i32;
        run_steps[0].attempt = 1;
        run_steps[0].started_at = at(1_000);
        run_steps[1].state = StepState::Succeeded as i32;
        run_steps[1].attempt = 1;
        run_steps[1].started_at = at(200);
        run_steps[1].finished_at = at(900);
        let run = Run {
            run_id: "r1".into(),
            workflow: "room-scan".into(),
            workflow_version: 3,
            state: RunState::Running as i32,
            created_at: at(0),
            steps: run_steps,
            ..Run::default()
        };
        let received = at(6_000).as_ref().and_then(format::to_system_time).unwrap();
        let mut plain = PlainLines::default();
        let mut lines = plain.snapshot(&run, received);
        let next = event(
            9,
            1_500,
            step_state("mesh", StepState::Succeeded, 1, "gpu-1"),
        );
        lines.extend(plain.event(&next, received));
        assert_eq!(
            lines,
            [
                "12:00:00.000 run r1 room-scan@3 RUNNING",
                "12:00:00.900 fetch SUCCEEDED attempt=1",
                "12:00:01.000 mesh RUNNING attempt=1",
                "12:00:01.500 mesh SUCCEEDED attempt=1 worker=gpu-1",
            ]
        );
    }
}

//! Following a run live: `submit --watch`, `runs watch`, `submit --wait` and `dagmesh demo`.
//!
//! The run's state is kept here, from WatchRun's snapshot plus every event after it, and shown
//! one of three ways:
//!
//! - stdout is a terminal: a tree of steps redrawn in place (at most 10 times a second), each
//!   step under the first step it needs, with its state, attempt, duration, a progress bar, the
//!   worker and the progress message or error; task log lines scroll above the tree;
//! - stdout is not a terminal (CI, pipes): one plain line per event,
//!   `12:00:01.234 mesh RUNNING attempt=1 worker=gpu-1`, times of day in UTC;
//! - `-o json`: every WatchRunResponse as one JSON line.
//!
//! When the stream breaks (server restart, network) the watch reconnects with backoff and
//! resumes with `after_seq` = the last event seen, so no event is lost or shown twice. It gives
//! up after [`GIVE_UP_AFTER`] without a message from the server.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use dagmesh_proto::connect::AuthChannel;
use dagmesh_proto::v1::run_service_client::RunServiceClient;
use dagmesh_proto::v1::workflow_service_client::WorkflowServiceClient;
use dagmesh_proto::v1::{
    GetRunRequest, GetWorkflowRequest, Run, RunEvent, Step, StepState, WatchRunRequest,
    WatchRunResponse, run_event, watch_run_response,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::format::{self, Paint};
use super::{Interrupted, OutputFormat, json};

/// A watch that hears nothing from the server for this long stops with the last error.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Redraw period of the live tree.
const FRAME: Duration = Duration::from_millis(100);

/// Follows a run from its snapshot until it ends, printing it as `output` and the terminal
/// allow, and returns the final run (from GetRun). Ctrl-C stops the watch with
/// [`Interrupted`](super::Interrupted); the run goes on.
pub async fn follow(
    channel: AuthChannel,
    run_id: &str,
    output: OutputFormat,
) -> anyhow::Result<Run> {
    follow_after(channel, run_id, None, output, false).await
}

/// Like [`follow`], but with `Some(n)` replays the run's events after seq `n` (0: all of them)
/// instead of starting from a snapshot.
///
/// `expand_items` lists the items of map steps under their map in the live tree instead of
/// counting them on the map's line.
pub async fn follow_after(
    channel: AuthChannel,
    run_id: &str,
    after_seq: Option<u64>,
    output: OutputFormat,
    expand_items: bool,
) -> anyhow::Result<Run> {
    let mode = match output {
        OutputFormat::Json => Mode::Json,
        OutputFormat::Text if std::io::stdout().is_terminal() => Mode::Tree,
        OutputFormat::Text => Mode::Lines,
    };
    Watcher::new(channel, run_id, mode, expand_items)
        .run(after_seq)
        .await
}

/// Waits for a run to end without printing anything, and returns the final run.
pub async fn wait(channel: AuthChannel, run_id: &str) -> anyhow::Result<Run> {
    Watcher::new(channel, run_id, Mode::Quiet, false)
        .run(None)
        .await
}

/// `run <id> SUCCEEDED in 1.23s`, plus `: <error>` when the run has one.
pub fn summary(run: &Run) -> String {
    let took = format::span(
        run.created_at.as_ref(),
        run.finished_at.as_ref(),
        SystemTime::now(),
    )
    .map_or_else(|| "?".to_owned(), format::duration);
    let verb = if format::run_is_final(run.state) {
        "in"
    } else {
        "after"
    };
    let mut line = format!(
        "run {} {} {verb} {took}",
        run.run_id,
        format::run_state(run.state)
    );
    if !run.error.is_empty() {
        line.push_str(": ");
        line.push_str(&run.error);
    }
    line
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Tree,
    Lines,
    Json,
    Quiet,
}

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
    fn new(run_id: &str) -> Self {
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

    pub fn is_final(&self) -> bool {
        format::run_is_final(self.run.state)
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

/// Plain lines for logs and pipes. Keeps the last progress printed per step so that a task
/// reporting every few milliseconds prints a line only when its percent or message changes.
#[derive(Debug, Default)]
pub(crate) struct PlainLines {
    progress: HashMap<String, (u32, u32, String)>,
}

impl PlainLines {
    /// The run and every step that has started, as the snapshot shows them.
    pub fn snapshot(&mut self, run: &Run, now: SystemTime) -> Vec<String> {
        let time = format::clock(now);
        let mut lines = vec![format!(
            "{time} run {} {}@{} {}",
            run.run_id,
            run.workflow,
            run.workflow_version,
            format::run_state(run.state)
        )];
        for step in &run.steps {
            if step.state == StepState::Pending as i32
                || step.state == StepState::Unspecified as i32
            {
                continue;
            }
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

/// One line of the tree: which step, and the box-drawing prefix that places it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TreeRow {
    /// Index into `Run.steps`.
    pub step: usize,
    /// `""` for roots, `"├─ "`, `"│  └─ "`...
    pub prefix: String,
    /// The needs other than the parent it is drawn under.
    pub also_needs: Vec<String>,
}

/// Orders the steps as a tree in which every step comes after all the steps it needs: a step
/// hangs under the need that is drawn last (the one that completes its needs), children in the
/// workflow's order. A chain reads as a staircase, a fan-out as siblings, and a fan-in under its
/// last branch with "(also needs ...)" naming the others. Steps without known needs are roots.
#[cfg(test)]
pub(crate) fn tree_rows(steps: &[Step], needs: &HashMap<String, Vec<String>>) -> Vec<TreeRow> {
    tree_rows_with(steps, needs, false)
}

/// The map step and position of an item's step id (`extract[17]`).
pub(crate) fn item_key(step_id: &str) -> Option<(&str, u32)> {
    let (map, rest) = step_id.split_once('[')?;
    let digits = rest.strip_suffix(']')?;
    Some((map, digits.parse().ok()?))
}

fn is_item(step: &Step) -> bool {
    !step.map_step.is_empty() || item_key(&step.step_id).is_some()
}

/// [`tree_rows`]; a map's items are left out (its line counts them), or with `expand_items`
/// listed under it.
pub(crate) fn tree_rows_with(
    all_steps: &[Step],
    needs: &HashMap<String, Vec<String>>,
    expand_items: bool,
) -> Vec<TreeRow> {
    // The DAG without items; `positions` maps back to `all_steps`.
    let positions: Vec<usize> = (0..all_steps.len())
        .filter(|&i| !is_item(&all_steps[i]))
        .collect();
    let steps: Vec<Step> = positions.iter().map(|&i| all_steps[i].clone()).collect();
    let mut rows = dag_rows(&steps, needs);
    for row in &mut rows {
        row.step = positions[row.step];
    }
    if !expand_items {
        return rows;
    }
    let mut items: HashMap<&str, Vec<(u32, usize)>> = HashMap::new();
    for (i, step) in all_steps.iter().enumerate() {
        if let Some((map, item)) = item_key(&step.step_id) {
            items.entry(map).or_default().push((item, i));
        }
    }
    let mut expanded = Vec::with_capacity(all_steps.len());
    for row in rows {
        let map_id = all_steps[row.step].step_id.as_str();
        let children = items.remove(map_id);
        let indent: String = row
            .prefix
            .chars()
            .map(|c| if c == '├' || c == '│' { '│' } else { ' ' })
            .collect();
        expanded.push(row);
        if let Some(mut children) = children {
            children.sort_unstable();
            for (_, i) in children {
                expanded.push(TreeRow {
                    step: i,
                    prefix: format!("{indent}  · "),
                    also_needs: Vec::new(),
                });
            }
        }
    }
    expanded
}

fn dag_rows(steps: &[Step], needs: &HashMap<String, Vec<String>>) -> Vec<TreeRow> {
    let index: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.step_id.as_str(), i))
        .collect();
    // Needs as indexes; unknown ids (and self-references) are ignored.
    let needs_of: Vec<Vec<usize>> = steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            needs
                .get(&step.step_id)
                .into_iter()
                .flatten()
                .filter_map(|n| index.get(n.as_str()).copied())
                .filter(|&n| n != i)
                .collect()
        })
        .collect();
    let mut needed_by: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, needs) in needs_of.iter().enumerate() {
        for &n in needs {
            needed_by[n].push(i);
        }
    }

    let mut tree = TreeBuilder {
        steps,
        needs_of: &needs_of,
        needed_by: &needed_by,
        drawn: vec![false; steps.len()],
        rows: Vec::with_capacity(steps.len()),
    };
    let roots: Vec<usize> = (0..steps.len())
        .filter(|&i| needs_of[i].is_empty())
        .collect();
    for root in roots {
        tree.draw(root, None, "", "");
    }
    // A cycle (which a validated workflow never has) would leave steps out; show them anyway.
    for i in 0..steps.len() {
        if !tree.drawn[i] {
            tree.draw(i, None, "", "");
        }
    }
    tree.rows
}

/// Indentation levels drawn before the prefix is shortened with an ellipsis.
const MAX_TREE_DEPTH: usize = 8;

struct TreeBuilder<'a> {
    steps: &'a [Step],
    needs_of: &'a [Vec<usize>],
    needed_by: &'a [Vec<usize>],
    drawn: Vec<bool>,
    rows: Vec<TreeRow>,
}

impl TreeBuilder<'_> {
    /// Draws step `i` (under `parent`) and then, depth first, the steps it completes.
    fn draw(&mut self, i: usize, parent: Option<usize>, indent: &str, branch: &str) {
        if self.drawn[i] {
            return;
        }
        self.drawn[i] = true;
        let also_needs = self.needs_of[i]
            .iter()
            .filter(|&&n| Some(n) != parent)
            .map(|&n| self.steps[n].step_id.clone())
            .collect();
        self.rows.push(TreeRow {
            step: i,
            prefix: shorten(&format!("{indent}{branch}")),
            also_needs,
        });
        // Children: the steps whose last missing need this one was. Collected before drawing
        // any of them, so that each child's branch knows whether it is the last.
        let children: Vec<usize> = self.needed_by[i]
            .iter()
            .copied()
            .filter(|&c| !self.drawn[c] && self.needs_of[c].iter().all(|&n| self.drawn[n]))
            .collect();
        let child_indent = if branch.is_empty() {
            indent.to_owned()
        } else if branch.starts_with('└') {
            format!("{indent}   ")
        } else {
            format!("{indent}│  ")
        };
        for (k, &child) in children.iter().enumerate() {
            let branch = if k + 1 == children.len() {
                "└─ "
            } else {
                "├─ "
            };
            self.draw(child, Some(i), &child_indent, branch);
        }
    }
}

/// Deep chains would push every line off the screen: past [`MAX_TREE_DEPTH`] levels, the
/// outer part of the prefix becomes `…`.
fn shorten(prefix: &str) -> String {
    let max = MAX_TREE_DEPTH * 3;
    let chars = prefix.chars().count();
    if chars <= max {
        return prefix.to_owned();
    }
    let kept: String = prefix.chars().skip(chars - (max - 1)).collect();
    format!("…{kept}")
}

const SPINNER: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
const BAR_WIDTH: usize = 16;

fn symbol(state: i32, frame: usize, paint: Paint) -> String {
    match StepState::try_from(state) {
        Ok(StepState::Pending) => paint.dim("○"),
        Ok(StepState::Ready) => paint.dim("◌"),
        Ok(StepState::Assigned) => paint.blue("◔"),
        Ok(StepState::Running) => paint.cyan(SPINNER[frame % SPINNER.len()]),
        Ok(StepState::RetryWait) => paint.yellow("↻"),
        Ok(StepState::Succeeded) => paint.green("✔"),
        Ok(StepState::Failed) => paint.red("✖"),
        Ok(StepState::Skipped) => paint.dim("⊘"),
        Ok(StepState::Cancelled) => paint.yellow("⊗"),
        _ => "?".to_owned(),
    }
}

fn bar(fraction: f32) -> String {
    let filled = (format::percent(fraction) as usize * BAR_WIDTH)
        .div_ceil(100)
        .min(BAR_WIDTH);
    format!("{}{}", "█".repeat(filled), "░".repeat(BAR_WIDTH - filled))
}

fn pad(text: &str, visible: usize, width: usize) -> String {
    format!("{text}{}", " ".repeat(width.saturating_sub(visible)))
}

/// The tree as text: a header line, then one line per step in [`tree_rows`] order. `frame`
/// animates the spinner of running steps.
pub(crate) fn tree_lines(
    view: &RunView,
    rows: &[TreeRow],
    now: SystemTime,
    frame: usize,
    paint: Paint,
) -> Vec<String> {
    let run = &view.run;
    let mut lines = Vec::with_capacity(rows.len() + 1);

    let done = run
        .steps
        .iter()
        .filter(|s| !is_item(s))
        .filter(|s| {
            matches!(
                StepState::try_from(s.state),
                Ok(StepState::Succeeded | StepState::Skipped)
            )
        })
        .count();
    let step_count = run.steps.iter().filter(|s| !is_item(s)).count();
    let maps = map_counts(&run.steps);
    let elapsed = format::span(run.created_at.as_ref(), run.finished_at.as_ref(), now)
        .map_or_else(|| "-".to_owned(), format::duration);
    let workflow = if run.workflow.is_empty() {
        String::new()
    } else {
        format!("  {}@{}", run.workflow, run.workflow_version)
    };
    let mut header = format!(
        "{} {}{workflow}  {}  {}  {done}/{} steps",
        paint.bold("Run"),
        run.run_id,
        paint.run_state(run.state),
        elapsed,
        step_count
    );
    if run.suspended {
        header.push_str(&format!("  {}", paint.yellow("suspended")));
    }
    if !run.error.is_empty() {
        header.push_str(&format!(
            "  {}",
            paint.red(&format::one_line(&run.error, 120))
        ));
    }
    lines.push(header);

    // Left column: prefix, symbol, step id, attempt; padded so the columns after it line up.
    let lefts: Vec<(String, usize)> = rows
        .iter()
        .map(|row| {
            let step = &run.steps[row.step];
            let mut plain = format!("{}X {}", row.prefix, step.step_id);
            let mut text = format!(
                "{}{} {}",
                paint.dim(&row.prefix),
                symbol(step.state, frame, paint),
                step.step_id
            );
            if step.attempt > 1 {
                let attempt = format!(" #{}", step.attempt);
                plain.push_str(&attempt);
                text.push_str(&paint.yellow(&attempt));
            }
            (text, plain.chars().count())
        })
        .collect();
    let left_width = lefts.iter().map(|(_, w)| *w).max().unwrap_or(0);
    let worker_width = rows
        .iter()
        .map(|row| run.steps[row.step].worker.chars().count())
        .max()
        .unwrap_or(0);

    for (row, (left, left_visible)) in rows.iter().zip(&lefts) {
        let step = &run.steps[row.step];
        let state = StepState::try_from(step.state).ok();
        let took = format::span(step.started_at.as_ref(), step.finished_at.as_ref(), now)
            .map_or_else(|| "-".to_owned(), format::duration);
        let counts = maps.get(step.step_id.as_str());
        let progress = match (state, counts) {
            (Some(StepState::Running), Some(counts)) => {
                let fraction = counts.ended() as f32 / counts.total.max(1) as f32;
                format!(
                    "{} {:>3}%",
                    paint.cyan(&bar(fraction)),
                    format::percent(fraction)
                )
            }
            (Some(StepState::Running), None) => format!(
                "{} {:>3}%",
                paint.cyan(&bar(step.progress)),
                format::percent(step.progress)
            ),
            _ => " ".repeat(BAR_WIDTH + 5),
        };
        // A map has no worker of its own: its column counts the items instead.
        let (who, who_visible) = match counts {
            Some(counts) => {
                let plain = counts.describe(Paint::PLAIN);
                let width = plain.chars().count();
                (counts.describe(paint), width)
            }
            None => (step.worker.clone(), step.worker.chars().count()),
        };
        let note = match state {
            Some(StepState::Running | StepState::Assigned) => step.progress_message.clone(),
            Some(StepState::Ready) if !step.waiting_reason.is_empty() => {
                paint.yellow(&format::one_line(&step.waiting_reason, 200))
            }
            Some(StepState::Failed) => paint.red(&format::one_line(&step.error, 200)),
            Some(StepState::RetryWait) => paint.yellow(&format!(
                "retrying after: {}",
                format::one_line(&step.error, 200)
            )),
            // Steps cancelled because the run failed repeat the header's error: leave it there.
            Some(StepState::Cancelled) if step.error == run.error => String::new(),
            Some(StepState::Skipped | StepState::Cancelled) => {
                paint.dim(&format::one_line(&step.error, 200))
            }
            Some(StepState::Succeeded) if !step.cached_from.is_empty() => {
                paint.dim(&format!("reused from run {}", step.cached_from))
            }
            _ => String::new(),
        };
        let also = if row.also_needs.is_empty() {
            String::new()
        } else {
            paint.dim(&format!("  (also needs {})", row.also_needs.join(", ")))
        };
        let line = format!(
            "{}  {:>7}  {}  {}  {}{}",
            pad(left, *left_visible, left_width),
            took,
            progress,
            pad(&who, who_visible, worker_width),
            note,
            also
        );
        lines.push(line.trim_end().to_owned());
    }
    lines
}

/// How far the items of one map step got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapCounts {
    pub total: u32,
    pub done: u32,
    pub running: u32,
    pub failed: u32,
    pub cancelled: u32,
}

impl MapCounts {
    fn ended(&self) -> u32 {
        self.done + self.failed + self.cancelled
    }

    /// `▸ 37/40 done · 2 running · 1 failed`
    pub fn describe(&self, paint: Paint) -> String {
        let mut text = format!("▸ {}/{} done", self.done, self.total);
        if self.running > 0 {
            text.push_str(&format!(" · {} running", self.running));
        }
        if self.failed > 0 {
            text.push_str(&format!(
                " · {}",
                paint.red(&format!("{} failed", self.failed))
            ));
        }
        if self.cancelled > 0 {
            text.push_str(&format!(" · {} cancelled", self.cancelled));
        }
        text
    }
}

/// Map step id -> the counts of its items.
pub(crate) fn map_counts(steps: &[Step]) -> HashMap<&str, MapCounts> {
    let mut maps: HashMap<&str, MapCounts> = HashMap::new();
    for step in steps {
        if step.item_count > 0 {
            maps.entry(step.step_id.as_str()).or_default().total = step.item_count;
        }
    }
    for step in steps {
        let Some((map, _)) = item_key(&step.step_id) else {
            continue;
        };
        let counts = maps.entry(map).or_default();
        match StepState::try_from(step.state) {
            Ok(StepState::Succeeded) => counts.done += 1,
            Ok(StepState::Assigned | StepState::Running) => counts.running += 1,
            Ok(StepState::Failed) => counts.failed += 1,
            Ok(StepState::Cancelled | StepState::Skipped) => counts.cancelled += 1,
            _ => {}
        }
    }
    for counts in maps.values_mut() {
        counts.total = counts.total.max(counts.ended() + counts.running);
    }
    maps
}

/// The live tree on the terminal: one indicatif line per row (`{wide_msg}` cuts lines to the
/// terminal's width), redrawn from [`tree_lines`].
struct TreeScreen {
    multi: MultiProgress,
    bars: Vec<ProgressBar>,
    rows: Vec<TreeRow>,
    /// (steps, needs) the rows were computed for.
    shape: Option<(usize, usize)>,
    frame: usize,
    paint: Paint,
    status: Option<String>,
    /// List map items under their map instead of counting them.
    expand_items: bool,
}

impl TreeScreen {
    fn new(expand_items: bool) -> Self {
        TreeScreen {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10)),
            bars: Vec::new(),
            rows: Vec::new(),
            shape: None,
            frame: 0,
            paint: Paint::for_terminal(),
            status: None,
            expand_items,
        }
    }

    fn line_bar(&self) -> ProgressBar {
        let style =
            ProgressStyle::with_template("{wide_msg}").expect("a constant template is valid");
        self.multi.add(ProgressBar::new(1).with_style(style))
    }

    fn draw(&mut self, view: &RunView) {
        let shape = (view.run.steps.len(), view.needs.len());
        if self.shape != Some(shape) {
            self.rows = tree_rows_with(&view.run.steps, &view.needs, self.expand_items);
            self.shape = Some(shape);
        }
        let mut lines = tree_lines(view, &self.rows, SystemTime::now(), self.frame, self.paint);
        if let Some(status) = &self.status {
            lines[0].push_str(&format!("  {}", self.paint.yellow(status)));
        }
        while self.bars.len() < lines.len() {
            let bar = self.line_bar();
            self.bars.push(bar);
        }
        for (bar, line) in self.bars.iter().zip(lines) {
            if bar.message() != line {
                bar.set_message(line);
            }
        }
    }

    fn tick(&mut self, view: &RunView) {
        self.frame = self.frame.wrapping_add(1);
        self.draw(view);
    }

    fn log(&self, text: String) {
        // Fails only when the terminal went away; the tree is all that is lost.
        let _ = self.multi.println(text);
    }

    fn finish(&mut self, view: &RunView) {
        self.status = None;
        self.draw(view);
        for bar in &self.bars {
            bar.finish();
        }
    }
}

enum Printer {
    Tree(Box<TreeScreen>),
    Lines(PlainLines),
    Json,
    Quiet,
}

impl Printer {
    fn new(mode: Mode, expand_items: bool) -> Self {
        match mode {
            Mode::Tree => Printer::Tree(Box::new(TreeScreen::new(expand_items))),
            Mode::Lines => Printer::Lines(PlainLines::default()),
            Mode::Json => Printer::Json,
            Mode::Quiet => Printer::Quiet,
        }
    }

    fn response(&mut self, view: &RunView, response: &WatchRunResponse) {
        match self {
            Printer::Json => outln!(
                "{}",
                serde_json::to_string(&json::watch_response(response))
                    .expect("a serde_json::Value always serializes")
            ),
            Printer::Lines(lines) => {
                let now = SystemTime::now();
                let printed = match &response.message {
                    Some(watch_run_response::Message::Snapshot(run)) => lines.snapshot(run, now),
                    Some(watch_run_response::Message::Event(event)) => lines.event(event, now),
                    None => Vec::new(),
                };
                for line in printed {
                    outln!("{line}");
                }
            }
            Printer::Tree(screen) => {
                screen.status = None;
                if let Some(watch_run_response::Message::Event(RunEvent {
                    event: Some(run_event::Event::StepLog(log)),
                    ..
                })) = &response.message
                {
                    for line in &log.lines {
                        if line.level == "debug" {
                            continue;
                        }
                        let level = match line.level.as_str() {
                            "error" => screen.paint.red("error"),
                            "warn" => screen.paint.yellow("warn"),
                            other => {
                                screen
                                    .paint
                                    .dim(if other.is_empty() { "info" } else { other })
                            }
                        };
                        for text in line.text.lines() {
                            screen.log(format!(
                                "{} {level} {text}",
                                screen.paint.dim(&format!("[{}]", log.step_id))
                            ));
                        }
                    }
                }
                screen.draw(view);
            }
            Printer::Quiet => {}
        }
    }

    fn tick(&mut self, view: &RunView) {
        if let Printer::Tree(screen) = self {
            screen.tick(view);
        }
    }

    fn reconnecting(&mut self, view: &RunView, error: &str, delay: Duration) {
        let text = format!(
            "watch stream broken ({error}); resuming after event {} in {}",
            view.last_seq,
            format::duration(delay)
        );
        match self {
            Printer::Tree(screen) => {
                screen.status = Some(format!("reconnecting… ({error})"));
                screen.draw(view);
            }
            _ => eprintln!("{text}"),
        }
    }

    fn finish(&mut self, view: &RunView, run: &Run) {
        match self {
            Printer::Tree(screen) => {
                screen.finish(view);
                outln!("{}", summary(run));
            }
            Printer::Lines(_) => outln!("{}", summary(run)),
            Printer::Json | Printer::Quiet => {}
        }
    }

    fn abandon(&mut self, view: &RunView) {
        if let Printer::Tree(screen) = self {
            screen.finish(view);
        }
    }
}

/// Codes worth a reconnect: the server or the network went away, or the stream was cut.
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::ResourceExhausted
    )
}

struct Watcher {
    runs: RunServiceClient<AuthChannel>,
    workflows: WorkflowServiceClient<AuthChannel>,
    run_id: String,
    mode: Mode,
    view: RunView,
    printer: Printer,
    spec_loaded: bool,
}

/// How one stream ended.
enum StreamEnd {
    /// The run is over; here is its final state if we already fetched it.
    Done(Option<Box<Run>>),
    /// Reconnect after this error.
    Broken(tonic::Status),
}

impl Watcher {
    fn new(channel: AuthChannel, run_id: &str, mode: Mode, expand_items: bool) -> Self {
        Watcher {
            runs: RunServiceClient::new(channel.clone()),
            workflows: WorkflowServiceClient::new(channel),
            run_id: run_id.to_owned(),
            mode,
            view: RunView::new(run_id),
            printer: Printer::new(mode, expand_items),
            spec_loaded: false,
        }
    }

    async fn run(mut self, after_seq: Option<u64>) -> anyhow::Result<Run> {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let finished = tokio::select! {
            result = self.watch(after_seq) => Some(result),
            _ = &mut ctrl_c => None,
        };
        match finished {
            Some(result) => result,
            None => {
                self.printer.abandon(&self.view);
                Err(Interrupted {
                    run_id: self.run_id.clone(),
                }
                .into())
            }
        }
    }

    async fn watch(&mut self, after_seq: Option<u64>) -> anyhow::Result<Run> {
        if let Some(after_seq) = after_seq
            && self.mode == Mode::Tree
        {
            // No snapshot comes when replaying: take the run's shape (workflow, steps) from
            // GetRun; the replayed events then move it forward.
            let run = self.get_run().await?;
            self.view.run = run;
            self.view.last_seq = after_seq;
            self.load_spec().await;
        }
        // What to ask for: the caller's choice until the first message arrives, then always
        // the events after the last one applied (or contained in the snapshot).
        let mut after = after_seq;
        let mut backoff = FIRST_BACKOFF;
        let mut last_heard = Instant::now();
        let final_run = loop {
            let end = match self
                .runs
                .watch_run(WatchRunRequest {
                    run_id: self.run_id.clone(),
                    after_seq: after,
                })
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    self.read(&mut stream, &mut last_heard, &mut backoff, &mut after)
                        .await
                }
                Err(status) => StreamEnd::Broken(status),
            };
            match end {
                StreamEnd::Done(run) => break run,
                StreamEnd::Broken(status) => {
                    if !retryable(&status) || last_heard.elapsed() > GIVE_UP_AFTER {
                        return Err(status.into());
                    }
                    self.printer
                        .reconnecting(&self.view, status.message(), backoff);
                    self.sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let run = match final_run {
            Some(run) => *run,
            None => match self.get_run().await {
                Ok(run) => run,
                // The events already told how it ended; GetRun only adds the last details.
                Err(_) => self.view.run.clone(),
            },
        };
        self.view.snapshot(run.clone());
        self.printer.finish(&self.view, &run);
        Ok(run)
    }

    /// Reads one stream until it ends, redrawing the tree between messages.
    async fn read(
        &mut self,
        stream: &mut tonic::Streaming<WatchRunResponse>,
        last_heard: &mut Instant,
        backoff: &mut Duration,
        resume_after: &mut Option<u64>,
    ) -> StreamEnd {
        let mut ticker = tokio::time::interval(FRAME);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = ticker.tick() => {
                    self.printer.tick(&self.view);
                    continue;
                }
            };
            match message {
                Ok(Some(response)) => {
                    *last_heard = Instant::now();
                    *backoff = FIRST_BACKOFF;
                    self.handle(response).await;
                    *resume_after = Some(self.view.last_seq);
                }
                Ok(None) if self.view.is_final() => return StreamEnd::Done(None),
                Ok(None) => {
                    // Closed before the run's final event: the server is going away, or we
                    // replayed past the end. GetRun tells which.
                    return match self.get_run().await {
                        Ok(run) if format::run_is_final(run.state) => {
                            StreamEnd::Done(Some(Box::new(run)))
                        }
                        Ok(_) => StreamEnd::Broken(tonic::Status::unavailable(
                            "stream closed before the run ended",
                        )),
                        Err(err) => StreamEnd::Broken(
                            err.downcast::<tonic::Status>()
                                .unwrap_or_else(|err| tonic::Status::unavailable(err.to_string())),
                        ),
                    };
                }
                Err(status) => return StreamEnd::Broken(status),
            }
        }
    }

    async fn handle(&mut self, response: WatchRunResponse) {
        match &response.message {
            Some(watch_run_response::Message::Snapshot(run)) => {
                self.view.snapshot(run.clone());
                if self.mode == Mode::Tree {
                    self.load_spec().await;
                }
            }
            Some(watch_run_response::Message::Event(event)) => {
                if !self.view.apply(event) {
                    return;
                }
            }
            None => return,
        }
        self.printer.response(&self.view, &response);
    }

    /// The workflow's `needs`, for the tree. Without them the steps are a flat list.
    async fn load_spec(&mut self) {
        if self.spec_loaded || self.view.run.workflow.is_empty() {
            return;
        }
        self.spec_loaded = true;
        let request = GetWorkflowRequest {
            name: self.view.run.workflow.clone(),
            version: self.view.run.workflow_version,
        };
        if let Ok(workflow) = self.workflows.get_workflow(request).await
            && let Some(spec) = workflow.into_inner().spec
        {
            self.view.needs = spec
                .steps
                .into_iter()
                .map(|step| (step.id, step.needs))
                .collect();
        }
    }

    async fn get_run(&mut self) -> anyhow::Result<Run> {
        let run = self
            .runs
            .get_run(GetRunRequest {
                run_id: self.run_id.clone(),
            })
            .await
            .with_context(|| format!("cannot get run {}", self.run_id))?
            .into_inner();
        Ok(run)
    }

    /// Sleeps for the backoff, keeping the tree's clock and spinner going.
    async fn sleep(&mut self, delay: Duration) {
        let deadline = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < deadline {
            let step = (deadline - tokio::time::Instant::now()).min(FRAME);
            tokio::time::sleep(step).await;
            self.printer.tick(&self.view);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmesh_proto::v1::{
        LogLine, RunState, RunStateChanged, StepLog, StepProgress, StepStateChanged,
    };
    use prost_types::Timestamp;

    fn at(millis: i64) -> Option<Timestamp> {
        // 2023-11-14T12:00:00Z plus `millis`.
        let base = 1_699_963_200_000_i64 + millis;
        Some(Timestamp {
            seconds: base / 1000,
            nanos: ((base % 1000) * 1_000_000) as i32,
        })
    }

    fn event(seq: u64, millis: i64, event: run_event::Event) -> RunEvent {
        RunEvent {
            run_id: "r1".into(),
            seq,
            at: at(millis),
            event: Some(event),
        }
    }

    fn step_state(step: &str, state: StepState, attempt: u32, worker: &str) -> run_event::Event {
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

    fn progress(step: &str, attempt: u32, fraction: f32, message: &str) -> run_event::Event {
        run_event::Event::StepProgress(StepProgress {
            step_id: step.into(),
            attempt,
            fraction,
            message: message.into(),
            metrics: HashMap::new(),
        })
    }

    fn steps(ids: &[&str]) -> Vec<Step> {
        ids.iter()
            .map(|id| Step {
                step_id: (*id).into(),
                state: StepState::Pending as i32,
                ..Step::default()
            })
            .collect()
    }

    fn needs(pairs: &[(&str, &[&str])]) -> HashMap<String, Vec<String>> {
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

    #[test]
    fn summary_names_state_and_duration() {
        let run = Run {
            run_id: "r1".into(),
            state: RunState::Succeeded as i32,
            created_at: at(0),
            finished_at: at(1230),
            ..Run::default()
        };
        assert_eq!(summary(&run), "run r1 SUCCEEDED in 1.23s");
        let failed = Run {
            state: RunState::Failed as i32,
            error: "step mesh failed".into(),
            ..run
        };
        assert_eq!(summary(&failed), "run r1 FAILED in 1.23s: step mesh failed");
    }

    #[test]
    fn tree_draws_every_step_after_all_its_needs() {
        // room-scan: fetch fans out to four feature shards and thumbnails; mesh needs the
        // shards; notify needs mesh and thumbnails; a lone root is listed in run order.
        let steps = steps(&[
            "lone", "fetch", "f0", "f1", "f2", "mesh", "thumbs", "notify",
        ]);
        let needs = needs(&[
            ("fetch", &[]),
            ("f0", &["fetch"]),
            ("f1", &["fetch"]),
            ("f2", &["fetch"]),
            ("mesh", &["f0", "f1", "f2"]),
            ("thumbs", &["fetch"]),
            ("notify", &["mesh", "thumbs"]),
            ("lone", &[]),
        ]);
        let rows = tree_rows(&steps, &needs);
        let drawn: Vec<String> = rows
            .iter()
            .map(|r| format!("{}{}", r.prefix, steps[r.step].step_id))
            .collect();
        assert_eq!(
            drawn,
            [
                "lone",
                "fetch",
                "├─ f0",
                "├─ f1",
                "├─ f2",
                "│  └─ mesh",
                "└─ thumbs",
                "   └─ notify",
            ]
        );
        let also = |id: &str| {
            rows.iter()
                .find(|r| steps[r.step].step_id == id)
                .unwrap()
                .also_needs
                .clone()
        };
        assert_eq!(also("mesh"), ["f0", "f1"]);
        assert_eq!(also("notify"), ["mesh"]);
        assert!(also("f1").is_empty());
    }

    #[test]
    fn deep_chains_are_shortened_on_the_left() {
        let ids: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
        let steps = steps(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        let needs: HashMap<String, Vec<String>> = (1..12)
            .map(|i| (format!("s{i}"), vec![format!("s{}", i - 1)]))
            .collect();
        let rows = tree_rows(&steps, &needs);
        assert_eq!(rows.len(), 12);
        assert_eq!(rows[1].prefix, "└─ ");
        assert_eq!(rows[2].prefix, "   └─ ");
        let last = &rows[11].prefix;
        assert!(last.starts_with('…') && last.ends_with("└─ "), "{last:?}");
        assert_eq!(last.chars().count(), MAX_TREE_DEPTH * 3);
    }

    #[test]
    fn tree_without_needs_is_the_run_order() {
        let steps = steps(&["b", "a"]);
        let rows = tree_rows(&steps, &HashMap::new());
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [0, 1]);
        assert!(rows.iter().all(|r| r.prefix.is_empty()));
    }

    #[test]
    fn tree_lines_show_state_attempt_progress_worker_and_errors() {
        let mut view = RunView::new("r1");
        view.snapshot(Run {
            run_id: "r1".into(),
            workflow: "room-scan".into(),
            workflow_version: 2,
            state: RunState::Running as i32,
            steps: steps(&["fetch", "mesh", "thumbs"]),
            created_at: at(0),
            ..Run::default()
        });
        view.needs = needs(&[("mesh", &["fetch"]), ("thumbs", &["fetch"])]);
        for e in [
            event(1, 0, step_state("fetch", StepState::Running, 1, "cpu-1")),
            event(2, 1000, step_state("fetch", StepState::Succeeded, 1, "")),
            event(3, 1000, step_state("mesh", StepState::Running, 2, "gpu-1")),
            event(4, 1500, progress("mesh", 2, 0.4, "meshing")),
            event(
                5,
                2000,
                run_event::Event::StepState(StepStateChanged {
                    step_id: "thumbs".into(),
                    state: StepState::Failed as i32,
                    attempt: 1,
                    worker: "cpu-2".into(),
                    error: "boom".into(),
                    item_count: 0,
                    cached_from: String::new(),
                }),
            ),
        ] {
            assert!(view.apply(&e));
        }
        // Replayed after a reconnect: ignored.
        assert!(!view.apply(&event(4, 1500, progress("mesh", 2, 0.9, "late"))));

        let rows = tree_rows(&view.run.steps, &view.needs);
        let now = format::to_system_time(&at(3000).unwrap()).unwrap();
        let lines = tree_lines(&view, &rows, now, 0, Paint::PLAIN);
        assert_eq!(
            lines,
            [
                "Run r1  room-scan@2  RUNNING  3.00s  1/3 steps",
                "✔ fetch         1.00s                         cpu-1",
                "├─ ⠋ mesh #2    2.00s  ███████░░░░░░░░░  40%  gpu-1  meshing",
                "└─ ✖ thumbs         -                         cpu-2  boom",
            ]
        );
    }

    #[test]
    fn a_step_no_worker_can_take_says_why_in_the_tree() {
        let mut view = RunView::new("r1");
        view.snapshot(Run {
            run_id: "r1".into(),
            workflow: "w".into(),
            workflow_version: 1,
            state: RunState::Running as i32,
            steps: steps(&["build"]),
            created_at: at(0),
            ..Run::default()
        });
        let reason = "waiting: no connected worker offers mesh.build@^1.2 with gpu=true";
        assert!(view.apply(&event(
            1,
            0,
            run_event::Event::StepState(StepStateChanged {
                step_id: "build".into(),
                state: StepState::Ready as i32,
                attempt: 1,
                worker: String::new(),
                error: reason.into(),
                item_count: 0,
                cached_from: String::new(),
            }),
        )));
        let rows = tree_rows(&view.run.steps, &view.needs);
        let now = format::to_system_time(&at(1000).unwrap()).unwrap();
        let lines = tree_lines(&view, &rows, now, 0, Paint::PLAIN);
        assert!(lines[1].ends_with(reason), "{lines:?}");
        // Once a worker takes it, the reason goes away.
        assert!(view.apply(&event(
            2,
            500,
            step_state("build", StepState::Running, 1, "gpu-1")
        )));
        let lines = tree_lines(&view, &rows, now, 0, Paint::PLAIN);
        assert!(!lines[1].contains("waiting"), "{lines:?}");
    }

    #[test]
    fn a_map_is_one_line_with_counts_and_its_items_can_be_listed() {
        let mut view = RunView::new("r1");
        let mut steps = steps(&["fetch", "extract", "merge"]);
        steps[1].state = StepState::Running as i32;
        steps[1].item_count = 4;
        view.snapshot(Run {
            run_id: "r1".into(),
            state: RunState::Running as i32,
            steps,
            last_seq: 3,
            ..Run::default()
        });
        view.needs = needs(&[("extract", &["fetch"]), ("merge", &["extract"])]);
        // Items are first heard of by their events (the snapshot came before the expansion).
        let events = [
            step_state("extract[0]", StepState::Succeeded, 1, "w1"),
            step_state("extract[1]", StepState::Succeeded, 1, "w1"),
            step_state("extract[2]", StepState::Running, 1, "w2"),
            step_state("extract[3]", StepState::Failed, 1, "w2"),
        ];
        for (i, change) in events.into_iter().enumerate() {
            assert!(view.apply(&event(4 + i as u64, 1_000, change)));
        }
        let now = format::to_system_time(&at(2000).unwrap()).unwrap();
        let rows = tree_rows_with(&view.run.steps, &view.needs, false);
        let lines = tree_lines(&view, &rows, now, 0, Paint::PLAIN);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].ends_with("0/3 steps"), "{}", lines[0]);
        assert!(
            lines[2].contains("extract") && lines[2].contains("▸ 2/4 done · 1 running · 1 failed"),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].contains(" 75%"),
            "3 of 4 items ended: {}",
            lines[2]
        );

        let rows = tree_rows_with(&view.run.steps, &view.needs, true);
        let lines = tree_lines(&view, &rows, now, 0, Paint::PLAIN);
        assert_eq!(lines.len(), 8, "{lines:#?}");
        assert!(
            lines[3].contains("· ") && lines[3].contains("extract[0]"),
            "{}",
            lines[3]
        );
        assert!(lines[6].contains("extract[3]"), "{}", lines[6]);
        assert!(lines[7].contains("merge"), "{}", lines[7]);
    }

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
        assert!(view.is_final() && view.run.finished_at.is_some());
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
        assert!(!view.is_final());
        assert!(view.run.finished_at.is_none() && view.run.error.is_empty());
    }
}

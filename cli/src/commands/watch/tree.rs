//! The live tree's layout: steps ordered under the steps they need, and each drawn as a line
//! with its state, attempt, duration, progress bar, worker and note; a map step's items are
//! counted on its line (or listed under it).

use std::collections::HashMap;
use std::time::SystemTime;

use dagmesh_proto::v1::{Step, StepState};

use super::super::format::{self, Paint};
use super::view::{RunView, item_key};

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

#[cfg(test)]
mod tests {
    use dagmesh_proto::v1::{Run, RunState, StepStateChanged, run_event};

    use super::super::fixtures::{at, event, needs, progress, step_state, steps};
    use super::*;

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
}

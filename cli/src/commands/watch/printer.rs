//! Printing a followed run: the live tree on a terminal, plain lines in a pipe, JSON lines
//! with `-o json`, or nothing.

use std::time::{Duration, SystemTime};

use dagmesh_proto::v1::{Run, RunEvent, StepLog, WatchRunResponse, run_event, watch_run_response};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::super::format::{self, Paint};
use super::super::json;
use super::plain::PlainLines;
use super::tree::{TreeRow, tree_lines, tree_rows_with};
use super::view::RunView;
use super::{Mode, summary};

/// The live tree on the terminal: one indicatif line per row (`{wide_msg}` cuts lines to the
/// terminal's width), redrawn from [`tree_lines`].
pub(super) struct TreeScreen {
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

    /// A task's log lines, scrolling above the tree; debug lines are left out.
    fn log_lines(&self, log: &StepLog) {
        let step = self.paint.dim(&format!("[{}]", log.step_id));
        for line in log.lines.iter().filter(|line| line.level != "debug") {
            let level = match line.level.as_str() {
                "error" => self.paint.red("error"),
                "warn" => self.paint.yellow("warn"),
                "" => self.paint.dim("info"),
                other => self.paint.dim(other),
            };
            for text in line.text.lines() {
                // Fails only when the terminal went away; the tree is all that is lost.
                let _ = self.multi.println(format!("{step} {level} {text}"));
            }
        }
    }

    fn finish(&mut self, view: &RunView) {
        self.status = None;
        self.draw(view);
        for bar in &self.bars {
            bar.finish();
        }
    }
}

/// How the watch shows the run, one per [`Mode`].
pub(super) enum Printer {
    Tree(Box<TreeScreen>),
    Lines(PlainLines),
    Json,
    Quiet,
}

impl Printer {
    pub(super) fn new(mode: Mode, expand_items: bool) -> Self {
        match mode {
            Mode::Tree => Printer::Tree(Box::new(TreeScreen::new(expand_items))),
            Mode::Lines => Printer::Lines(PlainLines::default()),
            Mode::Json => Printer::Json,
            Mode::Quiet => Printer::Quiet,
        }
    }

    /// The snapshot the follower starts from (again, if it reconnected before any event).
    pub(super) fn snapshot(&mut self, view: &RunView, run: Run) {
        match self {
            Printer::Json => json_line(watch_run_response::Message::Snapshot(run)),
            Printer::Lines(lines) => {
                for line in lines.snapshot(&run, SystemTime::now()) {
                    outln!("{line}");
                }
            }
            Printer::Tree(screen) => {
                screen.status = None;
                screen.draw(view);
            }
            Printer::Quiet => {}
        }
    }

    /// An event, already applied to `view`.
    pub(super) fn event(&mut self, view: &RunView, event: RunEvent) {
        match self {
            Printer::Json => json_line(watch_run_response::Message::Event(event)),
            Printer::Lines(lines) => {
                for line in lines.event(&event, SystemTime::now()) {
                    outln!("{line}");
                }
            }
            Printer::Tree(screen) => {
                screen.status = None;
                if let Some(run_event::Event::StepLog(log)) = &event.event {
                    screen.log_lines(log);
                }
                screen.draw(view);
            }
            Printer::Quiet => {}
        }
    }

    pub(super) fn tick(&mut self, view: &RunView) {
        if let Printer::Tree(screen) = self {
            screen.tick(view);
        }
    }

    pub(super) fn reconnecting(&mut self, view: &RunView, error: &str, delay: Duration) {
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

    pub(super) fn finish(&mut self, view: &RunView, run: &Run) {
        match self {
            Printer::Tree(screen) => {
                screen.finish(view);
                outln!("{}", summary(run));
            }
            Printer::Lines(_) => outln!("{}", summary(run)),
            Printer::Json | Printer::Quiet => {}
        }
    }

    pub(super) fn abandon(&mut self, view: &RunView) {
        if let Printer::Tree(screen) = self {
            screen.finish(view);
        }
    }
}

/// One WatchRunResponse as one JSON line, as the server sent it.
fn json_line(message: watch_run_response::Message) {
    let response = WatchRunResponse {
        message: Some(message),
    };
    outln!(
        "{}",
        serde_json::to_string(&json::watch_response(&response))
            .expect("a serde_json::Value always serializes")
    );
}

//! Following a run live: `submit --watch`, `runs watch`, `submit --wait` and `dagmesh demo`.
//!
//! The SDK's [`RunFollower`](dagmesh_sdk::RunFollower) does the network's part: the snapshot,
//! resuming with `after_seq` after a broken stream so that no event is lost or shown twice,
//! giving up after [`GIVE_UP_AFTER`](dagmesh_sdk::follow::GIVE_UP_AFTER) of failed reconnects,
//! and the run's end. What is here only shows what it yields:
//!
//! - `view`: the event reducer, the run as the snapshot plus every event since;
//! - `tree`: stdout is a terminal: the steps as a tree, each under the step that completes its
//!   needs, with its state, attempt, duration, a progress bar, the worker and the progress
//!   message or error;
//! - `plain`: stdout is not a terminal (CI, pipes): one plain line per event;
//! - `printer`: the tree redrawn in place (at most 10 times a second) with task log lines
//!   scrolling above it, the plain lines, or with `-o json` every WatchRunResponse as one JSON
//!   line.
//!
//! Ctrl-C stops the watch here, not in the follower: the run goes on.

mod plain;
mod printer;
mod tree;
mod view;

#[cfg(test)]
mod fixtures;

use std::io::IsTerminal as _;
use std::time::{Duration, SystemTime};

use dagmesh_proto::connect::AuthChannel;
use dagmesh_proto::v1::Run;
use dagmesh_sdk::{Client, ClientError, Followed};
use futures::StreamExt as _;

use super::format;
use super::{Interrupted, OutputFormat};
use printer::Printer;

pub(crate) use tree::map_counts;
pub(crate) use view::{RunView, item_key};

/// Redraw period of the live tree.
const FRAME: Duration = Duration::from_millis(100);

/// Follows a run from its snapshot until it ends, printing it as `output` and the terminal
/// allow, and returns the final run (from GetRun). Ctrl-C stops the watch with
/// [`Interrupted`]; the run goes on.
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

/// How the run is shown: from `-o` and whether stdout is a terminal (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Tree,
    Lines,
    Json,
    Quiet,
}

/// Shows what the SDK's run follower yields, until the run ends or Ctrl-C.
struct Watcher {
    client: Client,
    run_id: String,
    mode: Mode,
    view: RunView,
    printer: Printer,
    spec_loaded: bool,
}

impl Watcher {
    fn new(channel: AuthChannel, run_id: &str, mode: Mode, expand_items: bool) -> Self {
        Watcher {
            client: Client::from_auth_channel(channel),
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
            Some(result) => result.map_err(|err| status(err).into()),
            None => {
                self.printer.abandon(&self.view);
                Err(Interrupted {
                    run_id: self.run_id.clone(),
                }
                .into())
            }
        }
    }

    async fn watch(&mut self, after_seq: Option<u64>) -> Result<Run, ClientError> {
        let mut follower = match after_seq {
            Some(after_seq) => {
                if self.mode == Mode::Tree {
                    // No snapshot comes when replaying: take the run's shape (workflow, steps)
                    // from GetRun; the replayed events then move it forward.
                    self.view.run = self.client.get_run(&self.run_id).await?;
                    self.view.last_seq = after_seq;
                    self.load_spec().await;
                }
                self.client.follow_run_after(&self.run_id, after_seq)
            }
            None => self.client.follow_run(&self.run_id),
        };
        // The first tick a frame from now: an immediate one would draw the run before its
        // snapshot came, as an empty header.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + FRAME, FRAME);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // Polling the follower is cancel-safe: a tick in the middle of a message, a GetRun
            // or a backoff loses nothing, and the tree's clock and spinner keep going meanwhile.
            let item = tokio::select! {
                item = follower.next() => item,
                _ = ticker.tick() => {
                    self.printer.tick(&self.view);
                    continue;
                }
            };
            match item {
                Some(Ok(Followed::Snapshot(run))) => {
                    self.view.snapshot(run.clone());
                    if self.mode == Mode::Tree {
                        self.load_spec().await;
                    }
                    self.printer.snapshot(&self.view, run);
                }
                Some(Ok(Followed::Event(event))) => {
                    if self.view.apply(&event) {
                        self.printer.event(&self.view, event);
                    }
                }
                Some(Ok(Followed::Reconnecting { error, retry_in })) => {
                    self.printer
                        .reconnecting(&self.view, &error.message(), retry_in);
                }
                Some(Ok(Followed::Ended { run, get_run_error })) => {
                    // Without GetRun's answer, the events this view applied say more than the
                    // follower's run-level fallback.
                    let run = match get_run_error {
                        None => run,
                        Some(_) => self.view.run.clone(),
                    };
                    self.view.snapshot(run.clone());
                    self.printer.finish(&self.view, &run);
                    return Ok(run);
                }
                Some(Err(err)) => return Err(err),
                // A follower ends with `Ended` or an error; this is only for completeness.
                None => {
                    return Err(ClientError::Status {
                        code: tonic::Code::Internal,
                        message: "the run follower stopped before the run ended".to_owned(),
                    });
                }
            }
        }
    }

    /// The workflow's `needs`, for the tree. Without them the steps are a flat list.
    async fn load_spec(&mut self) {
        if self.spec_loaded || self.view.run.workflow.is_empty() {
            return;
        }
        self.spec_loaded = true;
        let workflow = self
            .client
            .get_workflow(&self.view.run.workflow, self.view.run.workflow_version)
            .await;
        if let Ok(workflow) = workflow
            && let Some(spec) = workflow.spec
        {
            self.view.needs = spec
                .steps
                .into_iter()
                .map(|step| (step.id, step.needs))
                .collect();
        }
    }
}

/// The SDK's error as the `tonic::Status` the CLI reports (its wording and exit code).
fn status(err: ClientError) -> tonic::Status {
    tonic::Status::new(err.code(), err.message())
}

#[cfg(test)]
mod tests {
    use dagmesh_proto::v1::RunState;

    use super::fixtures::at;
    use super::*;

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
}

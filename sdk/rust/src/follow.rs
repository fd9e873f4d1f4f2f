//! Following a run to its end: a snapshot (or a replay), then every event exactly once, across
//! broken streams and server restarts.
//!
//! `WatchRun` streams a run until its final event, but a stream can break at any moment: the
//! executor restarts, the network drops, a proxy cuts an idle connection. A [`RunFollower`]
//! hides that. It resumes with `after_seq` = the last event it yielded, drops any event it has
//! already yielded, backs off between attempts, and ends with the run as `GetRun` returns it.
//! It prints nothing and handles no signals: `dagmesh runs watch` draws its tree from it, and
//! [`Client::wait_for_run`] is a loop over it.
//!
//! A follower is a [`Stream`] of [`Followed`] items. It ends after [`Followed::Ended`] or after
//! an error, which is final: a status that reconnecting cannot fix (`NotFound`,
//! `PermissionDenied`, ...), or [`GIVE_UP_AFTER`] of failed reconnects. Polling it is
//! cancel-safe, so it can sit in a `tokio::select!` next to a timer or Ctrl-C.
//!
//! ```no_run
//! use dagmesh_sdk::{Client, Followed};
//! use futures::StreamExt as _;
//!
//! # async fn example(client: Client) -> Result<(), dagmesh_sdk::ClientError> {
//! let mut follower = client.follow_run("run-1");
//! while let Some(item) = follower.next().await {
//!     match item? {
//!         Followed::Snapshot(run) => println!("{} steps so far", run.steps.len()),
//!         Followed::Event(event) => println!("event {}", event.seq),
//!         Followed::Reconnecting { error, retry_in } => {
//!             eprintln!("watch broke ({error}); retrying in {retry_in:?}")
//!         }
//!         Followed::Ended { run, .. } => println!("run ended {:?}", run.state()),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use dagmesh_proto::v1::{Run, RunEvent, WatchRunResponse, run_event, watch_run_response};
use futures::stream::{BoxStream, Stream, StreamExt as _};
use tokio::time::Instant;
use tonic::Code;

use crate::backoff::Backoff;
use crate::client::{Client, ClientError, is_terminal};

/// A follower whose reconnects have failed for this long stops with the last error.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// The first wait before a reconnect; it doubles with each failure in a row.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two reconnects.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a [`RunFollower`] yields.
#[derive(Debug)]
pub enum Followed {
    /// The run as it stands, steps included: the first item when following from a snapshot
    /// ([`Client::follow_run`]), and again if a follower that had not yet heard from the server
    /// reconnects. Never sent when replaying ([`Client::follow_run_after`]).
    Snapshot(Run),
    /// The next event of the run. Events come in `seq` order and each one once, whatever the
    /// server resends after a reconnect.
    Event(RunEvent),
    /// The watch broke; the follower will resume after the last event it yielded in `retry_in`
    /// (it waits when next polled). Worth telling a user; nothing to do for a program.
    Reconnecting {
        error: ClientError,
        retry_in: Duration,
    },
    /// The run ended (succeeded, failed or cancelled). The last item.
    Ended {
        /// The run from `GetRun`, with all its steps. If `GetRun` failed after the run's final
        /// event, the last the follower knew instead: the snapshot's run-level fields (only the
        /// run id when replaying) with the run state changes since applied, and no steps.
        run: Run,
        /// Why `GetRun` failed, when `run` is only what the follower knew.
        get_run_error: Option<ClientError>,
    },
}

/// Follows one run; made by [`Client::follow_run`] or [`Client::follow_run_after`]. See the
/// [module docs](self).
#[must_use = "a follower does nothing until it is polled"]
pub struct RunFollower {
    /// The follower until its first poll, while its settings can still change.
    unstarted: Option<Box<Follow>>,
    stream: Option<BoxStream<'static, Result<Followed, ClientError>>>,
}

impl RunFollower {
    pub(crate) fn new(client: Client, run_id: String, after_seq: Option<u64>) -> Self {
        let known = Run {
            run_id: run_id.clone(),
            ..Run::default()
        };
        let follow = Follow {
            client,
            run_id,
            last_seq: after_seq.unwrap_or_default(),
            replay: after_seq.is_some(),
            stream: None,
            known,
            backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
            give_up_after: GIVE_UP_AFTER,
            broken_since: None,
            retry_at: None,
            ended: false,
        };
        RunFollower {
            unstarted: Some(Box::new(follow)),
            stream: None,
        }
    }

    /// Waits between reconnects: from `first`, doubling up to `max`, each drawn at random from
    /// its upper half ([`FIRST_BACKOFF`] and [`MAX_BACKOFF`] unless set). No effect once the
    /// follower has been polled.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        if let Some(follow) = &mut self.unstarted {
            follow.backoff = Backoff::new(first, max);
        }
        self
    }

    /// Stops with the last error once reconnects have failed for `limit` without a message from
    /// the server ([`GIVE_UP_AFTER`] unless set). No effect once the follower has been polled.
    pub fn give_up_after(mut self, limit: Duration) -> Self {
        if let Some(follow) = &mut self.unstarted {
            follow.give_up_after = limit;
        }
        self
    }
}

impl std::fmt::Debug for RunFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunFollower")
            .field("started", &self.stream.is_some())
            .finish_non_exhaustive()
    }
}

impl Stream for RunFollower {
    type Item = Result<Followed, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(follow) = this.unstarted.take() {
            // The item in progress lives in the stream, not in the caller's future: dropping a
            // `next()` (a select! that took another branch) loses nothing.
            let items = futures::stream::unfold(follow, |mut follow| async move {
                let item = follow.next().await?;
                Some((item, follow))
            });
            this.stream = Some(items.fuse().boxed());
        }
        match &mut this.stream {
            Some(stream) => stream.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

/// The follower's state between two items.
struct Follow {
    client: Client,
    run_id: String,
    /// Events up to this seq have been yielded, or are part of the snapshot.
    last_seq: u64,
    /// Whether the next WatchRun replays the events after `last_seq` rather than asking for a
    /// snapshot: from the first message on, or from the start when the caller chose a seq.
    replay: bool,
    stream: Option<BoxStream<'static, Result<WatchRunResponse, ClientError>>>,
    /// What [`Followed::Ended`] falls back on when GetRun fails.
    known: Run,
    backoff: Backoff,
    give_up_after: Duration,
    /// When the watch broke, if the server has sent nothing since.
    broken_since: Option<Instant>,
    /// The reconnect announced by the last `Reconnecting`, not waited for yet.
    retry_at: Option<Instant>,
    ended: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Result<Followed, ClientError>> {
        if self.ended {
            return None;
        }
        if let Some(at) = self.retry_at.take() {
            tokio::time::sleep_until(at).await;
        }
        loop {
            let stream = self.stream.get_or_insert_with(|| {
                let after_seq = self.replay.then_some(self.last_seq);
                self.client
                    .watch_run_from(self.run_id.clone(), after_seq)
                    .boxed()
            });
            let broken = match stream.next().await {
                Some(Ok(response)) => {
                    self.broken_since = None;
                    self.backoff.reset();
                    match self.accept(response) {
                        Some(item) => return Some(Ok(item)),
                        None => continue,
                    }
                }
                Some(Err(error)) => error,
                None => match self.closed().await {
                    Ok(ended) => {
                        self.ended = true;
                        return Some(Ok(ended));
                    }
                    Err(error) => error,
                },
            };
            self.stream = None;
            let broken_since = *self.broken_since.get_or_insert_with(Instant::now);
            if !retryable(broken.code()) || broken_since.elapsed() >= self.give_up_after {
                self.ended = true;
                return Some(Err(broken));
            }
            let retry_in = self.backoff.next_delay();
            tracing::debug!(
                run_id = %self.run_id,
                after_seq = self.last_seq,
                ?retry_in,
                error = %broken,
                "run watch broke; resuming",
            );
            self.retry_at = Some(Instant::now() + retry_in);
            return Some(Ok(Followed::Reconnecting {
                error: broken,
                retry_in,
            }));
        }
    }

    /// The item for one message; `None` for an event already yielded (or an empty message).
    fn accept(&mut self, response: WatchRunResponse) -> Option<Followed> {
        match response.message? {
            watch_run_response::Message::Snapshot(mut run) => {
                self.last_seq = run.last_seq;
                self.replay = true;
                // Keep the run-level fields only: a map's thousands of steps are the caller's.
                let steps = std::mem::take(&mut run.steps);
                self.known = run.clone();
                run.steps = steps;
                Some(Followed::Snapshot(run))
            }
            watch_run_response::Message::Event(event) => {
                if event.seq != 0 && event.seq <= self.last_seq {
                    return None;
                }
                self.last_seq = self.last_seq.max(event.seq);
                self.replay = true;
                self.known.last_seq = self.last_seq;
                if let Some(run_event::Event::RunState(change)) = &event.event {
                    self.known.state = change.state;
                    self.known.suspended = change.suspended;
                    self.known.error = change.error.clone();
                    // A RunStateChanged that is not final is a retried run coming back.
                    self.known.finished_at = if is_terminal(change.state()) {
                        event.at
                    } else {
                        None
                    };
                }
                Some(Followed::Event(event))
            }
        }
    }

    /// The stream closed without an error: after the run's final event, or before it (the
    /// server is going away, or a replay started past the end). GetRun tells which.
    async fn closed(&mut self) -> Result<Followed, ClientError> {
        self.stream = None;
        let fetched = self.client.get_run(self.run_id.clone()).await;
        if is_terminal(self.known.state()) {
            // The events already told how it ended; GetRun only adds the steps.
            return Ok(match fetched {
                Ok(run) => Followed::Ended {
                    run,
                    get_run_error: None,
                },
                Err(error) => Followed::Ended {
                    run: self.known.clone(),
                    get_run_error: Some(error),
                },
            });
        }
        let run = fetched?;
        if is_terminal(run.state()) {
            return Ok(Followed::Ended {
                run,
                get_run_error: None,
            });
        }
        Err(ClientError::Status {
            code: Code::Unavailable,
            message: "stream closed before the run ended".to_owned(),
        })
    }
}

/// Codes worth a reconnect: the server or the network went away, or the stream was cut.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

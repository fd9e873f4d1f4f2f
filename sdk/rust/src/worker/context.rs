//! The handle a task handler gets: who it is, progress, logs and cancellation.
//!
//! Progress and logs never block the handler and never fail it. They land in per-task buffers
//! that the task's pump (see `driver::pump`) forwards to the stream: progress keeps only the
//! latest value while the stream is busy, logs are batched and flushed every
//! [`LOG_FLUSH_INTERVAL`] and before the result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use dagmesh_proto::v1::{Assign, LogLine, TaskProgress};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(crate) const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Lines held per task between flushes; beyond it lines are counted and dropped, so a handler
/// that logs in a tight loop cannot exhaust memory while the stream is down.
const LOG_BUFFER_LINES: usize = 1000;
/// A batch this large is flushed at once instead of waiting for the next tick.
const LOG_EARLY_FLUSH_LINES: usize = 200;

/// Severity of a task log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The wire name (`LogLine.level`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// What the running attempt knows about itself, plus progress, logs and cancellation.
/// Cheap to clone; hand it to sub-tasks freely.
#[derive(Clone)]
pub struct TaskContext {
    inner: Arc<Inner>,
}

struct Inner {
    task_id: String,
    attempt: u32,
    run_id: String,
    step_id: String,
    task_type: String,
    task_version: String,
    traceparent: String,
    deadline: Option<SystemTime>,
    cancel: CancellationToken,
    outbox: Mutex<Outbox>,
    /// Wakes the pump when there is something to send before the next tick.
    wake: Notify,
}

#[derive(Default)]
struct Outbox {
    progress: Option<TaskProgress>,
    logs: Vec<LogLine>,
    dropped_logs: u64,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("task_id", &self.inner.task_id)
            .field("attempt", &self.inner.attempt)
            .field("run_id", &self.inner.run_id)
            .field("step_id", &self.inner.step_id)
            .field("task_type", &self.inner.task_type)
            .finish_non_exhaustive()
    }
}

impl TaskContext {
    pub(crate) fn from_assign(assign: &Assign, cancel: CancellationToken) -> Self {
        let task_type = assign.task_type.clone().unwrap_or_default();
        Self::build(Inner {
            task_id: assign.task_id.clone(),
            attempt: assign.attempt,
            run_id: assign.run_id.clone(),
            step_id: assign.step_id.clone(),
            task_type: task_type.name,
            task_version: task_type.version,
            traceparent: assign.traceparent.clone(),
            deadline: assign.deadline.and_then(|ts| SystemTime::try_from(ts).ok()),
            cancel,
            outbox: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// A context attached to no stream, for unit-testing handlers: progress and logs go
    /// nowhere (logs still reach `tracing`), and [`TaskContext::cancellation_token`] is the
    /// way to simulate a cancel.
    pub fn detached(task_id: impl Into<String>, attempt: u32) -> Self {
        Self::build(Inner {
            task_id: task_id.into(),
            attempt,
            run_id: String::new(),
            step_id: String::new(),
            task_type: String::new(),
            task_version: String::new(),
            traceparent: String::new(),
            deadline: None,
            cancel: CancellationToken::new(),
            outbox: Mutex::default(),
            wake: Notify::new(),
        })
    }

    fn build(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Stable id of the step's task across attempts (`<run_id>/<step_id>`).
    pub fn task_id(&self) -> &str {
        &self.inner.task_id
    }

    /// 1 for the first attempt, 2 for the first retry...
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    pub fn step_id(&self) -> &str {
        &self.inner.step_id
    }

    /// The task type being run, e.g. `mesh.build`.
    pub fn task_type(&self) -> &str {
        &self.inner.task_type
    }

    /// The version of the task type the executor chose, one this worker registered.
    pub fn task_version(&self) -> &str {
        &self.inner.task_version
    }

    /// W3C trace context of the attempt's span, to continue the run's trace; `None` when the
    /// executor has tracing off.
    pub fn traceparent(&self) -> Option<&str> {
        Some(self.inner.traceparent.as_str()).filter(|t| !t.is_empty())
    }

    /// When the executor times the attempt out (and sends Cancel); `None` without a timeout.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.inner.deadline
    }

    /// Whether the executor cancelled this attempt (run cancelled, deadline passed, or the
    /// task moved elsewhere). Its result will be discarded; stop as soon as convenient.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves when the attempt is cancelled; made for `tokio::select!`.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// The attempt's cancellation token, for code that takes one.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Reports progress, `fraction` in 0..1 (clamped). Never blocks: while the stream is busy
    /// only the latest report is kept.
    pub fn progress(&self, fraction: f32, message: impl Into<String>) {
        self.progress_with_metrics(fraction, message, std::iter::empty::<(String, f64)>());
    }

    /// [`TaskContext::progress`] with numeric metrics, e.g. `[("triangles", 120_000.0)]`.
    pub fn progress_with_metrics<K: Into<String>>(
        &self,
        fraction: f32,
        message: impl Into<String>,
        metrics: impl IntoIterator<Item = (K, f64)>,
    ) {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let progress = TaskProgress {
            task_id: self.inner.task_id.clone(),
            attempt: self.inner.attempt,
            fraction,
            message: message.into(),
            metrics: metrics
                .into_iter()
                .map(|(k, v)| (k.into(), v))
                .collect::<HashMap<_, _>>(),
        };
        self.outbox().progress = Some(progress);
        self.inner.wake.notify_one();
    }

    /// Appends a line to the step's log (batched, see the module doc) and emits it as a
    /// `tracing` event in the task's span.
    pub fn log(&self, level: LogLevel, text: impl Into<String>) {
        let text = text.into();
        match level {
            LogLevel::Debug => tracing::debug!(target: "dagmesh_sdk::task", "{text}"),
            LogLevel::Info => tracing::info!(target: "dagmesh_sdk::task", "{text}"),
            LogLevel::Warn => tracing::warn!(target: "dagmesh_sdk::task", "{text}"),
            LogLevel::Error => tracing::error!(target: "dagmesh_sdk::task", "{text}"),
        }
        let line = LogLine {
            at: Some(SystemTime::now().into()),
            level: level.as_str().to_owned(),
            text,
        };
        let flush_now = {
            let mut outbox = self.outbox();
            if outbox.logs.len() >= LOG_BUFFER_LINES {
                outbox.dropped_logs += 1;
                false
            } else {
                outbox.logs.push(line);
                outbox.logs.len() >= LOG_EARLY_FLUSH_LINES
            }
        };
        if flush_now {
            self.inner.wake.notify_one();
        }
    }

    pub fn debug(&self, text: impl Into<String>) {
        self.log(LogLevel::Debug, text)
    }

    pub fn info(&self, text: impl Into<String>) {
        self.log(LogLevel::Info, text)
    }

    pub fn warn(&self, text: impl Into<String>) {
        self.log(LogLevel::Warn, text)
    }

    pub fn error(&self, text: impl Into<String>) {
        self.log(LogLevel::Error, text)
    }

    /// A handler that panicked while holding the lock must not take progress reporting down
    /// with it: the buffers hold plain data, valid after any panic.
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.inner
            .outbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn take_progress(&self) -> Option<TaskProgress> {
        self.outbox().progress.take()
    }

    /// Buffered log lines and how many were dropped since the last call.
    pub(crate) fn take_logs(&self) -> (Vec<LogLine>, u64) {
        let mut outbox = self.outbox();
        (
            std::mem::take(&mut outbox.logs),
            std::mem::take(&mut outbox.dropped_logs),
        )
    }

    pub(crate) async fn woken(&self) {
        self.inner.wake.notified().await
    }

    pub(crate) fn cancel(&self) {
        self.inner.cancel.cancel()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_keeps_only_the_latest_report_and_clamps() {
        let ctx = TaskContext::detached("run/step", 1);
        ctx.progress(0.2, "first");
        ctx.progress_with_metrics(1.7, "second", [("triangles", 3.0)]);
        let progress = ctx.take_progress().expect("latest progress is kept");
        assert_eq!(progress.message, "second");
        assert_eq!(progress.fraction, 1.0);
        assert_eq!(progress.metrics["triangles"], 3.0);
        assert!(ctx.take_progress().is_none(), "taken once");
    }

    #[test]
    fn logs_are_capped_and_counted() {
        let ctx = TaskContext::detached("run/step", 1);
        for i in 0..LOG_BUFFER_LINES + 5 {
            ctx.info(format!("line {i}"));
        }
        let (logs, dropped) = ctx.take_logs();
        assert_eq!(logs.len(), LOG_BUFFER_LINES);
        assert_eq!(dropped, 5);
        assert_eq!(logs[0].level, "info");
        assert_eq!(ctx.take_logs().0.len(), 0, "taken once");
    }
}

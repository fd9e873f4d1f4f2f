//! What a task handler returns, and the type erasure that lets one worker hold handlers of
//! different input and output types.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::context::TaskContext;

/// Why a task attempt failed. The executor retries it (within the step's retry policy) only when
/// `retryable` is true: set it to false for failures a retry cannot fix, such as bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    /// Shown as the step's error in `dagmesh runs get` and in run events.
    pub message: String,
    /// Whether another attempt could succeed.
    pub retryable: bool,
}

impl TaskError {
    /// A failure that another attempt may not repeat (a timeout, a busy resource).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that every attempt would repeat (invalid input, a missing file).
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// Errors that reach a handler through `?` are presumed transient; return
/// [`TaskError::fatal`] to say otherwise.
impl From<anyhow::Error> for TaskError {
    fn from(err: anyhow::Error) -> Self {
        // `{:#}` keeps the context chain ("open mesh: no such file") on one line.
        Self::retryable(format!("{err:#}"))
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A handler with its input and output types erased to JSON.
pub(crate) type ErasedHandler =
    Arc<dyn Fn(TaskContext, Value) -> BoxFuture<Result<Value, TaskError>> + Send + Sync>;

pub(crate) fn erase<I, O, E, F, Fut>(task_type: String, handler: F) -> ErasedHandler
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    E: Into<TaskError> + Send + 'static,
    F: Fn(TaskContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
{
    let task_type: Arc<str> = task_type.into();
    Arc::new(move |ctx, input| {
        // Bad input fails the attempt for good: every retry would see the same JSON.
        let input = match serde_json::from_value::<I>(input) {
            Ok(input) => input,
            Err(err) => {
                let error = TaskError::fatal(format!("invalid input for {task_type:?}: {err}"));
                return Box::pin(std::future::ready(Err(error)));
            }
        };
        let task_type = task_type.clone();
        let fut = handler(ctx, input);
        Box::pin(async move {
            let output = fut.await.map_err(Into::into)?;
            serde_json::to_value(output).map_err(|err| {
                TaskError::fatal(format!("cannot serialize output of {task_type:?}: {err}"))
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anyhow_errors_are_retryable_and_keep_their_context() {
        let err = anyhow::anyhow!("no such file").context("open mesh");
        let task_err = TaskError::from(err);
        assert!(task_err.retryable);
        assert_eq!(task_err.message, "open mesh: no such file");
        assert!(!TaskError::fatal("bad").retryable);
        assert_eq!(TaskError::retryable("busy").to_string(), "busy");
    }
}

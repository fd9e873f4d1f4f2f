//! A client for backends: register workflows, start runs, follow them to the end.
//!
//! A thin, typed layer over `RunService` (through [`GrpcExecutor`], the executor's API as a Rust
//! trait) and `WorkflowService`. Every error carries the gRPC status code, so callers can tell "no such run" (`NotFound`) from "try again"
//! (`Unavailable`).

use std::collections::HashMap;
use std::time::Duration;

use dagmesh_api::{ApiError, Caller, ExecutorApi, GrpcExecutor};
use dagmesh_proto::connect::{AuthChannel, ClientSettings, Credentials, error_chain};
use dagmesh_proto::json::map_to_struct;
use dagmesh_proto::v1::{
    ApplyWorkflowRequest, CancelRunRequest, GetWorkflowRequest, ListRunsRequest, ListRunsResponse,
    RetryRunRequest, Run, RunState, SubmitRunRequest, WatchRunRequest, WatchRunResponse, Workflow,
    WorkflowRef, WorkflowSpec, submit_run_request,
};
use futures::{Stream, StreamExt, TryStreamExt};
use serde::Serialize;
use tonic::Code;
use tonic::transport::Channel;

use crate::follow::{Followed, RunFollower};

/// A failed call. [`ClientError::code`] is the gRPC status code for every variant.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server url {url:?}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {url}: {}", error_chain(source))]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with a non-OK status.
    #[error("{code:?}: {message}")]
    Status { code: Code, message: String },
    /// Run inputs that are not a JSON object, or that do not serialize.
    #[error("invalid run inputs: {0}")]
    InvalidInputs(String),
    /// The server's answer lacked a field the API promises.
    #[error("server response has no {0}")]
    MissingField(&'static str),
    /// A TLS or token setting that cannot be used (an unreadable file, TLS settings with an
    /// `http://` URL, a client certificate without its key).
    #[error("{0}")]
    Settings(String),
}

impl ClientError {
    pub fn code(&self) -> Code {
        match self {
            ClientError::Status { code, .. } => *code,
            ClientError::InvalidUrl { .. }
            | ClientError::InvalidInputs(_)
            | ClientError::Settings(_) => Code::InvalidArgument,
            ClientError::Connect { .. } => Code::Unavailable,
            ClientError::MissingField(_) => Code::Internal,
        }
    }

    /// The server's message, or this error's text.
    pub fn message(&self) -> String {
        match self {
            ClientError::Status { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

impl From<ApiError> for ClientError {
    fn from(error: ApiError) -> Self {
        tonic::Status::from(error).into()
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// What [`Client::submit`] starts: a workflow (by name, or inline), inputs, and options.
#[derive(Debug, Clone)]
#[must_use]
pub struct SubmitRun {
    workflow: submit_run_request::WorkflowRef,
    inputs: Result<serde_json::Map<String, serde_json::Value>, String>,
    idempotency_key: String,
    tags: HashMap<String, String>,
    priority: i32,
    memoize_from: String,
    notifications: Vec<dagmesh_proto::v1::Notification>,
}

impl SubmitRun {
    /// The latest version of the registered workflow `name`.
    pub fn workflow(name: impl Into<String>) -> Self {
        Self::new(submit_run_request::WorkflowRef::Workflow(WorkflowRef {
            name: name.into(),
            version: 0,
        }))
    }

    /// An inline definition; the server registers it (or matches an identical version) first.
    pub fn inline(spec: WorkflowSpec) -> Self {
        Self::new(submit_run_request::WorkflowRef::Spec(spec))
    }

    fn new(workflow: submit_run_request::WorkflowRef) -> Self {
        Self {
            workflow,
            inputs: Ok(serde_json::Map::new()),
            idempotency_key: String::new(),
            tags: HashMap::new(),
            priority: 0,
            memoize_from: String::new(),
            notifications: Vec::new(),
        }
    }

    /// Pins a version of a named workflow (no effect on an inline spec).
    pub fn version(mut self, version: u32) -> Self {
        if let submit_run_request::WorkflowRef::Workflow(r) = &mut self.workflow {
            r.version = version;
        }
        self
    }

    /// The run's inputs; must serialize to a JSON object. A serialization error is reported
    /// by [`Client::submit`].
    pub fn inputs(mut self, inputs: impl Serialize) -> Self {
        self.inputs = match serde_json::to_value(inputs) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(other) => Err(format!("expected a JSON object, got {other}")),
            Err(err) => Err(err.to_string()),
        };
        self
    }

    /// A second submit with the same key returns the first run instead of starting another.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }

    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    /// Admission priority when the run queues behind a concurrency limit (higher first).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// A memoized resubmit of `run_id` (a run of the same workflow version): steps whose task
    /// and evaluated inputs equal a step that succeeded there reuse its outputs instead of
    /// running (`SubmitRunRequest.memoize_from`).
    pub fn memoized_from(mut self, run_id: impl Into<String>) -> Self {
        self.memoize_from = run_id.into();
        self
    }

    /// A webhook for this run only, on top of the workflow's: POST `events` (e.g.
    /// `["run.failed"]`) to `url` (`SubmitRunRequest.notifications`).
    pub fn notify(
        mut self,
        url: impl Into<String>,
        events: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.notifications.push(dagmesh_proto::v1::Notification {
            url: url.into(),
            events: events.into_iter().map(Into::into).collect(),
            filter: String::new(),
        });
        self
    }

    /// The request as sent, for callers that use the generated client directly.
    pub fn into_request(self) -> Result<SubmitRunRequest, ClientError> {
        let inputs = self.inputs.map_err(ClientError::InvalidInputs)?;
        Ok(SubmitRunRequest {
            workflow_ref: Some(self.workflow),
            inputs: Some(map_to_struct(&inputs)),
            idempotency_key: self.idempotency_key,
            tags: self.tags,
            priority: self.priority,
            memoize_from: self.memoize_from,
            notifications: self.notifications,
        })
    }
}

/// Terminal run states: the run will not change again (until a RetryRun).
pub fn is_terminal(state: RunState) -> bool {
    matches!(
        state,
        RunState::Succeeded | RunState::Failed | RunState::Cancelled
    )
}

/// Calls `RunService` and `WorkflowService` on one connection. Cheap to clone; clones share
/// the connection.
#[derive(Clone)]
pub struct Client {
    runs: GrpcExecutor,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url`, e.g. `http://127.0.0.1:7070` or `https://dagmesh:7070`, with the
    /// token and TLS settings of the environment (`DAGMESH_TOKEN`, `DAGMESH_TLS_CA`, ...);
    /// fails if the server is unreachable or the TLS handshake fails.
    pub async fn connect(url: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with(url, ClientSettings::from_env()).await
    }

    /// Like [`Client::connect`], with explicit settings (unset ones are *not* read from the
    /// environment; call [`ClientSettings::or_env`] for that).
    pub async fn connect_with(
        url: impl Into<String>,
        settings: ClientSettings,
    ) -> Result<Self, ClientError> {
        let url = url.into();
        let (endpoint, credentials) = prepare(&url, &settings)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { url, source })?;
        Ok(Self::from_auth_channel(credentials.wrap(channel)))
    }

    /// Like [`Client::connect`], but connects on the first call (and reconnects as needed).
    pub fn connect_lazy(url: impl Into<String>) -> Result<Self, ClientError> {
        let (endpoint, credentials) = prepare(&url.into(), &ClientSettings::from_env())?;
        Ok(Self::from_auth_channel(
            credentials.wrap(endpoint.connect_lazy()),
        ))
    }

    /// Uses a channel configured by the caller (interceptors, timeouts), without a token.
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_auth_channel(Credentials::none().wrap(channel))
    }

    /// Uses a channel that carries credentials
    /// ([`ClientSettings::connect`](dagmesh_proto::connect::ClientSettings::connect)).
    pub fn from_auth_channel(channel: AuthChannel) -> Self {
        Self {
            runs: GrpcExecutor::new(channel),
        }
    }

    /// The executor's run API behind this client, as the [`ExecutorApi`] trait: for code that
    /// also runs against an in-process executor.
    pub fn executor(&self) -> &GrpcExecutor {
        &self.runs
    }

    /// Registers a workflow definition; identical content returns the existing version.
    pub async fn apply_workflow(&self, spec: WorkflowSpec) -> Result<Workflow, ClientError> {
        let response = self
            .runs
            .apply_workflow(ApplyWorkflowRequest { spec: Some(spec) })
            .await?;
        response
            .workflow
            .ok_or(ClientError::MissingField("workflow"))
    }

    /// A workflow version; 0 means the latest.
    pub async fn get_workflow(
        &self,
        name: impl Into<String>,
        version: u32,
    ) -> Result<Workflow, ClientError> {
        let request = GetWorkflowRequest {
            name: name.into(),
            version,
        };
        Ok(self.runs.get_workflow(request).await?)
    }

    /// Starts a run (or, with a known idempotency key, returns the run it started before).
    pub async fn submit(&self, run: SubmitRun) -> Result<Run, ClientError> {
        // The server records the actor from the token.
        let response = self
            .runs
            .submit_run(&Caller::default(), run.into_request()?)
            .await?;
        response.run.ok_or(ClientError::MissingField("run"))
    }

    /// The run with all its steps; `NotFound` for an unknown id.
    pub async fn get_run(&self, run_id: impl Into<String>) -> Result<Run, ClientError> {
        Ok(self.runs.get_run(&run_id.into()).await?)
    }

    pub async fn list_runs(
        &self,
        request: ListRunsRequest,
    ) -> Result<ListRunsResponse, ClientError> {
        Ok(self.runs.list_runs(request).await?)
    }

    /// The raw `WatchRun` stream: a snapshot then live events (`after_seq` 0), or the events
    /// after `after_seq`. The stream ends after the run's final event, or when it breaks;
    /// [`Client::follow_run`] resumes it for you. The call is made when the stream is first
    /// polled; its failure is the first item.
    pub fn watch_run(
        &self,
        run_id: impl Into<String>,
        after_seq: u64,
    ) -> impl Stream<Item = Result<WatchRunResponse, ClientError>> + Send + 'static {
        self.watch_run_from(run_id.into(), (after_seq > 0).then_some(after_seq))
    }

    /// [`Client::watch_run`] with the request's own `after_seq`: `Some(0)` replays the whole
    /// log, which `watch_run`'s 0 cannot say.
    pub(crate) fn watch_run_from(
        &self,
        run_id: String,
        after_seq: Option<u64>,
    ) -> impl Stream<Item = Result<WatchRunResponse, ClientError>> + Send + 'static {
        let runs = self.runs.clone();
        let request = WatchRunRequest { run_id, after_seq };
        futures::stream::once(async move {
            let stream = runs.watch_run(request).await?;
            Ok::<_, ClientError>(stream.map_err(ClientError::from))
        })
        .try_flatten()
    }

    /// Follows a run from a snapshot to its end, resuming across broken streams: see
    /// [`RunFollower`].
    pub fn follow_run(&self, run_id: impl Into<String>) -> RunFollower {
        RunFollower::new(self.clone(), run_id.into(), None)
    }

    /// Like [`Client::follow_run`], but replays the run's events after `after_seq` (0: all of
    /// them) instead of starting from a snapshot.
    pub fn follow_run_after(&self, run_id: impl Into<String>, after_seq: u64) -> RunFollower {
        RunFollower::new(self.clone(), run_id.into(), Some(after_seq))
    }

    /// Cancels a run that has not ended; `FailedPrecondition` if it has.
    pub async fn cancel_run(
        &self,
        run_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Run, ClientError> {
        let request = CancelRunRequest {
            run_id: run_id.into(),
            reason: reason.into(),
        };
        Ok(self.runs.cancel_run(&Caller::default(), request).await?)
    }

    /// Approves a step that waits for an approval: it succeeds with `outputs` (an object; plus
    /// `approved_by`).
    pub async fn approve_step(
        &self,
        run_id: impl Into<String>,
        step_id: impl Into<String>,
        outputs: serde_json::Value,
        comment: impl Into<String>,
    ) -> Result<Run, ClientError> {
        let request = dagmesh_proto::v1::ApproveStepRequest {
            run_id: run_id.into(),
            step_id: step_id.into(),
            approve: true,
            outputs: Some(dagmesh_proto::json::to_struct(&outputs)),
            comment: comment.into(),
        };
        Ok(self.runs.approve_step(&Caller::default(), request).await?)
    }

    /// Denies a step that waits for an approval: it fails naming who and `reason`.
    pub async fn deny_step(
        &self,
        run_id: impl Into<String>,
        step_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Run, ClientError> {
        let request = dagmesh_proto::v1::ApproveStepRequest {
            run_id: run_id.into(),
            step_id: step_id.into(),
            approve: false,
            outputs: None,
            comment: reason.into(),
        };
        Ok(self.runs.approve_step(&Caller::default(), request).await?)
    }

    /// Holds a running run: nothing more of it goes to workers until [`Client::resume_run`].
    pub async fn suspend_run(
        &self,
        run_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Run, ClientError> {
        let request = dagmesh_proto::v1::SuspendRunRequest {
            run_id: run_id.into(),
            reason: reason.into(),
        };
        Ok(self.runs.suspend_run(&Caller::default(), request).await?)
    }

    /// Lets a suspended run go on.
    pub async fn resume_run(&self, run_id: impl Into<String>) -> Result<Run, ClientError> {
        let request = dagmesh_proto::v1::ResumeRunRequest {
            run_id: run_id.into(),
        };
        Ok(self.runs.resume_run(&Caller::default(), request).await?)
    }

    /// Re-runs the failed and cancelled steps of an ended run.
    pub async fn retry_run(&self, run_id: impl Into<String>) -> Result<Run, ClientError> {
        self.retry_run_from(run_id, "").await
    }

    /// Re-runs an ended run from `step`: that step and everything downstream of it run again,
    /// even what succeeded, as well as what failed (an empty `step`: like [`Client::retry_run`]).
    pub async fn retry_run_from(
        &self,
        run_id: impl Into<String>,
        step: impl Into<String>,
    ) -> Result<Run, ClientError> {
        let request = RetryRunRequest {
            run_id: run_id.into(),
            from_step: step.into(),
        };
        Ok(self.runs.retry_run(&Caller::default(), request).await?)
    }

    /// Waits until the run ends (succeeded, failed or cancelled) and returns it with all its
    /// steps. Watches rather than polls ([`Client::follow_run`]): a watch that breaks
    /// (`Unavailable`, or a stream that ends early) is resumed after the last event seen, with
    /// backoff; after [`GIVE_UP_AFTER`](crate::follow::GIVE_UP_AFTER) of failed reconnects it
    /// fails with the last error.
    pub async fn wait_for_run(&self, run_id: impl Into<String>) -> Result<Run, ClientError> {
        let mut follower = self.follow_run(run_id);
        while let Some(item) = follower.next().await {
            if let Followed::Ended { run, get_run_error } = item? {
                return match get_run_error {
                    // The run ended, but "with all its steps" needs GetRun's answer.
                    Some(error) => Err(error),
                    None => Ok(run),
                };
            }
        }
        Err(ClientError::Status {
            code: Code::Internal,
            message: "the run follower stopped before the run ended".to_owned(),
        })
    }
}

fn prepare(
    url: &str,
    settings: &ClientSettings,
) -> Result<(tonic::transport::Endpoint, Credentials), ClientError> {
    let settings_error =
        |error: dagmesh_proto::connect::ConnectError| ClientError::Settings(error.to_string());
    let endpoint = settings
        .endpoint(url)
        .map_err(settings_error)?
        .connect_timeout(Duration::from_secs(5));
    let credentials = settings.credentials().map_err(settings_error)?;
    Ok((endpoint, credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_builds_the_request() {
        let request = SubmitRun::workflow("room-scan")
            .version(3)
            .inputs(serde_json::json!({"room": "kitchen"}))
            .idempotency_key("upload-42")
            .tag("customer", "acme")
            .into_request()
            .unwrap();
        assert_eq!(
            request.workflow_ref,
            Some(submit_run_request::WorkflowRef::Workflow(WorkflowRef {
                name: "room-scan".into(),
                version: 3
            }))
        );
        assert_eq!(request.idempotency_key, "upload-42");
        assert_eq!(request.tags["customer"], "acme");
        assert!(request.inputs.unwrap().fields.contains_key("room"));
    }

    #[test]
    fn non_object_inputs_are_refused() {
        let err = SubmitRun::workflow("w")
            .inputs([1, 2])
            .into_request()
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("JSON object"), "{err}");
    }
}

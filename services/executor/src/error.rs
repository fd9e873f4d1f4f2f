use dagmesh_metastore::StoreError;

/// Errors of the executor's API; each maps to the gRPC code a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// The run belongs to partition `partition`, which another executor replica drives (or
    /// none right now): UNAVAILABLE, unless the call can go to that replica.
    #[error("{message}")]
    Elsewhere { partition: u32, message: String },
    /// The request conflicted with stored state and was not applied; it may be retried.
    #[error("{0}")]
    Aborted(String),
    /// Another executor took over the database (this one's lease epoch is stale).
    #[error("{0}")]
    Fenced(String),
    /// The caller may not do this (a worker resuming another principal's session).
    #[error("{0}")]
    PermissionDenied(String),
    /// A worker instance id that is connected already.
    #[error("{0}")]
    AlreadyExists(String),
    /// A worker broke a size limit of its stream.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ExecError> for tonic::Status {
    fn from(error: ExecError) -> Self {
        match error {
            ExecError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ExecError::NotFound(m) => tonic::Status::not_found(m),
            ExecError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ExecError::Unavailable(m) | ExecError::Elsewhere { message: m, .. } => {
                tonic::Status::unavailable(m)
            }
            ExecError::Aborted(m) => tonic::Status::aborted(m),
            ExecError::Fenced(m) => tonic::Status::unavailable(m),
            ExecError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            ExecError::AlreadyExists(m) => tonic::Status::already_exists(m),
            ExecError::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            ExecError::Store(e) => e.into(),
        }
    }
}

/// The engine task has stopped (shutdown or a failed commit); callers should retry elsewhere.
pub(crate) fn engine_gone() -> ExecError {
    ExecError::Unavailable("executor is shutting down".into())
}

impl From<ExecError> for dagmesh_api::ApiError {
    fn from(error: ExecError) -> Self {
        use dagmesh_api::ApiError;
        match error {
            ExecError::InvalidArgument(m) => ApiError::invalid_argument(m),
            ExecError::NotFound(m) => ApiError::not_found(m),
            ExecError::FailedPrecondition(m) => ApiError::failed_precondition(m),
            ExecError::Unavailable(m)
            | ExecError::Fenced(m)
            | ExecError::Elsewhere { message: m, .. } => ApiError::unavailable(m),
            ExecError::Aborted(m) => ApiError::aborted(m),
            ExecError::PermissionDenied(m) => ApiError::permission_denied(m),
            ExecError::AlreadyExists(m) => ApiError::already_exists(m),
            ExecError::ResourceExhausted(m) => ApiError::resource_exhausted(m),
            // The store's errors carry their own code (and a detail only the store reads).
            ExecError::Store(e) => ApiError::from(tonic::Status::from(e)),
        }
    }
}

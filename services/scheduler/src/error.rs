//! The scheduler's error type and its gRPC status codes.

use dagmesh_metastore::StoreError;

/// Why a scheduler operation failed; each variant is the gRPC code a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// The request is wrong; the message starts with the field path (`cron: ...`).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in a state that does not allow the operation (cancel an ended backfill).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The executor or the store cannot be reached; retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SchedError {
    /// Whether retrying the same operation later may succeed (the loop then keeps the tick).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SchedError::Unavailable(_) | SchedError::Store(StoreError::Unavailable(_))
        )
    }
}

impl From<SchedError> for tonic::Status {
    fn from(error: SchedError) -> Self {
        match error {
            SchedError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            SchedError::NotFound(m) => tonic::Status::not_found(m),
            SchedError::AlreadyExists(m) => tonic::Status::already_exists(m),
            SchedError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            SchedError::Unavailable(m) => tonic::Status::unavailable(m),
            SchedError::Internal(m) => tonic::Status::internal(m),
            SchedError::Store(e) => e.into(),
        }
    }
}

impl From<tonic::Status> for SchedError {
    /// As the executor API reads a status (a broken connection is `Unavailable`).
    fn from(status: tonic::Status) -> Self {
        dagmesh_api::ApiError::from(status).into()
    }
}

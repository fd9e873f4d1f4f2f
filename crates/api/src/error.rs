//! [`ApiError`]: what went wrong, as the gRPC code a caller can act on, and a message that
//! names the field, the limit or the state.

/// The kind of an [`ApiError`]; each is the gRPC status code of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    FailedPrecondition,
    ResourceExhausted,
    /// The request conflicted with stored state and was not applied; it may be retried.
    Aborted,
    /// The executor cannot answer now (shutting down, not the owner yet, unreachable).
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    Unimplemented,
    Internal,
}

/// An error of the executor's API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

macro_rules! constructors {
    ($($name:ident => $kind:ident),* $(,)?) => {
        $(
            pub fn $name(message: impl Into<String>) -> Self {
                ApiError { kind: ErrorKind::$kind, message: message.into() }
            }
        )*
    };
}

impl ApiError {
    constructors! {
        invalid_argument => InvalidArgument,
        not_found => NotFound,
        already_exists => AlreadyExists,
        permission_denied => PermissionDenied,
        failed_precondition => FailedPrecondition,
        resource_exhausted => ResourceExhausted,
        aborted => Aborted,
        unavailable => Unavailable,
        internal => Internal,
    }

    /// Whether the same call may succeed later without changes (the executor was away, or a
    /// conflict was refused whole).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Unavailable | ErrorKind::Aborted | ErrorKind::DeadlineExceeded
        )
    }
}

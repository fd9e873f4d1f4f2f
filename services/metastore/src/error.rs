//! The one error type of the store, and its mapping to and from gRPC status codes.

/// Why a store operation failed. The message names what was involved, e.g. `run "abc" not found`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The workflow, workflow version or run does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A unique key is taken: an idempotency key used by another run, or an event sequence
    /// number that was already written. The whole commit was rolled back.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request itself is wrong (empty mutation, missing id, unsupported URL); retrying the
    /// same request fails the same way.
    #[error("{0}")]
    InvalidArgument(String),
    /// The database (or the metastore service) cannot be reached or is overloaded; the operation
    /// did not happen and may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt data: a row that does not decode, an unexpected database error.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(msg) => tonic::Status::not_found(msg),
            StoreError::AlreadyExists(msg) => tonic::Status::already_exists(msg),
            StoreError::InvalidArgument(msg) => tonic::Status::invalid_argument(msg),
            StoreError::Unavailable(msg) => tonic::Status::unavailable(msg),
            StoreError::Internal(msg) => tonic::Status::internal(msg),
        }
    }
}

impl From<tonic::Status> for StoreError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let msg = status.message().to_owned();
        match status.code() {
            Code::NotFound => StoreError::NotFound(msg),
            Code::AlreadyExists => StoreError::AlreadyExists(msg),
            Code::InvalidArgument => StoreError::InvalidArgument(msg),
            // A deadline or a cancelled call did not reach (or finish on) the server: the caller
            // may retry, exactly as for an unreachable server.
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                StoreError::Unavailable(format!("metastore unavailable: {msg}"))
            }
            code => StoreError::Internal(format!("metastore error ({code:?}): {msg}")),
        }
    }
}

impl From<prost::DecodeError> for StoreError {
    fn from(err: prost::DecodeError) -> Self {
        StoreError::Internal(format!("corrupt record in the metadata store: {err}"))
    }
}

impl From<sqlx::Error> for StoreError {
    /// The generic mapping; call sites that know what a unique violation means (an idempotency
    /// key, an event sequence number) check for it first to give a precise message.
    fn from(err: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &err {
            E::RowNotFound => StoreError::NotFound(err.to_string()),
            E::Database(db) if db.is_unique_violation() => {
                StoreError::AlreadyExists(db.message().to_owned())
            }
            E::Database(db) if is_transient(db.as_ref()) => {
                StoreError::Unavailable(format!("database busy: {err}"))
            }
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                StoreError::Unavailable(format!("database unavailable: {err}"))
            }
            E::Configuration(_) => StoreError::InvalidArgument(err.to_string()),
            _ => StoreError::Internal(format!("database error: {err}")),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            other => StoreError::Internal(format!("schema migration failed: {other}")),
        }
    }
}

/// Whether a database error means "try again".
fn is_transient(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = db.code() else { return false };
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        code.parse().is_ok_and(sqlite_code_is_transient)
    } else {
        sqlstate_is_transient(&code)
    }
}

/// SQLite BUSY and LOCKED, whatever the extended code (its low byte is the primary code).
fn sqlite_code_is_transient(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6)
}

/// PostgreSQL connection exceptions (class 08), insufficient resources (53), operator
/// intervention such as a shutdown (57P), serialization failures and deadlocks.
fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
}

/// True when `err` is a unique-key violation (which the caller turns into a precise message).
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|db| db.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_the_kind() {
        let cases = [
            StoreError::NotFound("run \"a\" not found".into()),
            StoreError::AlreadyExists("x".into()),
            StoreError::InvalidArgument("y".into()),
        ];
        for err in cases {
            let back = StoreError::from(tonic::Status::from(err.clone()));
            assert_eq!(back, err);
        }
        let unavailable = StoreError::from(tonic::Status::from(StoreError::Unavailable(
            "db down".into(),
        )));
        assert!(matches!(unavailable, StoreError::Unavailable(m) if m.contains("db down")));
    }

    #[test]
    fn transient_codes() {
        assert!(sqlite_code_is_transient(5)); // SQLITE_BUSY
        assert!(sqlite_code_is_transient(517)); // SQLITE_BUSY_SNAPSHOT
        assert!(sqlite_code_is_transient(262)); // SQLITE_LOCKED_SHAREDCACHE
        assert!(!sqlite_code_is_transient(2067)); // SQLITE_CONSTRAINT_UNIQUE
        assert!(sqlstate_is_transient("08006")); // connection failure
        assert!(sqlstate_is_transient("40001")); // serialization failure
        assert!(sqlstate_is_transient("57P01")); // admin shutdown
        assert!(!sqlstate_is_transient("23505")); // unique violation
        assert!(!sqlstate_is_transient("42P01")); // undefined table
    }
}

//! The one error type of the store, and its mapping to and from gRPC status codes.

use std::time::Duration;

use dagmesh_proto::v1::{Fenced, LeaseHeld, StoreErrorDetail, store_error_detail};
use prost::Message as _;

/// The binary trailer that carries a [`StoreErrorDetail`], so that the structured variants
/// ([`StoreError::LeaseHeld`], [`StoreError::Fenced`]) survive the trip through gRPC.
const DETAIL_KEY: &str = "dagmesh-store-error-bin";

/// Why a store operation failed. The message names what was involved, e.g. `run "abc" not found`.
///
/// [`StoreError::is_outage`] tells the two kinds apart: the store failed (retry, or stop), or
/// the request failed (fail that request and carry on).
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
    /// A bug or an unexpected database error (not a bad request, not an unreadable record).
    #[error("{0}")]
    Internal(String),
    /// A stored record does not decode (damaged, or written before the limits that keep records
    /// decodable existed). The message names the record; other records are unaffected.
    #[error("{0}")]
    DataLoss(String),
    /// The lease is held by another holder and has not expired.
    #[error(
        "lease {name:?} is held by {holder:?} and expires in {:.1}s unless renewed",
        expires_in.as_secs_f64()
    )]
    LeaseHeld {
        name: String,
        holder: String,
        expires_in: Duration,
    },
    /// A compare-and-set found the record changed since the caller read it (another writer
    /// came first); nothing was written. Read it again and redo the change.
    #[error("{0}")]
    Conflict(String),
    /// The caller's lease epoch is stale: another holder took the lease since. Nothing was
    /// written; the caller must stop writing as that holder.
    #[error(
        "lease {name:?} epoch {epoch} is stale: the current epoch is {current_epoch} \
         (another holder took the lease); nothing was written"
    )]
    Fenced {
        name: String,
        epoch: u64,
        current_epoch: u64,
    },
}

impl StoreError {
    /// Whether the store itself failed (unreachable, busy, I/O error, unexpected database
    /// error), as opposed to this request being wrong (a conflict, an invalid argument, an
    /// unreadable record, a held or stale lease, a missing record). A writer stops or retries on
    /// an outage; on anything else it fails the one request and carries on.
    pub fn is_outage(&self) -> bool {
        // Internal counts as an outage: it says nothing about the request, so blaming the
        // request could drop good work while the store is broken.
        matches!(self, StoreError::Unavailable(_) | StoreError::Internal(_))
    }
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(msg) => tonic::Status::not_found(msg),
            StoreError::AlreadyExists(msg) => tonic::Status::already_exists(msg),
            StoreError::InvalidArgument(msg) => tonic::Status::invalid_argument(msg),
            StoreError::Unavailable(msg) => tonic::Status::unavailable(msg),
            StoreError::Internal(msg) => tonic::Status::internal(msg),
            StoreError::DataLoss(msg) => tonic::Status::data_loss(msg),
            StoreError::Conflict(msg) => tonic::Status::aborted(msg),
            StoreError::LeaseHeld {
                ref name,
                ref holder,
                expires_in,
            } => with_detail(
                tonic::Status::failed_precondition(err.to_string()),
                store_error_detail::Detail::LeaseHeld(LeaseHeld {
                    name: name.clone(),
                    holder: holder.clone(),
                    expires_in_ms: u64::try_from(expires_in.as_millis()).unwrap_or(u64::MAX),
                }),
            ),
            StoreError::Fenced {
                ref name,
                epoch,
                current_epoch,
            } => with_detail(
                // ABORTED: a sequencer check failed; the caller's view is stale (gRPC's own
                // guidance for this code), unlike FAILED_PRECONDITION which AcquireLease uses
                // for "wait until the holder lets go".
                tonic::Status::aborted(err.to_string()),
                store_error_detail::Detail::Fenced(Fenced {
                    name: name.clone(),
                    epoch,
                    current_epoch,
                }),
            ),
        }
    }
}

fn with_detail(mut status: tonic::Status, detail: store_error_detail::Detail) -> tonic::Status {
    let bytes = StoreErrorDetail {
        detail: Some(detail),
    }
    .encode_to_vec();
    status.metadata_mut().insert_bin(
        DETAIL_KEY,
        tonic::metadata::MetadataValue::from_bytes(&bytes),
    );
    status
}

/// The structured detail of a status, when it carries a readable one.
fn detail_of(status: &tonic::Status) -> Option<store_error_detail::Detail> {
    let bytes = status.metadata().get_bin(DETAIL_KEY)?.to_bytes().ok()?;
    StoreErrorDetail::decode(bytes).ok()?.detail
}

impl From<tonic::Status> for StoreError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let msg = status.message().to_owned();
        match (status.code(), detail_of(&status)) {
            (Code::FailedPrecondition, Some(store_error_detail::Detail::LeaseHeld(held))) => {
                return StoreError::LeaseHeld {
                    name: held.name,
                    holder: held.holder,
                    expires_in: Duration::from_millis(held.expires_in_ms),
                };
            }
            (Code::Aborted, Some(store_error_detail::Detail::Fenced(fenced))) => {
                return StoreError::Fenced {
                    name: fenced.name,
                    epoch: fenced.epoch,
                    current_epoch: fenced.current_epoch,
                };
            }
            _ => {}
        }
        match status.code() {
            Code::NotFound => StoreError::NotFound(msg),
            Code::AlreadyExists => StoreError::AlreadyExists(msg),
            Code::InvalidArgument => StoreError::InvalidArgument(msg),
            Code::DataLoss => StoreError::DataLoss(msg),
            // ABORTED without a fenced detail: a compare-and-set lost.
            Code::Aborted => StoreError::Conflict(msg),
            // A request over the message size limit (refused by either side's gRPC layer): the
            // request is at fault, not the store.
            Code::ResourceExhausted | Code::OutOfRange => {
                StoreError::InvalidArgument(format!("metastore refused the request: {msg}"))
            }
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
        StoreError::DataLoss(format!("unreadable record in the metadata store: {err}"))
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
            E::Database(db) if is_bad_value(db.as_ref()) => {
                StoreError::InvalidArgument(format!("the database refused a value: {err}"))
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

/// Whether a database error blames a value of the request (too big, out of range, not
/// storable, a constraint other than uniqueness) rather than the database.
fn is_bad_value(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = db.code() else { return false };
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        code.parse().is_ok_and(sqlite_code_is_bad_value)
    } else {
        sqlstate_is_bad_value(&code)
    }
}

/// SQLite TOOBIG (18), CONSTRAINT (19), MISMATCH (20) and RANGE (25).
pub(crate) fn sqlite_code_is_bad_value(code: i32) -> bool {
    matches!(code & 0xff, 18 | 19 | 20 | 25)
}

/// PostgreSQL data exceptions (class 22: a NUL byte in a text, a value out of range),
/// integrity constraint violations (23) and program limits exceeded (54: a key too long for
/// its index).
fn sqlstate_is_bad_value(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
}

/// SQLite BUSY and LOCKED, whatever the extended code (its low byte is the primary code).
pub(crate) fn sqlite_code_is_transient(code: i32) -> bool {
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
            StoreError::DataLoss("step \"s\" of run \"r\" does not decode".into()),
            StoreError::Conflict("backfill \"b\" was changed by another writer".into()),
            StoreError::LeaseHeld {
                name: "executor".into(),
                holder: "host-a/42".into(),
                expires_in: Duration::from_millis(9_500),
            },
            StoreError::Fenced {
                name: "executor/partition-3".into(),
                epoch: 4,
                current_epoch: 5,
            },
        ];
        for err in cases {
            let status = tonic::Status::from(err.clone());
            // The message a remote caller reads is the local one.
            assert_eq!(status.message(), err.to_string());
            let back = StoreError::from(status);
            assert_eq!(back, err);
        }
        let unavailable = StoreError::from(tonic::Status::from(StoreError::Unavailable(
            "db down".into(),
        )));
        assert!(matches!(unavailable, StoreError::Unavailable(m) if m.contains("db down")));
    }

    #[test]
    fn lease_errors_name_the_holder_and_the_epochs() {
        let held = StoreError::LeaseHeld {
            name: "executor".into(),
            holder: "host-a/42".into(),
            expires_in: Duration::from_millis(9_500),
        };
        let text = held.to_string();
        assert!(
            text.contains("\"host-a/42\"") && text.contains("9.5s"),
            "{text}"
        );
        assert_eq!(
            tonic::Status::from(held).code(),
            tonic::Code::FailedPrecondition
        );
        let fenced = StoreError::Fenced {
            name: "executor".into(),
            epoch: 4,
            current_epoch: 5,
        };
        let text = fenced.to_string();
        assert!(
            text.contains("epoch 4") && text.contains("current epoch is 5"),
            "{text}"
        );
        assert_eq!(tonic::Status::from(fenced).code(), tonic::Code::Aborted);
    }

    #[test]
    fn a_status_without_detail_does_not_invent_one() {
        // A FAILED_PRECONDITION from something else (a proxy that dropped the trailer) must
        // not become a LeaseHeld with empty fields.
        let err = StoreError::from(tonic::Status::failed_precondition("nope"));
        assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
    }

    #[test]
    fn outages_are_told_from_bad_requests() {
        assert!(StoreError::Unavailable("db down".into()).is_outage());
        assert!(StoreError::Internal("?".into()).is_outage());
        let request_errors = [
            StoreError::NotFound("n".into()),
            StoreError::AlreadyExists("event 5 of run \"r\" already exists".into()),
            StoreError::InvalidArgument("i".into()),
            StoreError::DataLoss("d".into()),
            StoreError::Fenced {
                name: "executor".into(),
                epoch: 1,
                current_epoch: 2,
            },
            StoreError::LeaseHeld {
                name: "executor".into(),
                holder: "h".into(),
                expires_in: Duration::ZERO,
            },
        ];
        for err in request_errors {
            assert!(!err.is_outage(), "{err:?}");
        }
        // A request too large for gRPC is the request's fault.
        let err = StoreError::from(tonic::Status::resource_exhausted("message too large"));
        assert!(!err.is_outage(), "{err:?}");
    }

    #[test]
    fn bad_value_codes() {
        assert!(sqlite_code_is_bad_value(18)); // SQLITE_TOOBIG
        assert!(sqlite_code_is_bad_value(275)); // SQLITE_CONSTRAINT_CHECK
        assert!(!sqlite_code_is_bad_value(5)); // SQLITE_BUSY
        assert!(!sqlite_code_is_bad_value(10)); // SQLITE_IOERR
        assert!(sqlstate_is_bad_value("22021")); // NUL byte in a text
        assert!(sqlstate_is_bad_value("54000")); // index row too large
        assert!(sqlstate_is_bad_value("23502")); // not-null violation
        assert!(!sqlstate_is_bad_value("08006"));
        assert!(!sqlstate_is_bad_value("42P01"));
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

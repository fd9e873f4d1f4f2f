//! The dagmesh metadata store: the system of record.
//!
//! **What it owns.** Everything that must survive a restart: workflow versions (immutable,
//! numbered 1, 2, 3... per name), runs, their steps, and each run's append-only event log. No
//! other component touches the database; they call the [`MetadataStore`] trait, in-process
//! ([`SqlStore`], one implementation over a small [`Dialect`] trait: SQLite or PostgreSQL) or
//! over gRPC ([`grpc::MetadataGrpcClient`] talking to a [`grpc::MetadataGrpcServer`]; each RPC
//! is named after its trait method). Records are the proto messages themselves: each row stores
//! the prost-encoded message plus indexed copies of the fields that queries filter on.
//!
//! **Lifecycle.** [`connect`] opens the database named by a URL (`sqlite://PATH`,
//! `sqlite::memory:`, `postgres://...`), creating a SQLite file if needed, and applies the
//! embedded schema migrations ([`connect_sql`] also keeps [`SqlDatabase::postgres_tls`] and
//! [`SqlDatabase::close`]). The executor then writes with [`MetadataStore::commit`], its
//! group commit: one transaction per batch of run, step and event mutations, all or nothing.
//! On start it takes the named lease `"executor"` ([`MetadataStore::acquire_lease`]), renews it
//! while it runs, and commits with [`MetadataStore::commit_fenced`], which refuses a batch once
//! another holder has taken the lease (its epoch went up). It recovers with
//! [`MetadataStore::read_active_runs_checked`], which lists runs whose records do not decode
//! apart instead of failing, and ends those with [`MetadataStore::quarantine_run`].
//! [`SqlDatabase::close`] (or dropping the store) closes the connections.
//!
//! **How it fails.** Every operation returns a [`StoreError`] whose variant says what the caller
//! can do: `NotFound`, `AlreadyExists` (a unique key is taken: an idempotency key or an event
//! sequence number; the commit was rolled back), `InvalidArgument` (fix the request; includes
//! values the database refuses), `DataLoss` (a stored record does not decode), `LeaseHeld` and
//! `Fenced` (another holder has the lease), `Unavailable` (the database or metastore is
//! unreachable or busy; nothing happened, retry) and `Internal` (a bug or an unexpected database
//! error). [`StoreError::is_outage`] separates the store failing (`Unavailable`, `Internal`)
//! from the request failing (everything else). The variants map one to one onto gRPC status
//! codes, so a remote store fails exactly like a local one. A record that does not decode
//! never fails a whole read: `get_run` and `list_runs` answer with a stand-in that says what was
//! unreadable, and `read_events` keeps the event's place with `unreadable` set. SQLite runs in WAL mode with `synchronous = NORMAL`: a
//! commit survives a killed process, but a power loss may lose the last commits.

mod error;
pub mod grpc;
pub mod ownership;
mod sql;
mod store;

pub use dagmesh_proto::v1::{ActiveRuns, UnreadableRun};
pub use error::StoreError;
pub use sql::{
    Dialect, PgTls, PostgresStore, SqlDatabase, SqlStore, SqliteStore, connect, connect_sql,
    run_id_floor,
};
pub use store::{
    ClaimedLeases, DEFAULT_EVENT_LIMIT, DEFAULT_PAGE_SIZE, Lease, MAX_LEASE_TTL, MAX_LIVE_LEASES,
    MAX_PAGE_SIZE, MAX_PARTITIONS, MEMBER_LEASES, MetadataStore,
};

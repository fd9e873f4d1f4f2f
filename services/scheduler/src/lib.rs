//! The scheduler: decides when runs start.
//!
//! **What it owns.** Cron schedules (an expression read in an IANA time zone, a workflow, input
//! expressions over the tick time, a catch-up policy), event triggers (a topic, a filter and an
//! input mapping over the event payload) and backfills (one run per hourly or daily partition
//! of a range, at most N at a time). Their state lives in the metadata store; the runs they
//! start are ordinary runs, started through a [`RunStarter`] (the in-process executor, or the
//! `RunService` of a remote one) with an idempotency key that names the decision:
//! `schedule/<id>/<tick UTC>`, `event/<trigger id>/<event id>`, `backfill/<id>/<partition
//! start UTC>`. A decision taken twice (a retry, a restart, a second scheduler process) thus
//! starts one run.
//!
//! **Lifecycle.** [`Scheduler::spawn`] starts one loop task: each pass fires the due ticks of
//! every active schedule, moves each schedule's `last_tick` with a compare-and-set in the store,
//! and drives running backfills; then it sleeps until the next tick, a change made through this
//! scheduler, a backfill poll (while one runs) or a coarse re-check (30 s) for changes made by
//! another process. Time comes from a [`Clock`], so tests move a [`ManualClock`] instead of
//! sleeping. The gRPC adapter ([`grpc`]) serves `dagmesh.v1.SchedulerService`.
//!
//! **How it fails.** A crash between starting a tick's run and advancing `last_tick` re-fires
//! the tick on restart; the idempotency key returns the first run. Ticks missed while down (or
//! paused) follow the schedule's catch-up policy. An unreachable executor or store keeps the
//! tick pending and retries after a second; a permanent failure (unknown workflow, an input
//! expression that fails on this tick) is logged and the tick counts as handled. Two scheduler
//! processes on one database may both submit a tick; the executor's idempotency key keeps it one
//! run, and the compare-and-set keeps `last_tick` monotonic. A backfill driven by two processes
//! at once may briefly exceed its `max_concurrency` (each counts the other's runs only on its
//! next pass).
//!
//! **Bounds.** Definitions are checked against `dagmesh_proto::limits` when created (names,
//! cron and zone lengths, expressions, entries, timestamps within the protobuf range, at most
//! `MAX_BACKFILL_PARTITIONS` partitions, `max_concurrency` in 1..=`MAX_BACKFILL_CONCURRENCY`,
//! `catch_up_limit` up to `MAX_CATCH_UP_TICKS`), and again when read back: a stored schedule or
//! trigger that fails is logged and skipped, a backfill is marked FAILED with the reason, and
//! everything else keeps running. A backfill costs the same whatever its range: partition `k`
//! is computed when it is submitted, the record holds a cursor, the active run ids and counters,
//! and each pass asks only about the active runs. Evaluated inputs and event payloads are held
//! to the payload limits (size and depth) before anything is submitted.

mod clock;
mod error;
mod expr;
pub mod grpc;
mod metrics;
mod scheduler;
mod starter;
mod ticks;
mod validate;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::SchedError;
pub use scheduler::{
    BACKFILL_TAG, DEFAULT_CATCH_UP_LIMIT, SCHEDULE_TAG, Scheduler, SchedulerConfig, TRIGGER_TAG,
};
pub use starter::{ExecutorStarter, RunStarter, require_ended};

/// The time types of this crate's API ([`Clock`], [`ManualClock`]).
pub use chrono;

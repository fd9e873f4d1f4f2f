//! The `dagmesh` command line, as a library so tests and benchmarks can start the same mesh the
//! binary runs.
//!
//! - [`mesh`]: the store, the executor and the scheduler in one process (`dagmesh up`, demo, bench, tests).
//! - [`serve`]: the server commands `up`, `metastore`, `executor`, `scheduler`.
//! - [`commands`]: the client commands (`submit`, `runs`, `workflows`, `workers`) and the live
//!   run view.
//! - [`demo`], [`bench`]: the example end to end, and the performance goals measured.

pub mod bench;
pub mod commands;
pub mod demo;
pub mod mesh;
pub mod pki;
pub mod security;
pub mod serve;

/// The scheduler crate, for tests that start extra scheduler instances beside a mesh.
pub use dagmesh_scheduler;

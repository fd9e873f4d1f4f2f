//! Rust SDK for dagmesh: step workers and a client for backends.
//!
//! - [`worker`]: a [`Worker`] registers task handlers (`name`, semver `version`, an async fn
//!   from a `Deserialize` input to a `Serialize` output), dials the run-executor over one
//!   `WorkerService.Connect` stream, runs what it is assigned, reports progress and logs, and
//!   keeps every result until the executor has made it durable. It reconnects on its own and
//!   drains on SIGTERM.
//! - [`client`]: a [`Client`] for backends: apply workflows, submit runs, watch them, wait for
//!   them to end, cancel and retry them.
//! - [`follow`]: a [`RunFollower`] follows one run to its end, each event once, resuming across
//!   broken streams and server restarts; `Client::wait_for_run` and `dagmesh runs watch` are
//!   built on it.
//! - [`workflow`]: workflows in code, a typed builder of the `WorkflowSpec` a YAML file gives.
//!
//! ```no_run
//! use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct MeshInput {
//!     images: Vec<String>,
//! }
//!
//! #[derive(Serialize)]
//! struct MeshOutput {
//!     triangles: u64,
//! }
//!
//! async fn build_mesh(ctx: TaskContext, input: MeshInput) -> Result<MeshOutput, TaskError> {
//!     for (i, image) in input.images.iter().enumerate() {
//!         if ctx.is_cancelled() {
//!             return Err(TaskError::retryable("cancelled"));
//!         }
//!         ctx.info(format!("aligning {image}"));
//!         ctx.progress(i as f32 / input.images.len() as f32, "aligning");
//!     }
//!     Ok(MeshOutput { triangles: 120_000 })
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // A worker process: runs until SIGTERM/SIGINT, then drains.
//! let worker = Worker::builder("http://127.0.0.1:7070")
//!     .name("mesher")
//!     .label("gpu", "true")
//!     .slots(2)
//!     .task("mesh.build", "1.3.0", build_mesh)
//!     .build()?;
//! worker.run().await?;
//!
//! // A backend: start a run and wait for its end.
//! let client = Client::connect("http://127.0.0.1:7070").await?;
//! let run = client
//!     .submit(
//!         SubmitRun::workflow("room-scan")
//!             .inputs(serde_json::json!({"images": ["a.jpg", "b.jpg"]}))
//!             .idempotency_key("upload-42"),
//!     )
//!     .await?;
//! let run = client.wait_for_run(&run.run_id).await?;
//! println!("run {} ended {:?}", run.run_id, run.state());
//! # Ok(())
//! # }
//! ```

mod backoff;
pub mod client;
pub mod follow;
pub mod worker;
pub mod workflow;

pub use client::{Client, ClientError, SubmitRun};
pub use follow::{Followed, RunFollower};
pub use worker::{
    BuildError, LogLevel, TaskContext, TaskError, Worker, WorkerBuilder, WorkerError, WorkerHandle,
    WorkerState,
};

/// The generated protocol types, for fields this SDK does not wrap.
pub use dagmesh_proto::v1 as proto;

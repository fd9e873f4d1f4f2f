//! The Rust conformance worker: the task types every SDK's conformance worker implements
//! (`conformance.echo`, `.progress`, `.wait_cancel`, `.sleep`, `.big`, all version 1.0.0), so
//! `tests/conformance.rs` can run the same protocol scenarios against every language.
//! Prints `EVENT started <task_id> <attempt>` when a handler starts and
//! `EVENT cancelled <task_id> <attempt>` when `wait_cancel` sees its Cancel.

use std::io::Write as _;
use std::time::Duration;

use clap::Parser;
use dagmesh_sdk::{TaskContext, TaskError, Worker};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "DAGMESH_SERVER")]
    server: String,
    #[arg(long)]
    instance_id: String,
    #[arg(long, default_value_t = 1)]
    slots: u32,
    #[arg(long, default_value = "conformance-rust")]
    name: String,
    /// Token and TLS (`--token`, `--tls-ca`, ...; or their DAGMESH_* variables).
    #[command(flatten)]
    client: dagmesh_proto::connect::ClientFlags,
}

fn event(what: &str, ctx: &TaskContext) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "EVENT {what} {} {}", ctx.task_id(), ctx.attempt());
    let _ = stdout.flush();
}

async fn echo(ctx: TaskContext, inputs: Value) -> Result<Value, TaskError> {
    event("started", &ctx);
    Ok(inputs)
}

#[derive(Deserialize)]
struct ProgressInput {
    steps: u32,
}

async fn progress(ctx: TaskContext, input: ProgressInput) -> Result<Value, TaskError> {
    event("started", &ctx);
    for k in 1..=input.steps {
        ctx.progress(k as f32 / input.steps as f32, format!("step {k}"));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    Ok(json!({ "done": input.steps }))
}

async fn wait_cancel(ctx: TaskContext, _: Value) -> Result<Value, TaskError> {
    event("started", &ctx);
    tokio::select! {
        () = ctx.cancelled() => {
            event("cancelled", &ctx);
            Err(TaskError::retryable("cancelled"))
        }
        () = tokio::time::sleep(Duration::from_secs(60)) => Err(TaskError::fatal("never cancelled")),
    }
}

#[derive(Deserialize)]
struct SleepInput {
    ms: u64,
    first_attempt_ms: Option<u64>,
}

async fn sleep(ctx: TaskContext, input: SleepInput) -> Result<Value, TaskError> {
    event("started", &ctx);
    let ms = match input.first_attempt_ms {
        Some(first) if ctx.attempt() == 1 => first,
        _ => input.ms,
    };
    // Deliberately ignores cancellation: the scenarios need a result that arrives late.
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json!({ "slept": ms, "attempt": ctx.attempt() }))
}

#[derive(Deserialize)]
struct BigInput {
    bytes: usize,
}

async fn big(ctx: TaskContext, input: BigInput) -> Result<Value, TaskError> {
    event("started", &ctx);
    Ok(json!({ "blob": "x".repeat(input.bytes) }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker = Worker::builder(args.server)
        .client_settings(args.client.settings())
        .name(args.name)
        .instance_id(args.instance_id)
        .slots(args.slots)
        .task("conformance.echo", "1.0.0", echo)
        .task("conformance.progress", "1.0.0", progress)
        .task("conformance.wait_cancel", "1.0.0", wait_cancel)
        .task("conformance.sleep", "1.0.0", sleep)
        .task("conformance.big", "1.0.0", big)
        .build()?;
    worker.run().await?;
    Ok(())
}

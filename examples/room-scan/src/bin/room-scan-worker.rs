//! Runs the room-scan example workers against a dagmesh executor until SIGTERM (then drains).

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    /// Fetching, features, thumbnails and notifications.
    Cpu,
    /// Mesh building (labelled gpu=true).
    Gpu,
    /// Both pools in one process.
    All,
}

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Executor address.
    #[arg(long, env = "DAGMESH_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    #[arg(long, env = "DAGMESH_WORKER_ROLE", value_enum, default_value = "all")]
    role: Role,
    /// Token and TLS (`--token`, `--tls-ca`, ...; or their DAGMESH_* variables).
    #[command(flatten)]
    client: dagmesh_proto::connect::ClientFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: not in a log file, not with NO_COLOR.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let args = Args::parse();
    let settings = args.client.settings();
    let mut workers = Vec::new();
    if matches!(args.role, Role::Cpu | Role::All) {
        workers.push(
            dagmesh_example_room_scan::cpu_worker(&args.server)
                .client_settings(settings.clone())
                .build()?,
        );
    }
    if matches!(args.role, Role::Gpu | Role::All) {
        workers.push(
            dagmesh_example_room_scan::gpu_worker(&args.server)
                .client_settings(settings)
                .build()?,
        );
    }
    let results = futures_join(workers).await;
    for result in results {
        result?;
    }
    Ok(())
}

async fn futures_join(
    workers: Vec<dagmesh_sdk::Worker>,
) -> Vec<Result<(), dagmesh_sdk::WorkerError>> {
    let handles: Vec<_> = workers
        .into_iter()
        .map(|worker| tokio::spawn(worker.run()))
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.expect("worker task panicked"));
    }
    results
}

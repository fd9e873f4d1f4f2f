use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dagmesh::commands::{self, ClientCommand, Global, OutputFormat};
use dagmesh::{bench, demo, serve};

/// dagmesh: a workflow (DAG) orchestrator built as a mesh of gRPC services.
#[derive(Parser)]
#[command(name = "dagmesh", version)]
struct Cli {
    /// Executor address for client commands.
    #[arg(
        long,
        global = true,
        env = "DAGMESH_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    /// Output format.
    #[arg(
        short = 'o',
        long,
        global = true,
        env = "DAGMESH_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    output: OutputFormat,
    #[command(flatten)]
    client: commands::ClientFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the metadata store, the executor and the scheduler in one process (SQLite under
    /// ./.dagmesh by default).
    Up(serve::UpArgs),
    /// Run the metadata store alone (split mode).
    Metastore(serve::MetastoreArgs),
    /// Run the executor alone, against a metastore (split mode).
    Executor(serve::ExecutorArgs),
    /// Run the scheduler alone, against a metastore and an executor (split mode).
    Scheduler(serve::SchedulerArgs),
    /// Run the room-scan example end to end and watch it.
    Demo(demo::DemoArgs),
    /// Measure the performance goals (chain, fanout, runs, idle).
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let global = Global {
        server: cli.server,
        output: cli.output,
        client: commands::client_settings(cli.client),
    };
    let result = match cli.command {
        Command::Up(args) => serve::up(args).await.map(|()| ExitCode::SUCCESS),
        Command::Metastore(args) => serve::metastore(args).await.map(|()| ExitCode::SUCCESS),
        Command::Executor(args) => serve::executor(args, &global.client)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Scheduler(args) => serve::scheduler(args, &global.client)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::demo(&global, args).await,
        Command::Bench(args) => bench::bench(&global, args).await,
        Command::Client(command) => commands::run(&global, command).await,
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clap's own checks of every command (e.g. two arguments with one long name), which it
    /// would otherwise make only when that command is first run.
    #[test]
    fn every_command_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

//! The client side of the `dagmesh` command line: commands that talk to a running server over
//! gRPC (`submit`, `runs`, `workflows`, `workers`, and the scheduler's `schedules`, `triggers`,
//! `events`, `backfill`).
//!
//! Every command prints readable text by default and the proto messages as JSON with `-o json`
//! (see [`json`] for the mapping). Errors go to stderr; the exit code tells scripts what
//! happened:
//!
//! | code | meaning                                                                    |
//! |------|----------------------------------------------------------------------------|
//! | 0    | done (for `--watch`/`--wait`: the run succeeded)                           |
//! | 1    | the run failed or was cancelled, the server refused, or it is unreachable  |
//! | 2    | the request was invalid: a bad workflow file, an unknown run or workflow   |
//! | 130  | interrupted (Ctrl-C) while watching; the run goes on                       |

/// `print!` that ends the process quietly when stdout is a closed pipe (`dagmesh runs list |
/// head`), as a tool killed by SIGPIPE would, instead of panicking like `print!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::commands::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` with [`out!`]'s handling of closed pipes.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::commands::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod format;
pub mod json;
pub(crate) mod operate;
mod runs;
mod schedules;
mod submit;
mod tokens;
pub mod watch;
mod workers;
mod workflows;

use std::process::ExitCode;
use std::time::Duration;

use dagmesh_proto::connect::{AuthChannel, ClientSettings, error_chain};

pub use runs::RunsCommand;
pub use schedules::{BackfillCommand, EventsCommand, SchedulesCommand, TriggersCommand};
pub use submit::SubmitArgs;
pub use tokens::TokensCommand;
pub use workers::WorkersCommand;
pub use workflows::WorkflowsCommand;

/// How commands print their results.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Human-readable text: tables, trees and one-line summaries.
    #[default]
    Text,
    /// The proto messages as JSON (snake_case field names, enums by name, RFC 3339 timestamps);
    /// streams print one JSON object per line.
    Json,
}

/// Flags shared by every client command (defined on the root command).
#[derive(Clone, Debug)]
pub struct Global {
    /// Server address, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    pub output: OutputFormat,
    /// Token and TLS settings (flags, else environment, else the admin token of a local
    /// `dagmesh up`).
    pub client: ClientSettings,
}

/// The client flags (`--token`, `--tls-ca`, ...), shared with the example and conformance
/// workers; defined on the root command.
pub use dagmesh_proto::connect::ClientFlags;

/// The client settings of the flags; without a token or token file, the admin token of a
/// `dagmesh up` whose data directory is DAGMESH_DATA_DIR (default `.dagmesh`), when that file
/// exists.
pub fn client_settings(flags: ClientFlags) -> ClientSettings {
    let mut settings = flags.settings();
    if settings.token.is_none() && settings.token_file.is_none() {
        let data_dir = std::env::var_os("DAGMESH_DATA_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| ".dagmesh".into());
        let file = data_dir.join(crate::security::ADMIN_TOKEN_FILE);
        if file.is_file() {
            settings.token_file = Some(file);
        }
    }
    settings
}

/// The commands that talk to a dagmesh server.
#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Submit a run of a workflow file (or of a registered workflow) and optionally follow it.
    Submit(SubmitArgs),
    /// List, inspect, follow, cancel and retry runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Register and read workflow definitions.
    #[command(subcommand)]
    Workflows(WorkflowsCommand),
    /// Inspect the workers connected to the executor.
    #[command(subcommand)]
    Workers(WorkersCommand),
    /// Cron schedules of workflows (the scheduler).
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Subscriptions of workflows to event topics.
    #[command(subcommand)]
    Triggers(TriggersCommand),
    /// Publish events to triggers.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Run a workflow once per hourly or daily partition of a time range.
    #[command(subcommand)]
    Backfill(BackfillCommand),
    /// Create, list and revoke API tokens; show who the current token is.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The ready queues: tasks waiting per task type, their oldest age, the workers that could
    /// take them and their free slots.
    Queues(operate::QueuesArgs),
    /// What became of the runs' webhooks.
    #[command(subcommand)]
    Webhooks(operate::WebhooksCommand),
    /// Whether the server answers (gRPC health; no token needed); `--wait 30s` waits for it.
    Health(operate::HealthArgs),
    /// The web console's address on the server, with your token to log in: open it in a
    /// browser.
    Console(operate::ConsoleArgs),
}

/// Runs one client command. Server and connection errors are printed to stderr here and turned
/// into exit codes; only unexpected errors come back as `Err`.
pub async fn run(global: &Global, command: ClientCommand) -> anyhow::Result<ExitCode> {
    let result = match command {
        ClientCommand::Submit(args) => submit::run(global, args).await,
        ClientCommand::Runs(command) => runs::run(global, command).await,
        ClientCommand::Workflows(command) => workflows::run(global, command).await,
        ClientCommand::Workers(command) => workers::run(global, command).await,
        ClientCommand::Schedules(command) => schedules::run_schedules(global, command).await,
        ClientCommand::Triggers(command) => schedules::run_triggers(global, command).await,
        ClientCommand::Events(command) => schedules::run_events(global, command).await,
        ClientCommand::Backfill(command) => schedules::run_backfill(global, command).await,
        ClientCommand::Tokens(command) => tokens::run(global, command).await,
        ClientCommand::Queues(args) => operate::queues(global, args).await,
        ClientCommand::Webhooks(command) => operate::webhooks(global, command).await,
        ClientCommand::Health(args) => operate::health(global, args).await,
        ClientCommand::Console(args) => operate::console(global, args).await,
    };
    result.or_else(|err| report(&global.server, err))
}

/// Opens a channel to the server of `global`, with its token and TLS settings.
pub async fn connect(global: &Global) -> anyhow::Result<AuthChannel> {
    connect_to(&global.server, &global.client).await
}

/// Opens a channel to `server`. HTTP/2 keep-alives make a watch notice a vanished server
/// within seconds instead of waiting on a dead connection forever. TLS handshake failures (an
/// untrusted certificate, a name mismatch, a refused client certificate) surface here.
pub async fn connect_to(server: &str, settings: &ClientSettings) -> anyhow::Result<AuthChannel> {
    let credentials = settings.credentials()?;
    let endpoint = settings
        .endpoint(server)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|err| {
        anyhow::Error::new(Unreachable(format!("{server}: {}", error_chain(&err))))
    })?;
    Ok(credentials.wrap(channel))
}

/// The server could not be reached at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach dagmesh server at {0}")]
struct Unreachable(String);

/// A watch was stopped with Ctrl-C; the run itself goes on.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped watching run {run_id}; it keeps going (resume with `dagmesh runs watch {run_id}`)"
)]
pub struct Interrupted {
    pub run_id: String,
}

/// A duration flag that bounds a wait (`--wait`, `--startup-timeout`): at most a day, so that
/// the deadline it makes always fits the clock.
pub fn wait_duration(text: &str) -> Result<Duration, String> {
    const MAX: Duration = Duration::from_secs(24 * 60 * 60);
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration > MAX {
        return Err(format!("{text} is longer than the limit of 24h"));
    }
    Ok(duration)
}

/// Exit code for a Status: 2 when the request itself was wrong, 1 otherwise.
fn status_exit_code(status: &tonic::Status) -> ExitCode {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

fn report(server: &str, err: anyhow::Error) -> anyhow::Result<ExitCode> {
    let status = err.downcast_ref::<tonic::Status>().cloned().or_else(|| {
        err.downcast_ref::<dagmesh_api::ApiError>()
            .map(|error| tonic::Status::from(error.clone()))
    });
    if let Some(status) = &status {
        match status.code() {
            // The message lists every problem as `path: message`, one per line, like a local
            // spec error; printed the same way so that both read the same.
            tonic::Code::Unavailable => eprintln!(
                "error: dagmesh server at {server} is unavailable: {}",
                status.message()
            ),
            _ => eprintln!("error: {}", status.message()),
        }
        return Ok(status_exit_code(status));
    }
    if let Some(unreachable) = err.downcast_ref::<Unreachable>() {
        eprintln!("error: {unreachable}");
        return Ok(ExitCode::FAILURE);
    }
    if let Some(interrupted) = err.downcast_ref::<Interrupted>() {
        eprintln!("{interrupted}");
        return Ok(ExitCode::from(130));
    }
    Err(err)
}

/// Exit code of a command that waited for a run: 0 only when it succeeded.
fn run_exit_code(run: &dagmesh_proto::v1::Run) -> ExitCode {
    if run.state == dagmesh_proto::v1::RunState::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints one JSON document (pretty) to stdout.
fn print_json(value: &serde_json::Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("a serde_json::Value always serializes")
    );
}

pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout.write_fmt(args).and_then(|()| stdout.flush())
        && err.kind() == std::io::ErrorKind::BrokenPipe
    {
        // 128 + SIGPIPE: what the shell reports for a tool the signal ended.
        std::process::exit(141);
    }
}

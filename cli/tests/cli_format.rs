//! The client commands as a user meets them without a server: argument parsing, local workflow
//! checks, exit codes, and the JSON and summary renderings of a run.

use std::process::ExitCode;

use clap::Parser;
use dagmesh::commands::{self, ClientCommand, Global, OutputFormat, RunsCommand};
use dagmesh_proto::v1::{Run, RunState};
use serde_json::json;

/// The client commands under a root command, as `main.rs` flattens them.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: ClientCommand,
}

fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
    let args = std::iter::once("dagmesh").chain(args.iter().copied());
    Cli::try_parse_from(args).map(|cli| cli.command)
}

fn global(server: &str) -> Global {
    Global {
        server: server.to_owned(),
        output: OutputFormat::Text,
        client: Default::default(),
    }
}

#[test]
fn submit_collects_inputs_tags_and_mode() {
    let command = parse(&[
        "submit",
        "scan.yaml",
        "-i",
        "room=kitchen",
        "-i",
        "count=3",
        "--input",
        "ok=true",
        "--tag",
        "team=vision",
        "--idempotency-key",
        "k1",
        "--wait",
    ])
    .unwrap();
    let ClientCommand::Submit(args) = command else {
        panic!("expected submit, got {command:?}");
    };
    assert_eq!(
        args.file.as_deref(),
        Some(std::path::Path::new("scan.yaml"))
    );
    assert_eq!(
        args.inputs,
        [
            ("room".to_owned(), json!("kitchen")),
            ("count".to_owned(), json!(3)),
            ("ok".to_owned(), json!(true)),
        ]
    );
    assert_eq!(args.tags, [("team".to_owned(), "vision".to_owned())]);
    assert_eq!(args.idempotency_key.as_deref(), Some("k1"));
    assert!(args.wait && !args.watch);
}

#[test]
fn submit_needs_exactly_one_workflow_source_and_one_mode() {
    assert!(parse(&["submit"]).is_err());
    assert!(parse(&["submit", "a.yaml", "--workflow", "room-scan"]).is_err());
    assert!(parse(&["submit", "a.yaml", "--watch", "--wait"]).is_err());
    assert!(parse(&["submit", "a.yaml", "-i", "no-equals-sign"]).is_err());
    assert!(parse(&["submit", "--workflow", "room-scan@2"]).is_ok());
}

#[test]
fn runs_list_takes_states_in_any_case() {
    let command = parse(&["runs", "list", "--state", "FAILED", "--limit", "5"]).unwrap();
    assert!(matches!(
        command,
        ClientCommand::Runs(RunsCommand::List(ref args)) if args.limit == Some(5) && args.state.is_some()
    ));
    assert!(parse(&["runs", "list", "--state", "exploded"]).is_err());
}

#[tokio::test]
async fn a_broken_workflow_file_exits_2_before_contacting_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "name: bad\nsteps:\n  - id: b\n    task: t@^1\n    needs: [mesh]\n",
    )
    .unwrap();
    let command = parse(&["submit", path.to_str().unwrap()]).unwrap();
    // Port 1 refuses connections: reaching the server would give exit code 1, not 2.
    let code = commands::run(&global("http://127.0.0.1:1"), command)
        .await
        .unwrap();
    assert_eq!(code, ExitCode::from(2));
}

#[tokio::test]
async fn an_unreachable_server_exits_1() {
    let command = parse(&["runs", "get", "some-run"]).unwrap();
    let code = commands::run(&global("http://127.0.0.1:1"), command)
        .await
        .unwrap();
    assert_eq!(code, ExitCode::FAILURE);
}

#[test]
fn a_run_prints_as_json_and_as_a_summary() {
    let run = Run {
        run_id: "r1".into(),
        workflow: "room-scan".into(),
        workflow_version: 2,
        state: RunState::Cancelled as i32,
        error: "cancelled by alice".into(),
        created_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        finished_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_002,
            nanos: 500_000_000,
        }),
        ..Run::default()
    };
    let value = commands::json::run(&run);
    assert_eq!(value["state"], "RUN_STATE_CANCELLED");
    assert_eq!(value["finished_at"], "2023-11-14T22:13:22.500Z");
    assert_eq!(value["steps"], json!([]));
    assert_eq!(
        commands::watch::summary(&run),
        "run r1 CANCELLED in 2.50s: cancelled by alice"
    );
}

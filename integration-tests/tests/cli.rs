//! The `dagmesh` command line end to end: the real binary against a `dagmesh up` process and a
//! worker in this test, as a user types it in a shell or a script runs it.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dagmesh_integration_tests::{PATIENCE, dagmesh_binary, free_port, wait_healthy};
use dagmesh_sdk::{TaskContext, TaskError, Worker};
use serde::Deserialize;
use serde_json::{Value, json};

/// A `dagmesh up` child process, SIGKILLed and reaped on drop so a failing test leaves nothing
/// behind; its log is printed when the test fails.
struct UpProcess {
    child: Child,
    log: PathBuf,
    url: String,
}

impl UpProcess {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let database = format!("sqlite://{}", dir.join("db.sqlite").display());
        let log = dir.join("up.log");
        let data_dir = dir.join("data").display().to_string();
        let file = OpenOptions::new().create(true).append(true).open(&log)?;
        let mut command = Command::new(dagmesh_binary()?);
        command
            .args([
                "up",
                "--listen",
                &listen,
                "--database",
                &database,
                "--no-auth",
                "--data-dir",
                &data_dir,
            ])
            .args(["--lease", "1s", "--heartbeat-interval", "200ms"])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        clear_dagmesh_env(&mut command);
        let child = command.spawn().context("starting dagmesh up")?;
        let mut up = Self {
            child,
            log,
            url: format!("http://{listen}"),
        };
        if let Err(error) = wait_healthy(&up.url).await {
            let status = up.child.try_wait()?;
            bail!(
                "dagmesh up not healthy ({error}; exit status {status:?}){}",
                up.log_tail()
            );
        }
        Ok(up)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "\n--- last lines of {} ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// The test's environment must not steer the command (`DAGMESH_SERVER`, `DAGMESH_OUTPUT`...).
fn clear_dagmesh_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DAGMESH_") {
            command.env_remove(key);
        }
    }
}

/// What one `dagmesh` command did.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }
}

/// Runs `dagmesh ARGS` with stdout and stderr piped (not a terminal), killed if it hangs.
async fn dagmesh(args: &[&str]) -> anyhow::Result<Ran> {
    dagmesh_within(args, PATIENCE).await
}

/// [`dagmesh`], killed after `patience`.
async fn dagmesh_within(args: &[&str], patience: Duration) -> anyhow::Result<Ran> {
    let mut command = Command::new(dagmesh_binary()?);
    command.args(args).stdin(Stdio::null());
    clear_dagmesh_env(&mut command);
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let output = tokio::time::timeout(patience, command.output())
        .await
        .with_context(|| format!("dagmesh {} did not finish in time", args.join(" ")))??;
    Ok(Ran {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout)?,
        stderr: String::from_utf8(output.stderr)?,
    })
}

const OK_WORKFLOW: &str = r#"
name: cli-ok
description: Two steps passing text along.
steps:
  - id: first
    task: cli.echo@^1
    inputs:
      text: "'hello'"
  - id: second
    task: cli.echo@^1
    needs: [first]
    inputs:
      text: first.text + ' again'
"#;

const FAILING_WORKFLOW: &str = r#"
name: cli-fail
steps:
  - id: boom
    task: cli.fail@^1
"#;

const INVALID_WORKFLOW: &str = r#"
name: cli-bad
steps:
  - id: first
    task: cli.echo@^1
  - id: second
    task: cli.echo@^1
    needs: [nope]
"#;

#[derive(Deserialize)]
struct TextInput {
    text: String,
}

/// `run <id> SUCCEEDED in 1.23s` -> (id, state).
fn summary_line(stdout: &str) -> (String, String) {
    let last = stdout.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    assert!(
        words.len() >= 3 && words[0] == "run",
        "the last line should name the run and its state: {stdout:?}"
    );
    (words[1].to_owned(), words[2].to_owned())
}

const LOGGING_WORKFLOW: &str = r#"
name: cli-logs
steps:
  - id: chatty
    task: cli.logger@^1
  - id: stuck
    task: cli.nobody@^1
    needs: [chatty]
"#;

/// `runs logs` (all at once and following), `runs get`'s outputs and log tail, `queues`, and
/// logs without colour codes when they go to a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_step_logs_and_lists_queues() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = UpProcess::start(dir.path()).await?;
    let server = up.url.as_str();
    let worker = Worker::builder(server)
        .name("cli-logs")
        .task(
            "cli.logger",
            "1.0.0",
            |ctx: TaskContext, _input: Value| async move {
                for i in 1..=3 {
                    ctx.info(format!("line {i}"));
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ctx.info("last line");
                Ok::<_, TaskError>(json!({ "lines": 4 }))
            },
        )
        .build()?;
    let handle = worker.handle();
    let worker_task = tokio::spawn(worker.run_until(std::future::pending()));
    tokio::time::timeout(PATIENCE, handle.wait_for(|s| s.connected))
        .await
        .context("worker never connected")?;
    let path = dir.path().join("logs.yaml");
    std::fs::write(&path, LOGGING_WORKFLOW)?;
    let path = path.display().to_string();
    let submitted = dagmesh(&["--server", server, "-o", "json", "submit", &path])
        .await?
        .ok()
        .json();
    let run_id = submitted["run"]["run_id"].as_str().unwrap().to_owned();

    // Following prints the lines as they come, until the run ends (`stuck` keeps it running
    // until it is cancelled below).
    let follow = tokio::spawn({
        let server = server.to_owned();
        let run_id = run_id.clone();
        async move {
            dagmesh(&[
                "--server", &server, "runs", "logs", &run_id, "chatty", "--follow",
            ])
            .await
        }
    });
    // Once `stuck` is queued, chatty is done.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let queues = dagmesh(&["--server", server, "queues"]).await?.ok();
        if queues.stdout.contains("cli.nobody") {
            assert!(queues.stdout.contains("QUEUED"), "{}", queues.stdout);
            let row = queues
                .stdout
                .lines()
                .find(|l| l.contains("cli.nobody"))
                .unwrap();
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(cells[1], "^1", "{row}");
            assert_eq!(cells[3], "1", "one task queued: {row}");
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "cli.nobody never queued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = dagmesh(&["--server", server, "runs", "logs", &run_id])
        .await?
        .ok();
    let lines: Vec<&str> = logs.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", logs.stdout);
    for (line, text) in lines
        .iter()
        .zip(["line 1", "line 2", "line 3", "last line"])
    {
        assert!(
            line.contains("chatty#1") && line.contains("INFO") && line.ends_with(text),
            "{line}"
        );
    }
    let json_logs = dagmesh(&[
        "--server",
        server,
        "-o",
        "json",
        "runs",
        "logs",
        &run_id,
        "--attempt",
        "2",
    ])
    .await?
    .ok();
    assert!(
        json_logs.stdout.is_empty(),
        "attempt 2 never ran: {}",
        json_logs.stdout
    );
    let got = dagmesh(&["--server", server, "runs", "get", &run_id])
        .await?
        .ok();
    assert!(
        got.stdout.contains("Outputs:") && got.stdout.contains(r#"chatty: {"lines":4}"#),
        "{}",
        got.stdout
    );
    assert!(got.stdout.contains("Last 4 log lines:"), "{}", got.stdout);

    // The follower saw the same lines; it stays open while the run is active.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !follow.is_finished(),
        "--follow must keep waiting while the run is active"
    );
    dagmesh(&["--server", server, "runs", "cancel", &run_id])
        .await?
        .ok();
    let followed = tokio::time::timeout(PATIENCE, follow).await???.ok();
    assert_eq!(followed.stdout.lines().count(), 4, "{}", followed.stdout);

    worker_task.abort();
    let log = std::fs::read_to_string(&up.log)?;
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log file: {log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_applies_submits_inspects_and_watches() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = UpProcess::start(dir.path()).await?;
    let server = up.url.as_str();

    let worker = Worker::builder(server)
        .name("cli-worker")
        .instance_id("cli-worker-1")
        .slots(2)
        .task(
            "cli.echo",
            "1.0.0",
            |_ctx: TaskContext, input: TextInput| async move {
                Ok::<_, TaskError>(json!({ "text": input.text }))
            },
        )
        .task(
            "cli.fail",
            "1.0.0",
            |_ctx: TaskContext, _input: Value| async move {
                Err::<Value, _>(TaskError::fatal("disk full"))
            },
        )
        .build()?;
    let handle = worker.handle();
    let worker_task = tokio::spawn(worker.run_until(std::future::pending()));
    tokio::time::timeout(PATIENCE, handle.wait_for(|s| s.connected))
        .await
        .context("worker never connected")?;

    let file = |name: &str, text: &str| -> anyhow::Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    };
    let ok = file("ok.yaml", OK_WORKFLOW)?;
    let failing = file("fail.yaml", FAILING_WORKFLOW)?;
    let invalid = file("bad.yaml", INVALID_WORKFLOW)?;

    // Applying the same file twice keeps version 1.
    let applied = dagmesh(&["--server", server, "workflows", "apply", &ok])
        .await?
        .ok();
    assert_eq!(applied.stdout.trim(), "workflow cli-ok version 1 created");
    let again = dagmesh(&["--server", server, "workflows", "apply", &ok])
        .await?
        .ok();
    assert_eq!(again.stdout.trim(), "workflow cli-ok version 1 unchanged");

    // --wait: exit 0 and a summary for a run that succeeds...
    let waited = dagmesh(&["--server", server, "submit", &ok, "--wait"])
        .await?
        .ok();
    let (ok_run, state) = summary_line(&waited.stdout);
    assert_eq!(state, "SUCCEEDED", "{waited:#?}");

    // ...non-zero and the step's error for one that fails.
    let failed = dagmesh(&["--server", server, "submit", &failing, "--wait"]).await?;
    assert_eq!(failed.code, Some(1), "a failed run exits 1: {failed:#?}");
    let (failed_run, state) = summary_line(&failed.stdout);
    assert_eq!(state, "FAILED", "{failed:#?}");
    assert!(
        failed.stdout.contains("disk full"),
        "the summary should say why: {failed:#?}"
    );

    // An invalid file is refused before anything runs, naming the field.
    let refused = dagmesh(&["--server", server, "submit", &invalid]).await?;
    assert_eq!(
        refused.code,
        Some(2),
        "an invalid workflow exits 2: {refused:#?}"
    );
    assert!(
        refused
            .stderr
            .contains(r#"steps[1].needs[0]: unknown step "nope""#),
        "the error should name the field path: {refused:#?}"
    );

    // runs get -o json: the run, its state and every step's outputs.
    let got = dagmesh(&["--server", server, "runs", "get", &ok_run, "-o", "json"])
        .await?
        .ok();
    let run = got.json();
    assert_eq!(run["run_id"], json!(ok_run));
    assert_eq!(run["state"], json!("RUN_STATE_SUCCEEDED"));
    assert_eq!(run["workflow"], json!("cli-ok"));
    let second = run["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["step_id"] == json!("second")))
        .unwrap_or_else(|| panic!("no step second in {run:#}"));
    assert_eq!(second["outputs"]["text"], json!("hello again"));
    assert_eq!(second["worker"], json!("cli-worker-1"));

    // runs list -o json: both runs, newest first, with their states.
    let listed = dagmesh(&["--server", server, "runs", "list", "-o", "json"])
        .await?
        .ok();
    let runs = listed.json();
    let states: Vec<(String, String)> = runs["runs"]
        .as_array()
        .context("runs list -o json has no runs array")?
        .iter()
        .map(|r| {
            (
                r["run_id"].as_str().unwrap_or_default().to_owned(),
                r["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (failed_run.clone(), "RUN_STATE_FAILED".to_owned()),
            (ok_run.clone(), "RUN_STATE_SUCCEEDED".to_owned()),
        ],
        "{listed:#?}"
    );

    // workers list: the on-call engineer sees the worker by its name, its SDK, what it serves
    // and that it is ready — on a line that fits a terminal; `--wide` adds the full instance id.
    let workers = dagmesh(&["--server", server, "workers", "list"])
        .await?
        .ok();
    let row = workers
        .stdout
        .lines()
        .find(|line| line.starts_with("cli-worker "))
        .unwrap_or_else(|| panic!("no row for cli-worker: {workers:#?}"));
    assert!(
        row.contains("cli.echo@1.0.0") && row.contains(" rust ") && row.contains(" ready "),
        "row: {row}"
    );
    assert!(
        workers
            .stdout
            .lines()
            .all(|line| line.chars().count() <= 120),
        "{}",
        workers.stdout
    );
    let wide = dagmesh(&["--server", server, "workers", "list", "--wide"])
        .await?
        .ok();
    assert!(wide.stdout.contains(" cli-worker-1 "), "{wide:#?}");

    // --watch into a pipe: plain lines, one per change, and a final summary line.
    let watched = dagmesh(&["--server", server, "submit", &ok, "--watch"])
        .await?
        .ok();
    assert!(
        !watched.stdout.contains('\u{1b}'),
        "no terminal codes in a pipe: {watched:#?}"
    );
    let (watched_run, state) = summary_line(&watched.stdout);
    assert_eq!(state, "SUCCEEDED", "{watched:#?}");
    assert_ne!(
        watched_run, ok_run,
        "a second submit without a key is a new run"
    );
    for step_id in ["first", "second"] {
        assert!(
            watched
                .stdout
                .lines()
                .any(|line| line.contains(&format!(" {step_id} SUCCEEDED"))),
            "no line says {step_id} succeeded: {watched:#?}"
        );
    }

    handle.drain();
    tokio::time::timeout(PATIENCE, worker_task).await???;
    drop(up);
    Ok(())
}

const WAITS_WORKFLOW: &str = r#"
name: cli-waits
inputs:
  n: {type: int, default: 3}
  who: {type: string}
steps:
  - id: review
    approval: {message: "Go ahead?"}
  - id: each
    needs: [review]
    task: cli.echo@^1
    for_each: "[1, 2, 3].filter(x, x <= inputs.n)"
    inputs: {text: "'item ' + string(item)"}
"#;

/// Declared inputs refused by `submit`, an approval given with `runs approve`, a suspended run
/// shown by `runs get`, a map counted by `runs get` — through the binary, as a user would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_checks_inputs_approves_suspends_and_counts_map_items() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = UpProcess::start(dir.path()).await?;
    let server = up.url.as_str();
    let worker = Worker::builder(server)
        .name("cli-waits-worker")
        .task(
            "cli.echo",
            "1.0.0",
            |_ctx: TaskContext, input: TextInput| async move {
                Ok::<_, TaskError>(json!({ "text": input.text }))
            },
        )
        .build()?;
    let handle = worker.handle();
    let worker_task = tokio::spawn(worker.run());
    let file = dir.path().join("waits.yaml");
    std::fs::write(&file, WAITS_WORKFLOW)?;
    let file = file.to_str().context("path")?;

    let refused = dagmesh(&["--server", server, "submit", file, "-i", "n=many"]).await?;
    assert_ne!(refused.code, Some(0), "{refused:#?}");
    for expected in [
        "inputs.n: the string \"many\" is not of type int",
        "inputs.who: required input of type string is missing",
    ] {
        assert!(
            refused.stderr.contains(expected),
            "{expected:?}: {refused:#?}"
        );
    }

    let submitted = dagmesh(&[
        "--server", server, "-o", "json", "submit", file, "-i", "who=me",
    ])
    .await?
    .ok()
    .json();
    let run_id = submitted["run"]["run_id"]
        .as_str()
        .context("run_id")?
        .to_owned();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let shown = dagmesh(&["--server", server, "runs", "get", &run_id])
            .await?
            .ok();
        if shown.stdout.contains("waiting for approval: Go ahead?") {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never waited: {shown:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let suspended = dagmesh(&[
        "--server", server, "runs", "suspend", &run_id, "--reason", "lunch",
    ])
    .await?
    .ok();
    assert!(suspended.stdout.contains("suspended"), "{suspended:#?}");
    let shown = dagmesh(&["--server", server, "runs", "get", &run_id])
        .await?
        .ok();
    assert!(shown.stdout.contains("RUNNING (suspended"), "{shown:#?}");
    dagmesh(&["--server", server, "runs", "resume", &run_id])
        .await?
        .ok();

    let approved = dagmesh(&[
        "--server",
        server,
        "runs",
        "approve",
        &run_id,
        "review",
        "-i",
        "ticket=7",
        "--comment",
        "fine",
    ])
    .await?
    .ok();
    assert!(
        approved.stdout.contains("step review approved"),
        "{approved:#?}"
    );
    let waited = dagmesh(&["--server", server, "runs", "watch", &run_id]).await?;
    let (_, state) = summary_line(&waited.stdout);
    assert_eq!(state, "SUCCEEDED", "{waited:#?}");
    let shown = dagmesh(&["--server", server, "runs", "get", &run_id])
        .await?
        .ok();
    assert!(shown.stdout.contains("▸ 3/3 done"), "{shown:#?}");
    assert!(
        !shown.stdout.contains("each[0]"),
        "items are counted, not listed: {shown:#?}"
    );
    let listed = dagmesh(&["--server", server, "runs", "get", &run_id, "--items"])
        .await?
        .ok();
    assert!(listed.stdout.contains("each[2]"), "{listed:#?}");
    let json = dagmesh(&["--server", server, "-o", "json", "runs", "get", &run_id])
        .await?
        .ok()
        .json();
    let review = json["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["step_id"] == "review"))
        .context("review")?;
    assert_eq!(
        review["outputs"],
        json!({"ticket": 7, "approved_by": "anonymous", "comment": "fine"})
    );

    // A second approval is refused, naming why.
    let again = dagmesh(&["--server", server, "runs", "deny", &run_id, "review"]).await?;
    assert_ne!(again.code, Some(0));
    assert!(again.stderr.contains("not active"), "{again:#?}");
    handle.drain();
    tokio::time::timeout(PATIENCE, worker_task).await???;
    drop(up);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_demo_runs_room_scan_to_success() -> anyhow::Result<()> {
    let demo = dagmesh(&["demo", "--pace-ms", "0"]).await?;
    assert_eq!(demo.code, Some(0), "dagmesh demo failed: {demo:#?}");
    let (_, state) = summary_line(&demo.stdout);
    assert_eq!(state, "SUCCEEDED", "{demo:#?}");
    // `features` maps over the 12 fetched photos: one item per photo.
    let items: Vec<String> = (0..12).map(|i| format!("features[{i}]")).collect();
    // `reconstruct` is the child workflow room-mesh (mesh and thumbnails).
    let mut steps = vec!["fetch", "features", "reconstruct", "notify"];
    steps.extend(items.iter().map(String::as_str));
    for step_id in steps {
        assert!(
            demo.stdout
                .lines()
                .any(|line| line.contains(&format!(" {step_id} SUCCEEDED"))),
            "the demo never showed {step_id} succeed: {demo:#?}"
        );
    }
    Ok(())
}

/// `dagmesh demo polyglot` with workers prepared by `scripts/test.sh` (the Python venv and the
/// C++ build); without them the demo would first install and compile them, too slow for a test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_polyglot_demo_runs_across_three_languages() -> anyhow::Result<()> {
    let prepared = ["DAGMESH_PYTHON", "DAGMESH_CPP_CONFORMANCE_WORKER"]
        .iter()
        .all(|var| std::env::var_os(var).is_some());
    if !prepared {
        anyhow::ensure!(
            std::env::var_os("CI").is_none(),
            "CI must prepare the Python and C++ workers (scripts/test.sh)"
        );
        eprintln!("skipping: the Python and C++ workers are not prepared (run scripts/test.sh)");
        return Ok(());
    }
    // Three worker processes start cold (a Python interpreter importing grpc among them): on a
    // loaded 2-core CI machine that once took longer than the usual bound.
    let demo = dagmesh_within(&["demo", "polyglot"], Duration::from_secs(90)).await?;
    assert_eq!(
        demo.code,
        Some(0),
        "dagmesh demo polyglot failed: {demo:#?}"
    );
    let (_, state) = summary_line(&demo.stdout);
    assert_eq!(state, "SUCCEEDED", "{demo:#?}");
    for (step_id, worker) in [
        ("plan", "polyglot-rust"),
        ("smooth", "polyglot-cpp"),
        ("report", "polyglot-python"),
        ("publish", "polyglot-rust"),
    ] {
        assert!(
            demo.stdout
                .lines()
                .any(|line| line.contains(&format!(" {step_id} ")) && line.contains(worker)),
            "{step_id} did not run on {worker}: {demo:#?}"
        );
    }
    assert!(
        demo.stderr.contains("(written in Python) (by Rust)"),
        "the published line went through all three languages: {demo:#?}"
    );
    Ok(())
}

const CHILD_WORKFLOW: &str = r#"
name: cli-child
inputs:
  text: {type: string}
steps:
  - {id: echo, task: cli.echo@^1, inputs: {text: inputs.text}, cache: {ttl: 1h}}
"#;

const PARENT_WORKFLOW: &str = r#"
name: cli-parent
inputs:
  word: {type: string}
steps:
  - {id: first, task: cli.echo@^1, inputs: {text: inputs.word}}
  - {id: inner, workflow: cli-child, needs: [first], inputs: {text: "first.text + '!'"}}
"#;

/// A child workflow, a memoized resubmit and the step cache as a user sees them in the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_shows_child_runs_and_reused_steps() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = UpProcess::start(dir.path()).await?;
    let server = up.url.as_str();
    let worker = Worker::builder(server)
        .name("cli-child-worker")
        .task(
            "cli.echo",
            "1.0.0",
            |_ctx: TaskContext, input: TextInput| async move {
                Ok::<_, TaskError>(json!({ "text": input.text }))
            },
        )
        .build()?;
    let handle = worker.handle();
    let worker_task = tokio::spawn(worker.run());
    let write = |name: &str, text: &str| -> anyhow::Result<String> {
        let file = dir.path().join(name);
        std::fs::write(&file, text)?;
        Ok(file.to_str().context("path")?.to_owned())
    };
    let (child, parent) = (
        write("child.yaml", CHILD_WORKFLOW)?,
        write("parent.yaml", PARENT_WORKFLOW)?,
    );
    dagmesh(&["--server", server, "workflows", "apply", &child])
        .await?
        .ok();
    let first = dagmesh(&[
        "--server", server, "submit", &parent, "-i", "word=hi", "--wait",
    ])
    .await?
    .ok();
    let (run_id, state) = summary_line(&first.stdout);
    assert_eq!(state, "SUCCEEDED", "{first:#?}");

    let shown = dagmesh(&["--server", server, "-o", "json", "runs", "get", &run_id])
        .await?
        .ok()
        .json();
    let inner = &shown["steps"][1];
    assert_eq!(inner["outputs"]["echo"]["text"], json!("hi!"));
    let child_id = inner["child_run_id"].as_str().context("child")?.to_owned();
    let text = dagmesh(&["--server", server, "runs", "get", &run_id])
        .await?
        .ok();
    assert!(
        text.stdout.contains(&format!("child run {child_id}")),
        "{text:#?}"
    );
    let child_text = dagmesh(&["--server", server, "runs", "get", &child_id])
        .await?
        .ok();
    assert!(
        child_text.stdout.contains(&format!(
            "Parent:          run {run_id} (step inner; depth 1)"
        )),
        "{child_text:#?}"
    );

    // Resubmitted with --memoized: both steps reuse the first run's outputs.
    let again = dagmesh(&[
        "--server",
        server,
        "runs",
        "resubmit",
        &run_id,
        "--memoized",
    ])
    .await?
    .ok();
    let new_id = again.stdout.trim().to_owned();
    let done = dagmesh(&["--server", server, "runs", "watch", &new_id])
        .await?
        .ok();
    for step in ["first", "inner"] {
        assert!(
            done.stdout
                .lines()
                .any(|line| line.contains(&format!(" {step} SUCCEEDED"))
                    && line.contains(&format!("reused_from={run_id}"))),
            "{step}: {done:#?}"
        );
    }
    // A plain resubmit runs `first` again, and the child's memoized `echo` is a cache hit.
    let plain = dagmesh(&["--server", server, "runs", "resubmit", &run_id, "--watch"])
        .await?
        .ok();
    assert!(
        !plain
            .stdout
            .contains("first SUCCEEDED attempt=1 reused_from"),
        "{plain:#?}"
    );
    let (plain_id, _) = summary_line(&plain.stdout);
    let plain_run = dagmesh(&["--server", server, "-o", "json", "runs", "get", &plain_id])
        .await?
        .ok()
        .json();
    let new_child = plain_run["steps"][1]["child_run_id"]
        .as_str()
        .context("child")?;
    let new_child = dagmesh(&["--server", server, "-o", "json", "runs", "get", new_child])
        .await?
        .ok()
        .json();
    assert_eq!(new_child["steps"][0]["cached_from"], json!(child_id));

    // A child cannot be retried on its own.
    let refused = dagmesh(&["--server", server, "runs", "retry", &child_id]).await?;
    assert_ne!(refused.code, Some(0));
    assert!(refused.stderr.contains("retry the parent"), "{refused:#?}");
    handle.drain();
    tokio::time::timeout(PATIENCE, worker_task).await???;
    drop(up);
    Ok(())
}

/// The newcomer's rough edges: `health --wait` for scripts, one `--server` in the help of
/// client commands only, every error starting with `error:`, a cron error naming its field,
/// and a backfill's `get` in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_like_a_finished_tool() -> anyhow::Result<()> {
    // Nothing listens yet: health fails after its wait, naming the server.
    let port = free_port()?;
    let server = format!("http://127.0.0.1:{port}");
    let down = dagmesh(&["--server", &server, "health", "--wait", "300ms"]).await?;
    assert_eq!(down.code, Some(1), "{down:#?}");
    assert!(
        down.stderr
            .starts_with(&format!("error: cannot reach dagmesh server at {server}")),
        "{down:#?}"
    );

    // A wait too long for the clock is refused, naming the limit, not a panic.
    for args in [
        &["health", "--wait", "580000000000years"][..],
        &["executor", "--startup-timeout", "580000000000years"][..],
    ] {
        let refused = dagmesh(args).await?;
        assert_eq!(refused.code, Some(2), "{refused:#?}");
        assert!(
            refused.stderr.contains("longer than the limit of 24h"),
            "{refused:#?}"
        );
    }

    // Servers take --listen (and the scheduler --executor), not the client's --server.
    let help = dagmesh(&["scheduler", "--help"]).await?.ok();
    assert!(help.stdout.contains("--executor"), "{help:#?}");
    assert!(!help.stdout.contains("--server"), "{help:#?}");
    let client_help = dagmesh(&["runs", "list", "--help"]).await?.ok();
    assert!(client_help.stdout.contains("--server"), "{client_help:#?}");
    let refused = dagmesh(&["up", "--server", "http://x:1"]).await?;
    assert_eq!(refused.code, Some(2), "{refused:#?}");
    assert!(
        refused.stderr.contains("servers take --listen"),
        "{refused:#?}"
    );

    let dir = tempfile::tempdir()?;
    let up = UpProcess::start(dir.path()).await?;
    let server = up.url.as_str();
    let ok = dagmesh(&["--server", server, "health", "--wait", "5s"])
        .await?
        .ok();
    assert_eq!(ok.stdout, format!("{server} is serving\n"));

    // A refusal of the server (INVALID_ARGUMENT, several lines) and a local one read alike.
    let flow = dir.path().join("flow.yaml");
    std::fs::write(
        &flow,
        "name: flow\ninputs: { n: { type: int } }\nsteps:\n  - { id: a, task: t@^1 }\n",
    )?;
    let remote = dagmesh(&["--server", server, "submit", &flow.display().to_string()]).await?;
    assert_eq!(remote.code, Some(2), "{remote:#?}");
    assert!(
        remote.stderr.starts_with("error: the inputs do not match")
            && remote.stderr.contains("\ninputs.n: required input"),
        "{remote:#?}"
    );
    std::fs::write(
        &flow,
        "name: flow\nsteps:\n  - { id: a, task: t@^1, needs: [b] }\n",
    )?;
    let local = dagmesh(&["--server", server, "submit", &flow.display().to_string()]).await?;
    assert_eq!(local.code, Some(2), "{local:#?}");
    assert!(
        local.stderr.starts_with("error: steps[0].needs[0]"),
        "{local:#?}"
    );

    // A cron out of range names the field and its range.
    std::fs::write(&flow, "name: flow\nsteps:\n  - { id: a, task: t@^1 }\n")?;
    dagmesh(&[
        "--server",
        server,
        "workflows",
        "apply",
        &flow.display().to_string(),
    ])
    .await?
    .ok();
    let cron = dagmesh(&[
        "--server",
        server,
        "schedules",
        "create",
        "bad",
        "--cron",
        "0 25 * * *",
        "--workflow",
        "flow",
    ])
    .await?;
    assert_eq!(cron.code, Some(2), "{cron:#?}");
    assert_eq!(
        cron.stderr, "error: cron: field 2 (hour) is \"25\": 25 is outside 0-23\n",
        "{cron:#?}"
    );

    // backfill create prints the id (for scripts), get the backfill in full.
    let created = dagmesh(&[
        "--server",
        server,
        "backfill",
        "create",
        "flow",
        "--start",
        "2026-10-01T00:00:00Z",
        "--end",
        "2026-10-03T00:00:00Z",
        "--partition",
        "daily",
    ])
    .await?
    .ok();
    let id = created.stdout.trim();
    assert_eq!(id.len(), 36, "{created:#?}");
    let got = dagmesh(&["--server", server, "backfill", "get", id])
        .await?
        .ok();
    for expected in [
        format!("Backfill:     {id}\n"),
        "Range:        2026-10-01T00:00:00Z to 2026-10-03T00:00:00Z (2 daily partitions, UTC)\n"
            .to_owned(),
        "Concurrency:  one run at a time\n".to_owned(),
    ] {
        assert!(got.stdout.contains(&expected), "{expected}: {got:#?}");
    }
    Ok(())
}

/// `bench --slots` takes what a worker may announce: past the executor's limit it is refused at
/// once, naming the range, instead of a worker that is never let in and a bench that waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_slots_outside_the_executor_limit_are_refused() -> anyhow::Result<()> {
    for slots in ["0", "10001", "4294967295"] {
        let ran = dagmesh(&["bench", "fanout", "--size", "5", "--slots", slots]).await?;
        assert_eq!(ran.code, Some(2), "--slots {slots}: {ran:#?}");
        assert!(
            ran.stderr.contains("--slots") && ran.stderr.contains("1..=10000"),
            "--slots {slots}: {ran:#?}"
        );
    }
    let ran = dagmesh(&[
        "bench", "fanout", "--size", "5", "--repeat", "1", "--slots", "3", "-o", "json",
    ])
    .await?
    .ok();
    assert_eq!(ran.json()["steps"], 6, "{ran:#?}");
    Ok(())
}

/// `bench chain --worker-command` runs the chain on another worker program (here the Rust
/// conformance worker), as it would an SDK's, and a program that cannot start is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_chain_runs_on_an_external_worker_program() -> anyhow::Result<()> {
    let worker = env!("CARGO_BIN_EXE_dagmesh-conformance-worker");
    let ran = dagmesh(&[
        "bench",
        "chain",
        "--size",
        "5",
        "--repeat",
        "1",
        "--worker-command",
        worker,
        "--task",
        "conformance.echo@^1",
        "-o",
        "json",
    ])
    .await?
    .ok();
    let report = ran.json();
    assert_eq!(report["scenario"], "chain", "{report}");
    assert_eq!(report["steps"], 5, "{report}");
    assert!(
        report["per_step_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{report}"
    );

    let ran = dagmesh(&[
        "bench",
        "chain",
        "--worker-command",
        "/nonexistent/worker",
        "-o",
        "json",
    ])
    .await?;
    assert_ne!(ran.code, Some(0), "{ran:#?}");
    assert!(ran.stderr.contains("/nonexistent/worker"), "{ran:#?}");
    Ok(())
}

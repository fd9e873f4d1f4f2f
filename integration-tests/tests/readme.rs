//! The README's shell examples, run as a newcomer would: every ```sh block of README.md, in
//! order, in one bash shell (`set -e`: any failing command fails the test), in an empty
//! directory that holds only `examples/` — the server and the workers are the ones the README
//! itself starts in the background. Afterwards every run must have ended the way the README
//! says: succeeded, cancelled by a README command, or failed by its `runs deny`.
//!
//! Three things differ from a user's shell, each checked to still be in the README so a change
//! there fails here instead of silently running something else:
//! - the release build line is skipped (the suite already built the debug binaries, and a second
//!   profile would double CI's build time), and `$PWD/target/release` is the debug directory;
//! - the server listens on a free port instead of 7070, which a developer's own `dagmesh up`
//!   may hold (`DAGMESH_LISTEN`/`DAGMESH_SERVER`, and `127.0.0.1:7070` in the grpcurl lines).
//!
//! A block preceded by `<!-- README test: not run here; ... -->` is skipped; the comment says
//! which other test covers it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use dagmesh_integration_tests::{dagmesh_binary, free_port};
use serde_json::Value;

const BUILD_LINE: &str = "cargo build --release -p dagmesh -p dagmesh-example-room-scan";
const RELEASE_DIR: &str = "$PWD/target/release";
const README_ADDR: &str = "127.0.0.1:7070";
const SKIP_MARK: &str = "<!-- README test: not run here";
/// The whole README, the room-scan run, a week of backfill and pip installing grpcurl.
const TIMEOUT: Duration = Duration::from_secs(600);

/// A shell block of the README and the line its code starts on.
struct Block {
    line: usize,
    code: String,
}

fn shell_blocks(readme: &str) -> anyhow::Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines().enumerate();
    let mut previous = "";
    while let Some((index, line)) = lines.next() {
        if line.trim() == "```sh" {
            let mut code = String::new();
            loop {
                let (_, line) = lines
                    .next()
                    .with_context(|| format!("README.md:{}: unclosed ```sh block", index + 1))?;
                if line.trim() == "```" {
                    break;
                }
                code.push_str(line);
                code.push('\n');
            }
            if !previous.trim_start().starts_with(SKIP_MARK) {
                blocks.push(Block {
                    line: index + 2,
                    code,
                });
            }
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    Ok(blocks)
}

/// The blocks as one script, with the substitutions of the module comment.
fn script(blocks: &[Block], debug_dir: &Path, port: u16) -> anyhow::Result<String> {
    let all: String = blocks.iter().map(|b| b.code.as_str()).collect();
    for needle in [BUILD_LINE, RELEASE_DIR, README_ADDR] {
        ensure!(
            all.contains(needle),
            "the README no longer contains `{needle}`: update integration-tests/tests/readme.rs"
        );
    }
    let mut script = String::from("set -eo pipefail\n");
    for block in blocks {
        let code = block
            .code
            .replace(BUILD_LINE, ": built by the test suite")
            .replace(RELEASE_DIR, &debug_dir.display().to_string())
            .replace(README_ADDR, &format!("127.0.0.1:{port}"));
        script.push_str(&format!(
            "echo '>>> README.md line {}' >&2\nset -x\n{code}set +x\n",
            block.line
        ));
    }
    // Let what the README started finish, then record how every run ended.
    script.push_str(
        "for _ in $(seq 1 600); do\n\
         \x20 [ -z \"$(dagmesh runs list --state running -o json | grep run_id)\" ] \
         && [ -z \"$(dagmesh runs list --state queued -o json | grep run_id)\" ] && break\n\
         \x20 sleep 0.2\n\
         done\n\
         dagmesh runs list --limit 1000 -o json > runs.json\n",
    );
    Ok(script)
}

/// Builds a binary of another package of the workspace (cargo does not for this test).
fn build_binary(package: &str, bin: &str) -> anyhow::Result<()> {
    let status = dagmesh_integration_tests::cargo()
        .args(["build", "-p", package, "--bin", bin])
        .status()?;
    ensure!(status.success(), "cargo build -p {package} failed");
    Ok(())
}

/// Signals every process the script started (it leads its own process group).
fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn every_shell_block_of_the_readme_runs_as_written() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let blocks = shell_blocks(&readme)?;
    ensure!(
        blocks.len() >= 4,
        "only {} shell blocks found",
        blocks.len()
    );

    let debug_dir = dagmesh_binary()?
        .parent()
        .context("binary directory")?
        .to_owned();
    build_binary("dagmesh-example-room-scan", "room-scan-worker")?;
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink(root.join("examples"), dir.path().join("examples"))?;
    let script_path = dir.path().join("readme.sh");
    std::fs::write(&script_path, script(&blocks, &debug_dir, port)?)?;
    let log_path = dir.path().join("readme.log");
    let log = std::fs::File::create(&log_path)?;

    let mut command = Command::new("bash");
    command
        .arg(&script_path)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DAGMESH_") {
            command.env_remove(key);
        }
    }
    command
        .env("DAGMESH_LISTEN", format!("127.0.0.1:{port}"))
        .env("DAGMESH_SERVER", format!("http://127.0.0.1:{port}"))
        .env("NO_COLOR", "1");
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().context("starting bash")?;
    let pgid = child.id();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The server and the workers the README started in the background.
    signal_group(pgid, "-TERM");
    std::thread::sleep(Duration::from_millis(500));
    signal_group(pgid, "-KILL");
    let _ = child.wait();
    let context = || {
        format!(
            "--- end of the README's output:\n{}\n--- dagmesh.log:\n{}\n--- worker.log:\n{}",
            tail(&log_path, 60),
            tail(&dir.path().join("dagmesh.log"), 20),
            tail(&dir.path().join("worker.log"), 10)
        )
    };
    match status {
        None => bail!("the README did not finish in {TIMEOUT:?}\n{}", context()),
        Some(status) if !status.success() => {
            bail!("a README command failed ({status})\n{}", context())
        }
        Some(_) => {}
    }

    let runs: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs.json")).with_context(context)?,
    )?;
    let runs = runs["runs"].as_array().context("runs.json has no runs")?;
    // Using it (room-scan and its child), waits (2), a trigger, a week of backfill, grpcurl (2).
    ensure!(runs.len() >= 12, "only {} runs\n{}", runs.len(), context());
    for run in runs {
        let state = run["state"].as_str().unwrap_or_default();
        let state = state.trim_start_matches("RUN_STATE_");
        let error = run["error"].as_str().unwrap_or_default();
        let expected = match state {
            "SUCCEEDED" | "CANCELLED" => true,
            "FAILED" => error.contains("denied by"),
            _ => false,
        };
        ensure!(
            expected,
            "run {} of {} ended {state}: {error}\n{}",
            run["run_id"],
            run["workflow"],
            context()
        );
    }
    Ok(())
}

#[test]
fn skipped_blocks_say_so_and_the_rest_are_found() {
    let readme = "a\n\n<!-- README test: not run here; x -->\n```sh\nskipped\n```\n\n```sh\nrun 1\nrun 2\n```\n";
    let blocks = shell_blocks(readme).expect("parses");
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].code, "run 1\nrun 2\n");
    assert_eq!(blocks[0].line, 9);
}

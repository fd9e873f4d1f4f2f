//! `dagmesh demo polyglot`: one run whose steps run on Rust, Python and C++ workers, each its
//! own child process: plan (Rust) → smooth a mesh (the C++ GPU tool, on its CPU path when there
//! is no GPU) → report (Python) → publish (Rust).
//!
//! It prepares what it needs first: a Python virtual environment with `./sdk/python`
//! (`.venv-python/`), and a CMake build of `examples/cpp-gpu-tool` against the system's gRPC
//! (Debian: `libgrpc++-dev protobuf-compiler-grpc cmake nlohmann-json3-dev`, installed with
//! apt-get when running as root).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dagmesh_proto::v1::RunState;
use dagmesh_runtime::telemetry;
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::commands::{self, Global};
use crate::mesh::{Mesh, MeshOptions, MeshSecurity};
use crate::serve::EngineFlags;
use dagmesh_proto::connect::ClientSettings;

const WORKFLOW: &str = include_str!("../../../examples/polyglot/workflow.yaml");
const APT_PACKAGES: &[&str] = &[
    "libgrpc++-dev",
    "protobuf-compiler-grpc",
    "cmake",
    "nlohmann-json3-dev",
    "pkg-config",
];

#[derive(clap::Args, Debug)]
pub struct PolyglotArgs {
    /// The dagmesh source tree (for sdk/python, examples/cpp-gpu-tool and examples/polyglot).
    #[arg(long, env = "DAGMESH_REPO", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    pub repo: PathBuf,
    /// Address to serve on while the demo runs (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[command(flatten)]
    pub engine: EngineFlags,
}

pub async fn run(global: &Global, args: PolyglotArgs) -> anyhow::Result<ExitCode> {
    let _telemetry = telemetry::init_with("dagmesh-demo", "warn");
    let repo = args
        .repo
        .canonicalize()
        .with_context(|| format!("source tree {} not found (set --repo)", args.repo.display()))?;
    let python = prepare_python(&repo).await?;
    let cpp_worker = prepare_cpp(&repo).await?;

    let scratch = tempfile::tempdir()?;
    let database_url = format!("sqlite://{}", scratch.path().join("polyglot.db").display());
    let mesh = Mesh::start(MeshOptions {
        listen: args.listen,
        database_url,
        executor: args.engine.config()?,
        security: MeshSecurity {
            auth: true,
            admin_token_file: Some(scratch.path().join(crate::security::ADMIN_TOKEN_FILE)),
            ..MeshSecurity::default()
        },
    })
    .await?;
    let url = mesh.url();
    eprintln!("polyglot: mesh serving on {url}");
    // Every worker process gets the token the way the SDKs document it: DAGMESH_TOKEN.
    let token = mesh.admin_token().unwrap_or_default().to_owned();
    let settings = ClientSettings::default().with_token(token.clone());

    let rust = std::env::current_exe()?;
    let mut children = vec![
        spawn(
            "rust",
            Command::new(rust)
                .args(["demo", "polyglot-worker", "--server", &url])
                .env("DAGMESH_TOKEN", &token),
        )?,
        spawn(
            "python",
            Command::new(&python)
                .arg(repo.join("examples/polyglot/report_worker.py"))
                .args(["--server", &url])
                .env("DAGMESH_TOKEN", &token),
        )?,
        spawn(
            "c++",
            Command::new(&cpp_worker)
                .args(["--server", &url, "--name", "polyglot-cpp"])
                .env("DAGMESH_TOKEN", &token),
        )?,
    ];
    wait_for_workers(&mesh, &mut children).await?;
    eprintln!(
        "polyglot: workers connected: Rust (plan, publish), C++ (mesh.smooth), Python (report)"
    );

    let spec = dagmesh_spec::parse_workflow(WORKFLOW, dagmesh_spec::Format::Yaml)
        .map_err(|errors| anyhow::anyhow!("polyglot workflow is invalid:\n{errors}"))?;
    let client = Client::connect_with(&url, settings.clone()).await?;
    let run = client
        .submit(SubmitRun::inline(spec).inputs(json!({"scan_id": "scan-7", "quality": "high"})))
        .await?;
    let channel = commands::connect_to(&url, &settings).await?;
    let finished = commands::watch::follow(channel, &run.run_id, global.output).await;

    for (_, child) in &mut children {
        terminate(child);
    }
    for (name, child) in &mut children {
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(Ok(status)) if !status.success() => {
                eprintln!("polyglot: {name} worker exited {status}")
            }
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill().await;
            }
        }
    }
    mesh.shutdown().await?;
    let finished = finished?;
    if let Some(publish) = finished.steps.iter().find(|s| s.step_id == "publish")
        && let Some(line) =
            dagmesh_proto::json::from_struct(publish.outputs.as_ref()).get("published")
    {
        eprintln!("polyglot: {}", line.as_str().unwrap_or_default());
    }
    Ok(if finished.state() == RunState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The Rust worker of the demo, started by `run` as a child process (`dagmesh demo polyglot-worker`).
pub async fn rust_worker(server: String) -> anyhow::Result<ExitCode> {
    let _telemetry = telemetry::init_with("dagmesh-demo-worker", "warn");
    Worker::builder(server)
        .name("polyglot-rust")
        .slots(2)
        .task("poly.plan", "1.0.0", plan)
        .task("poly.publish", "1.0.0", publish)
        .build()?
        .run()
        .await?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Deserialize)]
struct PlanInput {
    scan_id: String,
    quality: String,
}

#[derive(Serialize)]
struct PlanOutput {
    rings: u32,
    segments: u32,
    iterations: u32,
    seed: u32,
}

async fn plan(ctx: TaskContext, input: PlanInput) -> Result<PlanOutput, TaskError> {
    let (rings, segments, iterations) = match input.quality.as_str() {
        "draft" => (24, 48, 10),
        "high" => (64, 128, 40),
        other => return Err(TaskError::fatal(format!("unknown quality {other:?}"))),
    };
    ctx.info(format!(
        "planned {rings}x{segments} mesh, {iterations} iterations (in Rust)"
    ));
    Ok(PlanOutput {
        rings,
        segments,
        iterations,
        seed: input.scan_id.bytes().map(u32::from).sum(),
    })
}

#[derive(Deserialize)]
struct PublishInput {
    summary: String,
}

async fn publish(ctx: TaskContext, input: PublishInput) -> Result<serde_json::Value, TaskError> {
    ctx.progress(1.0, "published");
    Ok(json!({ "published": format!("published: {} (by Rust)", input.summary) }))
}

fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<(&'static str, Child)> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {name} worker"))?;
    Ok((name, child))
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

async fn wait_for_workers(mesh: &Mesh, children: &mut [(&str, Child)]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let workers = mesh.executor().list_workers().await?;
        let connected = |name: &str| workers.iter().any(|w| w.connected && w.worker_name == name);
        if ["polyglot-rust", "polyglot-python", "polyglot-cpp"]
            .iter()
            .all(|name| connected(name))
        {
            return Ok(());
        }
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("the {name} worker exited before connecting ({status})");
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("workers did not all connect within 60s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Python interpreter with the dagmesh SDK: `.venv-python`, created and filled when needed.
async fn prepare_python(repo: &Path) -> anyhow::Result<PathBuf> {
    let venv = repo.join(".venv-python");
    let python = venv.join("bin/python");
    if python.exists() && succeeds(Command::new(&python).args(["-c", "import dagmesh"])).await {
        return Ok(python);
    }
    eprintln!(
        "polyglot: installing the Python SDK into {}",
        venv.display()
    );
    if !python.exists() {
        run_step(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        )
        .await?;
    }
    run_step(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(repo.join("sdk/python")),
        "pip install ./sdk/python",
    )
    .await?;
    Ok(python)
}

/// The C++ GPU tool's worker, configured and built with CMake when missing.
async fn prepare_cpp(repo: &Path) -> anyhow::Result<PathBuf> {
    let source = repo.join("examples/cpp-gpu-tool");
    let build = source.join("build");
    let worker = build.join("cpp-gpu-tool-worker");
    if worker.exists() {
        return Ok(worker);
    }
    if !succeeds(Command::new("pkg-config").args(["--exists", "grpc++"])).await
        || !succeeds(Command::new("cmake").arg("--version")).await
    {
        let root = succeeds(Command::new("sh").args(["-c", "[ \"$(id -u)\" = 0 ]"])).await;
        if !root {
            bail!(
                "the C++ worker needs Debian's gRPC packages: sudo apt-get install -y {}",
                APT_PACKAGES.join(" ")
            );
        }
        eprintln!("polyglot: installing {}", APT_PACKAGES.join(" "));
        run_step(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(APT_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )
        .await?;
    }
    eprintln!("polyglot: building examples/cpp-gpu-tool (CMake, first run only)");
    run_step(
        Command::new("cmake")
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .arg("-DCMAKE_BUILD_TYPE=Release"),
        "cmake configure",
    )
    .await?;
    run_step(
        Command::new("cmake").arg("--build").arg(&build).args([
            "-j2",
            "--target",
            "cpp-gpu-tool-worker",
        ]),
        "cmake build",
    )
    .await?;
    Ok(worker)
}

async fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

async fn run_step(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .stdout(Stdio::null())
        .status()
        .await
        .with_context(|| format!("{what}: could not start"))?;
    anyhow::ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

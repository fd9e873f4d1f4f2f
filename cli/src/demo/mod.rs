//! `dagmesh demo`: the room-scan example end to end in one process — the mesh on SQLite, the
//! example's CPU and GPU workers (real gRPC streams over loopback), one run (and the child run
//! it starts), the live tree.
//! `dagmesh demo polyglot` runs one DAG across Rust, Python and C++ worker processes.

mod polyglot;

use std::process::ExitCode;

use dagmesh_proto::v1::RunState;
use dagmesh_runtime::telemetry;
use dagmesh_sdk::{Client, SubmitRun};

use crate::commands::{self, Global};
use crate::mesh::{Mesh, MeshOptions, MeshSecurity};
use crate::serve::EngineFlags;
use dagmesh_proto::connect::ClientSettings;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Milliseconds per unit of example work (slows the run down to watch it; 0 is full speed).
    #[arg(long, default_value_t = 60)]
    pub pace_ms: u64,
    /// Database URL; default: a fresh SQLite file in a temporary directory.
    #[arg(long, env = "DAGMESH_DEMO_DATABASE_URL")]
    pub database: Option<String>,
    /// Address to serve on while the demo runs (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// After the run ends, keep the server and the workers up (for the web console) until
    /// Ctrl-C. This is the default when stderr is a terminal; `--keep=false` ends at once.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub keep: Option<bool>,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(subcommand)]
    pub kind: Option<DemoKind>,
}

#[derive(clap::Subcommand, Debug)]
pub enum DemoKind {
    /// One run across Rust, Python and C++ workers, each a child process.
    Polyglot(polyglot::PolyglotArgs),
    /// The Rust worker of the polyglot demo (started by `demo polyglot`).
    #[command(hide = true)]
    PolyglotWorker {
        #[arg(long)]
        server: String,
    },
}

pub async fn demo(global: &Global, args: DemoArgs) -> anyhow::Result<ExitCode> {
    match args.kind {
        Some(DemoKind::Polyglot(polyglot)) => return polyglot::run(global, polyglot).await,
        Some(DemoKind::PolyglotWorker { server }) => return polyglot::rust_worker(server).await,
        None => {}
    }
    let _telemetry = telemetry::init_with("dagmesh-demo", "warn");
    let scratch = tempfile::tempdir()?;
    let database_url = args
        .database
        .unwrap_or_else(|| format!("sqlite://{}", scratch.path().join("demo.db").display()));
    // Authentication on, as with `dagmesh up`: the demo's workers and its watcher use the admin
    // token it creates in its scratch directory.
    let mesh = Mesh::start(MeshOptions {
        listen: args.listen,
        database_url: database_url.clone(),
        executor: args.engine.config()?,
        security: MeshSecurity {
            auth: true,
            admin_token_file: Some(scratch.path().join(crate::security::ADMIN_TOKEN_FILE)),
            ..MeshSecurity::default()
        },
    })
    .await?;
    let url = mesh.url();
    let token = mesh.admin_token().unwrap_or_default().to_owned();
    let settings = ClientSettings::default().with_token(token.clone());
    eprintln!("dagmesh demo: mesh serving on {url} (database {database_url})");

    let workers = [
        dagmesh_example_room_scan::cpu_worker(&url)
            .token(token.clone())
            .build()?,
        dagmesh_example_room_scan::gpu_worker(&url)
            .token(token.clone())
            .build()?,
    ];
    let handles: Vec<_> = workers.iter().map(|worker| worker.handle()).collect();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|worker| tokio::spawn(worker.run_until(std::future::pending())))
        .collect();
    for handle in &handles {
        handle.wait_for(|state| state.connected).await;
    }
    eprintln!("dagmesh demo: workers connected: room-scan-cpu (4 slots), room-scan-gpu (gpu=true)");

    let parse = |text: &str| {
        dagmesh_spec::parse_workflow(text, dagmesh_spec::Format::Yaml)
            .map_err(|errors| anyhow::anyhow!("example workflow is invalid:\n{errors}"))
    };
    let spec = parse(dagmesh_example_room_scan::WORKFLOW_YAML)?;
    let client = Client::connect_with(&url, settings.clone()).await?;
    // The child workflow that the `reconstruct` step starts.
    client
        .apply_workflow(parse(dagmesh_example_room_scan::MESH_WORKFLOW_YAML)?)
        .await?;
    let run = client
        .submit(
            SubmitRun::inline(spec.clone())
                .inputs(dagmesh_example_room_scan::demo_inputs(args.pace_ms)),
        )
        .await?;
    // A second room whose photos are still uploading: its run fails at once, and retrying it
    // (the console's Retry, or `dagmesh runs retry`) finishes it.
    let mut uploading = dagmesh_example_room_scan::demo_inputs(args.pace_ms);
    uploading["room_id"] = "room-7".into();
    uploading["image_count"] = 4.into();
    uploading["uploads_pending"] = 1.into();
    let uploading = client
        .submit(SubmitRun::inline(spec).inputs(uploading))
        .await?;
    let token = commands::operate::fragment_escape(&token);
    eprintln!(
        "dagmesh demo: watch it in the web console: {url}/#/runs/{}?token={token}",
        run.run_id
    );
    let channel = commands::connect_to(&url, &settings).await?;
    let finished = commands::watch::follow(channel, &run.run_id, global.output).await?;
    let keep = args
        .keep
        .unwrap_or_else(|| std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let uploading = client.wait_for_run(&uploading.run_id).await?;
    eprintln!(
        "dagmesh demo: a second run, of room-7, ended {}: {}",
        uploading
            .state()
            .as_str_name()
            .trim_start_matches("RUN_STATE_"),
        uploading.error,
    );
    if keep {
        eprintln!(
            "dagmesh demo: retry it in the console (the upload is done now): \
             {url}/#/runs/{}?token={token}\n\
             dagmesh demo: the console stays up at {url}/#/runs?token={token}; Ctrl-C to stop",
            uploading.run_id
        );
        dagmesh_runtime::shutdown_signal().await;
    }

    for handle in &handles {
        handle.drain();
    }
    for task in tasks {
        task.await??;
    }
    mesh.shutdown().await?;

    if let Some(notify) = finished.steps.iter().find(|step| step.step_id == "notify")
        && let Some(message) =
            dagmesh_proto::json::from_struct(notify.outputs.as_ref()).get("message")
    {
        eprintln!(
            "dagmesh demo: notify said: {}",
            message.as_str().unwrap_or_default()
        );
    }
    Ok(if finished.state() == RunState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

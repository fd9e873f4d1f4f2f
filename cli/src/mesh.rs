//! The whole mesh in one process: metadata store (SQLite or PostgreSQL), executor and scheduler,
//! wired in-process through the `MetadataStore` and `RunStarter` traits and served on one port.
//! `dagmesh up`, the demo, the benchmarks and the integration tests all start it this way.
//!
//! The metadata store API is *not* on that port: the executor and scheduler call the store
//! in-process, and nobody outside needs (or may have) raw access to the system of record.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use dagmesh_auth::{AuthLayer, Authenticator, TokenApi};
use dagmesh_executor::{ExecError, Executor, ExecutorConfig};
use dagmesh_metastore::MetadataStore;
use dagmesh_runtime::ServeOptions;
use dagmesh_runtime::tls::ServerTls;
use dagmesh_scheduler::grpc::SchedulerGrpcServer;
use dagmesh_scheduler::{ExecutorStarter, Scheduler, SchedulerConfig, SystemClock};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct MeshOptions {
    /// Address to listen on; port 0 picks a free one.
    pub listen: String,
    /// `sqlite://PATH`, `sqlite::memory:` or `postgres://...`.
    pub database_url: String,
    pub executor: ExecutorConfig,
    pub security: MeshSecurity,
}

/// How the mesh's port is protected. The default (no auth, no TLS) is for in-process tests;
/// `dagmesh up` turns authentication on.
#[derive(Clone, Default)]
pub struct MeshSecurity {
    /// Check tokens on every call (stored in this mesh's database).
    pub auth: bool,
    /// A shared secret accepted as the internal principal.
    pub internal_token: Option<String>,
    /// Also accept JWTs of an identity provider.
    pub jwt: Option<dagmesh_auth::jwt::JwtConfig>,
    pub tls: Option<Arc<ServerTls>>,
    /// With `auth`: where the admin token is kept (created on first start).
    pub admin_token_file: Option<PathBuf>,
}

pub struct Mesh {
    addr: SocketAddr,
    executor: Executor,
    scheduler: Scheduler,
    scheduler_task: JoinHandle<()>,
    stop_server: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), dagmesh_runtime::ServeError>>,
    engine: JoinHandle<Result<(), ExecError>>,
    tls: bool,
    admin_token: Option<String>,
    authenticator: Option<Arc<Authenticator>>,
}

impl Mesh {
    pub async fn start(options: MeshOptions) -> anyhow::Result<Self> {
        let store = dagmesh_metastore::connect_sql(&options.database_url)
            .await
            .with_context(|| format!("opening database {}", options.database_url))?;
        crate::security::log_database_tls(&*store).await;
        let store: Arc<dyn MetadataStore> = store;
        // Bind first: a taken port must not leave an engine running against the store.
        let listener = TcpListener::bind(&options.listen)
            .await
            .with_context(|| format!("binding {}", options.listen))?;
        let (executor, engine) = Executor::start(store.clone(), options.executor).await?;
        let addr = listener.local_addr()?;
        let scheduler = Scheduler::new(
            store.clone(),
            Arc::new(ExecutorStarter::new(Arc::new(executor.clone()))),
            Arc::new(SystemClock),
            SchedulerConfig::default(),
        );
        let scheduler_task = scheduler.spawn();
        let security = options.security;
        let authenticator = match security.auth {
            true => Some(Arc::new(crate::security::build_authenticator(
                store.clone(),
                security.internal_token.as_deref(),
                security.jwt.clone(),
            )?)),
            false => None,
        };
        let admin_token = match (&authenticator, &security.admin_token_file) {
            (Some(_), Some(file)) => Some(crate::security::admin_token(&store, file).await?),
            _ => None,
        };
        // One port serves every public service; the store API stays in-process.
        let mut services = executor
            .services()
            .with(SchedulerGrpcServer::new(scheduler.clone()).into_service())
            .with_http(dagmesh_console::router());
        if let Some(authenticator) = &authenticator {
            services = services.with(TokenApi::new(authenticator.clone()).into_service());
        }
        let serve_options = ServeOptions {
            auth: authenticator
                .clone()
                .map_or_else(AuthLayer::disabled, AuthLayer::new),
            tls: security.tls.clone(),
        };
        let (stop_server, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(dagmesh_runtime::serve(
            listener,
            services,
            serve_options,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            addr,
            executor,
            scheduler,
            scheduler_task,
            stop_server: Some(stop_server),
            server,
            engine,
            tls: security.tls.is_some(),
            admin_token,
            authenticator,
        })
    }

    /// The admin token (when authentication is on and an admin token file was given).
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The token checker of this mesh's port (None without authentication).
    pub fn authenticator(&self) -> Option<&Arc<Authenticator>> {
        self.authenticator.as_ref()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (`https://` with TLS), what workers and clients dial.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Resolves if the engine stops on its own (a failed commit): the process should exit.
    pub async fn engine_stopped(&mut self) -> anyhow::Error {
        match (&mut self.engine).await {
            Ok(Ok(())) => anyhow::anyhow!("executor engine stopped"),
            Ok(Err(error)) => anyhow::Error::new(error).context("executor engine stopped"),
            Err(join) => anyhow::anyhow!("executor engine panicked: {join}"),
        }
    }

    /// Stops this mesh's scheduler loop and hands its partitions to the other schedulers of
    /// the database at once; its API keeps answering. For tests that drive schedulers of their
    /// own over the same database.
    pub async fn stop_scheduler(&self) {
        self.scheduler_task.abort();
        self.scheduler.release_partitions().await;
    }

    /// Drains the executor (workers finish what they hold), then stops the server.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        // No new runs from schedules while draining; the loop keeps nothing in memory.
        self.scheduler_task.abort();
        self.scheduler.release_partitions().await;
        self.executor.drain().await;
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        self.server.await??;
        // The engine ends right after the drain and hands the executor lease back on its way
        // out, so a successor starts at once; give it a moment to do so.
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.engine)
            .await
            .is_err()
        {
            self.engine.abort();
        }
        Ok(())
    }

    /// Stops at once without draining, like a crash; for tests.
    pub fn abort(mut self) {
        if let Some(stop) = self.stop_server.take() {
            drop(stop);
        }
        self.scheduler_task.abort();
        self.server.abort();
        self.engine.abort();
    }
}

//! The server commands: `up` (everything in one process), `metastore`, `executor` and
//! `scheduler` (the split mode, talking gRPC to each other).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dagmesh_auth::TokenApi;
use dagmesh_executor::grpc::forward::LeaseHolderRoute;
use dagmesh_executor::{Executor, ExecutorConfig, Limits};
use dagmesh_metastore::MetadataStore;
use dagmesh_metastore::grpc::{MetadataGrpcClient, MetadataGrpcServer};
use dagmesh_proto::connect::ClientSettings;
use dagmesh_runtime::{ServiceSet, serve, shutdown_signal, telemetry};
use dagmesh_scheduler::grpc::SchedulerGrpcServer;
use dagmesh_scheduler::{ExecutorStarter, Scheduler, SchedulerConfig, SystemClock};
use tokio::net::TcpListener;

use crate::mesh::{Mesh, MeshOptions, MeshSecurity};
use crate::security::{ADMIN_TOKEN_FILE, SecurityFlags};

/// Tunables of the executor's engine.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineFlags {
    /// Silence after which a worker is considered lost and its tasks are requeued.
    #[arg(long, env = "DAGMESH_LEASE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// How long a worker whose stream ended keeps its tasks to reconnect and resume them (a
    /// silent worker keeps them for the whole lease).
    #[arg(long, env = "DAGMESH_RECONNECT_GRACE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reconnect_grace: Duration,
    /// Attempts of one step that may be lost to vanished workers before the step fails.
    #[arg(long, env = "DAGMESH_MAX_LOST_ATTEMPTS", default_value_t = 5)]
    pub max_lost_attempts: u32,
    /// TTL of the executor lease in the store: a standby executor takes over this long after
    /// the active one died (a clean shutdown hands over at once).
    #[arg(long, env = "DAGMESH_EXECUTOR_LEASE_TTL", default_value = "6s", value_parser = humantime::parse_duration)]
    pub executor_lease_ttl: Duration,
    /// Refuse to start while another executor drives the database, instead of waiting as a
    /// standby.
    #[arg(long, env = "DAGMESH_NO_STANDBY")]
    pub no_standby: bool,
    /// How many partitions runs hash into, used when the database is first set up (1 to 4096);
    /// afterwards the stored count holds. Far more than executor replicas, so moving one is
    /// cheap.
    #[arg(long, env = "DAGMESH_PARTITIONS", default_value_t = dagmesh_executor::DEFAULT_PARTITIONS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(dagmesh_metastore::MAX_PARTITIONS)))]
    pub partitions: u32,
    /// How often workers send heartbeats.
    #[arg(long, env = "DAGMESH_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Limit of inline payloads (run inputs, step inputs and outputs), in bytes.
    #[arg(long, env = "DAGMESH_MAX_PAYLOAD_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// How long shutdown waits for in-flight tasks before handing them back.
    #[arg(long, env = "DAGMESH_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Concurrency limits (YAML: run admission limits and step resource limits).
    #[arg(long, env = "DAGMESH_LIMITS", value_parser = parse_limits)]
    pub limits: Option<Arc<Limits>>,
    /// File holding the secret that signs webhook deliveries (HMAC-SHA256, the
    /// `webhook-signature` header). `dagmesh up` creates DATA_DIR/webhook-secret when unset;
    /// the executor alone sends unsigned deliveries without one (and warns).
    #[arg(long, env = "DAGMESH_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// How long a webhook delivery is retried after its event before it is given up.
    #[arg(long, env = "DAGMESH_WEBHOOK_RETRY_FOR", default_value = "24h", value_parser = humantime::parse_duration)]
    pub webhook_retry_for: Duration,
    /// Wait before a webhook's second attempt; it doubles per attempt, up to 5 minutes.
    #[arg(long, env = "DAGMESH_WEBHOOK_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub webhook_backoff: Duration,
}

fn parse_limits(path: &str) -> Result<Arc<Limits>, String> {
    Limits::load(std::path::Path::new(path)).map(Arc::new)
}

impl EngineFlags {
    /// The executor's configuration; reads the webhook secret file.
    pub fn config(&self) -> anyhow::Result<ExecutorConfig> {
        let secret = match &self.webhook_secret_file {
            None => None,
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading --webhook-secret-file {}", file.display()))?;
                let text = text.trim();
                anyhow::ensure!(
                    !text.is_empty(),
                    "--webhook-secret-file {} is empty",
                    file.display()
                );
                Some(Arc::from(text.as_bytes()))
            }
        };
        let webhooks = dagmesh_executor::webhooks::WebhookConfig {
            secret,
            retry_for: self.webhook_retry_for,
            first_backoff: self.webhook_backoff,
            max_backoff: Duration::from_secs(300).max(self.webhook_backoff),
            ..Default::default()
        };
        Ok(ExecutorConfig {
            webhooks,
            lease: self.lease,
            reconnect_grace: self.reconnect_grace,
            max_lost_attempts: self.max_lost_attempts,
            executor_lease_ttl: self.executor_lease_ttl,
            standby: !self.no_standby,
            partitions: self.partitions,
            heartbeat_interval: self.heartbeat_interval,
            max_payload_bytes: self.max_payload_bytes,
            drain_timeout: self.drain_timeout,
            limits: self.limits.clone().unwrap_or_default(),
            ..ExecutorConfig::default()
        })
    }
}

/// How a server is observed: its metrics port and its log format.
#[derive(clap::Args, Debug, Clone)]
pub struct ObserveFlags {
    /// Serve Prometheus metrics (OpenMetrics text at /metrics) on this HTTP address, e.g.
    /// 127.0.0.1:9464. Unauthenticated, like every Prometheus endpoint: keep it on a network
    /// only Prometheus reaches. Unset: no metrics are recorded.
    #[arg(long, env = "DAGMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Log lines as `text` (colours only on a terminal, and not with NO_COLOR) or `json` (one
    /// object per line).
    #[arg(long, env = "DAGMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormatArg,
    /// Shadows the client commands' global `--server` (same id, so clap does not add that one
    /// here): servers `--listen`, and help would otherwise offer both. Given anyway, it is
    /// refused, naming the flags that are meant.
    #[arg(long = "server", id = "server", hide = true, value_parser = refuse_server_flag)]
    pub not_for_servers: Option<String>,
}

fn refuse_server_flag(_: &str) -> Result<String, String> {
    Err(
        "servers take --listen (their own address), and the executor and scheduler \
         --metastore / --executor (the services they call); --server is for client commands"
            .to_owned(),
    )
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl ObserveFlags {
    /// Sets the log format, installs logs and traces for `service`, and starts the metrics
    /// server when asked for (it stops with the process).
    async fn start(&self, service: &'static str) -> anyhow::Result<telemetry::Telemetry> {
        telemetry::set_log_format(match self.log_format {
            LogFormatArg::Text => telemetry::LogFormat::Text,
            LogFormatArg::Json => telemetry::LogFormat::Json,
        });
        let telemetry = telemetry::init(service);
        if let Some(listen) = &self.metrics_listen {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding --metrics-listen {listen}"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
            tokio::spawn(async move {
                let never = std::future::pending::<()>();
                if let Err(error) = dagmesh_runtime::metrics::serve(listener, never).await {
                    tracing::error!(%error, "the metrics server stopped");
                }
            });
        }
        Ok(telemetry)
    }
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Address for all services (gRPC).
    #[arg(long, env = "DAGMESH_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Database URL; default: SQLite at DATA_DIR/dagmesh.db.
    #[arg(long, env = "DAGMESH_DATABASE_URL")]
    pub database: Option<String>,
    /// Where the default SQLite database lives.
    #[arg(long, env = "DAGMESH_DATA_DIR", default_value = ".dagmesh")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub security: SecurityFlags,
    #[command(flatten)]
    pub observe: ObserveFlags,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let telemetry = args.observe.start("dagmesh").await?;
    let database_url = args
        .database
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("dagmesh.db").display()));
    check_listen(&args.listen, &args.security).await?;
    let admin_token_file = args.data_dir.join(ADMIN_TOKEN_FILE);
    let mut engine = args.engine.clone();
    if engine.webhook_secret_file.is_none() {
        let file = args.data_dir.join("webhook-secret");
        crate::security::webhook_secret(&file)?;
        engine.webhook_secret_file = Some(file);
    }
    let mut mesh = Mesh::start(MeshOptions {
        listen: args.listen,
        database_url: database_url.clone(),
        executor: engine.config()?,
        security: MeshSecurity {
            auth: !args.security.no_auth,
            internal_token: args.security.internal_token.clone(),
            jwt: args.security.jwt(),
            tls: args.security.tls()?,
            admin_token_file: Some(admin_token_file.clone()),
        },
    })
    .await?;
    tracing::info!(
        addr = %mesh.url(),
        database = %redact(&database_url),
        "dagmesh up: metadata store, executor and scheduler in one process"
    );
    tracing::info!(
        url = %format!("{}/", mesh.url()),
        "web console: open the url in a browser (`dagmesh console` prints it with your token)"
    );
    if mesh.admin_token().is_some() {
        tracing::info!(
            file = %admin_token_file.display(),
            "authentication on: the dagmesh CLI run from here uses the admin token in this file; \
             workers need a token too (DAGMESH_TOKEN_FILE={} or `dagmesh tokens create --scope worker`)",
            admin_token_file.display()
        );
    } else {
        tracing::warn!("authentication is OFF (--no-auth): every caller may do everything");
    }
    let stopped = tokio::select! {
        () = shutdown_signal() => mesh.shutdown().await,
        error = mesh.engine_stopped() => Err(error),
    };
    // Last, so the spans of the drain go out too.
    telemetry.shutdown();
    stopped
}

#[derive(clap::Args, Debug)]
pub struct MetastoreArgs {
    #[arg(long, env = "DAGMESH_LISTEN", default_value = "127.0.0.1:7071")]
    pub listen: String,
    /// Database URL (`sqlite://PATH` or `postgres://...`).
    #[arg(
        long,
        env = "DAGMESH_DATABASE_URL",
        default_value = "sqlite://.dagmesh/dagmesh.db"
    )]
    pub database: String,
    #[command(flatten)]
    pub security: SecurityFlags,
    #[command(flatten)]
    pub observe: ObserveFlags,
}

pub async fn metastore(args: MetastoreArgs) -> anyhow::Result<()> {
    let telemetry = args.observe.start("dagmesh-metastore").await?;
    let store = dagmesh_metastore::connect_sql(&args.database)
        .await
        .with_context(|| format!("opening database {}", redact(&args.database)))?;
    crate::security::log_database_tls(&*store).await;
    let tls = args.security.tls()?;
    let listener = bind(&args.listen, &args.security).await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        database = %redact(&args.database),
        tls = tls.is_some(),
        "metastore serving"
    );
    if !args.security.no_auth && args.security.internal_token.is_none() {
        tracing::warn!(
            "no --internal-token (DAGMESH_INTERNAL_TOKEN): no executor or scheduler can use this metastore"
        );
    }
    let store: Arc<dyn MetadataStore> = store;
    let authenticator = args.security.authenticator(store.clone())?;
    let services = ServiceSet::new().with(MetadataGrpcServer::new(store).into_service());
    let options = args.security.serve_options(authenticator, tls);
    let served = serve(listener, services, options, shutdown_signal()).await;
    telemetry.shutdown();
    Ok(served?)
}

#[derive(clap::Args, Debug)]
pub struct ExecutorArgs {
    #[arg(long, env = "DAGMESH_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Address of the metastore.
    #[arg(
        long,
        env = "DAGMESH_METASTORE",
        default_value = "http://127.0.0.1:7071"
    )]
    pub metastore: String,
    /// Where the other executor replicas reach this one (e.g. `http://$(POD_IP):7070`): a
    /// standby forwards the calls it gets to the replica that drives the runs. Default: the
    /// listening address (0.0.0.0 read as 127.0.0.1).
    #[arg(long, env = "DAGMESH_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// The name to verify in another executor replica's certificate when a standby forwards
    /// to it over https:// (replicas advertise pod IPs, which certificates seldom name; e.g.
    /// `dagmesh-executor`, the Service name every replica's certificate holds). Default:
    /// --tls-server-name, else the advertised URL's host.
    #[arg(long, env = "DAGMESH_PEER_TLS_SERVER_NAME")]
    pub peer_tls_server_name: Option<String>,
    /// How long to keep trying to reach the metastore at start (at most 24h).
    #[arg(long, env = "DAGMESH_STARTUP_TIMEOUT", default_value = "60s", value_parser = crate::commands::wait_duration)]
    pub startup_timeout: Duration,
    /// Share the runs with the other executor replicas of the database: each drives its share
    /// of the partitions, and the one that holds the executor lease hands every task to the
    /// workers (the others forward worker streams to it). Without it one executor drives every
    /// run and the others stand by. Give it to every replica.
    #[arg(long, env = "DAGMESH_SHARE_PARTITIONS")]
    pub share_partitions: bool,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub security: SecurityFlags,
    #[command(flatten)]
    pub observe: ObserveFlags,
}

pub async fn executor(args: ExecutorArgs, client: &ClientSettings) -> anyhow::Result<()> {
    let telemetry = args.observe.start("dagmesh-executor").await?;
    let tls = args.security.tls()?;
    let listener = bind(&args.listen, &args.security).await?;
    let address = listener.local_addr()?;
    let advertise_url = match &args.advertise_url {
        Some(url) => url.clone(),
        None => default_advertise_url(address, tls.is_some()),
    };
    let store = connect_metastore(&args, client)?;
    // Tokens live in the metastore; the executor reads them through its (internal) client.
    let authenticator = args.security.authenticator(store.clone())?;
    let options = args
        .security
        .serve_options(authenticator.clone(), tls.clone());

    // Until this executor holds the lease (at once, or as a standby), the port forwards every
    // call to the executor that does; then the same socket serves this one's services.
    let socket = listener.into_std()?;
    let standby_listener = TcpListener::from_std(socket.try_clone()?)?;
    let listener = TcpListener::from_std(socket)?;
    let mut hop = args.security.peer_settings(client);
    if let Some(name) = &args.peer_tls_server_name {
        hop.tls_server_name = Some(name.clone());
    }
    let route = LeaseHolderRoute::new(store.clone(), hop.clone(), advertise_url.clone());
    let (stop_forwarding, forwarding_stopped) = tokio::sync::oneshot::channel::<()>();
    let forwarder = tokio::spawn(serve(
        standby_listener,
        route.services().with_http(dagmesh_console::router()),
        options.clone(),
        async move {
            let _ = forwarding_stopped.await;
        },
    ));
    tracing::info!(addr = %address, advertise = %advertise_url, "executor: taking the lease (calls are forwarded to its holder meanwhile)");
    let mut config = args.engine.config()?;
    config.advertise_url = Some(advertise_url);
    config.share_partitions = args.share_partitions;
    config.peers = hop;
    let started = tokio::select! {
        started = start_executor(&args, store, config) => started,
        () = shutdown_signal() => {
            let _ = stop_forwarding.send(());
            let _ = forwarder.await;
            telemetry.shutdown();
            return Ok(());
        }
    };
    let (executor, mut engine) = started?;
    let _ = stop_forwarding.send(()); // it finishes its forwarded calls in the background
    tracing::info!(addr = %address, metastore = %args.metastore, tls = tls.is_some(), "executor serving (the web console at / on the same port)");
    let mut services = executor.services().with_http(dagmesh_console::router());
    if let Some(authenticator) = &authenticator {
        services = services.with(TokenApi::new(authenticator.clone()).into_service());
    }
    let (engine_failed_tx, engine_failed) = tokio::sync::oneshot::channel();
    let drainer = executor.clone();
    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => drainer.drain().await,
            result = &mut engine => {
                let _ = engine_failed_tx.send(result);
            }
        }
    };
    let served = serve(listener, services, options, shutdown).await;
    telemetry.shutdown();
    served?;
    match engine_failed.await {
        Ok(Ok(Ok(()))) | Err(_) => Ok(()),
        Ok(Ok(Err(error))) => Err(anyhow::Error::new(error).context("executor engine stopped")),
        Ok(Err(join)) => Err(anyhow::anyhow!("executor engine panicked: {join}")),
    }
}

/// Where other replicas reach this executor when --advertise-url is not given: the listening
/// address, with an unspecified IP (0.0.0.0, ::) read as loopback.
fn default_advertise_url(address: std::net::SocketAddr, tls: bool) -> String {
    let mut address = address;
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("{}://{address}", if tls { "https" } else { "http" })
}

/// Takes the lease (waiting as a standby if another executor holds it) and recovers, retrying
/// while the metastore is not reachable yet (in a cluster the two start in any order).
async fn start_executor(
    args: &ExecutorArgs,
    store: Arc<dyn MetadataStore>,
    config: ExecutorConfig,
) -> anyhow::Result<(
    Executor,
    tokio::task::JoinHandle<Result<(), dagmesh_executor::ExecError>>,
)> {
    let deadline = tokio::time::Instant::now() + args.startup_timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        match Executor::start(store.clone(), config.clone()).await {
            Ok(started) => return Ok(started),
            Err(error) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(%error, metastore = %args.metastore, "cannot start yet (is the metastore reachable?); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => {
                return Err(anyhow::Error::new(error).context(format!(
                    "cannot start: metastore {} not reachable within {}",
                    args.metastore,
                    humantime::format_duration(args.startup_timeout)
                )));
            }
        }
    }
}

/// A client of the metastore (it connects on first use, so only bad settings fail here).
fn connect_metastore(
    args: &ExecutorArgs,
    client: &ClientSettings,
) -> anyhow::Result<Arc<dyn MetadataStore>> {
    let settings = args.security.peer_settings(client);
    let store = MetadataGrpcClient::connect_lazy(&args.metastore, &settings)?;
    Ok(Arc::new(store))
}

#[derive(clap::Args, Debug)]
pub struct SchedulerArgs {
    #[arg(long, env = "DAGMESH_LISTEN", default_value = "127.0.0.1:7072")]
    pub listen: String,
    /// Address of the metastore (where schedules, triggers and backfills live).
    #[arg(
        long,
        env = "DAGMESH_METASTORE",
        default_value = "http://127.0.0.1:7071"
    )]
    pub metastore: String,
    /// Address of the executor (its RunService starts the runs).
    #[arg(
        long,
        env = "DAGMESH_EXECUTOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub executor: String,
    /// TTL of this scheduler's leases in the store. Several schedulers share the schedules,
    /// triggers and backfills of a database; those of one that died move to the others within
    /// this time (a clean shutdown hands them over at once).
    #[arg(long, env = "DAGMESH_SCHEDULER_LEASE_TTL", default_value = "15s", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
    #[command(flatten)]
    pub security: SecurityFlags,
    #[command(flatten)]
    pub observe: ObserveFlags,
}

/// A lease TTL: from 1 second to the store's limit of an hour.
fn parse_lease_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) || ttl > dagmesh_metastore::MAX_LEASE_TTL {
        return Err(format!(
            "{} is out of range: from 1s to 1h",
            humantime::format_duration(ttl)
        ));
    }
    Ok(ttl)
}

/// The scheduler alone. Both clients connect lazily, so it starts in any order with the others;
/// until they are reachable its passes fail and are retried.
pub async fn scheduler(args: SchedulerArgs, client: &ClientSettings) -> anyhow::Result<()> {
    let telemetry = args.observe.start("dagmesh-scheduler").await?;
    let tls = args.security.tls()?;
    let settings = args.security.peer_settings(client);
    let store: Arc<dyn MetadataStore> =
        Arc::new(MetadataGrpcClient::connect(&args.metastore, &settings).await?);
    let starter = Arc::new(ExecutorStarter::connect(&args.executor, &settings)?);
    let authenticator = args.security.authenticator(store.clone())?;
    let scheduler = Scheduler::new(
        store,
        starter,
        Arc::new(SystemClock),
        SchedulerConfig {
            lease_ttl: args.lease_ttl,
            ..SchedulerConfig::default()
        },
    );
    let task = scheduler.spawn();
    let listener = bind(&args.listen, &args.security).await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        metastore = %args.metastore,
        executor = %args.executor,
        "scheduler serving"
    );
    let services =
        ServiceSet::new().with(SchedulerGrpcServer::new(scheduler.clone()).into_service());
    let options = args.security.serve_options(authenticator, tls);
    let served = serve(listener, services, options, shutdown_signal()).await;
    task.abort();
    scheduler.release_partitions().await;
    telemetry.shutdown();
    Ok(served?)
}

/// Binds `listen`, refusing an unprotected non-loopback address (see
/// [`SecurityFlags::check_listen`]).
async fn bind(listen: &str, security: &SecurityFlags) -> anyhow::Result<TcpListener> {
    check_listen(listen, security).await?;
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))
}

/// Checks every address `listen` resolves to, before anything binds or starts.
async fn check_listen(listen: &str, security: &SecurityFlags) -> anyhow::Result<()> {
    let addrs = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("resolving listen address {listen}"))?;
    for addr in addrs {
        security.check_listen(addr)?;
    }
    Ok(())
}

/// A database URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scheduler_lease_ttl_is_bounded_and_named() {
        assert_eq!(
            super::parse_lease_ttl("15s"),
            Ok(std::time::Duration::from_secs(15))
        );
        for out_of_range in ["0s", "500ms", "2h"] {
            let err = super::parse_lease_ttl(out_of_range).unwrap_err();
            assert!(err.contains("from 1s to 1h"), "{out_of_range}: {err}");
        }
        assert!(super::parse_lease_ttl("soon").is_err());
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            super::redact("postgres://app:s3cret@db:5432/dagmesh"),
            "postgres://app:***@db:5432/dagmesh"
        );
        assert_eq!(
            super::redact("postgres://app@db/dagmesh"),
            "postgres://app@db/dagmesh"
        );
        assert_eq!(
            super::redact("sqlite://.dagmesh/x.db"),
            "sqlite://.dagmesh/x.db"
        );
    }
}

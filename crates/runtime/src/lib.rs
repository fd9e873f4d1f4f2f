//! Server plumbing shared by every dagmesh service, so that each one serves the same way:
//!
//! - [`serve`] runs a set of tonic services on a listener with `grpc.health.v1.Health` and
//!   server reflection (v1 *and* v1alpha, because grpcurl 1.8 only speaks v1alpha), behind the
//!   authentication layer and, when configured, TLS ([`tls`]).
//! - [`shutdown_signal`] resolves on the first SIGINT/SIGTERM (drain); a second one exits.
//! - [`telemetry`] sets up logs and, when configured, OpenTelemetry export.

pub mod metrics;
pub mod telemetry;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

pub use dagmesh_auth::AuthLayer;
use tls::ServerTls;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::ServingStatus;
use tower::Layer as _;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The services one server exposes; health and reflection are added by [`serve`].
#[derive(Default)]
pub struct ServiceSet {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    /// When set, health reports SERVING only while it holds true (see [`ServiceSet::ready_when`]).
    readiness: Option<tokio::sync::watch::Receiver<bool>>,
    /// Plain HTTP routes served next to the gRPC services (see [`ServiceSet::with_http`]).
    http: Option<axum::Router>,
}

impl ServiceSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with<S>(mut self, service: S) -> Self
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        // Every service also speaks gRPC-web, for browsers (the web console); plain gRPC
        // requests pass through the layer untouched.
        self.routes
            .add_service(tonic_web::GrpcWebLayer::new().layer(service));
        self.names.push(S::NAME);
        self
    }

    /// Serves `router` for every request that is not a call of one of the services (the web
    /// console's files), and accepts HTTP/1.1 as well as HTTP/2 so that browsers can reach it
    /// and make gRPC-web calls without TLS.
    pub fn with_http(mut self, router: axum::Router) -> Self {
        self.http = Some(router);
        self
    }

    /// Names of the services added, e.g. `dagmesh.v1.RunService`.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Health follows `readiness` (SERVING while true, NOT_SERVING while false) instead of
    /// reporting SERVING from the start: for a server that answers only once something else is
    /// there (a standby executor, until there is an executor to forward to).
    pub fn ready_when(mut self, readiness: tokio::sync::watch::Receiver<bool>) -> Self {
        self.readiness = Some(readiness);
        self
    }
}

/// How long in-flight calls and open streams get after shutdown begins before they are cut.
/// Streams whose client never closes its side (a worker that ignores Drain) would otherwise
/// keep the process alive forever.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How a server is protected.
#[derive(Clone)]
pub struct ServeOptions {
    /// Checks every call's credentials (or lets everything through when disabled).
    pub auth: AuthLayer,
    /// TLS (mTLS with a client CA); None serves plaintext.
    pub tls: Option<Arc<ServerTls>>,
}

impl ServeOptions {
    /// Plaintext, no authentication: in-process tests and `--no-auth` on loopback.
    pub fn open() -> Self {
        Self {
            auth: AuthLayer::disabled(),
            tls: None,
        }
    }
}

/// Serves `services` on `listener` until `shutdown` resolves. Health reports SERVING for every
/// service (and for "") until shutdown begins, then NOT_SERVING while in-flight calls finish,
/// for at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    services: ServiceSet,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let status_of = |ready: bool| {
        if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let initial = status_of(services.readiness.as_ref().is_none_or(|r| *r.borrow()));
    for name in services.names.iter().copied().chain([""]) {
        health.set_service_status(name, initial).await;
    }
    // Health follows the readiness signal until shutdown begins.
    let follower = services.readiness.clone().map(|mut readiness| {
        let health = health.clone();
        let names = services.names.clone();
        tokio::spawn(async move {
            while readiness.changed().await.is_ok() {
                let status = status_of(*readiness.borrow_and_update());
                for name in names.iter().copied().chain([""]) {
                    health.set_service_status(name, status).await;
                }
            }
        })
    });
    // Reflection advertises only what this server serves (the descriptor set holds every
    // dagmesh service, the store API included).
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(dagmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for name in &services.names {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let names = services.names.clone();
    let grpc_metrics = metrics::GrpcMetricsLayer::new(&names);
    let mut routes: Routes = services.routes.routes();
    routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let (began_tx, began) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        if let Some(follower) = follower {
            follower.abort();
        }
        let _ = began_tx.send(());
        for name in names.into_iter().chain([""]) {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    };
    let accept_http1 = services.http.is_some();
    if let Some(http) = services.http {
        routes = Routes::from(routes.into_axum_router().fallback_service(http));
    }
    let router = tonic::transport::Server::builder()
        .accept_http1(accept_http1)
        .layer(grpc_metrics)
        .layer(options.auth)
        .trace_fn(|request| tracing::debug_span!("grpc", path = %request.uri().path()))
        .add_routes(routes);
    let server = async move {
        match options.tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown)
                    .await
            }
            None => {
                // No Nagle: a worker's next Assign must not wait for the ACK of the last
                // (with delayed ACKs that was a 40 ms stall in a fan-out).
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        }
    };
    let deadline = async {
        if began.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served?,
        () = deadline => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after shutdown; closing them");
        }
    }
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM so the caller can drain. A second signal exits the
/// process at once (status 130), for an operator who does not want to wait.
pub async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown signal received, draining (send it again to exit now)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second shutdown signal, exiting");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only ctrl-c stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

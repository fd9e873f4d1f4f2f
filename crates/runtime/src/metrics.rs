//! Prometheus metrics of a dagmesh process, served over HTTP at `/metrics`.
//!
//! One registry per process (`dagmesh up` runs every service in one process, and they share
//! it); each service registers its families once, at start, so that every series a dashboard
//! names exists from the first scrape on. Recording is off until [`serve`] runs (a process
//! started without `--metrics-listen`): [`enabled`] is one relaxed atomic load, and the
//! services skip their label look-ups when it is false.
//!
//! Gauges that describe state owned by another task (the executor's ready queues and worker
//! sessions) are not kept up to date on every change: a refresher registered with
//! [`on_scrape`] fills them in just before each scrape.
//!
//! The exposition is OpenMetrics text ([`prometheus_client`], the Prometheus project's own
//! Rust client): counters get their `_total` suffix from the encoder, so they are registered
//! without it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether metrics are recorded (a `/metrics` endpoint is served by this process).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

type Refresh = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct Global {
    registry: Mutex<Registry>,
    /// (name, type) of every family registered, for checks of dashboards against them (a
    /// family without series yet is left out of the exposition).
    families: Mutex<Vec<(String, &'static str)>>,
    refreshers: Mutex<Vec<Arc<Refresh>>>,
}

static GLOBAL: LazyLock<Global> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
    registry.register(
        "dagmesh_build_info",
        "The running dagmesh version (always 1).",
        build,
    );
    Global {
        registry: Mutex::new(registry),
        families: Mutex::new(vec![("dagmesh_build_info".to_owned(), "gauge")]),
        refreshers: Mutex::new(Vec::new()),
    }
});

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Adds a metric family to the process's registry. `name` follows Prometheus conventions
/// (`dagmesh_` prefix, base units; counters without `_total`, which the encoder appends).
pub fn register(name: &str, help: &str, metric: impl Metric) {
    let kind = match prometheus_client::encoding::EncodeMetric::metric_type(&metric) {
        prometheus_client::metrics::MetricType::Counter => "counter",
        prometheus_client::metrics::MetricType::Gauge => "gauge",
        prometheus_client::metrics::MetricType::Histogram => "histogram",
        prometheus_client::metrics::MetricType::Info => "info",
        _ => "unknown",
    };
    GLOBAL
        .families
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((name.to_owned(), kind));
    GLOBAL
        .registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        // The encoder ends the help text with a period itself.
        .register(name, help.trim_end_matches('.'), metric);
}

/// The series names every registered family can export: counters with `_total`, histograms
/// as `_bucket`, `_sum` and `_count`.
pub fn series_names() -> Vec<String> {
    let families = GLOBAL
        .families
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut names = Vec::new();
    for (name, kind) in families.iter() {
        match *kind {
            "counter" => names.push(format!("{name}_total")),
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.push(format!("{name}{suffix}"));
                }
            }
            _ => names.push(name.clone()),
        }
    }
    names
}

/// Runs `refresh` before every scrape (to fill in gauges of state owned elsewhere).
pub fn on_scrape<F, Fut>(refresh: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let boxed: Refresh = Box::new(move || Box::pin(refresh()));
    GLOBAL
        .refreshers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(Arc::new(boxed));
}

/// How long a scrape waits for the refreshers before it answers with what it has.
const REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The OpenMetrics text of every registered family, after running the refreshers.
pub async fn render() -> String {
    let refreshers: Vec<Arc<Refresh>> = GLOBAL
        .refreshers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let refresh = async {
        for refresh in &refreshers {
            refresh().await;
        }
    };
    if tokio::time::timeout(REFRESH_TIMEOUT, refresh)
        .await
        .is_err()
    {
        tracing::warn!(
            "metrics refresh took longer than {REFRESH_TIMEOUT:?}; serving older gauges"
        );
    }
    let mut text = String::new();
    let registry = GLOBAL
        .registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    text
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown` resolves, and turns recording on.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    ENABLED.store(true, Ordering::Relaxed);
    LazyLock::force(&GLOBAL);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|| async { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], render().await) }),
        )
        .route(
            "/",
            get(|| async { "dagmesh metrics: GET /metrics (OpenMetrics text)\n" }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Buckets for latencies of a millisecond to a few minutes, in seconds.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 20)
}

/// A histogram family whose histograms use [`latency_buckets`].
pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub fn latency_family<L: Clone + std::hash::Hash + Eq>() -> LatencyFamily<L> {
    Family::new_with_constructor(|| Histogram::new(latency_buckets()))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    service: String,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcMethodLabels {
    service: String,
    method: String,
}

struct GrpcMetrics {
    requests: Family<GrpcLabels, Counter>,
    duration: LatencyFamily<GrpcMethodLabels>,
}

static GRPC: LazyLock<GrpcMetrics> = LazyLock::new(|| {
    let metrics = GrpcMetrics {
        requests: Family::default(),
        duration: latency_family(),
    };
    register(
        "dagmesh_grpc_server_requests",
        "gRPC calls answered, by service, method and status code (the code of the response \
         headers: an error, or OK for a call that answered or a stream that opened).",
        metrics.requests.clone(),
    );
    register(
        "dagmesh_grpc_server_request_duration_seconds",
        "Time to a gRPC call's response headers (a unary call's handling; a stream's opening).",
        metrics.duration.clone(),
    );
    metrics
});

/// Counts and times the gRPC calls of one server. Only the services it serves are named in
/// labels (a made-up path from a hostile client is counted as `unknown`), so the label sets
/// stay bounded.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    services: Arc<[&'static str]>,
}

impl GrpcMetricsLayer {
    pub fn new(services: &[&'static str]) -> Self {
        LazyLock::force(&GRPC);
        Self {
            services: services.into(),
        }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            services: self.services.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    services: Arc<[&'static str]>,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let labels = method_labels(request.uri().path(), &self.services);
        // Plain HTTP (the web console's files) is not a gRPC call; gRPC-web calls are.
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
        let future = self.inner.call(request);
        if !enabled() || !grpc {
            return Box::pin(future);
        }
        let start = Instant::now();
        Box::pin(async move {
            let result = future.await;
            if let Ok(response) = &result {
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|code| code.to_str().ok())
                    .and_then(|code| code.parse::<i32>().ok())
                    .map_or("OK", code_name);
                GRPC.duration
                    .get_or_create(&labels)
                    .observe(start.elapsed().as_secs_f64());
                GRPC.requests
                    .get_or_create(&GrpcLabels {
                        service: labels.service,
                        method: labels.method,
                        code: code.to_owned(),
                    })
                    .inc();
            }
            result
        })
    }
}

/// (service, method) of a gRPC path `/package.Service/Method`, or `unknown` for a service this
/// server does not serve (the method of a known service is bounded by the server too: tonic
/// answers UNIMPLEMENTED for others, and those are counted as `unknown`).
fn method_labels(path: &str, services: &[&'static str]) -> GrpcMethodLabels {
    let unknown = || GrpcMethodLabels {
        service: "unknown".into(),
        method: "unknown".into(),
    };
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return unknown();
    };
    let known = services.contains(&service)
        || service.starts_with("grpc.health.")
        || service.starts_with("grpc.reflection.");
    let plausible = !method.is_empty()
        && method.len() <= 64
        && method.bytes().all(|byte| byte.is_ascii_alphanumeric());
    if known && plausible {
        GrpcMethodLabels {
            service: service.to_owned(),
            method: method.to_owned(),
        }
    } else {
        unknown()
    }
}

/// The canonical name of a gRPC status code, as the `code` label.
fn code_name(code: i32) -> &'static str {
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_services_are_named() {
        let services = ["dagmesh.v1.RunService"];
        let labels = method_labels("/dagmesh.v1.RunService/SubmitRun", &services);
        assert_eq!(
            (labels.service.as_str(), labels.method.as_str()),
            ("dagmesh.v1.RunService", "SubmitRun")
        );
        for hostile in [
            "/evil.Service/Method",
            "/dagmesh.v1.RunService/",
            "/dagmesh.v1.RunService/a-b",
            "no-slash",
            "/",
        ] {
            let labels = method_labels(hostile, &services);
            assert_eq!(labels.service, "unknown", "{hostile}");
        }
        let long = format!("/dagmesh.v1.RunService/{}", "A".repeat(100));
        assert_eq!(method_labels(&long, &services).method, "unknown");
    }
}

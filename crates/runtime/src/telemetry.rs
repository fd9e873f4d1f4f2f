//! Logs and traces for a dagmesh process.
//!
//! Logs go to stderr, filtered by `RUST_LOG`. Traces are exported only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and not empty,
//! as the OpenTelemetry spec reads it, unless `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none`. Then spans go out over OTLP/gRPC through a batch processor: the
//! `tracing` spans of the process, and the spans a service builds itself with the
//! `opentelemetry` API (the executor's run, step and attempt spans). The SDK's own variables
//! apply as usual: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_INSECURE`, `OTEL_BSP_*` (the batch delay,
//! queue and batch sizes), `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
//!
//! Without the endpoint nothing is installed, and code that builds spans by hand asks
//! [`traces_enabled`] first, so tracing costs one relaxed atomic load.

use std::cell::Cell;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, ResourceDetector as _};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event; colours only when stderr is a terminal and
    /// `NO_COLOR` is not set.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans), for log shippers.
    Json,
}

static LOG_FORMAT: AtomicU8 = AtomicU8::new(0);

/// Sets the format of the logs [`init`] installs (call it before `init`).
pub fn set_log_format(format: LogFormat) {
    LOG_FORMAT.store(format as u8, Ordering::Relaxed);
}

fn log_format() -> LogFormat {
    match LOG_FORMAT.load(Ordering::Relaxed) {
        1 => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// Whether log lines may carry ANSI colours: stderr is a terminal and `NO_COLOR` is unset
/// (<https://no-color.org>).
pub fn colours_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

static TRACES_ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: a tracer provider with an exporter is installed globally. When
/// false, the global tracer is a no-op and hand-built spans are not worth their attributes.
pub fn traces_enabled() -> bool {
    TRACES_ENABLED.load(Ordering::Relaxed)
}

/// Held by `main` until exit. [`Telemetry::shutdown`] (or dropping it) exports what spans are
/// still buffered, so call it last, after the servers stopped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes buffered spans and stops the exporter (a no-op without one).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        TRACES_ENABLED.store(false, Ordering::Relaxed);
        // The batch processor exports on its own thread through a tonic channel that lives on
        // the tokio runtime; keep this worker thread from starving it while we wait.
        let result = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| provider.shutdown())
            }
            _ => provider.shutdown(),
        };
        match result {
            Ok(()) => tracing::debug!("telemetry flushed"),
            Err(error) => tracing::warn!(%error, "flushing spans at shutdown failed"),
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global subscriber: logs on stderr ([`set_log_format`]) filtered by `RUST_LOG`
/// (default `info`), and OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
/// `service` is the `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`
/// name one. Call it inside the tokio runtime. Safe to call more than once (later calls do
/// nothing).
pub fn init(service: &'static str) -> Telemetry {
    init_with(service, "info")
}

/// Like [`init`], with another default filter (the demo keeps logs down to warnings so they do
/// not break up its live view).
pub fn init_with(service: &'static str, default_filter: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (text, json) = match log_format() {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(colours_on_stderr()),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    let (provider, problem) = match otlp_endpoint() {
        None => (None, None),
        Some(endpoint) => match tracer_provider(service) {
            Ok(provider) => (Some((provider, endpoint)), None),
            Err(error) => (None, Some(error)),
        },
    };
    let otel = provider.as_ref().map(|(provider, _)| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("dagmesh"))
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(error) = problem {
        tracing::error!(%error, "cannot export traces; continuing without them");
    }
    let provider = match provider {
        Some((provider, endpoint)) if installed => {
            opentelemetry::global::set_tracer_provider(provider.clone());
            TRACES_ENABLED.store(true, Ordering::Relaxed);
            tracing::info!(%endpoint, service, "exporting traces over OTLP/gRPC");
            for name in [
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            ] {
                if let Ok(protocol) = std::env::var(name)
                    && !protocol.is_empty()
                    && protocol != "grpc"
                {
                    tracing::warn!(%protocol, "{name} is ignored: traces are sent over gRPC only");
                }
            }
            Some(provider)
        }
        // A second init in the same process: the first one's exporter stays in charge.
        Some((provider, _)) => {
            let _ = provider.shutdown();
            None
        }
        None => None,
    };
    tracing::debug!(service, "telemetry initialised");
    Telemetry { provider }
}

/// Where traces go, or None when they are off: no endpoint (an empty value counts as unset),
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
fn otlp_endpoint() -> Option<String> {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    };
    let off = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    if off {
        return None;
    }
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var(OTLP_ENDPOINT))
}

/// TLS for an https:// OTLP endpoint, from the standard OpenTelemetry variables:
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` (CA, PEM; default: the system roots) and
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` / `OTEL_EXPORTER_OTLP_CLIENT_KEY` (mTLS); the
/// `_TRACES_` variants win.
fn otlp_tls() -> Result<tonic::transport::ClientTlsConfig, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let setting = |name: &str| {
        let traces = name.replace("OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_TRACES_");
        [traces, name.to_owned()].into_iter().find_map(|var| {
            std::env::var(&var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (var, v))
        })
    };
    let read = |(var, path): (String, String)| {
        std::fs::read(&path).map_err(|error| format!("{var}: cannot read {path}: {error}"))
    };
    let mut config = ClientTlsConfig::new();
    config = match setting("OTEL_EXPORTER_OTLP_CERTIFICATE") {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => config.with_native_roots(),
    };
    match (
        setting("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
        setting("OTEL_EXPORTER_OTLP_CLIENT_KEY"),
    ) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY \
                        go together"
                    .to_owned(),
            );
        }
    }
    Ok(config)
}

fn tracer_provider(
    service: &'static str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithTonicConfig as _;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if otlp_endpoint().is_some_and(|endpoint| endpoint.starts_with("https://")) {
        builder = builder.with_tls_config(
            otlp_tls().map_err(opentelemetry_otlp::ExporterBuildError::InternalFailure)?,
        );
    }
    let exporter = builder.build()?;
    // The SDK's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; our name is
    // only the default, where neither names the service.
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty())
        || EnvResourceDetector::new()
            .detect()
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .is_some();
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(service);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .with_id_generator(PresetIds::default())
        .build())
}

thread_local! {
    static PRESET_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
    static PRESET_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// Runs `build` (which must start exactly one span, synchronously) so that the span gets
/// `span_id`, and `trace_id` when it has no parent to take a trace id from. The executor
/// builds its spans after the fact with ids that are known in advance: the trace id is the
/// run id and an attempt's span id went out in the attempt's `traceparent`.
///
/// The OpenTelemetry API has no way to name a span's ids, so the provider installed by
/// [`init`] takes them from here before it falls back to random ones.
pub fn with_span_ids<R>(trace_id: TraceId, span_id: SpanId, build: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PRESET_TRACE_ID.with(|id| id.set(None));
            PRESET_SPAN_ID.with(|id| id.set(None));
        }
    }
    PRESET_TRACE_ID.with(|id| id.set(Some(trace_id)));
    PRESET_SPAN_ID.with(|id| id.set(Some(span_id)));
    let _reset = Reset;
    build()
}

/// Random ids, unless [`with_span_ids`] preset them for the span being built.
#[derive(Debug, Default)]
struct PresetIds {
    random: RandomIdGenerator,
}

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET_TRACE_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.random.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        PRESET_SPAN_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.random.new_span_id())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanBuilder, TraceContextExt as _, Tracer as _};
    use opentelemetry::{Context, trace::Span as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SpanData, SpanExporter};

    use super::*;

    #[derive(Debug, Clone, Default)]
    struct Collect(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().expect("lock").extend(batch);
            Ok(())
        }
    }

    #[test]
    fn preset_ids_name_one_span_and_parents_keep_their_trace() {
        let exporter = Collect::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .with_id_generator(PresetIds::default())
            .build();
        let tracer = provider.tracer("test");
        let trace_id = TraceId::from_bytes([7; 16]);
        let (root_id, child_id) = (SpanId::from_bytes([1; 8]), SpanId::from_bytes([2; 8]));

        let mut root = with_span_ids(trace_id, root_id, || {
            tracer.build_with_context(SpanBuilder::from_name("root"), &Context::new())
        });
        let root_context = root.span_context().clone();
        root.end();
        let parent = Context::new().with_remote_span_context(root_context);
        // The preset trace id is not used (the parent has one) and must not leak into the next
        // span built on this thread.
        let mut child = with_span_ids(TraceId::from_bytes([9; 16]), child_id, || {
            tracer.build_with_context(SpanBuilder::from_name("child"), &parent)
        });
        child.end();
        let mut other = tracer.build_with_context(SpanBuilder::from_name("other"), &Context::new());
        other.end();

        let spans = exporter.0.lock().expect("lock").clone();
        let by_name = |name: &str| spans.iter().find(|s| s.name == name).expect(name);
        let root = by_name("root");
        assert_eq!(root.span_context.trace_id(), trace_id);
        assert_eq!(root.span_context.span_id(), root_id);
        let child = by_name("child");
        assert_eq!(child.span_context.trace_id(), trace_id);
        assert_eq!(child.span_context.span_id(), child_id);
        assert_eq!(child.parent_span_id, root_id);
        let other = by_name("other");
        assert_ne!(other.span_context.trace_id(), trace_id);
        assert_ne!(other.span_context.trace_id(), TraceId::from_bytes([9; 16]));
        assert!(![root_id, child_id].contains(&other.span_context.span_id()));
    }
}

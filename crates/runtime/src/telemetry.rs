//! Logs (and later traces) for a dagmesh process.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Held by `main` until exit; dropping it flushes what telemetry is buffered.
pub struct Telemetry {
    _private: (),
}

/// Installs the global subscriber: human-readable logs on stderr filtered by `RUST_LOG`
/// (default `info`). Safe to call more than once (later calls do nothing).
pub fn init(service: &'static str) -> Telemetry {
    init_with(service, "info")
}

/// Like [`init`], with another default filter (the demo keeps logs down to warnings so they do
/// not break up its live view).
pub fn init_with(service: &'static str, default_filter: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
    tracing::debug!(service, "telemetry initialised");
    Telemetry { _private: () }
}

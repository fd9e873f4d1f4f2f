//! The scheduler's Prometheus metrics: what became of each schedule tick.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// A tick that started this long after its time counts as late too.
pub(crate) const LATE_AFTER: chrono::Duration = chrono::Duration::seconds(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

static TICKS: LazyLock<Family<Outcome, Counter>> = LazyLock::new(|| {
    let ticks = Family::<Outcome, Counter>::default();
    for outcome in ["fired", "missed", "late"] {
        let _ = ticks.get_or_create(&Outcome { outcome });
    }
    dagmesh_runtime::metrics::register(
        "dagmesh_scheduler_ticks",
        "Schedule ticks: outcome=fired (a run was submitted), missed (skipped: noticed past the \
         misfire grace under catch_up skip), late (fired more than 5 s after its time; also \
         counted as fired).",
        ticks.clone(),
    );
    ticks
});

pub(crate) fn register_all() {
    LazyLock::force(&TICKS);
}

pub(crate) fn tick(outcome: &'static str, count: u64) {
    if dagmesh_runtime::metrics::enabled() {
        TICKS.get_or_create(&Outcome { outcome }).inc_by(count);
    }
}

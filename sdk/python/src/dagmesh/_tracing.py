"""Runs handlers inside the span whose context the Assign carries (W3C `traceparent`).

OpenTelemetry is optional (`pip install dagmesh[otel]`). Without it handlers run as they are.
With it, each attempt gets a `CONSUMER` span, child of the executor's attempt span, made
current while the handler runs, so spans the handler starts join the run's trace. The SDK never
configures a tracer provider or an exporter: spans are exported only when the application has
set one up (`opentelemetry.trace.set_tracer_provider`). Without a provider the parent context
is still made current, so outgoing calls the handler instruments carry the run's trace id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagmesh.context import TaskContext

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: Any = TraceContextTextMapPropagator()
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    _context = None  # type: ignore[assignment]
    _trace = None  # type: ignore[assignment]
    AVAILABLE = False

__all__ = ["AVAILABLE", "task_span"]


@contextlib.contextmanager
def task_span(ctx: TaskContext) -> Iterator[None]:
    if _trace is None:
        yield
        return
    carrier = {"traceparent": ctx.traceparent} if ctx.traceparent else {}
    if isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider):
        # No tracer provider set: a span would not be recorded, so skip making one (a
        # per-task cost a short task notices) and make the executor's span current directly.
        if not carrier:
            yield
            return
        token = _context.attach(_PROPAGATOR.extract(carrier))
        try:
            yield
        finally:
            _context.detach(token)
        return
    parent = _PROPAGATOR.extract(carrier)
    tracer = _trace.get_tracer("dagmesh")
    span = tracer.start_span(
        f"task {ctx.task_type}",
        context=parent,
        kind=_trace.SpanKind.CONSUMER,
        attributes={
            "dagmesh.task_id": ctx.task_id,
            "dagmesh.attempt": ctx.attempt,
            "dagmesh.run_id": ctx.run_id,
            "dagmesh.step_id": ctx.step_id,
            "dagmesh.task_type": ctx.task_type,
            "dagmesh.task_version": ctx.task_version,
        },
    )
    if not span.get_span_context().is_valid:
        # No tracer provider: keep the executor's span current instead of an invalid one.
        span = _trace.get_current_span(parent)
        with _trace.use_span(span, end_on_exit=False):
            yield
        return
    with _trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield

"""Handlers run inside the span carried by the Assign's traceparent (OpenTelemetry, optional)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from dagmesh import Client, TaskContext, Worker, to_dict
from dagmesh.v1 import RunState

from conftest import STEP_TIMEOUT, Server

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402


def current_ids() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def test_handlers_continue_the_run_trace(server: Server, client: Client, run_worker: Any, unique: str) -> None:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another test set the global tracer provider first")

    worker = Worker(server=server.url, name=f"py-{unique}", slots=2)

    @worker.task(f"traced-sync.{unique}", version="1.0.0")
    def traced_sync(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        return {**current_ids(), "traceparent": ctx.traceparent}

    @worker.task(f"traced-async.{unique}", version="1.0.0")
    async def traced_async(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        return {**current_ids(), "traceparent": ctx.traceparent}

    run_worker(worker)
    run = client.submit(
        spec={"name": f"py-traced-{unique}",
              "steps": [{"id": "s", "task": f"traced-sync.{unique}"}, {"id": "a", "task": f"traced-async.{unique}"}]}
    )
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)
    assert done.state == RunState.Value("RUN_STATE_SUCCEEDED"), done.error

    spans = {span.attributes["dagmesh.step_id"]: span for span in exporter.get_finished_spans()}
    for step in done.steps:
        out = to_dict(step.outputs)
        _, trace_id, parent_span_id, _ = out["traceparent"].split("-")
        assert out["trace_id"] == trace_id, "the handler runs in the run's trace"
        span = spans[step.step_id]
        assert f"{span.context.span_id:016x}" == out["span_id"], "inside the SDK's task span"
        assert f"{span.parent.span_id:016x}" == parent_span_id, "child of the executor's attempt span"
        assert span.kind == trace.SpanKind.CONSUMER
        assert span.attributes["dagmesh.task_id"] == f"{run.run_id}/{step.step_id}"


def test_without_a_tracer_provider_the_parent_context_is_current() -> None:
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from dagmesh import TaskContext
        from dagmesh._tracing import task_span
        ctx = TaskContext("r/s", 1, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        with task_span(ctx):
            c = trace.get_current_span().get_span_context()
            print(f"{c.trace_id:032x} {c.span_id:016x}")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"]

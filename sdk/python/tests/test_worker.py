"""Workers and the client against a real `dagmesh up`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from dagmesh import Client, TaskContext, TaskError, Worker, WorkerRejected, to_dict, to_struct
from dagmesh.v1 import RunState, StepState

from conftest import STEP_TIMEOUT, Server


def step(run: Any, step_id: str) -> Any:
    return next(s for s in run.steps if s.step_id == step_id)


def wait_until_running(client: Client, run_id: str, step_ids: set[str]) -> None:
    """Follows the run until every step in `step_ids` is RUNNING (a worker sent Started)."""
    running: set[str] = set()
    for message in client.watch_run(run_id):
        if message.WhichOneof("message") == "snapshot":
            running |= {s.step_id for s in message.snapshot.steps if s.state == StepState.Value("STEP_STATE_RUNNING")}
        elif message.event.WhichOneof("event") == "step_state":
            change = message.event.step_state
            if change.state == StepState.Value("STEP_STATE_RUNNING"):
                running.add(change.step_id)
        if step_ids <= running:
            return
    raise AssertionError(f"run {run_id} ended before {step_ids - running} ran")


def test_two_step_workflow_passes_data(server: Server, client: Client, run_worker: Any, unique: str) -> None:
    worker = Worker(server=server.url, name=f"py-{unique}", labels={"pool": unique}, slots=2)
    seen: dict[str, Any] = {}

    @worker.task(f"fetch.{unique}", version="1.2.0")
    async def fetch(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        seen["fetch"] = (ctx.task_id, ctx.attempt, ctx.run_id, ctx.step_id, ctx.task_type, ctx.task_version)
        count = inputs["count"]
        return {"images": [f"{inputs['room']}-{i}.jpg" for i in range(count)], "count": count, "ratio": 0.5}

    @worker.task(f"summarize.{unique}", version="2.0.1")
    def summarize(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        seen["summarize_thread"] = threading.current_thread().name
        return {"names": ",".join(inputs["images"]), "total": inputs["count"] * 10, "ratio": inputs["ratio"]}

    run_worker(worker)
    run = client.submit(
        spec={
            "name": f"py-two-steps-{unique}",
            "steps": [
                {"id": "fetch", "task": f"fetch.{unique}@^1.2", "labels": {"pool": unique},
                 "inputs": {"room": "inputs.room", "count": "inputs.count"}},
                {"id": "summarize", "task": f"summarize.{unique}@2", "needs": ["fetch"],
                 "inputs": {"images": "fetch.images", "count": "fetch.count", "ratio": "fetch.ratio"}},
            ],
        },
        inputs={"room": "kitchen", "count": 3},
        idempotency_key=f"two-steps-{unique}",
        tags={"test": unique},
    )
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)

    assert done.state == RunState.Value("RUN_STATE_SUCCEEDED"), done.error
    assert to_dict(step(done, "fetch").outputs) == {
        "images": ["kitchen-0.jpg", "kitchen-1.jpg", "kitchen-2.jpg"],
        "count": 3,
        "ratio": 0.5,
    }
    assert to_dict(step(done, "summarize").outputs) == {
        "names": "kitchen-0.jpg,kitchen-1.jpg,kitchen-2.jpg",
        "total": 30,
        "ratio": 0.5,
    }
    assert step(done, "summarize").worker == worker.instance_id
    assert step(done, "fetch").task_version == "1.2.0"
    assert seen["fetch"] == (f"{run.run_id}/fetch", 1, run.run_id, "fetch", f"fetch.{unique}", "1.2.0")
    assert seen["summarize_thread"].startswith("dagmesh-"), "sync handlers run in the worker's pool"
    # The idempotency key returns the same run.
    again = client.submit(workflow=f"py-two-steps-{unique}", idempotency_key=f"two-steps-{unique}")
    assert again.run_id == run.run_id


def test_progress_and_logs_reach_watchers(server: Server, client: Client, run_worker: Any, unique: str) -> None:
    worker = Worker(server=server.url, name=f"py-{unique}")

    @worker.task(f"progress.{unique}", version="1.0.0")
    def work(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        ctx.log("meshing started")
        for i in range(1, 4):
            time.sleep(0.12)  # apart, so coalescing keeps every report
            ctx.progress(i / 4, f"phase {i}", metrics={"triangles": i * 1000})
        ctx.log("almost done", level="warn")
        return {}

    run_worker(worker)
    run = client.submit(spec={"name": f"py-progress-{unique}", "steps": [{"id": "mesh", "task": f"progress.{unique}"}]})
    progress: list[tuple[float, str, dict[str, float]]] = []
    logs: list[tuple[str, str]] = []
    # after_seq=0: the whole event log, so reports made before the watch began count too.
    for message in client.watch_run(run.run_id, after_seq=0):
        if message.WhichOneof("message") != "event":
            continue
        event = message.event
        kind = event.WhichOneof("event")
        if kind == "step_progress":
            p = event.step_progress
            assert (p.step_id, p.attempt) == ("mesh", 1)
            progress.append((round(p.fraction, 2), p.message, dict(p.metrics)))
        elif kind == "step_log":
            logs.extend((line.level, line.text) for line in event.step_log.lines)
    assert progress == [
        (0.25, "phase 1", {"triangles": 1000.0}),
        (0.5, "phase 2", {"triangles": 2000.0}),
        (0.75, "phase 3", {"triangles": 3000.0}),
    ]
    assert logs == [("info", "meshing started"), ("warn", "almost done")]
    done = client.get_run(run.run_id)
    assert done.state == RunState.Value("RUN_STATE_SUCCEEDED")
    assert step(done, "mesh").progress_message == "phase 3"


def test_cancel_reaches_async_and_sync_handlers(server: Server, client: Client, run_worker: Any, unique: str) -> None:
    worker = Worker(server=server.url, name=f"py-{unique}", slots=2)
    cancelled: dict[str, bool] = {}

    @worker.task(f"wait-async.{unique}", version="1.0.0")
    async def wait_async(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        await asyncio.wait_for(ctx.wait_cancelled(), STEP_TIMEOUT)
        cancelled["async"] = ctx.cancelled
        raise TaskError("cancelled")

    @worker.task(f"wait-sync.{unique}", version="1.0.0")
    def wait_sync(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        cancelled["sync"] = ctx.cancel_event.wait(STEP_TIMEOUT) and ctx.cancelled
        return {"stopped": True}

    running = run_worker(worker)
    run = client.submit(
        spec={
            "name": f"py-cancel-{unique}",
            "steps": [{"id": "a", "task": f"wait-async.{unique}"}, {"id": "s", "task": f"wait-sync.{unique}"}],
        }
    )
    wait_until_running(client, run.run_id, {"a", "s"})
    client.cancel_run(run.run_id, reason="customer left")
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)

    assert done.state == RunState.Value("RUN_STATE_CANCELLED")
    assert "customer left" in done.error
    deadline = time.monotonic() + STEP_TIMEOUT
    while running.worker.state.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cancelled == {"async": True, "sync": True}
    assert running.worker.state.in_flight == 0, "stale results are answered with Recorded too"


def test_cpu_bound_sync_handler_keeps_its_lease(server: Server, client: Client, run_worker: Any, unique: str) -> None:
    # The server's lease is 1 s: a worker whose heartbeats stopped for that long would lose the
    # task, which would come back as attempt 2.
    busy_seconds = 3.0
    worker = Worker(server=server.url, name=f"py-{unique}")

    @worker.task(f"busy.{unique}", version="1.0.0")
    def busy(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        spins = 0
        end = time.monotonic() + inputs["seconds"]
        while time.monotonic() < end:  # pure Python: holds the GIL but for the switch interval
            spins += 1
        return {"spins": spins, "attempt": ctx.attempt}

    run_worker(worker)
    run = client.submit(
        spec={
            "name": f"py-busy-{unique}",
            "steps": [{"id": "busy", "task": f"busy.{unique}", "inputs": {"seconds": "inputs.seconds"},
                       "retry": {"max_attempts": 3, "initial_backoff": "100ms"}}],
        },
        inputs={"seconds": busy_seconds},
    )
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)

    busy_step = step(done, "busy")
    assert done.state == RunState.Value("RUN_STATE_SUCCEEDED"), done.error
    assert busy_step.attempt == 1
    assert busy_step.lost_attempts == 0
    outputs = to_dict(busy_step.outputs)
    assert outputs["attempt"] == 1 and outputs["spins"] > 0


def test_output_over_the_payload_limit_fails_without_retry(
    server: Server, client: Client, run_worker: Any, unique: str
) -> None:
    task_type = f"big.{unique}"
    worker = Worker(server=server.url, name=f"py-{unique}")
    blob = "x" * server.max_payload_bytes

    @worker.task(task_type, version="1.0.0")
    def big(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"blob": blob}

    run_worker(worker)
    run = client.submit(
        spec={
            "name": f"py-big-{unique}",
            "steps": [{"id": "big", "task": task_type, "retry": {"max_attempts": 3, "initial_backoff": "100ms"}}],
        }
    )
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)

    size = to_struct({"blob": blob}).ByteSize()
    limit = server.max_payload_bytes
    assert done.state == RunState.Value("RUN_STATE_FAILED")
    big_step = step(done, "big")
    assert big_step.error == f'output of "{task_type}" is {size} bytes, over the {limit}-byte payload limit'
    assert big_step.attempt == 1, "a payload over the limit is not retryable"


def test_handler_errors_map_to_failures(server: Server, client: Client, run_worker: Any, unique: str) -> None:
    worker = Worker(server=server.url, name=f"py-{unique}")
    attempts: list[int] = []

    @worker.task(f"flaky.{unique}", version="1.0.0")
    def flaky(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("warehouse busy")  # any exception: retryable
        return {"attempt": ctx.attempt}

    @worker.task(f"bad-input.{unique}", version="1.0.0")
    async def bad_input(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        raise TaskError("no images given")  # not retryable

    run_worker(worker)
    retry = {"max_attempts": 3, "initial_backoff": "50ms"}
    run = client.submit(
        spec={
            "name": f"py-errors-{unique}",
            "continue_on_failure": True,
            "steps": [
                {"id": "flaky", "task": f"flaky.{unique}", "retry": retry},
                {"id": "bad", "task": f"bad-input.{unique}", "retry": retry},
            ],
        }
    )
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)

    assert done.state == RunState.Value("RUN_STATE_FAILED")
    assert step(done, "flaky").state == StepState.Value("STEP_STATE_SUCCEEDED")
    assert attempts == [1, 2]
    assert to_dict(step(done, "flaky").outputs) == {"attempt": 2}
    bad = step(done, "bad")
    assert (bad.state, bad.attempt, bad.error) == (StepState.Value("STEP_STATE_FAILED"), 1, "no images given")


def test_a_task_error_logs_its_traceback_only_at_debug(
    server: Server, client: Client, run_worker: Any, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dagmesh.worker")
    worker = Worker(server=server.url, name=f"py-{unique}")

    @worker.task(f"refuse.{unique}", version="1.0.0")
    def refuse(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        raise TaskError("no images given")

    run_worker(worker)
    run = client.submit(spec={"name": f"py-refuse-{unique}", "steps": [{"id": "refuse", "task": f"refuse.{unique}"}]})
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)
    assert step(done, "refuse").error == "no images given"

    # The failure is logged before it is sent, so it is here once the run has ended.
    key = f"{run.run_id}/refuse#1 refuse.{unique}"
    failure = [r for r in caplog.records if r.name == "dagmesh.worker" and key in r.getMessage()]
    formatter = logging.Formatter()
    shown = [formatter.format(r) for r in failure if r.levelno >= logging.INFO and "task started" not in r.getMessage()]
    assert shown == [f"task failed: {key} (retryable=False): no images given"]
    debug = [formatter.format(r) for r in failure if r.levelno == logging.DEBUG]
    assert len(debug) == 1 and "Traceback (most recent call last)" in debug[0], debug
    assert 'raise TaskError("no images given")' in debug[0], debug[0]


def test_invalid_hello_is_fatal(server: Server, unique: str) -> None:
    worker = Worker(server=server.url, name=f"py-{unique}", instance_id=f"bad/{unique}")
    worker.register(f"noop.{unique}", "1.0.0", lambda ctx, inputs: {})

    with pytest.raises(WorkerRejected, match="must not contain '/'"):
        asyncio.run(asyncio.wait_for(worker.run_async(), STEP_TIMEOUT))


def test_async_client_follows_a_run(server: Server, run_worker: Any, unique: str) -> None:
    from dagmesh import AsyncClient

    worker = Worker(server=server.url, name=f"py-{unique}")
    worker.register(f"echo.{unique}", "1.0.0", lambda ctx, inputs: inputs)
    run_worker(worker)

    async def scenario() -> tuple[Any, list[str]]:
        async with AsyncClient(server.url) as client:
            run = await client.submit(
                spec={"name": f"py-async-{unique}", "steps": [{"id": "e", "task": f"echo.{unique}", "inputs": {"v": "inputs.v"}}]},
                inputs={"v": [1, "two", None]},
            )
            kinds = [m.WhichOneof("message") async for m in client.watch_run(run.run_id, after_seq=0)]
            return await client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT), kinds

    done, kinds = asyncio.run(scenario())
    assert done.state == RunState.Value("RUN_STATE_SUCCEEDED")
    assert to_dict(step(done, "e").outputs) == {"v": [1, "two", None]}
    assert kinds and set(kinds) == {"event"}, "after_seq=0 replays the log without a snapshot"

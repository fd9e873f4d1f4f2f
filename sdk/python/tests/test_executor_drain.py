"""A worker whose executor drains (SIGTERM of `dagmesh up`) and comes back on the same port and
data directory: the worker finishes what it runs, reconnects and takes new work, unless it was
itself told to stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from dagmesh import Client, TaskContext, Worker, to_dict
from dagmesh.v1 import RunState

from conftest import STEP_TIMEOUT, Server, start_server, stop_server

SUCCEEDED = RunState.Value("RUN_STATE_SUCCEEDED")


def _worker(url: str, release: threading.Event, started: threading.Event) -> Worker:
    worker = Worker(server=url, name="py-drain", reconnect_backoff=(0.05, 0.5))

    @worker.task("drain.hold", version="1.0.0")
    def hold(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        started.set()
        assert release.wait(STEP_TIMEOUT)
        return {"held": True}

    @worker.task("drain.echo", version="1.0.0")
    async def echo(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"attempt": ctx.attempt}

    return worker


def _one_step(name: str, task: str) -> dict[str, Any]:
    return {"name": name, "steps": [{"id": "only", "task": task}]}


def _wait(predicate: Any) -> bool:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _drain_server_during_a_task(
    server: Server, worker: Worker, release: threading.Event, started: threading.Event, name: str
) -> str:
    """Submits a step that holds, then SIGTERMs the server; returns the run id once the worker
    heard the executor's Drain."""
    with Client(server.url, timeout=STEP_TIMEOUT) as client:
        run = client.submit(spec=_one_step(name, "drain.hold"))
    assert started.wait(STEP_TIMEOUT)
    server.process.terminate()  # drains: Drain to workers, waits for their work, then exits
    assert _wait(lambda: worker.state.executor_draining), worker.state
    return str(run.run_id)


def test_worker_drained_by_a_restarting_executor_reconnects_and_runs_new_steps(
    tmp_path: Path, run_worker: Any
) -> None:
    first = start_server(tmp_path, lease="10s")
    restarted = None
    try:
        release, started = threading.Event(), threading.Event()
        worker = _worker(first.url, release, started)
        running = run_worker(worker)
        run_id = _drain_server_during_a_task(first, worker, release, started, "py-drain-restart")
        assert not worker.state.draining, "the worker itself was not told to stop"

        release.set()
        assert first.process.wait(timeout=STEP_TIMEOUT) == 0, first.log_tail()
        # Its result was recorded before the executor left; the worker is still there.
        assert _wait(lambda: not worker.state.connected), worker.state
        assert worker.state.in_flight == 0, worker.state
        assert running.thread.is_alive(), f"the worker exited with its executor: {running.error!r}"

        restarted = start_server(tmp_path, port=first.port, lease="10s", log_name="server-2.log")
        assert _wait(lambda: worker.state.connected and worker.state.sessions >= 2), worker.state
        with Client(restarted.url, timeout=STEP_TIMEOUT) as client:
            assert client.get_run(run_id).state == SUCCEEDED
            second = client.submit(spec=_one_step("py-drain-echo", "drain.echo"))
            done = client.wait_for_run(second.run_id, timeout=STEP_TIMEOUT)
        assert done.state == SUCCEEDED, done.error
        assert done.steps[0].worker == worker.instance_id
        assert to_dict(done.steps[0].outputs) == {"attempt": 1}
        running.join()
    finally:
        stop_server(first.process)
        if restarted is not None:
            stop_server(restarted.process)


def test_worker_stopped_while_its_executor_drains_exits(tmp_path: Path, run_worker: Any) -> None:
    first = start_server(tmp_path, lease="10s")
    restarted = None
    try:
        release, started = threading.Event(), threading.Event()
        worker = _worker(first.url, release, started)
        running = run_worker(worker)
        run_id = _drain_server_during_a_task(first, worker, release, started, "py-drain-stop")

        running.stop.set()  # its own SIGTERM, during the executor's drain
        assert _wait(lambda: worker.state.draining), worker.state
        release.set()
        running.thread.join(STEP_TIMEOUT)
        assert not running.thread.is_alive(), f"worker still running: {worker.state}"
        assert running.error is None, running.error
        assert worker.state.in_flight == 0 and worker.state.sessions == 1, worker.state
        assert first.process.wait(timeout=STEP_TIMEOUT) == 0, first.log_tail()

        # The executor recorded the result before it went.
        restarted = start_server(tmp_path, port=first.port, lease="10s", log_name="server-2.log")
        with Client(restarted.url, timeout=STEP_TIMEOUT) as client:
            assert client.get_run(run_id).state == SUCCEEDED
    finally:
        stop_server(first.process)
        if restarted is not None:
            stop_server(restarted.process)

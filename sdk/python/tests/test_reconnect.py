"""A result made while the executor is down is kept, and delivered after the reconnect."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from dagmesh import Client, TaskContext, Worker, to_dict
from dagmesh.v1 import RunState

from conftest import STEP_TIMEOUT, start_server, stop_server


def test_result_made_offline_is_resent_after_reconnect(tmp_path: Path, run_worker: Any) -> None:
    # A lease long enough for the executor to restart while the worker still holds its task.
    first = start_server(tmp_path, lease="10s")
    restarted = None
    try:
        release = threading.Event()
        started = threading.Event()
        worker = Worker(server=first.url, name="py-reconnect", reconnect_backoff=(0.05, 0.5))

        @worker.task("reconnect.hold", version="1.0.0")
        def hold(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
            started.set()
            assert release.wait(STEP_TIMEOUT)
            return {"attempt": ctx.attempt}

        running = run_worker(worker)
        with Client(first.url, timeout=STEP_TIMEOUT) as client:
            run = client.submit(spec={"name": "py-reconnect", "steps": [{"id": "h", "task": "reconnect.hold"}]})
        assert started.wait(STEP_TIMEOUT)

        first.process.kill()
        first.process.wait()
        release.set()  # the handler finishes while no stream is open
        assert _wait(lambda: worker.state.unacknowledged == 1 and not worker.state.connected), worker.state

        restarted = start_server(tmp_path, port=first.port, lease="10s", log_name="server-2.log")
        with Client(restarted.url, timeout=STEP_TIMEOUT) as client:
            done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)
        assert done.state == RunState.Value("RUN_STATE_SUCCEEDED"), done.error
        assert (done.steps[0].attempt, done.steps[0].lost_attempts) == (1, 0)
        assert to_dict(done.steps[0].outputs) == {"attempt": 1}
        assert _wait(lambda: worker.state.in_flight == 0 and worker.state.sessions == 2), worker.state
        running.join()
    finally:
        stop_server(first.process)
        if restarted is not None:
            stop_server(restarted.process)


def _wait(predicate: Any) -> bool:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

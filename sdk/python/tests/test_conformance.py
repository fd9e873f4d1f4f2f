"""The conformance worker as a child process: drain on SIGTERM, and its task types."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dagmesh import Client, to_dict
from dagmesh.v1 import RunState, cluster_pb2, cluster_pb2_grpc

from conftest import STEP_TIMEOUT, Server


class ConformanceWorker:
    def __init__(self, server: Server, slots: int = 2) -> None:
        self.instance_id = f"conformance-py-{uuid.uuid4().hex[:8]}"
        self.server = server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dagmesh.conformance", "--server", server.url,
             "--instance-id", self.instance_id, "--slots", str(slots)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.events: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, self.events.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _read(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def info(self) -> cluster_pb2.WorkerInfo | None:
        with self.server.channel() as channel:
            workers = cluster_pb2_grpc.ClusterServiceStub(channel).ListWorkers(cluster_pb2.ListWorkersRequest(), timeout=5)
        return next((w for w in workers.workers if w.instance_id == self.instance_id), None)

    def wait_info(self, predicate: Any) -> cluster_pb2.WorkerInfo:
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "\n".join(self.stderr)
            info = self.info()
            if info is not None and predicate(info):
                return info
            time.sleep(0.05)
        raise AssertionError(f"worker {self.instance_id} never matched; stderr:\n" + "\n".join(self.stderr))

    def next_event(self) -> str:
        try:
            return self.events.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            raise AssertionError("no EVENT line; stderr:\n" + "\n".join(self.stderr)) from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def conformance(server: Server) -> Iterator[ConformanceWorker]:
    worker = ConformanceWorker(server)
    try:
        worker.wait_info(lambda w: w.connected and w.sdk_language == "python")
        yield worker
    finally:
        worker.stop()


def test_sigterm_drains_in_flight_work_and_exits_0(server: Server, client: Client, conformance: ConformanceWorker) -> None:
    run = client.submit(
        spec={"name": "py-conformance-drain",
              "steps": [{"id": "s", "task": "conformance.sleep@1.0.0", "inputs": {"ms": "1500"}}]}
    )
    assert conformance.next_event() == f"EVENT started {run.run_id}/s 1"

    conformance.process.send_signal(signal.SIGTERM)
    info = conformance.wait_info(lambda w: w.draining)
    assert info.tasks == [f"{run.run_id}/s#1"], "the running task stays with the draining worker"
    assert conformance.process.wait(timeout=STEP_TIMEOUT) == 0, "\n".join(conformance.stderr)

    done = client.get_run(run.run_id)
    assert done.state == RunState.Value("RUN_STATE_SUCCEEDED"), done.error
    assert (done.steps[0].attempt, done.steps[0].lost_attempts) == (1, 0)
    assert to_dict(done.steps[0].outputs) == {"slept": 1500, "attempt": 1}
    assert conformance.info() is None or not conformance.info().connected


def test_conformance_task_types(server: Server, client: Client, conformance: ConformanceWorker) -> None:
    run = client.submit(
        spec={
            "name": "py-conformance-types",
            "continue_on_failure": True,
            "steps": [
                {"id": "echo", "task": "conformance.echo@1.0.0", "inputs": {"a": "inputs.a", "b": "[1, 2.5]"}},
                {"id": "progress", "task": "conformance.progress@1.0.0", "inputs": {"steps": "3"}},
                {"id": "sleep", "task": "conformance.sleep@1.0.0", "needs": ["echo"],
                 "inputs": {"ms": "10", "first_attempt_ms": "20"}},
                {"id": "big", "task": "conformance.big@1.0.0", "needs": ["progress"], "inputs": {"bytes": "100"}},
            ],
        },
        inputs={"a": {"nested": True}},
    )
    progress: list[str] = []
    # after_seq=0: the whole event log, so reports made before the watch began count too.
    for message in client.watch_run(run.run_id, after_seq=0):
        if message.WhichOneof("message") == "event" and message.event.WhichOneof("event") == "step_progress":
            progress.append(message.event.step_progress.message)
    done = client.get_run(run.run_id)
    outputs = {s.step_id: to_dict(s.outputs) for s in done.steps}
    assert done.state == RunState.Value("RUN_STATE_SUCCEEDED"), done.error
    assert outputs == {
        "echo": {"a": {"nested": True}, "b": [1, 2.5]},
        "progress": {"done": 3},
        "sleep": {"slept": 20, "attempt": 1},
        "big": {"blob": "x" * 100},
    }
    # The executor keeps progress at most ~5 times a second per step (the latest value wins, and
    # the last one is written before the result): what reaches the log is in order and ends
    # with the last report.
    assert progress, "progress reached the watcher"
    assert progress == sorted(progress) and set(progress) <= {"step 1", "step 2", "step 3"}
    assert progress[-1] == "step 3"
    started = sorted(conformance.next_event() for _ in range(4))
    assert started == sorted(f"EVENT started {run.run_id}/{s} 1" for s in ("echo", "progress", "sleep", "big"))

    cancel_run = client.submit(spec={"name": "py-conformance-cancel", "steps": [{"id": "w", "task": "conformance.wait_cancel@1.0.0"}]})
    assert conformance.next_event() == f"EVENT started {cancel_run.run_id}/w 1"
    client.cancel_run(cancel_run.run_id)
    assert conformance.next_event() == f"EVENT cancelled {cancel_run.run_id}/w 1"
    assert client.wait_for_run(cancel_run.run_id, timeout=STEP_TIMEOUT).state == RunState.Value("RUN_STATE_CANCELLED")

"""`python -m dagmesh.worker MODULE:ATTRIBUTE` runs a worker defined in the user's module."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from dagmesh import Client, to_dict
from dagmesh.v1 import RunState, StepState, cluster_pb2, cluster_pb2_grpc

from conftest import STEP_TIMEOUT, Server


def _start_worker(server: Server, cwd: Path, target: str, instance_id: str, name: str) -> subprocess.Popen[str]:
    """`python -m dagmesh.worker TARGET` in `cwd`, stdout and stderr together; returns once the
    server lists it as connected."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dagmesh.worker", target, "--server", server.url, "--instance-id", instance_id],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + STEP_TIMEOUT
    with server.channel() as channel:
        cluster = cluster_pb2_grpc.ClusterServiceStub(channel)
        while not any(
            w.instance_id == instance_id and w.connected and w.worker_name == name
            for w in cluster.ListWorkers(cluster_pb2.ListWorkersRequest(), timeout=5).workers
        ):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"worker did not connect: {process.communicate()[0]}")
            time.sleep(0.05)
    return process


def test_worker_module_runs_and_drains(server: Server, client: Client, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    (tmp_path / "my_workers.py").write_text(
        textwrap.dedent(
            f"""
            from dagmesh import Worker

            worker = Worker(server="http://127.0.0.1:1", name="thumbnailer")

            @worker.task("thumbnail.{unique}", version="1.2.0")
            def thumbnail(ctx, inputs):
                return {{"url": inputs["image"] + ".thumb.jpg"}}
            """
        )
    )
    instance_id = f"cli-{unique}"
    process = _start_worker(server, tmp_path, "my_workers:worker", instance_id, "thumbnailer")
    try:
        run = client.submit(
            spec={"name": f"py-cli-{unique}", "steps": [{"id": "t", "task": f"thumbnail.{unique}@^1", "inputs": {"image": "'a.jpg'"}}]}
        )
        done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)
        assert done.state == RunState.Value("RUN_STATE_SUCCEEDED"), done.error
        assert to_dict(done.steps[0].outputs) == {"url": "a.jpg.thumb.jpg"}
        assert done.steps[0].worker == instance_id

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=STEP_TIMEOUT)
        assert process.returncode == 0, output
        assert "drained" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# A log record of `setup_logging`'s format starts with its time; traceback lines do not.
_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.MULTILINE)


def _records(output: str) -> list[str]:
    starts = [m.start() for m in _RECORD_START.finditer(output)]
    return [output[a:b].rstrip("\n") for a, b in zip(starts, starts[1:] + [len(output)])]


def test_expected_failures_log_one_line_and_unexpected_ones_a_traceback(
    server: Server, client: Client, tmp_path: Path
) -> None:
    unique = uuid.uuid4().hex[:8]
    (tmp_path / "failing_workers.py").write_text(
        textwrap.dedent(
            f"""
            from dagmesh import TaskError, Worker

            worker = Worker(server="http://127.0.0.1:1", name="failing")

            @worker.task("bad.{unique}", version="1.0.0")
            def bad(ctx, inputs):
                raise TaskError("no images given")

            @worker.task("flaky.{unique}", version="1.0.0")
            async def flaky(ctx, inputs):
                if ctx.attempt == 1:
                    raise TaskError("warehouse busy", retryable=True)
                return {{"attempt": ctx.attempt}}

            @worker.task("boom.{unique}", version="1.0.0")
            def boom(ctx, inputs):
                return {{"ratio": 1 / inputs["count"]}}
            """
        )
    )
    process = _start_worker(server, tmp_path, "failing_workers:worker", f"cli-fail-{unique}", "failing")
    try:
        retry = {"max_attempts": 3, "initial_backoff": "50ms"}
        run = client.submit(
            spec={
                "name": f"py-cli-failures-{unique}",
                "continue_on_failure": True,
                "steps": [
                    {"id": "bad", "task": f"bad.{unique}@1", "retry": retry},
                    {"id": "flaky", "task": f"flaky.{unique}@1", "retry": retry},
                    {"id": "boom", "task": f"boom.{unique}@1", "retry": {"max_attempts": 1}, "inputs": {"count": "0"}},
                ],
            }
        )
        done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=STEP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output

    # What the executor got does not depend on how it was logged.
    steps = {s.step_id: s for s in done.steps}
    assert (steps["bad"].state, steps["bad"].attempt, steps["bad"].error) == (
        StepState.Value("STEP_STATE_FAILED"), 1, "no images given"
    )
    assert (steps["flaky"].state, steps["flaky"].attempt) == (StepState.Value("STEP_STATE_SUCCEEDED"), 2)
    assert steps["boom"].error == "ZeroDivisionError: division by zero"

    failures = [r for r in _records(output) if "task failed" in r]

    def failed(step_id: str) -> list[str]:
        return [r for r in failures if f"task failed: {run.run_id}/{step_id}#1 {step_id}.{unique} " in r]

    # A TaskError, retryable or not: one line naming the attempt and the task type, no traceback.
    assert len(failed("bad")) == 1, output
    assert failed("bad")[0].endswith(
        f"WARNING dagmesh.worker: task failed: {run.run_id}/bad#1 bad.{unique} (retryable=False): no images given"
    ), output
    assert len(failed("flaky")) == 1, output
    assert failed("flaky")[0].endswith(" (retryable=True): warehouse busy"), output
    assert "\n" not in failed("bad")[0] + failed("flaky")[0], output
    # Any other exception: at ERROR, with the traceback down to the handler's line.
    assert len(failed("boom")) == 1, output
    boom = failed("boom")[0]
    assert " ERROR dagmesh.worker: task failed: " in boom.splitlines()[0], boom
    assert boom.splitlines()[0].endswith("(retryable=True): ZeroDivisionError: division by zero"), boom
    assert "Traceback (most recent call last)" in boom and 'return {"ratio": 1 / inputs["count"]}' in boom, boom
    assert output.count("Traceback") == 1, output


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("no_such_module.workers:worker", "no module named 'no_such_module'"),
        ("dagmesh:no_such_worker", "module 'dagmesh' has no attribute 'no_such_worker'"),
        ("targets.no_such_module:worker", "no module named 'targets.no_such_module'"),
        ("targets:wrkr", "module 'targets' has no attribute 'wrkr'"),
        ("targets:config.wrkr", "'targets:config' has no attribute 'wrkr'"),
        ("targets", "module 'targets' has no attribute 'worker' (a target without ':' means targets:worker)"),
        ("targets:count", "targets:count is not a dagmesh Worker (it is of type int)"),
        ("targets:Worker", "targets:Worker is not a dagmesh Worker (it is the class Worker)"),
        ("targets:make", "targets:make() returned an object of type str, not a dagmesh Worker"),
        (":worker", "expected MODULE:ATTRIBUTE, e.g. mypkg.workers:worker"),
        # A module of the user's that imports a missing one: name that one, and where.
        ("needs_dep:worker", "importing 'needs_dep' failed: No module named 'not_installed_dep' (at {dir}/needs_dep.py, line 3)"),
    ],
)
def test_a_bad_target_is_one_line_and_exit_status_2(tmp_path: Path, target: str, says: str) -> None:
    (tmp_path / "targets.py").write_text(
        textwrap.dedent(
            """
            import types
            from dagmesh import Worker

            count = 3
            config = types.SimpleNamespace(workers=[])

            def make():
                return "not a worker"
            """
        )
    )
    (tmp_path / "needs_dep.py").write_text("from dagmesh import Worker\n\nimport not_installed_dep\n")
    done = subprocess.run(
        [sys.executable, "-m", "dagmesh.worker", target, "--server", "http://127.0.0.1:1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == f"error: cannot load worker target {target!r}: {says.format(dir=tmp_path.resolve())}\n"

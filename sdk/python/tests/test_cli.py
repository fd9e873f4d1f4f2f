"""`python -m dagmesh.worker MODULE:ATTRIBUTE` runs a worker defined in the user's module."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path


from dagmesh import Client, to_dict
from dagmesh.v1 import RunState, cluster_pb2, cluster_pb2_grpc

from conftest import STEP_TIMEOUT, Server


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
    process = subprocess.Popen(
        [sys.executable, "-m", "dagmesh.worker", "my_workers:worker", "--server", server.url, "--instance-id", instance_id],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        with server.channel() as channel:
            cluster = cluster_pb2_grpc.ClusterServiceStub(channel)
            while not any(
                w.instance_id == instance_id and w.connected and w.worker_name == "thumbnailer"
                for w in cluster.ListWorkers(cluster_pb2.ListWorkersRequest(), timeout=5).workers
            ):
                assert process.poll() is None and time.monotonic() < deadline, "worker did not connect"
                time.sleep(0.05)
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

"""Command-line entry points shared by `python -m dagmesh.worker` and the conformance worker."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from dagmesh._worker import Worker
from dagmesh.errors import WorkerAborted, WorkerRejected

__all__ = ["run_worker", "run_worker_main", "setup_logging"]

log = logging.getLogger("dagmesh.worker")


def setup_logging(level: str) -> None:
    """Logs go to stderr (stdout stays free for the program's own output)."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_worker(worker: Worker) -> int:
    """Runs `worker` with signal handling; the process exit status: 0 after a drain, 2 if the
    executor rejected the worker, 130 after an abort (second signal)."""
    try:
        worker.run()
    except WorkerRejected as err:
        log.error("%s", err)
        return 2
    except WorkerAborted as err:
        log.error("%s", err)
        sys.stdout.flush()
        sys.stderr.flush()
        # Sync handlers still running in pool threads would hold up interpreter exit.
        os._exit(130)
    return 0


def load_worker(spec: str) -> Worker:
    module_name, sep, attribute = spec.partition(":")
    if not sep:
        attribute = "worker"
    module = importlib.import_module(module_name)
    target: object = module
    for part in attribute.split("."):
        target = getattr(target, part)
    if not isinstance(target, Worker) and callable(target):
        target = target()  # a factory
    if not isinstance(target, Worker):
        raise SystemExit(f"{spec} is a {type(target).__name__}, not a dagmesh Worker")
    return target


def run_worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dagmesh.worker",
        description=(
            "Run the dagmesh Worker found at MODULE:ATTRIBUTE (ATTRIBUTE defaults to 'worker'; it "
            "may also be a function returning a Worker). SIGTERM or SIGINT drains: no new work, "
            "running tasks finish and are recorded, then the process exits 0."
        ),
    )
    parser.add_argument("target", metavar="MODULE:ATTRIBUTE", help="e.g. mypkg.workers:worker")
    parser.add_argument("--server", default=os.environ.get("DAGMESH_SERVER"), help="executor URL, overrides the worker's (env DAGMESH_SERVER)")
    parser.add_argument("--name", default=None, help="worker name, overrides the worker's")
    parser.add_argument("--instance-id", default=os.environ.get("DAGMESH_INSTANCE_ID"), help="instance id, overrides the worker's (env DAGMESH_INSTANCE_ID)")
    parser.add_argument("--slots", type=int, default=None, help="task slots, overrides the worker's")
    parser.add_argument("--log-level", default=os.environ.get("DAGMESH_LOG_LEVEL", "info"), help="debug, info, warning or error (env DAGMESH_LOG_LEVEL)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    worker = load_worker(args.target)
    worker._override(server=args.server, name=args.name, instance_id=args.instance_id, slots=args.slots)
    return run_worker(worker)

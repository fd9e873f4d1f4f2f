"""Command-line entry points shared by `python -m dagmesh.worker` and the conformance worker."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from dagmesh._channel import SECURITY_OPTIONS
from dagmesh._worker import Worker, _defer_settings
from dagmesh.errors import WorkerAborted, WorkerRejected

__all__ = ["add_security_arguments", "run_worker", "run_worker_main", "security_arguments", "setup_logging"]

_HELP = {
    "token": "bearer token sent on every call",
    "token_file": "file holding the bearer token (used when no token is given)",
    "tls_ca": "PEM file of the CA(s) of the server certificate (https:// only; default: system roots)",
    "tls_client_cert": "PEM client certificate chain for mTLS (with --tls-client-key)",
    "tls_client_key": "PEM private key of the client certificate",
    "tls_server_name": "name to verify in the server certificate instead of the URL's host",
}

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


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--token, --token-file, --tls-ca, --tls-client-cert, --tls-client-key, --tls-server-name.
    Each defaults to its environment variable; the fallback happens in the Worker, so that an
    error names the variable a bad value came from."""
    group = parser.add_argument_group("security (a flag wins over its environment variable)")
    for name, (var, flag, _what) in SECURITY_OPTIONS.items():
        metavar = "TOKEN" if name == "token" else "NAME" if name == "tls_server_name" else "FILE"
        group.add_argument(flag, dest=name, default=None, metavar=metavar, help=f"{_HELP[name]} (env {var})")


def security_arguments(args: argparse.Namespace) -> dict[str, str | None]:
    return {name: getattr(args, name) for name in SECURITY_OPTIONS}


def load_worker(spec: str) -> Worker:
    module_name, sep, attribute = spec.partition(":")
    if not sep:
        attribute = "worker"
    deferred = _defer_settings.set(True)
    try:
        module = importlib.import_module(module_name)
        target: object = module
        for part in attribute.split("."):
            target = getattr(target, part)
        if not isinstance(target, Worker) and callable(target):
            target = target()  # a factory
    finally:
        _defer_settings.reset(deferred)
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
    add_security_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    worker = load_worker(args.target)
    try:
        worker._override(
            server=args.server,
            name=args.name,
            instance_id=args.instance_id,
            slots=args.slots,
            security=security_arguments(args),
        )
    except ValueError as err:
        parser.error(str(err))
    return run_worker(worker)

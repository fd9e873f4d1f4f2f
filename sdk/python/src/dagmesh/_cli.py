"""Command-line entry points shared by `python -m dagmesh.worker` and the conformance worker."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

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


_MISSING = object()


class TargetError(Exception):
    """A MODULE:ATTRIBUTE that does not lead to a Worker; the message names what is missing."""


def load_worker(spec: str) -> Worker:
    """The Worker at `spec`: MODULE:ATTRIBUTE (ATTRIBUTE defaults to `worker` and may be dotted),
    an attribute that is a Worker or a function returning one. Raises `TargetError` when the
    module, an attribute or a module the target imports is missing, or when it is no Worker;
    any other exception of the user's code (a syntax error, a failing factory) propagates."""
    module_name, sep, attribute = spec.partition(":")
    if not sep:
        attribute = "worker"
    where = f"cannot load worker target {spec!r}"
    if not module_name or not attribute:
        raise TargetError(f"{where}: expected MODULE:ATTRIBUTE, e.g. mypkg.workers:worker")
    deferred = _defer_settings.set(True)
    try:
        target: object = _import(module_name, where)
        parts = attribute.split(".")
        for i, part in enumerate(parts):
            value = getattr(target, part, _MISSING)
            if value is _MISSING:
                owner = f"module {module_name!r}" if i == 0 else repr(f"{module_name}:{'.'.join(parts[:i])}")
                hint = "" if sep else f" (a target without ':' means {module_name}:worker)"
                raise TargetError(f"{where}: {owner} has no attribute {part!r}{hint}")
            target = value
        what = f"{module_name}:{attribute}"
        if isinstance(target, Worker):
            return target
        if isinstance(target, type):
            # Calling a class (Worker itself, say) would make a worker without the user's tasks.
            raise TargetError(f"{where}: {what} is not a dagmesh Worker (it is the class {target.__name__})")
        if not callable(target):
            raise TargetError(f"{where}: {what} is not a dagmesh Worker (it is of type {type(target).__name__})")
        made = target()  # a factory
    finally:
        _defer_settings.reset(deferred)
    if not isinstance(made, Worker):
        raise TargetError(f"{where}: {what}() returned an object of type {type(made).__name__}, not a dagmesh Worker")
    return made


def _import(module_name: str, where: str) -> object:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None)
        if isinstance(err, ModuleNotFoundError) and missing and (
            module_name == missing or module_name.startswith(missing + ".")
        ):
            raise TargetError(f"{where}: no module named {missing!r}") from None
        # The target exists but an import inside it failed (e.g. a dependency not installed):
        # say so, and where, rather than blame the target.
        raise TargetError(f"{where}: importing {module_name!r} failed: {err}{_origin(err)}") from None


def _origin(err: BaseException) -> str:
    """Where a failed import was: " (at FILE, line N)" of the innermost frame outside
    importlib's own machinery, or "" when there is none."""
    frames = [
        frame
        for frame in traceback.extract_tb(err.__traceback__)
        if not frame.filename.startswith("<frozen ") and Path(frame.filename).parent.name != "importlib"
    ]
    if not frames:
        return ""
    return f" (at {frames[-1].filename}, line {frames[-1].lineno})"


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
    try:
        worker = load_worker(args.target)
    except TargetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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

"""The conformance worker: the same task types in every SDK (Rust, Python, C++), so one suite
checks them all against a real executor.

    python -m dagmesh.conformance --server URL --instance-id ID [--slots N] [--name NAME]
        [--token TOKEN | --token-file FILE] [--tls-ca FILE] [--tls-client-cert FILE
        --tls-client-key FILE] [--tls-server-name NAME]

The security flags default to DAGMESH_TOKEN, DAGMESH_TOKEN_FILE, DAGMESH_TLS_CA,
DAGMESH_TLS_CLIENT_CERT, DAGMESH_TLS_CLIENT_KEY and DAGMESH_TLS_SERVER_NAME.

Task types, each version "1.0.0":

- `conformance.echo`: returns its inputs.
- `conformance.progress` {"steps": n}: reports progress k/n with message "step k" for k in
  1..n, 60 ms apart (so coalescing hides no step); returns {"done": n}.
- `conformance.wait_cancel`: waits until cancelled (at most 60 s); then prints
  `EVENT cancelled <task_id> <attempt>` and fails with TaskError("cancelled").
- `conformance.sleep` {"ms": m, "first_attempt_ms": f}: sleeps f ms on attempt 1 when f is
  given, m ms otherwise, ignoring cancellation; returns {"slept": ms, "attempt": attempt}.
- `conformance.big` {"bytes": n}: returns {"blob": "x" * n}.

Every handler first prints `EVENT started <task_id> <attempt>`. Event lines go to stdout
(flushed), logs to stderr. SIGTERM drains; the process then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from dagmesh._cli import add_security_arguments, run_worker, security_arguments, setup_logging
from dagmesh._worker import Worker, _defer_settings
from dagmesh.context import TaskContext
from dagmesh.errors import TaskError

__all__ = ["build_worker", "main"]

VERSION = "1.0.0"
WAIT_CANCEL_MAX_S = 60.0
PROGRESS_STEP_S = 0.06

_stdout_lock = threading.Lock()


def _event(*fields: object) -> None:
    line = " ".join(["EVENT", *(str(f) for f in fields)])
    with _stdout_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def build_worker(
    server: str,
    instance_id: str | None = None,
    slots: int = 1,
    name: str = "conformance-python",
    **security: Any,
) -> Worker:
    """`security`: the Worker's token / TLS options (each falls back on its env var)."""
    worker = Worker(server=server, name=name, slots=slots, instance_id=instance_id, **security)

    @worker.task("conformance.echo", version=VERSION)
    async def echo(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        _event("started", ctx.task_id, ctx.attempt)
        return inputs

    @worker.task("conformance.progress", version=VERSION)
    async def progress(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        _event("started", ctx.task_id, ctx.attempt)
        steps = int(inputs.get("steps", 0))
        for k in range(1, steps + 1):
            if k > 1:
                await asyncio.sleep(PROGRESS_STEP_S)
            ctx.progress(k / steps, f"step {k}")
        return {"done": steps}

    @worker.task("conformance.wait_cancel", version=VERSION)
    async def wait_cancel(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        _event("started", ctx.task_id, ctx.attempt)
        try:
            await asyncio.wait_for(ctx.wait_cancelled(), WAIT_CANCEL_MAX_S)
        except asyncio.TimeoutError:
            raise TaskError(f"not cancelled within {WAIT_CANCEL_MAX_S:g} s") from None
        _event("cancelled", ctx.task_id, ctx.attempt)
        raise TaskError("cancelled")

    @worker.task("conformance.sleep", version=VERSION)
    async def sleep(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        _event("started", ctx.task_id, ctx.attempt)
        first = inputs.get("first_attempt_ms")
        ms = first if ctx.attempt == 1 and first is not None else inputs.get("ms", 0)
        await asyncio.sleep(float(ms) / 1000)
        return {"slept": ms, "attempt": ctx.attempt}

    @worker.task("conformance.big", version=VERSION)
    async def big(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        _event("started", ctx.task_id, ctx.attempt)
        return {"blob": "x" * int(inputs.get("bytes", 0))}

    return worker


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dagmesh.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="executor URL, e.g. http://127.0.0.1:7070")
    parser.add_argument("--instance-id", required=True, help="the worker's instance id")
    parser.add_argument("--slots", type=int, default=1, help="task slots (default 1)")
    parser.add_argument("--name", default="conformance-python", help="worker name (default conformance-python)")
    parser.add_argument("--log-level", default=os.environ.get("DAGMESH_LOG_LEVEL", "info"))
    add_security_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    # Flags are applied over the environment once parsed, so that errors name the flag.
    deferred = _defer_settings.set(True)
    try:
        worker = build_worker(args.server, instance_id=args.instance_id, slots=args.slots, name=args.name)
    finally:
        _defer_settings.reset(deferred)
    try:
        worker._override(security=security_arguments(args))
    except ValueError as err:
        parser.error(str(err))
    return run_worker(worker)


if __name__ == "__main__":
    sys.exit(main())

"""Step workers: register task handlers, dial the run-executor, run what it assigns.

A `Worker` holds one `WorkerService.Connect` stream at a time (grpc.aio) and implements the
protocol described at the top of `proto/dagmesh/v1/worker.proto`:

- Hello (task types, labels, slots, tasks in flight), then a heartbeat every
  `Welcome.heartbeat_interval_ms`;
- each Assign runs its handler: an `async def` on the event loop, a plain function in the
  worker's thread pool (so CPU-bound code never holds up heartbeats on the stream); Started,
  progress, logs, then exactly one Completed or Failed, all naming (task_id, attempt);
- a result is kept until the executor answers Recorded for it (whatever the outcome) and sent
  again after a reconnect, so a result is never lost when the stream breaks;
- Cancel sets the attempt's `TaskContext.cancelled`;
- the worker's own stop (SIGTERM/SIGINT for `Worker.run`, the `stop_event` of
  `Worker.run_async`, or `Worker.drain()`) sends Draining, takes no new work, waits until every
  result is Recorded, closes the stream and returns;
- Drain from the executor means the *executor* is going away (a restart, a rollout): the worker
  takes no new work from that stream, finishes what runs, and once every result is Recorded (or
  the executor closed the stream first, leaving results to send again) closes the stream and
  reconnects, to resume with the next executor. It does not return.

When the stream breaks, the executor drained it, or the executor is unreachable, the worker
reconnects with exponential backoff and jitter (100 ms to 5 s) under the same `instance_id`,
listing in `Hello.in_flight` the tasks it still runs and the results not yet recorded. The
errors it does not retry are refusals that the same stream would get again: an executor that
refuses the Hello (INVALID_ARGUMENT), a token it does not accept (UNAUTHENTICATED) or one whose
scope does not cover the worker's task types (PERMISSION_DENIED): configuration mistakes,
logged at ERROR and raised as `WorkerRejected`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import inspect
import json
import logging
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, Union

import grpc
import grpc.aio

from dagmesh import _tracing
from dagmesh._channel import SECURITY_OPTIONS, ChannelSettings, PathLike, aio_channel, resolve
from dagmesh._proto.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from dagmesh.context import TaskContext
from dagmesh.errors import TaskError, WorkerAborted, WorkerRejected
from dagmesh.payload import check_depth, to_dict, to_struct

__all__ = ["Handler", "Worker", "WorkerState"]

SDK_VERSION = "0.1.0"  # keep in step with pyproject.toml

log = logging.getLogger("dagmesh.worker")

Handler = Callable[[TaskContext, dict[str, Any]], Union[Mapping[str, Any], None, Awaitable[Any]]]
H = TypeVar("H", bound=Callable[..., Any])

DEFAULT_BACKOFF = (0.1, 5.0)
# Hello to Welcome. An executor that accepts the connection but never answers is as good as down.
HANDSHAKE_TIMEOUT = 15.0
# After a drain, how long to wait for the executor to close its side of the stream.
CLOSE_GRACE = 2.0
DEFAULT_HEARTBEAT = 5.0
# Progress is for people watching; more often than this only costs the executor writes.
PROGRESS_MIN_INTERVAL = 0.05
LOG_FLUSH_INTERVAL = 0.1
# Progress and log messages queued towards the executor before task pumps wait for the stream.
OUTBOX_CAPACITY = 1024

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)

_Key = tuple[str, int]

# Set by the command line while it imports the worker's module: the settings are resolved once
# its flags are applied (`Worker._override`), so that e.g. `--server https://...` with
# DAGMESH_TLS_CA set is not refused for the module's own `http://` default first.
_defer_settings: contextvars.ContextVar[bool] = contextvars.ContextVar("dagmesh_defer_settings", default=False)


@dataclasses.dataclass(frozen=True)
class WorkerState:
    """A snapshot of the worker, replaced after every change."""

    connected: bool = False
    """A stream is open and welcomed."""
    session_id: str | None = None
    """`Welcome.session_id` of the current stream, if connected."""
    draining: bool = False
    """The worker was told to stop (`drain()`, a signal, `stop_event`): it takes no new work and
    returns once every result is recorded."""
    executor_draining: bool = False
    """The executor of the current stream sent Drain (it is going away): no new work is taken
    from it, and once nothing is in flight the worker reconnects and resumes."""
    running: int = 0
    """Handlers still running."""
    unacknowledged: int = 0
    """Finished tasks whose results the executor has not yet Recorded."""
    sessions: int = 0
    """Streams that got a Welcome so far, the current one included."""

    @property
    def in_flight(self) -> int:
        """Tasks the worker still answers for (what the next Hello lists in `in_flight`)."""
        return self.running + self.unacknowledged


@dataclasses.dataclass(frozen=True)
class _Registered:
    name: str
    version: str
    fn: Callable[..., Any]
    is_async: bool


class Worker:
    """A worker process's connection to the run-executor; see the module doc.

    ```python
    worker = Worker(server="http://127.0.0.1:7070", name="thumbnailer", labels={"gpu": "true"}, slots=4)

    @worker.task("thumbnail", version="1.2.0")
    def thumbnail(ctx: TaskContext, inputs: dict) -> dict:
        ctx.progress(0.5, "resizing")
        return {"url": "..."}

    worker.run()  # until SIGTERM/SIGINT, then drains
    ```
    """

    def __init__(
        self,
        server: str = "http://127.0.0.1:7070",
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        slots: int = 1,
        instance_id: str | None = None,
        *,
        max_threads: int | None = None,
        reconnect_backoff: tuple[float, float] = DEFAULT_BACKOFF,
        token: str | None = None,
        token_file: PathLike | None = None,
        tls_ca: PathLike | None = None,
        tls_client_cert: PathLike | None = None,
        tls_client_key: PathLike | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """
        server: the executor's URL, `http://host:port` (or `https://` for TLS).
        name: logical worker name (the pool), `Hello.worker_name`; defaults to the script's name.
        labels: matched against `StepSpec.labels`, e.g. `{"gpu": "true"}`.
        slots: how many task slots this worker holds at once (at least 1).
        instance_id: unique per process, kept across reconnects so the executor hands back the
            tasks it held; defaults to the name plus a random suffix.
        max_threads: size of the thread pool for sync handlers (default: `slots`).
        reconnect_backoff: first and largest delay between reconnect attempts, in seconds.
        token / token_file: the bearer token (or a file holding it) sent on the stream as
            `authorization: Bearer <token>`; default `DAGMESH_TOKEN` / `DAGMESH_TOKEN_FILE`.
        tls_ca, tls_client_cert, tls_client_key, tls_server_name: TLS for an `https://`
            server: the CA file of the server certificate (default: system roots), the client
            certificate chain and key for mTLS, the name to verify instead of the URL's host;
            default `DAGMESH_TLS_CA`, `DAGMESH_TLS_CLIENT_CERT`, `DAGMESH_TLS_CLIENT_KEY`,
            `DAGMESH_TLS_SERVER_NAME`.

        Bad security settings (TLS options with an `http://` URL, a client certificate without
        its key, a file that cannot be read) raise ValueError naming the setting.
        """
        self._security: dict[str, Any] = {
            "token": token,
            "token_file": token_file,
            "tls_ca": tls_ca,
            "tls_client_cert": tls_client_cert,
            "tls_client_key": tls_client_key,
            "tls_server_name": tls_server_name,
        }
        self._sources: dict[str, str] = {}
        self._settings: ChannelSettings | None = None if _defer_settings.get() else resolve(server, **self._security)
        self._server = server
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError("slots must be an integer of at least 1")
        name = name if name is not None else _default_name()
        if not name:
            raise ValueError("worker name is empty")
        self._name = name
        self._instance_id = instance_id or f"{name}-{uuid.uuid4().hex[:12]}"
        self._labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self._slots = slots
        self._max_threads = max_threads or slots
        initial, largest = reconnect_backoff
        self._backoff = (max(initial, 0.001), max(largest, initial))
        self._tasks: list[_Registered] = []
        self._state = WorkerState()
        self._driver: _Driver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_drain = False
        self._pending_abort = False

    def __repr__(self) -> str:
        return (
            f"Worker(server={self._server!r}, name={self._name!r}, "
            f"instance_id={self._instance_id!r}, slots={self._slots})"
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def state(self) -> WorkerState:
        """The latest snapshot; safe to read from any thread."""
        return self._state

    @property
    def task_types(self) -> list[tuple[str, str]]:
        """The registered (name, version) pairs."""
        return [(t.name, t.version) for t in self._tasks]

    def task(self, name: str, version: str) -> Callable[[H], H]:
        """Registers the decorated function as the handler of task type `name` at `version`
        (semver, e.g. "1.2.0"). It is called as `handler(ctx, inputs)` with the step's inputs
        as a dict and returns a dict (None means `{}`; any other value is sent as
        `{"value": ...}`). `async def` handlers run on the event loop, plain functions in the
        worker's thread pool. Raise `TaskError` to fail the attempt; any other exception fails
        it as retryable."""

        def register(fn: H) -> H:
            self.register(name, version, fn)
            return fn

        return register

    def register(self, name: str, version: str, fn: Handler) -> None:
        """The non-decorator form of `task`."""
        if not name:
            raise ValueError("task type name is empty")
        if not _SEMVER.match(version or ""):
            raise ValueError(f"task type {name!r} has an invalid version {version!r}: expected semver, e.g. 1.2.0")
        if any(t.name == name and t.version == version for t in self._tasks):
            raise ValueError(f"task type {name!r} version {version} is registered twice")
        if not callable(fn):
            raise TypeError(f"handler of {name!r} is not callable")
        self._tasks.append(_Registered(name, version, fn, _is_async(fn)))

    def _override(
        self,
        *,
        server: str | None = None,
        name: str | None = None,
        instance_id: str | None = None,
        slots: int | None = None,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        """Command-line overrides, applied before the worker runs. `security` holds the
        security options given as flags (None or empty: not given, the worker's own option or
        the environment applies)."""
        if self._driver is not None:
            raise RuntimeError("cannot reconfigure a running worker")
        given = {k: v for k, v in (security or {}).items() if v}
        unknown = set(given) - set(SECURITY_OPTIONS)
        if unknown:
            raise ValueError(f"unknown security options: {', '.join(sorted(unknown))}")
        if server or given or self._settings is None:
            options = dict(self._security)
            sources = dict(self._sources)
            if "token" in given or "token_file" in given:
                # A token flag replaces whichever token the code gave.
                options["token"] = options["token_file"] = None
            for name, value in given.items():
                options[name] = value
                sources[name] = SECURITY_OPTIONS[name][1]
            settings = resolve(server or self._server, sources=sources, **options)
            self._security, self._sources, self._settings = options, sources, settings
            self._server = settings.server
        if name:
            if self._instance_id.startswith(f"{self._name}-") and not instance_id:
                self._instance_id = f"{name}-{uuid.uuid4().hex[:12]}"
            self._name = name
        if instance_id:
            self._instance_id = instance_id
        if slots is not None:
            if slots < 1:
                raise ValueError("slots must be at least 1")
            if self._max_threads == self._slots:
                self._max_threads = slots
            self._slots = slots

    def _handler(self, name: str, version: str) -> _Registered | None:
        """The handler for an Assign's task type. An empty version (an executor that does not
        say) matches the one registered version of that name."""
        if not version:
            by_name = [t for t in self._tasks if t.name == name]
            return by_name[0] if len(by_name) == 1 else None
        return next((t for t in self._tasks if t.name == name and t.version == version), None)

    def drain(self) -> None:
        """Starts a drain: Draining is sent, no new work is taken, and `run` returns once every
        running task has finished and its result is recorded. Safe from any thread."""
        self._pending_drain = True
        self._in_loop(lambda driver: driver.begin_drain("drain requested"))

    def abort(self) -> None:
        """Stops at once: running async handlers are cancelled, results not yet recorded are
        lost to this worker (the executor re-runs those tasks after the lease), and `run`
        raises `WorkerAborted`. Sync handlers already running cannot be interrupted: their
        threads finish on their own. Safe from any thread."""
        self._pending_abort = True
        self._in_loop(lambda driver: driver.abort())

    def _in_loop(self, fn: Callable[[_Driver], None]) -> None:
        """Calls `fn` with the running driver, on its loop; a worker not running yet picks the
        request up from the pending flags when it starts."""
        loop = self._loop

        def call() -> None:
            if self._driver is not None:
                fn(self._driver)

        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:
            pass  # the loop just closed: the worker is done

    def run(self) -> None:
        """Runs until drained, in a new event loop. The first SIGTERM or SIGINT starts a drain;
        a second one aborts. Raises `WorkerRejected` if the executor refuses the Hello and
        `WorkerAborted` after an abort."""
        asyncio.run(self._run_with_signals())

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        signals_seen = 0

        def on_signal(signum: signal.Signals) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                log.info("%s received, draining (signal again to abort)", signum.name)
                self.drain()
            else:
                log.warning("second signal, aborting")
                self.abort()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
                log.warning("cannot listen for %s; drain through Worker.drain()", sig.name)
        try:
            await self.run_async()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def run_async(self, stop_event: asyncio.Event | threading.Event | None = None) -> None:
        """Runs until drained, on the running event loop; for embedding. `stop_event` being set
        starts a drain (an `asyncio.Event` of this loop, or a `threading.Event`); so do the
        executor's Drain and `drain()`. Installs no signal handlers."""
        if not self._tasks:
            raise ValueError("a worker needs at least one task type (use @worker.task)")
        if self._driver is not None:
            raise RuntimeError("this worker is already running")
        if self._settings is None:
            self._settings = resolve(self._server, sources=self._sources, **self._security)
        self._loop = asyncio.get_running_loop()
        driver = _Driver(self)
        self._driver = driver
        watcher = asyncio.create_task(_watch_stop(stop_event, self.drain)) if stop_event is not None else None
        if self._pending_drain:
            driver.begin_drain("drain requested")
        if self._pending_abort:
            driver.abort()
        try:
            await driver.run()
        finally:
            if watcher is not None:
                watcher.cancel()
            self._driver = None
            self._loop = None
            self._pending_drain = self._pending_abort = False

    async def wait_for_state(
        self, predicate: Callable[[WorkerState], bool], timeout: float | None = None
    ) -> WorkerState:
        """Waits (on the worker's loop) until the state satisfies `predicate`; for tests and
        readiness probes. Raises `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate(self._state):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"worker state still {self._state}")
            await asyncio.sleep(0.01)
        return self._state


async def _watch_stop(stop_event: asyncio.Event | threading.Event, drain: Callable[[], None]) -> None:
    if isinstance(stop_event, asyncio.Event):
        await stop_event.wait()
    else:
        while not stop_event.is_set():
            await asyncio.sleep(0.05)
    drain()


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _default_name() -> str:
    stem = Path(sys.argv[0] if sys.argv and sys.argv[0] else "").stem
    return stem if stem and stem not in ("__main__", "-c") else "worker"


class _Backoff:
    """Doubles from `initial` up to `largest`; each delay is drawn from [d/2, d] so that a fleet
    of workers cut off by the same executor restart does not reconnect in lockstep."""

    def __init__(self, initial: float, largest: float) -> None:
        self._initial = initial
        self._largest = largest
        self._next = initial

    def next_delay(self) -> float:
        base = self._next
        self._next = min(base * 2, self._largest)
        return base * (0.5 + 0.5 * random.random())

    def reset(self) -> None:
        self._next = self._initial


# --- the driver -----------------------------------------------------------------------------


class _OutboxClosed(Exception):
    pass


class _Outbox:
    """Messages towards the executor, in order. Protocol messages (Started, results, heartbeats,
    Draining) are pushed without waiting; task pumps `send` progress and logs, waiting while
    the queue is full, so a slow stream holds back pumps (whose progress coalesces in the
    context), never the driver."""

    def __init__(self) -> None:
        self._queue: collections.deque[worker_pb2.WorkerMessage] = collections.deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.closed = False

    def push(self, message: worker_pb2.WorkerMessage) -> None:
        if self.closed:
            return
        self._queue.append(message)
        self._ready.set()
        if len(self._queue) >= OUTBOX_CAPACITY:
            self._room.clear()

    async def send(self, message: worker_pb2.WorkerMessage) -> None:
        while not self.closed and len(self._queue) >= OUTBOX_CAPACITY:
            self._room.clear()
            await self._room.wait()
        self.push(message)

    async def pop(self) -> worker_pb2.WorkerMessage:
        """The next message; after `close`, what is left, then `_OutboxClosed`."""
        while not self._queue:
            if self.closed:
                raise _OutboxClosed
            self._ready.clear()
            await self._ready.wait()
        message = self._queue.popleft()
        if len(self._queue) < OUTBOX_CAPACITY:
            self._room.set()
        return message

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._room.set()


class _Session:
    """One welcomed stream."""

    def __init__(self, channel: grpc.aio.Channel, call: Any, welcome: worker_pb2.Welcome) -> None:
        self.channel = channel
        self.call = call
        self.welcome = welcome
        self.outbox = _Outbox()
        self.broken: str | None = None

    async def close(self) -> None:
        self.outbox.close()
        with contextlib.suppress(Exception):
            self.call.cancel()
        with contextlib.suppress(Exception):
            await self.channel.close()


@dataclasses.dataclass
class _Running:
    slots: int
    ctx: TaskContext
    pump: asyncio.Task[None]


@dataclasses.dataclass
class _Finished:
    """The result (Completed or Failed) waits here until Recorded."""

    result: worker_pb2.WorkerMessage


class _Stop(Exception):
    def __init__(self, aborted: bool) -> None:
        self.aborted = aborted


_DRAINED = "drained"
_EXECUTOR_DRAINED = "executor drained"
_ABORTED = "aborted"
_HEARTBEAT = worker_pb2.WorkerMessage(heartbeat=worker_pb2.Heartbeat())
_DRAINING = worker_pb2.WorkerMessage(draining=worker_pb2.Draining())


class _Driver:
    """Owns a running worker's state: the task table, the current stream, the drain. Everything
    runs on one event loop, so the table needs no locks; only `TaskContext` buffers are shared
    with handler threads."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.loop = asyncio.get_running_loop()
        # Ordered by arrival, so Hello.in_flight and re-sent results come out in a stable order.
        self.tasks: dict[_Key, _Running | _Finished] = {}
        # The worker itself was told to stop: it drains and exits.
        self.draining = False
        # The executor of the current stream sent Drain: no new work from it; once nothing is
        # in flight the worker closes it and reconnects.
        self.executor_draining = False
        self.aborting = False
        self.session: _Session | None = None
        self.sessions = 0
        self.max_payload = 0
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(
            max_workers=worker._max_threads, thread_name_prefix=f"dagmesh-{worker.name}"
        )

    def poke(self) -> None:
        self.wakeup.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = _Backoff(*self.w._backoff)
        # After a stream the executor drained, the next Welcome does not reset the backoff: an
        # executor that drains every stream at once is then dialled ever more slowly, not in a
        # loop.
        reset_on_welcome = True
        log.info(
            "worker starting: name=%s instance=%s server=%s slots=%d tasks=%s",
            self.w.name,
            self.w.instance_id,
            self.w._server,
            self.w.slots,
            ", ".join(f"{n}@{v}" for n, v in self.w.task_types),
        )
        try:
            while True:
                if self.draining and not self.tasks:
                    log.info("drained")
                    return
                try:
                    opened = await self._offline(self._open())
                except _Stop as stop:
                    return self._stopped(stop)
                if isinstance(opened, _Session):
                    if reset_on_welcome:
                        backoff.reset()
                    reset_on_welcome = True
                    end = await self._serve(opened)
                    if end == _DRAINED:
                        log.info("drained")
                        return
                    if end == _ABORTED:
                        raise self._aborted()
                    if end == _EXECUTOR_DRAINED:
                        reset_on_welcome = False
                        log.info("executor drained this stream; reconnecting")
                    else:
                        log.warning("stream broken, reconnecting: %s", end)
                elif " (TLS" in opened:
                    # A handshake that failed (an untrusted certificate, a name mismatch) is
                    # retried, as a server may be replacing its certificate, but it is loud.
                    log.error("cannot open a stream, retrying: %s", opened)
                else:
                    log.warning("cannot open a stream, retrying: %s", opened)
                try:
                    await self._offline(asyncio.sleep(backoff.next_delay()))
                except _Stop as stop:
                    return self._stopped(stop)
        finally:
            for entry in self.tasks.values():
                if isinstance(entry, _Running):
                    entry.pump.cancel()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.session = None
            self.publish()

    def _stopped(self, stop: _Stop) -> None:
        if stop.aborted:
            raise self._aborted()
        log.info("drained")

    def _aborted(self) -> WorkerAborted:
        state = self.state()
        log.warning("aborted: running=%d unacknowledged=%d", state.running, state.unacknowledged)
        return WorkerAborted(state.running, state.unacknowledged)

    async def _offline(self, awaitable: Awaitable[Any]) -> Any:
        """Awaits `awaitable` (connecting, or waiting to retry) while keeping up with what
        happens without a stream: handlers finishing, a drain, an abort."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                self.wakeup.clear()
                if self.aborting:
                    raise _Stop(aborted=True)
                if self.draining and not self.tasks:
                    raise _Stop(aborted=False)
                waiter = asyncio.ensure_future(self.wakeup.wait())
                try:
                    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if task.done():
                    return task.result()
        except _Stop:
            if task.done() and not task.cancelled() and task.exception() is None:
                opened = task.result()
                if isinstance(opened, _Session):  # opened just as the worker stopped; never served
                    await opened.close()
            raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _open(self) -> _Session | str:
        """Dials the executor, sends Hello and waits for Welcome. Returns the session, or why it
        failed (to retry); raises WorkerRejected for a refusal that cannot change by retrying:
        INVALID_ARGUMENT (the Hello), UNAUTHENTICATED (the token), PERMISSION_DENIED (the
        token's scope)."""
        settings = self.w._settings
        assert settings is not None  # resolved by run_async
        channel = aio_channel(settings)
        call: Any = None
        try:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            call = stub.Connect(metadata=settings.metadata)
            await call.write(worker_pb2.WorkerMessage(hello=self.hello()))
            first = await asyncio.wait_for(call.read(), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            await channel.close()
            return f"no welcome within {HANDSHAKE_TIMEOUT:g}s"
        except grpc.aio.AioRpcError as err:
            await channel.close()
            _raise_if_fatal(err.code(), err.details())
            details = err.details() or ""
            return f"{err.code().name}: {details}{settings.hint(err.code(), details)}"
        except asyncio.CancelledError:
            await channel.close()
            raise
        except Exception as err:  # e.g. a write on a call that already failed
            # The call's own status, if it has one, says more than the write's error.
            status = None
            if call is not None and call.done():
                with contextlib.suppress(Exception):
                    status = (await call.code(), await call.details())
            await channel.close()
            if status is not None:
                _raise_if_fatal(*status)
                return f"{status[0].name}: {status[1]}"
            return f"cannot connect to {self.w._server}: {err!r}"
        if first is grpc.aio.EOF:
            await channel.close()
            return "stream closed before welcome"
        if first.WhichOneof("message") != "welcome":
            await channel.close()
            return "first server message is not welcome"
        return _Session(channel, call, first.welcome)

    async def _serve(self, session: _Session) -> str:
        """Serves one welcomed stream; returns _DRAINED, _ABORTED or why the stream broke."""
        welcome = session.welcome
        self.max_payload = welcome.max_payload_bytes
        self.sessions += 1
        self.session = session
        self.executor_draining = False
        resumed = {(r.task_id, r.attempt) for r in welcome.resumed}
        log.info(
            "connected: session=%s resumed=%d in_flight=%d", welcome.session_id, len(resumed), len(self.tasks)
        )
        # Tasks missing from `resumed` are stopped by the Cancel the executor sends for each
        # (protocol point 8), not by this list; it is only logged.
        for key in self.tasks:
            if key not in resumed:
                log.debug("task not resumed by the executor: %s#%d", *key)
        self.publish()
        # Results the executor has not recorded go again: it records a duplicate once and
        # answers Recorded either way.
        for entry in self.tasks.values():
            if isinstance(entry, _Finished):
                session.outbox.push(entry.result)

        interval = welcome.heartbeat_interval_ms / 1000 if welcome.heartbeat_interval_ms else DEFAULT_HEARTBEAT
        writer = asyncio.create_task(self._writer(session), name="dagmesh-writer")
        reader = asyncio.create_task(self._reader(session), name="dagmesh-reader")
        heartbeat = asyncio.create_task(self._heartbeats(session.outbox, interval), name="dagmesh-heartbeat")
        sent_draining = False
        end: str
        try:
            while True:
                self.wakeup.clear()
                if self.aborting:
                    end = _ABORTED
                    break
                if session.broken is not None:
                    end = session.broken
                    break
                if self.draining and not sent_draining:
                    session.outbox.push(_DRAINING)
                    sent_draining = True
                if self.draining and not self.tasks:
                    end = _DRAINED
                    break
                if self.executor_draining and not self.tasks:
                    end = _EXECUTOR_DRAINED
                    break
                await self.wakeup.wait()
        finally:
            self.session = None
            self.executor_draining = False
            heartbeat.cancel()
            session.outbox.close()
            self.publish()
        if end in (_DRAINED, _EXECUTOR_DRAINED):
            # Let the writer flush what is queued and half-close our side, then give the
            # executor a moment to end its side, so it sees a clean end of stream rather than a
            # reset. Anything it still sends is ignored: nothing is in flight, and an Assign
            # racing the close comes back to the queue after the lease.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_GRACE)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(reader), CLOSE_GRACE)
        for task in (writer, reader):
            task.cancel()
        await asyncio.gather(writer, reader, heartbeat, return_exceptions=True)
        await session.close()
        return end

    def _broken(self, session: _Session, reason: str) -> None:
        if session.broken is None:
            session.broken = reason
        self.poke()

    async def _writer(self, session: _Session) -> None:
        try:
            while True:
                try:
                    message = await session.outbox.pop()
                except _OutboxClosed:
                    await session.call.done_writing()
                    return
                await session.call.write(message)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as err:
            self._broken(session, f"{err.code().name}: {err.details()}")
        except Exception as err:
            self._broken(session, f"stream closed while sending: {err!r}")

    async def _reader(self, session: _Session) -> None:
        try:
            while True:
                message = await session.call.read()
                if message is grpc.aio.EOF:
                    self._broken(session, "executor closed the stream")
                    return
                if self.session is session:
                    self.on_server_message(message, session.outbox)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as err:
            self._broken(session, f"{err.code().name}: {err.details()}")
        except Exception as err:
            log.exception("error while handling a server message")
            self._broken(session, f"error while reading: {err!r}")

    async def _heartbeats(self, outbox: _Outbox, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            outbox.push(_HEARTBEAT)

    # -- server messages ----------------------------------------------------------------------

    def on_server_message(self, message: worker_pb2.ServerMessage, outbox: _Outbox) -> None:
        kind = message.WhichOneof("message")
        if kind == "assign":
            self.on_assign(message.assign, outbox)
        elif kind == "recorded":
            self.on_recorded(message.recorded)
        elif kind == "cancel":
            self.on_cancel(message.cancel)
        elif kind == "drain":
            # The executor is going away (a restart, a rollout): finish here, then resume with
            # whichever executor answers next. Only the worker's own stop ends the worker.
            if not self.executor_draining:
                log.info(
                    "executor is draining (%s); finishing %d in flight, then reconnecting",
                    message.drain.reason,
                    len(self.tasks),
                )
                self.executor_draining = True
                self.publish()
                self.poke()
        elif kind == "welcome":
            log.warning("second welcome ignored")
        else:  # a message kind from a newer executor
            log.debug("unknown server message ignored")

    def on_assign(self, assign: worker_pb2.Assign, outbox: _Outbox) -> None:
        key: _Key = (assign.task_id, assign.attempt)
        # The same attempt twice (the executor lost our Started): answer from what we hold.
        entry = self.tasks.get(key)
        if isinstance(entry, _Running):
            outbox.push(_started(key))
            return
        if isinstance(entry, _Finished):
            outbox.push(entry.result)
            return
        slots = max(assign.slots, 1)
        used = sum(e.slots for e in self.tasks.values() if isinstance(e, _Running))
        task_type = assign.task_type
        registered = self.w._handler(task_type.name, task_type.version)
        refusal = None
        if self.draining:
            refusal = "worker is draining"
        elif self.executor_draining:
            refusal = "worker is draining: the executor asked it to (assigned after Drain)"
        elif used + slots > self.w.slots:
            refusal = (
                f"worker {self.w.instance_id} has no room: task needs {slots} slot(s), "
                f"{used} of {self.w.slots} in use"
            )
        elif registered is None:
            refusal = (
                f"worker {self.w.instance_id} has no handler for "
                f"{json.dumps(task_type.name)} version {json.dumps(task_type.version)}"
            )
        retryable = True
        if refusal is None and registered is not None:
            # The executor checks step inputs against the limits it announced; inputs past them
            # mean a broken executor. Not retryable: the same inputs would come again.
            refusal = self._check_inputs(assign, task_type.name)
            retryable = refusal is None
        if refusal is not None or registered is None:
            refusal = refusal or "refused"
            log.warning("assignment refused: %s#%d: %s", key[0], key[1], refusal)
            result = _failed(key, refusal, retryable=retryable)
            self.tasks[key] = _Finished(result)
            self.publish()
            outbox.push(result)
            return
        # Started only for work taken: a refusal without Started tells a draining worker's
        # executor that the task was handed back, not attempted.
        outbox.push(_started(key))
        ctx = TaskContext._from_assign(assign, self.loop)
        inputs = to_dict(assign.inputs)
        pump = self.loop.create_task(
            self._pump(key, ctx, registered, inputs), name=f"dagmesh-task-{key[0]}#{key[1]}"
        )
        self.tasks[key] = _Running(slots, ctx, pump)
        self.publish()

    def _check_inputs(self, assign: worker_pb2.Assign, task_type: str) -> str | None:
        if not assign.HasField("inputs"):
            return None
        size = assign.inputs.ByteSize()
        limit = self.max_payload
        if limit > 0 and size > limit:
            return f"inputs of {json.dumps(task_type)} are {size} bytes, over the {limit}-byte payload limit"
        deep = check_depth("inputs", assign.inputs)
        return None if deep is None else f"inputs of {json.dumps(task_type)}: {deep}"

    def on_recorded(self, recorded: worker_pb2.Recorded) -> None:
        key: _Key = (recorded.task_id, recorded.attempt)
        entry = self.tasks.get(key)
        if isinstance(entry, _Finished):
            del self.tasks[key]
            if recorded.outcome == worker_pb2.RECORD_OUTCOME_STALE:
                log.warning("result refused as stale: %s#%d: %s", key[0], key[1], recorded.detail)
            else:
                log.debug(
                    "result recorded: %s#%d %s", key[0], key[1], worker_pb2.RecordOutcome.Name(recorded.outcome)
                )
            self.publish()
            self.poke()
        elif isinstance(entry, _Running):
            log.warning("recorded before any result; ignored: %s#%d", *key)
        else:
            log.debug("recorded for an unknown task: %s#%d", *key)

    def on_cancel(self, cancel: worker_pb2.Cancel) -> None:
        key: _Key = (cancel.task_id, cancel.attempt)
        entry = self.tasks.get(key)
        if isinstance(entry, _Running):
            log.info("task cancelled: %s#%d: %s", key[0], key[1], cancel.reason)
            entry.ctx.cancel()
        else:
            # A result already on its way is answered with Recorded anyway.
            log.debug("cancel for a task that is not running: %s#%d", *key)

    def begin_drain(self, why: str) -> None:
        if not self.draining:
            log.info("draining (%s), in flight: %d", why, len(self.tasks))
            self.draining = True
            self.publish()
            self.poke()

    def abort(self) -> None:
        self.aborting = True
        self.poke()

    # -- tasks -------------------------------------------------------------------------------

    async def _pump(self, key: _Key, ctx: TaskContext, registered: _Registered, inputs: dict[str, Any]) -> None:
        """Runs a task's handler, forwards its progress and logs while it runs, then reports
        the result."""
        log.info("task started: %s#%d %s@%s", key[0], key[1], registered.name, registered.version)
        handler = self._start_handler(ctx, registered, inputs)
        wake = ctx._wake_async
        assert wake is not None
        # One event wakes the pump: progress or logs from the handler, its end, or the flush
        # timer. (Cheaper per task than asyncio.wait over a handler and a waiter task, which a
        # short task paid for in full.)
        handler.add_done_callback(lambda _: wake.set())
        last_progress = float("-inf")
        next_flush = time.monotonic() + LOG_FLUSH_INTERVAL
        try:
            while not handler.done():
                if not wake.is_set():
                    timer = self.loop.call_later(max(0.0, next_flush - time.monotonic()), wake.set)
                    try:
                        await wake.wait()
                    finally:
                        timer.cancel()
                if handler.done():
                    break
                wake.clear()
                now = time.monotonic()
                progress_due = now >= next_flush or now - last_progress >= PROGRESS_MIN_INTERVAL
                if now >= next_flush:
                    next_flush = now + LOG_FLUSH_INTERVAL
                if progress_due and await self._forward_progress(ctx):
                    last_progress = now
                await self._forward_logs(ctx)
            # Whatever the handler reported last goes out before its result.
            await self._forward_progress(ctx)
            await self._forward_logs(ctx)
            result = self._result(key, registered.name, handler)
        finally:
            if not handler.done():
                handler.cancel()
        self._finish(key, result)

    def _start_handler(self, ctx: TaskContext, registered: _Registered, inputs: dict[str, Any]) -> asyncio.Future[Any]:
        if registered.is_async:

            async def call_async() -> Any:
                with _tracing.task_span(ctx):
                    result = registered.fn(ctx, inputs)
                    if inspect.isawaitable(result):
                        result = await result
                    return result

            return self.loop.create_task(call_async())

        def call_sync() -> Any:
            with _tracing.task_span(ctx):
                return registered.fn(ctx, inputs)

        return self.loop.run_in_executor(self.executor, contextvars.copy_context().run, call_sync)

    def _result(self, key: _Key, task_type: str, handler: asyncio.Future[Any]) -> worker_pb2.WorkerMessage:
        if handler.cancelled():
            return self._log_failure(key, task_type, "task handler was cancelled", retryable=True)
        error = handler.exception()
        if error is None:
            return self._completed(key, task_type, handler.result())
        if isinstance(error, TaskError):
            # The handler's own, deliberate way to fail: one line. Its traceback is noise
            # except to someone debugging the handler.
            result = self._log_failure(key, task_type, error.message, error.retryable)
            log.debug("traceback of task %s#%d %s:", key[0], key[1], task_type, exc_info=error)
            return result
        # Any other exception is a failure the handler did not expect: keep where it came from.
        text = str(error)
        message = f"{type(error).__name__}: {text}" if text else type(error).__name__
        return self._log_failure(key, task_type, message, True, unexpected=error)

    def _log_failure(
        self, key: _Key, task_type: str, message: str, retryable: bool, unexpected: BaseException | None = None
    ) -> worker_pb2.WorkerMessage:
        log.log(
            logging.ERROR if unexpected is not None else logging.WARNING,
            "task failed: %s#%d %s (retryable=%s): %s",
            key[0], key[1], task_type, retryable, message,
            exc_info=unexpected,
        )
        return _failed(key, message, retryable)

    def _completed(self, key: _Key, task_type: str, output: Any) -> worker_pb2.WorkerMessage:
        if output is None:
            output = {}
        elif not isinstance(output, Mapping):
            output = {"value": output}
        try:
            outputs = to_struct(output)
        except (TypeError, ValueError, RecursionError) as err:
            # RecursionError: an output nested past Python's stack; it must fail the attempt,
            # not the task's pump (which would leave the task running forever).
            return self._log_failure(key, task_type, f"cannot serialize output of {json.dumps(task_type)}: {err}", False)
        deep = check_depth("outputs", outputs)
        if deep is not None:
            return self._log_failure(key, task_type, f"output of {json.dumps(task_type)}: {deep}", False)
        size = outputs.ByteSize()
        limit = self.max_payload
        if limit > 0 and size > limit:
            return self._log_failure(
                key,
                task_type,
                f"output of {json.dumps(task_type)} is {size} bytes, over the {limit}-byte payload limit",
                False,
            )
        log.info("task completed: %s#%d, output %d bytes", key[0], key[1], size)
        return worker_pb2.WorkerMessage(
            completed=worker_pb2.TaskCompleted(task_id=key[0], attempt=key[1], outputs=outputs)
        )

    def _finish(self, key: _Key, result: worker_pb2.WorkerMessage) -> None:
        """Moves a running task to Finished and sends its result if a stream is open."""
        if not isinstance(self.tasks.get(key), _Running):
            return
        self.tasks[key] = _Finished(result)
        if self.session is not None:
            self.session.outbox.push(result)
        self.publish()
        self.poke()

    async def _forward_progress(self, ctx: TaskContext) -> bool:
        """Best effort: dropped while disconnected. True if a report went out."""
        progress = ctx._take_progress()
        session = self.session
        if progress is None or session is None:
            return False
        await session.outbox.send(worker_pb2.WorkerMessage(progress=progress))
        return True

    async def _forward_logs(self, ctx: TaskContext) -> None:
        lines, dropped = ctx._take_logs()
        if dropped:
            line = types_pb2.LogLine(
                level="warn", text=f"{dropped} log line(s) dropped: logged faster than the stream carried"
            )
            line.at.GetCurrentTime()
            lines.append(line)
        session = self.session
        if not lines or session is None:
            return
        await session.outbox.send(
            worker_pb2.WorkerMessage(log=worker_pb2.TaskLog(task_id=ctx.task_id, attempt=ctx.attempt, lines=lines))
        )

    # -- state -------------------------------------------------------------------------------

    def hello(self) -> worker_pb2.Hello:
        return worker_pb2.Hello(
            worker_name=self.w.name,
            instance_id=self.w.instance_id,
            task_types=[worker_pb2.TaskTypeVersion(name=n, version=v) for n, v in self.w.task_types],
            labels=self.w._labels,
            slots=self.w.slots,
            sdk_language="python",
            sdk_version=SDK_VERSION,
            in_flight=[worker_pb2.TaskRef(task_id=t, attempt=a) for t, a in self.tasks],
        )

    def state(self) -> WorkerState:
        running = sum(1 for e in self.tasks.values() if isinstance(e, _Running))
        session = self.session
        return WorkerState(
            connected=session is not None,
            session_id=session.welcome.session_id if session is not None else None,
            draining=self.draining,
            executor_draining=self.executor_draining,
            running=running,
            unacknowledged=len(self.tasks) - running,
            sessions=self.sessions,
        )

    def publish(self) -> None:
        self.w._state = self.state()


_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT: "executor rejected the hello",
    grpc.StatusCode.UNAUTHENTICATED: "executor refused the worker's token (check token / DAGMESH_TOKEN)",
    grpc.StatusCode.PERMISSION_DENIED: "executor refused the worker: its token does not allow it",
}


def _raise_if_fatal(code: grpc.StatusCode | None, details: str | None) -> None:
    """Refusals that the next stream would get again stop the worker."""
    what = _FATAL.get(code) if code is not None else None
    if what is None:
        return
    assert code is not None
    log.error("%s (%s): %s", what, code.name, details)
    raise WorkerRejected(details or "", code=code) from None


def _started(key: _Key) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(started=worker_pb2.TaskStarted(task_id=key[0], attempt=key[1]))


def _failed(key: _Key, message: str, retryable: bool) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(
        failed=worker_pb2.TaskFailed(task_id=key[0], attempt=key[1], error=message, retryable=retryable)
    )

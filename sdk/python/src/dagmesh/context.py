"""The handle a task handler gets: who it is, progress, logs and cancellation.

Progress and logs never block the handler and never fail it. They land in per-task buffers
that the worker forwards to the stream: progress keeps only the latest report while the stream
is busy, logs are batched and flushed every 100 ms and before the result. Every method is safe
to call from any thread, so a sync handler running in the worker's thread pool uses the same
context as an async one.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import threading
from collections.abc import Mapping
from typing import Literal

from google.protobuf import timestamp_pb2

from dagmesh._proto.v1 import types_pb2, worker_pb2

__all__ = ["LogLevel", "TaskContext"]

LogLevel = Literal["debug", "info", "warn", "error"]

_task_logger = logging.getLogger("dagmesh.task")
_LEVELS: dict[str, tuple[str, int]] = {
    "debug": ("debug", logging.DEBUG),
    "info": ("info", logging.INFO),
    "warn": ("warn", logging.WARNING),
    "warning": ("warn", logging.WARNING),
    "error": ("error", logging.ERROR),
}
# Lines held per task between flushes; beyond it lines are counted and dropped, so a handler
# that logs in a tight loop cannot exhaust memory while the stream is down.
LOG_BUFFER_LINES = 1000
# A batch this large is flushed at once instead of waiting for the next tick.
LOG_EARLY_FLUSH_LINES = 200


class TaskContext:
    """What the running attempt knows about itself, plus progress, logs and cancellation."""

    def __init__(
        self,
        task_id: str,
        attempt: int,
        *,
        run_id: str = "",
        step_id: str = "",
        task_type: str = "",
        task_version: str = "",
        traceparent: str | None = None,
        deadline: _dt.datetime | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """A context; the worker builds one per attempt. Built by hand (no `loop`) it is a
        detached context for unit-testing handlers: progress and logs stay in its buffers and
        `cancel()` simulates the executor's Cancel."""
        self._task_id = task_id
        self._attempt = attempt
        self._run_id = run_id
        self._step_id = step_id
        self._task_type = task_type
        self._task_version = task_version
        self._traceparent = traceparent or None
        self._deadline = deadline
        self._loop = loop
        self._lock = threading.Lock()
        self._progress: worker_pb2.TaskProgress | None = None
        self._logs: list[types_pb2.LogLine] = []
        self._dropped_logs = 0
        self._cancel_event = threading.Event()
        # Created on first use inside the loop that awaits them.
        self._cancelled_async: asyncio.Event | None = None
        self._wake_async: asyncio.Event | None = None
        self._wake_pending = False

    @classmethod
    def _from_assign(cls, assign: worker_pb2.Assign, loop: asyncio.AbstractEventLoop) -> TaskContext:
        deadline = None
        if assign.HasField("deadline"):
            deadline = assign.deadline.ToDatetime(tzinfo=_dt.timezone.utc)
        ctx = cls(
            assign.task_id,
            assign.attempt,
            run_id=assign.run_id,
            step_id=assign.step_id,
            task_type=assign.task_type.name,
            task_version=assign.task_type.version,
            traceparent=assign.traceparent,
            deadline=deadline,
            loop=loop,
        )
        ctx._wake_async = asyncio.Event()
        ctx._cancelled_async = asyncio.Event()
        return ctx

    def __repr__(self) -> str:
        return (
            f"TaskContext(task_id={self._task_id!r}, attempt={self._attempt}, "
            f"task_type={self._task_type!r}, cancelled={self.cancelled})"
        )

    @property
    def task_id(self) -> str:
        """Stable id of the step's task across attempts (`<run_id>/<step_id>`)."""
        return self._task_id

    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry..."""
        return self._attempt

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def step_id(self) -> str:
        return self._step_id

    @property
    def task_type(self) -> str:
        """The task type being run, e.g. `mesh.build`."""
        return self._task_type

    @property
    def task_version(self) -> str:
        """The version of the task type the executor chose, one this worker registered."""
        return self._task_version

    @property
    def traceparent(self) -> str | None:
        """W3C trace context of the attempt's span; None when the executor has tracing off."""
        return self._traceparent

    @property
    def deadline(self) -> _dt.datetime | None:
        """When the executor times the attempt out (and sends Cancel), in UTC; None without a
        timeout."""
        return self._deadline

    @property
    def cancelled(self) -> bool:
        """Whether the executor cancelled this attempt (run cancelled, deadline passed, or the
        task moved elsewhere). Its result will be discarded; stop as soon as convenient."""
        return self._cancel_event.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the attempt is cancelled; for sync handlers (`ctx.cancel_event.wait(1.0)`)."""
        return self._cancel_event

    async def wait_cancelled(self) -> None:
        """Returns when the attempt is cancelled (at once if it already is)."""
        if self._cancel_event.is_set():
            return
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        if self._cancelled_async is None:
            self._cancelled_async = asyncio.Event()
        if loop is not self._loop:
            # Awaited from a loop other than the worker's: poll the thread-safe event.
            while not self._cancel_event.is_set():
                await asyncio.sleep(0.05)
            return
        await self._cancelled_async.wait()

    def progress(
        self,
        fraction: float,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Reports progress, `fraction` in 0..1 (clamped), with a short message and optional
        numeric metrics. Never blocks: while the stream is busy only the latest report is kept."""
        fraction = float(fraction)
        fraction = 0.0 if math.isnan(fraction) else min(max(fraction, 0.0), 1.0)
        report = worker_pb2.TaskProgress(
            task_id=self._task_id,
            attempt=self._attempt,
            fraction=fraction,
            message=str(message),
            metrics={str(k): float(v) for k, v in (metrics or {}).items()},
        )
        with self._lock:
            self._progress = report
        self._wake()

    def log(self, text: str, level: LogLevel | str = "info") -> None:
        """Appends a line to the step's log (`dagmesh runs get`, run events) and to the
        `dagmesh.task` Python logger. `level` is debug, info, warn (or warning) or error."""
        try:
            wire_level, py_level = _LEVELS[level]
        except KeyError:
            raise ValueError(f"unknown log level {level!r}: use debug, info, warn or error") from None
        text = str(text)
        _task_logger.log(py_level, "%s", text, extra={"task_id": self._task_id, "attempt": self._attempt})
        line = types_pb2.LogLine(at=_now(), level=wire_level, text=text)
        with self._lock:
            if len(self._logs) >= LOG_BUFFER_LINES:
                self._dropped_logs += 1
                flush_now = False
            else:
                self._logs.append(line)
                flush_now = len(self._logs) >= LOG_EARLY_FLUSH_LINES
        if flush_now:
            self._wake()

    def debug(self, text: str) -> None:
        self.log(text, "debug")

    def info(self, text: str) -> None:
        self.log(text, "info")

    def warn(self, text: str) -> None:
        self.log(text, "warn")

    def error(self, text: str) -> None:
        self.log(text, "error")

    def cancel(self) -> None:
        """Marks the attempt cancelled. The worker calls it when the executor sends Cancel;
        tests call it on a detached context to simulate one."""
        self._cancel_event.set()
        self._call_in_loop(self._set_cancelled_async)

    # -- for the worker -------------------------------------------------------------------

    def _set_cancelled_async(self) -> None:
        if self._cancelled_async is not None:
            self._cancelled_async.set()

    def _set_wake(self) -> None:
        self._wake_pending = False
        if self._wake_async is not None:
            self._wake_async.set()

    def _wake(self) -> None:
        # One wake-up in flight at a time: a handler reporting in a tight loop from a thread
        # must not flood the event loop with callbacks.
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._call_in_loop(self._set_wake)

    def _call_in_loop(self, fn: object) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()  # type: ignore[operator]
        else:
            try:
                loop.call_soon_threadsafe(fn)  # type: ignore[arg-type]
            except RuntimeError:
                pass  # the loop is closed: the worker is gone, nobody to tell

    def _take_progress(self) -> worker_pb2.TaskProgress | None:
        with self._lock:
            progress, self._progress = self._progress, None
        return progress

    def _take_logs(self) -> tuple[list[types_pb2.LogLine], int]:
        with self._lock:
            logs, self._logs = self._logs, []
            dropped, self._dropped_logs = self._dropped_logs, 0
        return logs, dropped


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts

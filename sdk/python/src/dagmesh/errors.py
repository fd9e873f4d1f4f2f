"""Exceptions of the SDK."""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["ClientError", "TaskError", "WorkerAborted", "WorkerRejected"]


class TaskError(Exception):
    """Raised by a handler to fail its attempt with `message`.

    `retryable=False` (the default) says another attempt would fail the same way (bad input, a
    missing file): the executor retries it only if the step's policy has
    `retry_non_retryable`. Pass `retryable=True` for failures another attempt may not repeat.
    Any other exception a handler raises fails the attempt as retryable.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"TaskError({self.message!r}, retryable={self.retryable})"


class WorkerRejected(Exception):
    """The executor refused the worker's stream in a way that retrying cannot change, so the
    worker stops instead of reconnecting. `code` says why:

    - `INVALID_ARGUMENT`: the Hello (the details name the bad field);
    - `UNAUTHENTICATED`: no token, or one the executor does not accept (unknown, expired,
      revoked);
    - `PERMISSION_DENIED`: the token is valid but its scope does not allow this worker (e.g. a
      task type outside the token's patterns).
    """

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            message = f"executor rejected the worker: {details}"
        else:
            message = f"executor rejected the worker ({code.name}): {details}"
        super().__init__(message)
        self.details = details
        self.code = code


class WorkerAborted(Exception):
    """The worker was aborted (`Worker.abort()` or a second SIGTERM/SIGINT) before every result
    was recorded. The executor re-runs those tasks after the lease."""

    def __init__(self, running: int, unacknowledged: int) -> None:
        super().__init__(
            f"worker aborted with {running} task(s) running and {unacknowledged} unrecorded result(s)"
        )
        self.running = running
        self.unacknowledged = unacknowledged


class ClientError(Exception):
    """A failed client call; `code` is the gRPC status code (`NOT_FOUND` for an unknown run,
    `UNAVAILABLE` when the server cannot be reached, `INVALID_ARGUMENT` for bad input)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err: Any) -> ClientError:
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

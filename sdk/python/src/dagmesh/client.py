"""A client for backends: register workflows, start runs, follow them to the end.

A thin, typed layer over `RunService` and `WorkflowService`. Calls return the generated
protocol messages (`dagmesh.v1.Run`, `Workflow`...); `dagmesh.payload.to_dict(run.steps[0].outputs)`
turns a payload into a dict. Every failure raises `ClientError`, whose `code` tells "no such
run" (`NOT_FOUND`) from "try again" (`UNAVAILABLE`).

`Client` is synchronous (blocking stubs, safe to share between threads); `AsyncClient` has
the same methods for asyncio.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Callable, TypeVar, Union

import grpc
import grpc.aio
from google.protobuf import json_format

from dagmesh._channel import ChannelSettings, PathLike, aio_channel, parse_server, resolve, sync_channel
from dagmesh._proto.v1 import run_pb2, run_pb2_grpc, types_pb2, workflow_pb2, workflow_pb2_grpc
from dagmesh.errors import ClientError
from dagmesh.payload import to_struct

__all__ = ["AsyncClient", "Client", "WorkflowSpecLike", "is_terminal"]

WorkflowSpecLike = Union[types_pb2.WorkflowSpec, Mapping[str, Any]]
"""A `WorkflowSpec` message, or a dict of the same shape (a parsed YAML/JSON workflow file)."""

_TERMINAL = frozenset({types_pb2.RUN_STATE_SUCCEEDED, types_pb2.RUN_STATE_FAILED, types_pb2.RUN_STATE_CANCELLED})
T = TypeVar("T")


def is_terminal(state: int) -> bool:
    """Whether a `RunState` is final: succeeded, failed or cancelled (until a RetryRun)."""
    return state in _TERMINAL


def _spec(spec: WorkflowSpecLike) -> types_pb2.WorkflowSpec:
    if isinstance(spec, types_pb2.WorkflowSpec):
        return spec
    try:
        return json_format.ParseDict(dict(spec), types_pb2.WorkflowSpec())
    except json_format.ParseError as err:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid workflow spec: {err}") from None


def _submit_request(
    workflow: str | None,
    spec: WorkflowSpecLike | None,
    version: int,
    inputs: Mapping[str, Any] | None,
    idempotency_key: str | None,
    tags: Mapping[str, str] | None,
) -> run_pb2.SubmitRunRequest:
    if (workflow is None) == (spec is None):
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of workflow= (a name) or spec=")
    try:
        struct = to_struct(inputs)
    except TypeError as err:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid run inputs: {err}") from None
    request = run_pb2.SubmitRunRequest(
        inputs=struct,
        idempotency_key=idempotency_key or "",
        tags={str(k): str(v) for k, v in (tags or {}).items()},
    )
    if workflow is not None:
        request.workflow.CopyFrom(run_pb2.WorkflowRef(name=workflow, version=version))
    else:
        assert spec is not None
        request.spec.CopyFrom(_spec(spec))
    return request


def _watch_request(run_id: str, after_seq: int | None) -> run_pb2.WatchRunRequest:
    request = run_pb2.WatchRunRequest(run_id=run_id)
    if after_seq is not None:
        # proto3 `optional`: set (even to 0, which replays the whole log) means "no snapshot".
        request.after_seq = after_seq
    return request


def _advance(message: run_pb2.WatchRunResponse, after_seq: int) -> tuple[int, bool]:
    """The highest seq seen so far, and whether this message says the run ended."""
    kind = message.WhichOneof("message")
    if kind == "snapshot":
        return max(after_seq, message.snapshot.last_seq), is_terminal(message.snapshot.state)
    if kind == "event":
        event = message.event
        ended = event.WhichOneof("event") == "run_state" and is_terminal(event.run_state.state)
        return max(after_seq, event.seq), ended
    return after_seq, False


def _delay(attempt: int) -> float:
    base = min(0.1 * 2**attempt, 5.0)
    return base * (0.5 + 0.5 * random.random())


def _settings(server: str, security: dict[str, Any]) -> ChannelSettings:
    """A bad URL is a ClientError (INVALID_ARGUMENT), as it always was; bad security settings
    are a ValueError naming the setting."""
    try:
        parse_server(server)
    except ValueError as err:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
    return resolve(server, **security)


class Client:
    """Calls `RunService` and `WorkflowService` on one channel.

    ```python
    with Client("http://127.0.0.1:7070") as client:
        run = client.submit(workflow="room-scan", inputs={"room_id": "r1"}, idempotency_key="upload-42")
        run = client.wait_for_run(run.run_id)
    ```
    """

    def __init__(
        self,
        server: str = "http://127.0.0.1:7070",
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        token_file: PathLike | None = None,
        tls_ca: PathLike | None = None,
        tls_client_cert: PathLike | None = None,
        tls_client_key: PathLike | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """`timeout` bounds each unary call, in seconds (None: no deadline). Connecting is lazy:
        an unreachable server fails the first call with UNAVAILABLE (a TLS handshake that fails,
        e.g. an untrusted server certificate, too: the error says so).

        Security (each falls back on its environment variable; see the README): `token`
        (`DAGMESH_TOKEN`) or `token_file` (`DAGMESH_TOKEN_FILE`), sent as `authorization:
        Bearer <token>` on every call; for an `https://` server `tls_ca` (`DAGMESH_TLS_CA`),
        `tls_client_cert` and `tls_client_key` (mTLS), `tls_server_name`. Bad settings raise
        ValueError."""
        self._settings = _settings(server, dict(
            token=token,
            token_file=token_file,
            tls_ca=tls_ca,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            tls_server_name=tls_server_name,
        ))
        self._channel = sync_channel(self._settings)
        self._timeout = timeout
        self._runs = run_pb2_grpc.RunServiceStub(self._channel)
        self._workflows = workflow_pb2_grpc.WorkflowServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _error(self, err: Any) -> ClientError:
        error = ClientError.from_rpc(err)
        return ClientError(error.code, error.message + self._settings.hint(error.code, error.message))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def apply_workflow(self, spec: WorkflowSpecLike) -> types_pb2.Workflow:
        """Registers a workflow definition; identical content returns the existing version."""
        request = workflow_pb2.ApplyWorkflowRequest(spec=_spec(spec))
        return self._call(self._workflows.ApplyWorkflow, request).workflow

    def get_workflow(self, name: str, version: int = 0) -> types_pb2.Workflow:
        """A workflow version; 0 means the latest."""
        return self._call(self._workflows.GetWorkflow, workflow_pb2.GetWorkflowRequest(name=name, version=version))

    def submit(
        self,
        workflow: str | None = None,
        *,
        spec: WorkflowSpecLike | None = None,
        version: int = 0,
        inputs: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> types_pb2.Run:
        """Starts a run of the registered workflow `workflow` (`version` 0: the latest) or of
        the inline `spec` (registered or matched first). With an `idempotency_key` already
        used, returns the run the first submit started."""
        request = _submit_request(workflow, spec, version, inputs, idempotency_key, tags)
        return self._call(self._runs.SubmitRun, request).run

    def get_run(self, run_id: str) -> types_pb2.Run:
        """The run with all its steps; NOT_FOUND for an unknown id."""
        return self._call(self._runs.GetRun, run_pb2.GetRunRequest(run_id=run_id))

    def list_runs(
        self,
        *,
        workflow: str = "",
        state: int = types_pb2.RUN_STATE_UNSPECIFIED,
        tags: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> run_pb2.ListRunsResponse:
        """Runs, newest first, without their steps."""
        request = run_pb2.ListRunsRequest(
            workflow=workflow, state=state, tags=dict(tags or {}), page_size=page_size, page_token=page_token  # type: ignore[arg-type]
        )
        return self._call(self._runs.ListRuns, request)

    def watch_run(self, run_id: str, after_seq: int | None = None) -> Iterator[run_pb2.WatchRunResponse]:
        """Follows a run: without `after_seq`, a snapshot (`.snapshot`) then every event
        (`.event`) after it; with `after_seq` (0 included), the events after that sequence
        number, no snapshot. The iterator ends after the run's final event. Closing it (or
        leaving a `for` loop early and dropping it) cancels the call."""
        try:
            call = self._runs.WatchRun(_watch_request(run_id, after_seq))
        except grpc.RpcError as err:
            raise self._error(err) from None
        try:
            yield from call
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()

    def cancel_run(self, run_id: str, reason: str = "") -> types_pb2.Run:
        """Cancels a run that has not ended; FAILED_PRECONDITION if it has."""
        return self._call(self._runs.CancelRun, run_pb2.CancelRunRequest(run_id=run_id, reason=reason))

    def retry_run(self, run_id: str) -> types_pb2.Run:
        """Re-runs the failed and cancelled steps of an ended run."""
        return self._call(self._runs.RetryRun, run_pb2.RetryRunRequest(run_id=run_id))

    def wait_for_run(self, run_id: str, timeout: float | None = None) -> types_pb2.Run:
        """Waits until the run ends (succeeded, failed or cancelled) and returns it with all
        its steps. Watches rather than polls; a watch that breaks (UNAVAILABLE, or a stream
        that ends early) is resumed after the last event seen, with backoff. Raises
        `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after_seq: int | None = None
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"run {run_id} did not end within {timeout:g}s")
            ended = False
            try:
                call = self._runs.WatchRun(_watch_request(run_id, after_seq), timeout=remaining)
                try:
                    for message in call:
                        after_seq, ended = _advance(message, after_seq or 0)
                        if ended:
                            break
                finally:
                    call.cancel()
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"run {run_id} did not end within {timeout:g}s") from None
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self._error(err) from None
            # The watch ended one way or another: the run itself says whether it is over.
            try:
                run = self.get_run(run_id)
                if is_terminal(run.state):
                    return run
            except ClientError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE:
                    raise
            time.sleep(_delay(attempt))
            attempt += 1


class AsyncClient:
    """`Client` for asyncio (grpc.aio); the same methods, awaited."""

    def __init__(
        self,
        server: str = "http://127.0.0.1:7070",
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        token_file: PathLike | None = None,
        tls_ca: PathLike | None = None,
        tls_client_cert: PathLike | None = None,
        tls_client_key: PathLike | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """See `Client`: the same options and environment variables."""
        self._settings = _settings(server, dict(
            token=token,
            token_file=token_file,
            tls_ca=tls_ca,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            tls_server_name=tls_server_name,
        ))
        self._metadata = self._settings.metadata
        self._channel = aio_channel(self._settings)
        self._timeout = timeout
        self._runs = run_pb2_grpc.RunServiceStub(self._channel)
        self._workflows = workflow_pb2_grpc.WorkflowServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    def _error(self, err: Any) -> ClientError:
        error = ClientError.from_rpc(err)
        return ClientError(error.code, error.message + self._settings.hint(error.code, error.message))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None

    async def apply_workflow(self, spec: WorkflowSpecLike) -> types_pb2.Workflow:
        response = await self._call(self._workflows.ApplyWorkflow, workflow_pb2.ApplyWorkflowRequest(spec=_spec(spec)))
        return response.workflow  # type: ignore[no-any-return]

    async def get_workflow(self, name: str, version: int = 0) -> types_pb2.Workflow:
        request = workflow_pb2.GetWorkflowRequest(name=name, version=version)
        return await self._call(self._workflows.GetWorkflow, request)  # type: ignore[no-any-return]

    async def submit(
        self,
        workflow: str | None = None,
        *,
        spec: WorkflowSpecLike | None = None,
        version: int = 0,
        inputs: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> types_pb2.Run:
        request = _submit_request(workflow, spec, version, inputs, idempotency_key, tags)
        response = await self._call(self._runs.SubmitRun, request)
        return response.run  # type: ignore[no-any-return]

    async def get_run(self, run_id: str) -> types_pb2.Run:
        return await self._call(self._runs.GetRun, run_pb2.GetRunRequest(run_id=run_id))  # type: ignore[no-any-return]

    async def cancel_run(self, run_id: str, reason: str = "") -> types_pb2.Run:
        request = run_pb2.CancelRunRequest(run_id=run_id, reason=reason)
        return await self._call(self._runs.CancelRun, request)  # type: ignore[no-any-return]

    async def retry_run(self, run_id: str) -> types_pb2.Run:
        return await self._call(self._runs.RetryRun, run_pb2.RetryRunRequest(run_id=run_id))  # type: ignore[no-any-return]

    async def watch_run(self, run_id: str, after_seq: int | None = None) -> AsyncIterator[run_pb2.WatchRunResponse]:
        """See `Client.watch_run`."""
        call = self._runs.WatchRun(_watch_request(run_id, after_seq), metadata=self._metadata)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()

    async def wait_for_run(self, run_id: str, timeout: float | None = None) -> types_pb2.Run:
        """See `Client.wait_for_run`."""

        async def wait() -> types_pb2.Run:
            after_seq: int | None = None
            attempt = 0
            while True:
                try:
                    async for message in self.watch_run(run_id, after_seq):
                        after_seq, ended = _advance(message, after_seq or 0)
                        if ended:
                            break
                except ClientError as err:
                    if err.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                try:
                    run = await self.get_run(run_id)
                    if is_terminal(run.state):
                        return run
                except ClientError as err:
                    if err.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                await asyncio.sleep(_delay(attempt))
                attempt += 1

        try:
            return await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"run {run_id} did not end within {timeout:g}s") from None

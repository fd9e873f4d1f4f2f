"""Tokens and TLS against a real `dagmesh up`: a worker and a client over TLS with a token, the
conformance worker configured by the environment alone, refusals without a token, an untrusted
server certificate, and mTLS."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from dagmesh import Client, ClientError, TaskContext, Worker, WorkerRejected, to_dict
from dagmesh.v1 import RunState, auth_pb2, auth_pb2_grpc

from conftest import STEP_TIMEOUT, Certs, Server, WorkerThread, make_certs, start_server, stop_server
from test_conformance import ConformanceWorker

SUCCEEDED = RunState.Value("RUN_STATE_SUCCEEDED")
# A refusal (a handshake, a token) is answered at once; this only catches a hang.
PROMPT = 10.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start_server(tmp_path_factory.mktemp("dagmesh-tls"), certs=certs, set_env=False)
    try:
        yield started
    finally:
        stop_server(started.process)


@pytest.fixture(scope="module")
def mtls_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start_server(tmp_path_factory.mktemp("dagmesh-mtls"), certs=certs, mtls=True, set_env=False)
    try:
        yield started
    finally:
        stop_server(started.process)


def needs_auth(server: Server) -> str:
    assert server.token, f"dagmesh up wrote no admin.token: is authentication on?\n{server.log_tail()}"
    return server.token


def echo_worker(server: Server, unique: str, **options: Any) -> tuple[Worker, str]:
    task = f"secure.echo.{unique}"
    worker = Worker(server=server.url, name=f"py-sec-{unique}", **options)

    @worker.task(task, version="1.0.0")
    async def echo(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"echo": inputs.get("text"), "attempt": ctx.attempt}

    return worker, task


def run_echo(client: Client, task: str, unique: str) -> None:
    run = client.submit(
        spec={"name": f"py-sec-{unique}", "steps": [{"id": "e", "task": f"{task}@^1", "inputs": {"text": "'over tls'"}}]}
    )
    done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)
    assert done.state == SUCCEEDED, done.error
    assert to_dict(done.steps[0].outputs) == {"echo": "over tls", "attempt": 1}


def refused(call: Callable[[], Any]) -> ClientError:
    started = time.monotonic()
    with pytest.raises(ClientError) as err:
        call()
    assert time.monotonic() - started < PROMPT, "a refusal is answered at once"
    return err.value


# --- (a) TLS and a token -----------------------------------------------------------------------


def test_worker_and_client_over_tls_with_a_token(
    tls_server: Server, certs: Certs, unique: str, run_worker: Callable[[Worker], WorkerThread]
) -> None:
    token = needs_auth(tls_server)
    assert tls_server.url.startswith("https://")
    worker, task = echo_worker(tls_server, unique, token=token, tls_ca=certs.ca)
    run_worker(worker)
    with Client(tls_server.url, timeout=STEP_TIMEOUT, token=token, tls_ca=certs.ca) as client:
        run_echo(client, task, unique)
    # The certificate names localhost too; and a name override is what gets checked.
    localhost = tls_server.url.replace("127.0.0.1", "localhost")
    with Client(localhost, timeout=STEP_TIMEOUT, token=token, tls_ca=certs.ca) as client:
        assert client.list_runs(page_size=1).runs
    with Client(tls_server.url, timeout=STEP_TIMEOUT, token=token, tls_ca=certs.ca, tls_server_name="localhost") as client:
        assert client.list_runs(page_size=1).runs


def test_everything_from_the_environment(tls_server: Server, certs: Certs, unique: str, tmp_path: Any) -> None:
    """What the Rust conformance suite does: DAGMESH_TOKEN / DAGMESH_TLS_CA and an https://
    --server, no flags; and the token from a file."""
    token = needs_auth(tls_server)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    os.environ["DAGMESH_TOKEN_FILE"] = str(token_file)  # the security_env fixture restores these
    os.environ["DAGMESH_TLS_CA"] = str(certs.ca)
    conformance = ConformanceWorker(tls_server)
    try:
        conformance.wait_info(lambda w: w.connected and w.sdk_language == "python")
        with Client(tls_server.url, timeout=STEP_TIMEOUT) as client:
            run = client.submit(
                spec={"name": f"py-sec-env-{unique}", "steps": [{"id": "e", "task": "conformance.echo@1.0.0", "inputs": {"k": "'v'"}}]}
            )
            done = client.wait_for_run(run.run_id, timeout=STEP_TIMEOUT)
            assert done.state == SUCCEEDED, done.error
            assert to_dict(done.steps[0].outputs) == {"k": "v"}
        conformance.process.send_signal(signal.SIGTERM)
        assert conformance.process.wait(timeout=STEP_TIMEOUT) == 0, "\n".join(conformance.stderr)
    finally:
        conformance.stop()


# --- (b) no token, a wrong token ---------------------------------------------------------------


def test_a_client_without_a_token_is_unauthenticated(server: Server, tls_server: Server, certs: Certs) -> None:
    needs_auth(server)
    os.environ.pop("DAGMESH_TOKEN", None)  # set for tests of `server`; restored afterwards
    with Client(server.url, timeout=STEP_TIMEOUT) as client:
        err = refused(lambda: client.list_runs())
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, err
    assert "no token was sent" in err.message
    with Client(server.url, timeout=STEP_TIMEOUT, token="dmt_nosuchid_nosuchsecret") as client:
        err = refused(lambda: client.get_run("nope"))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, err
    with Client(tls_server.url, timeout=STEP_TIMEOUT, tls_ca=certs.ca) as client:
        err = refused(lambda: client.list_runs())
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, err

    async def watch() -> None:
        from dagmesh import AsyncClient

        async with AsyncClient(server.url, timeout=STEP_TIMEOUT) as client:
            async for _ in client.watch_run("nope"):
                pass

    with pytest.raises(ClientError) as watch_err:
        asyncio.run(asyncio.wait_for(watch(), PROMPT))
    assert watch_err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_worker_without_a_valid_token_stops(server: Server, unique: str) -> None:
    needs_auth(server)
    os.environ.pop("DAGMESH_TOKEN", None)
    for token in (None, "dmt_nosuchid_nosuchsecret"):
        worker, _ = echo_worker(server, unique, token=token, reconnect_backoff=(0.01, 0.05))
        started = time.monotonic()
        with pytest.raises(WorkerRejected) as err:
            asyncio.run(asyncio.wait_for(worker.run_async(), STEP_TIMEOUT))
        assert time.monotonic() - started < PROMPT
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED, err.value


def test_a_token_outside_its_scope_is_permission_denied(
    server: Server, unique: str, run_worker: Callable[[Worker], WorkerThread]
) -> None:
    needs_auth(server)
    with server.channel() as channel:
        created = auth_pb2_grpc.TokenServiceStub(channel).CreateToken(
            auth_pb2.CreateTokenRequest(
                name=f"py-pool-{unique}", scopes=[auth_pb2.SCOPE_WORKER], task_patterns=[f"mesh.{unique}.*"]
            ),
            timeout=STEP_TIMEOUT,
        )
    pool_token = created.secret
    # A task type outside the token's patterns: refused once, the worker stops with the reason.
    outsider = Worker(server=server.url, name=f"py-outsider-{unique}", token=pool_token, reconnect_backoff=(0.01, 0.05))
    outsider.register(f"other.{unique}", "1.0.0", lambda ctx, inputs: None)
    started = time.monotonic()
    with pytest.raises(WorkerRejected) as err:
        asyncio.run(asyncio.wait_for(outsider.run_async(), STEP_TIMEOUT))
    assert time.monotonic() - started < PROMPT
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, err.value
    assert f"other.{unique}" in err.value.details and f"mesh.{unique}.*" in err.value.details
    # Inside them it connects; the same token cannot read runs.
    insider = Worker(server=server.url, name=f"py-insider-{unique}", token=pool_token)
    insider.register(f"mesh.{unique}.build", "1.0.0", lambda ctx, inputs: None)
    run_worker(insider)
    with Client(server.url, timeout=STEP_TIMEOUT, token=pool_token) as client:
        denied = refused(lambda: client.list_runs())
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED, denied


# --- (c) an untrusted server certificate -------------------------------------------------------


def test_a_server_certificate_from_another_ca_is_a_clear_error(tls_server: Server, certs: Certs) -> None:
    token = needs_auth(tls_server)
    for options in ({"tls_ca": certs.other_ca}, {}, {"tls_ca": certs.ca, "tls_server_name": "elsewhere.example"}):
        with Client(tls_server.url, timeout=STEP_TIMEOUT, token=token, **options) as client:
            err = refused(lambda: client.list_runs())
        assert err.code == grpc.StatusCode.UNAVAILABLE, err
        assert "server certificate is not trusted" in err.message, err
    # Plaintext to a TLS port fails too, rather than hanging.
    with Client(tls_server.url.replace("https://", "http://"), timeout=STEP_TIMEOUT, token=token) as client:
        err = refused(lambda: client.list_runs())
    assert err.code == grpc.StatusCode.UNAVAILABLE, err


# --- (d) mTLS ----------------------------------------------------------------------------------


def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: Server, certs: Certs, unique: str, run_worker: Callable[[Worker], WorkerThread]
) -> None:
    token = needs_auth(mtls_server)
    with Client(mtls_server.url, timeout=STEP_TIMEOUT, token=token, tls_ca=certs.ca) as client:
        err = refused(lambda: client.list_runs())
    assert err.code == grpc.StatusCode.UNAVAILABLE, err
    assert "tls_client_cert" in err.message, err

    mtls = {"token": token, "tls_ca": certs.ca, "tls_client_cert": certs.client_cert, "tls_client_key": certs.client_key}
    worker, task = echo_worker(mtls_server, unique, **mtls)
    run_worker(worker)
    with Client(mtls_server.url, timeout=STEP_TIMEOUT, **mtls) as client:
        run_echo(client, task, unique)

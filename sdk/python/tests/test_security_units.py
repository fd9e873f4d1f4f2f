"""Tokens and TLS settings without a dagmesh server: resolution (options, environment, files,
errors), the metadata every call carries, and a worker refused for its credentials stopping.

An in-process grpc server stands in for the executor where a call has to go somewhere."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from dagmesh import AsyncClient, Client, ClientError, Worker, WorkerRejected
from dagmesh._channel import SECURITY_OPTIONS, resolve
from dagmesh._cli import load_worker
from dagmesh._proto.v1 import run_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc

from conftest import Certs, make_certs

ENV_VARS = [var for var, _flag, _what in SECURITY_OPTIONS.values()]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the DAGMESH_TOKEN / DAGMESH_TLS_* variables of the caller (or of conftest)."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot checked before connecting\n-----END CERTIFICATE-----\n")
    return path


# --- resolution ------------------------------------------------------------------------------


def test_no_settings_means_plaintext_without_metadata() -> None:
    settings = resolve("http://127.0.0.1:7070", environ={})
    assert (settings.target, settings.secure, settings.token, settings.metadata) == ("127.0.0.1:7070", False, None, ())
    assert settings.credentials() is None
    assert not any(key == "grpc.ssl_target_name_override" for key, _ in settings.options())


def test_token_from_the_environment_and_option_wins(tmp_path: Path) -> None:
    env = {"DAGMESH_TOKEN": "dmt_env_secret"}
    assert resolve("http://h:1", environ=env).metadata == (("authorization", "Bearer dmt_env_secret"),)
    assert resolve("http://h:1", token="dmt_code", environ=env).token == "dmt_code"
    # The file variable is used only when no token is given.
    token_file = tmp_path / "token"
    token_file.write_text("  dmt_from_file\n\n")
    env_both = {**env, "DAGMESH_TOKEN_FILE": str(token_file)}
    assert resolve("http://h:1", environ=env_both).token == "dmt_env_secret"
    assert resolve("http://h:1", environ={"DAGMESH_TOKEN_FILE": str(token_file)}).token == "dmt_from_file"
    # An explicit token file (a str or a Path) beats the variables, surrounding whitespace trimmed.
    assert resolve("http://h:1", token_file=token_file, environ=env).token == "dmt_from_file"
    assert resolve("http://h:1", token_file=str(token_file), environ=env).token == "dmt_from_file"
    # Empty values count as not given.
    assert resolve("http://h:1", token="", environ={"DAGMESH_TOKEN": ""}).token is None


def test_token_over_plaintext_is_allowed() -> None:
    settings = resolve("http://127.0.0.1:7070", token="dmt_a_b", environ={})
    assert not settings.secure and settings.metadata == (("authorization", "Bearer dmt_a_b"),)


def test_tls_settings_from_options_and_environment(tmp_path: Path, pem: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"CERT")
    key.write_bytes(b"KEY")
    settings = resolve(
        "https://dagmesh.internal:7443",
        tls_ca=pem,
        environ={
            "DAGMESH_TLS_CA": "/does/not/matter/the/option/wins",
            "DAGMESH_TLS_CLIENT_CERT": str(cert),
            "DAGMESH_TLS_CLIENT_KEY": str(key),
            "DAGMESH_TLS_SERVER_NAME": "executor.dagmesh",
        },
    )
    assert settings.secure and settings.target == "dagmesh.internal:7443"
    assert settings.root_certificates == pem.read_bytes()
    assert (settings.certificate_chain, settings.private_key) == (b"CERT", b"KEY")
    assert settings.server_name == "executor.dagmesh"
    assert ("grpc.ssl_target_name_override", "executor.dagmesh") in settings.options()
    assert isinstance(settings.credentials(), grpc.ChannelCredentials)
    # https without any TLS setting: system roots.
    plain = resolve("https://dagmesh.example.com", environ={})
    assert plain.secure and plain.root_certificates is None and plain.credentials() is not None
    assert "KEY" not in repr(settings) and "dmt" not in repr(resolve("http://h:1", token="dmt_x", environ={}))


@pytest.mark.parametrize(
    ("option", "env"),
    [
        ({"tls_ca": "ca.pem"}, {}),
        ({"tls_server_name": "x"}, {}),
        ({}, {"DAGMESH_TLS_CA": "ca.pem"}),
        ({}, {"DAGMESH_TLS_CLIENT_CERT": "c.pem", "DAGMESH_TLS_CLIENT_KEY": "k.pem"}),
    ],
)
def test_tls_settings_with_http_are_an_error(option: dict[str, str], env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="TLS settings need an https:// server URL") as err:
        resolve("http://127.0.0.1:7070", environ=env, **option)
    named = next(iter(option)) if option else next(iter(env))
    assert named in str(err.value) and "http://127.0.0.1:7070" in str(err.value)
    with pytest.raises(ValueError, match="https://"):
        resolve("127.0.0.1:7070", environ=env, **option)  # a bare host:port is plaintext too


def test_client_cert_and_key_go_together(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("CERT")
    with pytest.raises(ValueError, match=r"client certificate file \(tls_client_cert\) given without the TLS client key") as err:
        resolve("https://h:1", tls_client_cert=cert, environ={})
    assert "DAGMESH_TLS_CLIENT_KEY" in str(err.value)
    with pytest.raises(ValueError, match=r"client key file \(DAGMESH_TLS_CLIENT_KEY\) given without the TLS client certificate"):
        resolve("https://h:1", environ={"DAGMESH_TLS_CLIENT_KEY": str(cert)})


@pytest.mark.parametrize("name", ["tls_ca", "tls_client_cert", "tls_client_key", "token_file"])
def test_an_unreadable_file_names_the_file_and_the_setting(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "missing.pem"
    other = tmp_path / "other.pem"
    other.write_text("x")
    pair = {"tls_client_cert": "tls_client_key", "tls_client_key": "tls_client_cert"}
    extra = {pair[name]: other} if name in pair else {}
    url = "http://h:1" if name == "token_file" else "https://h:1"
    with pytest.raises(ValueError, match="cannot read") as err:
        resolve(url, environ={}, **{name: missing}, **extra)
    assert str(missing) in str(err.value) and f"({name})" in str(err.value)
    # The same through the environment variable names the variable.
    var = SECURITY_OPTIONS[name][0]
    env = {var: str(missing), **{SECURITY_OPTIONS[k][0]: str(v) for k, v in extra.items()}}
    with pytest.raises(ValueError, match="cannot read") as err:
        resolve(url, environ=env)
    assert str(missing) in str(err.value) and var in str(err.value)
    if not sys.platform.startswith("win") and os.geteuid() != 0:
        unreadable = tmp_path / "unreadable.pem"
        unreadable.write_text("x")
        unreadable.chmod(0)
        with pytest.raises(ValueError, match="Permission denied"):
            resolve(url, environ={}, **{name: unreadable}, **extra)


def test_bad_tokens_are_refused_before_sending(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"token file .*empty.* \(DAGMESH_TOKEN_FILE\) is empty"):
        resolve("http://h:1", environ={"DAGMESH_TOKEN_FILE": str(empty)})
    with pytest.raises(ValueError, match=r"the token \(DAGMESH_TOKEN\) contains"):
        resolve("http://h:1", environ={"DAGMESH_TOKEN": "two words"})
    two_lines = tmp_path / "two-lines"
    two_lines.write_text("dmt_a\ndmt_b\n")
    with pytest.raises(ValueError, match="contains '\\\\n'"):
        resolve("http://h:1", token_file=two_lines, environ={})


def test_sources_name_command_line_flags() -> None:
    with pytest.raises(ValueError, match=r"--tls-ca given with server"):
        resolve("http://h:1", tls_ca="ca.pem", sources={"tls_ca": "--tls-ca"}, environ={})


# --- Worker, Client and the command lines ------------------------------------------------------


def test_worker_and_clients_take_the_options_and_the_environment(monkeypatch: pytest.MonkeyPatch, pem: Path) -> None:
    monkeypatch.setenv("DAGMESH_TOKEN", "dmt_env")
    worker = Worker("https://127.0.0.1:1", name="w", tls_ca=pem, tls_server_name="localhost")
    assert worker._settings is not None
    assert worker._settings.token == "dmt_env" and worker._settings.server_name == "localhost"
    assert Worker("http://127.0.0.1:1", name="w", token="dmt_code")._settings.token == "dmt_code"  # type: ignore[union-attr]
    with Client("http://127.0.0.1:1") as client:
        assert client._settings.metadata == (("authorization", "Bearer dmt_env"),)

    async def async_client() -> None:
        async with AsyncClient("https://127.0.0.1:1", token="dmt_code", tls_ca=pem) as client:
            assert client._metadata == (("authorization", "Bearer dmt_code"),)

    asyncio.run(async_client())
    for make in (Worker, Client, AsyncClient):
        with pytest.raises(ValueError, match="TLS settings need an https:// server URL: tls_ca"):
            make("http://127.0.0.1:1", tls_ca=pem)
    monkeypatch.setenv("DAGMESH_TLS_CA", str(pem))
    with pytest.raises(ValueError, match="DAGMESH_TLS_CA given with server"):
        Client("http://127.0.0.1:1")
    # A bad URL stays a ClientError for the clients, as before.
    with pytest.raises(ClientError, match="invalid server url"):
        Client("ftp://x")


def test_command_line_flags_override_the_worker_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pem: Path
) -> None:
    module = tmp_path / "sec_workers.py"
    module.write_text(
        "from dagmesh import Worker\n"
        "worker = Worker(server='http://127.0.0.1:7070', name='sec', token='dmt_code')\n"
        "@worker.task('t', version='1.0.0')\n"
        "def t(ctx, inputs):\n"
        "    return inputs\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # The environment asks for TLS; the module's own default URL is http://: the command line's
    # --server decides before anything is refused.
    monkeypatch.setenv("DAGMESH_TLS_CA", str(pem))
    worker = load_worker("sec_workers:worker")
    worker._override(server="https://127.0.0.1:7443", security={"token": None, "tls_server_name": "localhost"})
    settings = worker._settings
    assert settings is not None and settings.secure and settings.token == "dmt_code"
    assert settings.root_certificates == pem.read_bytes() and settings.server_name == "localhost"
    worker._override(security={"token": "dmt_flag"})
    assert worker._settings.token == "dmt_flag"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="--tls-client-cert"):
        worker._override(security={"tls_client_cert": str(pem)})
    with pytest.raises(ValueError, match="DAGMESH_TLS_CA, --tls-server-name given with server 'http://127.0.0.1:7070'"):
        worker._override(server="http://127.0.0.1:7070")


def test_worker_command_line_reports_bad_settings(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["DAGMESH_TLS_CA"] = str(tmp_path / "missing-ca.pem")
    done = subprocess.run(
        [sys.executable, "-m", "dagmesh.conformance", "--server", "https://127.0.0.1:1", "--instance-id", "x"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 2
    assert "cannot read the TLS CA file" in done.stderr and "DAGMESH_TLS_CA" in done.stderr
    del env["DAGMESH_TLS_CA"]
    done = subprocess.run(
        [sys.executable, "-m", "dagmesh.conformance", "--server", "http://127.0.0.1:1", "--instance-id", "x",
         "--tls-server-name", "localhost"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 2 and "TLS settings need an https:// server URL: --tls-server-name" in done.stderr


# --- the metadata on the wire, against an in-process server -----------------------------------


class _Runs(run_pb2_grpc.RunServiceServicer):
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def GetRun(self, request: Any, context: grpc.ServicerContext) -> types_pb2.Run:
        self.seen.append(dict(context.invocation_metadata()))
        return types_pb2.Run(run_id=request.run_id)

    def WatchRun(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.seen.append(dict(context.invocation_metadata()))
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "watch refused: no token")
        yield  # pragma: no cover


class _Workers(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.seen: list[dict[str, str]] = []

    def Connect(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self.seen.append(dict(context.invocation_metadata()))
        hello = next(request_iterator)
        assert hello.WhichOneof("message") == "hello"
        context.abort(self.code, f"task type {hello.hello.task_types[0].name!r} is outside the token's patterns")
        yield worker_pb2.ServerMessage()  # pragma: no cover


@pytest.fixture
def fake_server() -> Iterator[tuple[str, _Runs, dict[str, _Workers]]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    runs = _Runs()
    workers: dict[str, _Workers] = {"servicer": _Workers(grpc.StatusCode.UNAUTHENTICATED)}

    class Dispatch(worker_pb2_grpc.WorkerServiceServicer):
        def Connect(self, request_iterator: Any, context: Any) -> Any:
            return workers["servicer"].Connect(request_iterator, context)

    run_pb2_grpc.add_RunServiceServicer_to_server(runs, server)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(Dispatch(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", runs, workers
    finally:
        server.stop(None)


def test_every_client_call_carries_the_token(fake_server: tuple[str, _Runs, dict[str, _Workers]]) -> None:
    url, runs, _ = fake_server
    with Client(url, token="dmt_sync", timeout=10) as client:
        assert client.get_run("r1").run_id == "r1"
        with pytest.raises(ClientError) as err:
            list(client.watch_run("r1"))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "no token" in err.value.message

    async def async_calls() -> None:
        async with AsyncClient(url, token="dmt_async", timeout=10) as client:
            assert (await client.get_run("r2")).run_id == "r2"
            with pytest.raises(ClientError) as err:
                async for _ in client.watch_run("r2"):
                    pass
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(async_calls())
    assert [seen.get("authorization") for seen in runs.seen] == [
        "Bearer dmt_sync", "Bearer dmt_sync", "Bearer dmt_async", "Bearer dmt_async"
    ]
    with Client(url, timeout=10) as client:
        client.get_run("r3")
    assert "authorization" not in runs.seen[-1]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED])
def test_a_worker_refused_for_its_credentials_stops(
    fake_server: tuple[str, _Runs, dict[str, _Workers]], code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    url, _, workers = fake_server
    workers["servicer"] = servicer = _Workers(code)
    worker = Worker(url, name="refused", token="dmt_worker", reconnect_backoff=(0.01, 0.02))

    @worker.task("mesh.build", version="1.0.0")
    def build(ctx: Any, inputs: dict[str, Any]) -> None:
        return None

    started = time.monotonic()
    with caplog.at_level("ERROR", logger="dagmesh.worker"), pytest.raises(WorkerRejected) as err:
        asyncio.run(asyncio.wait_for(worker.run_async(), 20))
    assert time.monotonic() - started < 10
    assert err.value.code == code and "outside the token's patterns" in str(err.value)
    assert code.name in str(err.value)
    assert len(servicer.seen) == 1, "not retried"
    assert servicer.seen[0].get("authorization") == "Bearer dmt_worker"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "outside the token's patterns" in errors[0].getMessage()


# --- TLS against an in-process grpc server ----------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return make_certs(tmp_path_factory.mktemp("pki"))


def _tls_server(certs: Certs, mtls: bool, workers: _Workers | None = None) -> tuple[grpc.Server, str, _Runs]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    runs = _Runs()
    run_pb2_grpc.add_RunServiceServicer_to_server(runs, server)
    if workers is not None:
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(workers, server)
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca.read_bytes() if mtls else None,
        require_client_auth=mtls,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"https://127.0.0.1:{port}", runs


def _get_run_error(url: str, **options: Any) -> ClientError:
    started = time.monotonic()
    with Client(url, timeout=10, **options) as client, pytest.raises(ClientError) as err:
        client.get_run("r")
    assert time.monotonic() - started < 5, "a failed handshake is an error at once, not a wait"
    return err.value


def test_tls_server_certificate_checks(certs: Certs) -> None:
    server, url, runs = _tls_server(certs, mtls=False)
    try:
        with Client(url, timeout=10, token="dmt_tls", tls_ca=certs.ca) as client:
            assert client.get_run("r1").run_id == "r1"
        assert runs.seen[-1].get("authorization") == "Bearer dmt_tls"
        # `localhost` is in the certificate too; a name override is checked instead of the host.
        with Client(url.replace("127.0.0.1", "localhost"), timeout=10, tls_ca=certs.ca) as client:
            assert client.get_run("r2").run_id == "r2"
        with Client(url, timeout=10, tls_ca=certs.ca, tls_server_name="localhost") as client:
            assert client.get_run("r3").run_id == "r3"
        for options in ({"tls_ca": certs.other_ca}, {}, {"tls_ca": certs.ca, "tls_server_name": "elsewhere.example"}):
            err = _get_run_error(url, **options)
            assert err.code == grpc.StatusCode.UNAVAILABLE
            assert "server certificate is not trusted" in err.message and "DAGMESH_TLS_CA" in err.message
    finally:
        server.stop(None)


def test_mtls_needs_the_client_certificate(certs: Certs) -> None:
    server, url, _ = _tls_server(certs, mtls=True)
    try:
        err = _get_run_error(url, tls_ca=certs.ca)
        assert err.code == grpc.StatusCode.UNAVAILABLE and "tls_client_cert" in err.message
        with Client(url, timeout=10, tls_ca=certs.ca, tls_client_cert=certs.client_cert, tls_client_key=certs.client_key) as client:
            assert client.get_run("r").run_id == "r"
    finally:
        server.stop(None)


def test_worker_stream_over_tls_carries_the_token(certs: Certs) -> None:
    refusing = _Workers(grpc.StatusCode.UNAUTHENTICATED)
    server, url, _ = _tls_server(certs, mtls=True, workers=refusing)
    try:
        worker = Worker(
            url, name="tls", token="dmt_tls_worker", tls_ca=certs.ca,
            tls_client_cert=certs.client_cert, tls_client_key=certs.client_key,
        )
        worker.register("t", "1.0.0", lambda ctx, inputs: None)
        with pytest.raises(WorkerRejected) as err:
            asyncio.run(asyncio.wait_for(worker.run_async(), 20))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert [seen.get("authorization") for seen in refusing.seen] == ["Bearer dmt_tls_worker"]
    finally:
        server.stop(None)


def test_a_worker_logs_a_failed_handshake_at_error_and_keeps_trying(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    server, url, _ = _tls_server(certs, mtls=False)
    try:
        worker = Worker(url, name="untrusting", tls_ca=certs.other_ca, reconnect_backoff=(0.01, 0.05))
        worker.register("t", "1.0.0", lambda ctx, inputs: None)

        async def run_a_while() -> None:
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run_async(stop_event=stop))
            while not any("not trusted" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.02)
            assert not running.done(), "still trying"
            stop.set()
            await asyncio.wait_for(running, 10)

        with caplog.at_level("ERROR", logger="dagmesh.worker"):
            asyncio.run(asyncio.wait_for(run_a_while(), 20))
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "not trusted" in r.getMessage()]
        assert errors and "CERTIFICATE_VERIFY_FAILED" in errors[0].getMessage()
    finally:
        server.stop(None)

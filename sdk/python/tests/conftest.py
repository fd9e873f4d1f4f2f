"""Fixtures: a real `dagmesh up` child process, and workers running in background threads.

The server binary is $DAGMESH_BIN (default: target/debug/dagmesh of this repository). It listens
on a free port of 127.0.0.1 and is ready once gRPC health answers SERVING: no fixed sleeps.

Authentication is on (the server's default): `dagmesh up` writes an admin token to
DATA_DIR/admin.token, and each test runs with DAGMESH_TOKEN set to the token of the server it
uses (the session `server`, or the last one it started with `start_server`), so workers,
clients and child processes pick it up without being told. The caller's own DAGMESH_TOKEN /
DAGMESH_TLS_* variables are hidden from the tests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dagmesh import Client, Worker
from dagmesh._channel import SECURITY_OPTIONS, resolve, sync_channel

REPO = Path(__file__).resolve().parents[3]
DAGMESH_BIN = Path(os.environ.get("DAGMESH_BIN", REPO / "target" / "debug" / "dagmesh"))
# Long enough for a loaded 2-core CI machine; a test that hits it has hung.
STEP_TIMEOUT = 30.0

# The lease is short so that a worker that stops heartbeating loses its tasks within the test
# (see test_cpu_bound_sync_handler_keeps_its_lease); the payload limit is small enough to hit.
LEASE = "1s"
HEARTBEAT_INTERVAL = "200ms"
MAX_PAYLOAD_BYTES = 65536


@dataclass(frozen=True)
class Certs:
    """A throwaway PKI made with the openssl CLI (see `make_certs`)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_certs(directory: Path) -> Certs:
    """Writes into `directory`: a CA (`ca.pem`), a server certificate it signed for
    DNS:localhost and IP:127.0.0.1 (`server.pem`/`server.key`), a client certificate it signed
    for mTLS (`client.pem`/`client.key`), and an unrelated CA (`other-ca.pem`). EC P-256 keys,
    valid for 2 days."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    def ca(name: str, cn: str) -> None:
        openssl(
            "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={cn}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )

    def leaf(name: str, cn: str, extensions: str) -> None:
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        (directory / f"{name}.ext").write_text(extensions)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        )
        (directory / f"{name}.csr").unlink()
        (directory / f"{name}.ext").unlink()

    ca("ca", "dagmesh test CA")
    ca("other-ca", "unrelated test CA")
    leaf(
        "server", "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    leaf(
        "client", "dagmesh-test-client",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return Certs(
        directory, directory / "ca.pem", directory / "server.pem", directory / "server.key",
        directory / "client.pem", directory / "client.key", directory / "other-ca.pem",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SECURITY_ENV = [var for var, _flag, _what in SECURITY_OPTIONS.values()]


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    max_payload_bytes: int
    token: str | None = None
    """The admin token `dagmesh up` wrote (None: a server without authentication)."""
    certs: Certs | None = None
    """The PKI of a TLS server (its URL is https://)."""
    mtls: bool = False
    """The server requires client certificates signed by `certs.ca`."""

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def security(self) -> dict[str, Any]:
        """Worker / Client options that get through: the admin token, and for a TLS server
        the CA (and the client certificate for mTLS)."""
        options: dict[str, Any] = {"token": self.token}
        if self.certs is not None:
            options["tls_ca"] = self.certs.ca
            if self.mtls:
                options["tls_client_cert"] = self.certs.client_cert
                options["tls_client_key"] = self.certs.client_key
        return options

    def channel(self) -> grpc.Channel:
        """A channel for raw stubs, with the admin token on every call."""
        return sync_channel(resolve(self.url, environ={}, **self.security()))


def _health_channel(port: int, certs: Certs | None, mtls: bool) -> grpc.Channel:
    if certs is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes() if mtls else None,
        certificate_chain=certs.client_cert.read_bytes() if mtls else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def wait_serving(
    port: int,
    process: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float = STEP_TIMEOUT,
    certs: Certs | None = None,
    mtls: bool = False,
) -> None:
    """Polls grpc.health.v1 (which needs no token) until the server says SERVING."""
    deadline = time.monotonic() + timeout
    with _health_channel(port, certs, mtls) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dagmesh up exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dagmesh up not serving within {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.05)


def start_server(
    data: Path,
    port: int | None = None,
    lease: str = LEASE,
    log_name: str = "server.log",
    *,
    certs: Certs | None = None,
    mtls: bool = False,
    extra_args: Sequence[str] = (),
    set_env: bool = True,
) -> Server:
    """Starts `dagmesh up` on SQLite in `data` (also its data dir: the admin token is
    `data/admin.token`) and waits until it serves. With `certs` it serves TLS with
    `certs.server_cert`; `mtls` also requires client certificates signed by `certs.ca`.

    With `set_env` the server's admin token becomes DAGMESH_TOKEN for the rest of the test
    (restored after it by the `security_env` fixture); fixtures wider than a test pass False
    (their tests pass `server.security()` or set the variable themselves)."""
    port = port or free_port()
    log_path = data / log_name
    command = [
        str(DAGMESH_BIN),
        "up",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data),
        "--database",
        f"sqlite://{data / 'db.sqlite'}",
        "--lease",
        lease,
        "--heartbeat-interval",
        HEARTBEAT_INTERVAL,
        "--max-payload-bytes",
        str(MAX_PAYLOAD_BYTES),
    ]
    if certs is not None:
        command += ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
        if mtls:
            command += ["--tls-client-ca", str(certs.ca)]
    command += list(extra_args)
    # The server's TLS comes from the flags alone.
    hidden = {*SECURITY_ENV, "DAGMESH_TLS_CERT", "DAGMESH_TLS_KEY", "DAGMESH_TLS_CLIENT_CA", "DAGMESH_DATA_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=data, env=env)
    try:
        wait_serving(port, process, log_path, certs=certs, mtls=mtls)
    except BaseException:
        stop_server(process)
        raise
    token_path = data / "admin.token"
    token = token_path.read_text().strip() if token_path.is_file() else None
    if token and set_env:
        os.environ["DAGMESH_TOKEN"] = token
    scheme = "https" if certs is not None else "http"
    return Server(f"{scheme}://127.0.0.1:{port}", port, process, log_path, MAX_PAYLOAD_BYTES, token, certs, mtls)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(autouse=True)
def security_env(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hides the caller's DAGMESH_TOKEN / DAGMESH_TLS_* variables; a test that uses the session
    `server` gets its admin token as DAGMESH_TOKEN. Restores the variables afterwards."""
    saved = {var: os.environ.get(var) for var in SECURITY_ENV}
    for var in SECURITY_ENV:
        os.environ.pop(var, None)
    try:
        if "server" in request.fixturenames:
            token = request.getfixturevalue("server").token
            if token:
                os.environ["DAGMESH_TOKEN"] = token
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not DAGMESH_BIN.is_file():
        pytest.fail(f"dagmesh binary not found at {DAGMESH_BIN}: run `cargo build -p dagmesh` or set DAGMESH_BIN")
    started = start_server(tmp_path_factory.mktemp("dagmesh"), set_env=False)
    try:
        yield started
    finally:
        stop_server(started.process)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, timeout=STEP_TIMEOUT) as c:
        yield c


@pytest.fixture
def unique() -> str:
    """A suffix that keeps task types and workflow names of one test apart from the others'."""
    return uuid.uuid4().hex[:8]


class WorkerThread:
    """Runs `worker.run_async` on its own event loop in a background thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"worker-{worker.instance_id}", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self.worker.run_async(stop_event=self.stop))
        except BaseException as err:  # reported by join()
            self.error = err

    def start(self) -> WorkerThread:
        self.thread.start()
        deadline = time.monotonic() + STEP_TIMEOUT
        while not self.worker.state.connected:
            if not self.thread.is_alive():
                raise RuntimeError(f"worker stopped before connecting: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not connect")
            time.sleep(0.01)
        return self

    def join(self, timeout: float = STEP_TIMEOUT) -> None:
        """Drains the worker and waits for it to return."""
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"worker still running: {self.worker.state}"
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_worker() -> Iterator[Callable[[Worker], WorkerThread]]:
    """`run_worker(worker)` starts it in a thread and waits until connected; every worker is
    drained at the end of the test."""
    started: list[WorkerThread] = []

    def start(worker: Worker) -> WorkerThread:
        running = WorkerThread(worker)
        started.append(running)
        return running.start()

    yield start
    errors = []
    for running in started:
        try:
            running.join()
        except BaseException as err:
            errors.append(err)
    if errors:
        raise errors[0]

"""Server URLs, credentials and channel options shared by the worker and the clients.

The security settings follow the contract every dagmesh client shares (CLI, Rust, Python and
C++ SDKs): each has a keyword option and an environment variable, and an option given in code
(or a command-line flag) wins over the variable.

| option            | env var                   | meaning                                     |
|-------------------|---------------------------|---------------------------------------------|
| `token`           | `DAGMESH_TOKEN`           | the bearer token                            |
| `token_file`      | `DAGMESH_TOKEN_FILE`      | a file holding the token (whitespace trimmed); used when no token is given |
| `tls_ca`          | `DAGMESH_TLS_CA`          | PEM CA(s) of the server certificate (default: system roots) |
| `tls_client_cert` | `DAGMESH_TLS_CLIENT_CERT` | PEM client certificate chain, for mTLS      |
| `tls_client_key`  | `DAGMESH_TLS_CLIENT_KEY`  | PEM private key of the client certificate   |
| `tls_server_name` | `DAGMESH_TLS_SERVER_NAME` | name to verify instead of the URL's host    |

TLS is used exactly when the URL is `https://`; the token travels as `authorization: Bearer
<token>` metadata on every call, over TLS or plaintext alike (plaintext is meant for loopback).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Optional, Union
from urllib.parse import urlsplit

import grpc
import grpc.aio

__all__ = [
    "SECURITY_OPTIONS",
    "ChannelSettings",
    "aio_channel",
    "channel_options",
    "parse_server",
    "resolve",
    "sync_channel",
]

PathLike = Union[str, "os.PathLike[str]"]

# option name -> (environment variable, command-line flag, what it is)
SECURITY_OPTIONS: dict[str, tuple[str, str, str]] = {
    "token": ("DAGMESH_TOKEN", "--token", "token"),
    "token_file": ("DAGMESH_TOKEN_FILE", "--token-file", "token file"),
    "tls_ca": ("DAGMESH_TLS_CA", "--tls-ca", "TLS CA file"),
    "tls_client_cert": ("DAGMESH_TLS_CLIENT_CERT", "--tls-client-cert", "TLS client certificate file"),
    "tls_client_key": ("DAGMESH_TLS_CLIENT_KEY", "--tls-client-key", "TLS client key file"),
    "tls_server_name": ("DAGMESH_TLS_SERVER_NAME", "--tls-server-name", "TLS server name"),
}
_TLS_OPTIONS = ("tls_ca", "tls_client_cert", "tls_client_key", "tls_server_name")


def parse_server(server: str) -> tuple[str, bool]:
    """`http://host:port` -> ("host:port", False); `https://host[:port]` -> (..., True);
    a bare `host:port` is plaintext."""
    if "://" not in server:
        if not server:
            raise ValueError("server URL is empty")
        return server, False
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid server url {server!r}: expected http://host:port or https://host:port")
    if parts.path not in ("", "/"):
        raise ValueError(f"invalid server url {server!r}: a path is not supported")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}", secure


def channel_options() -> list[tuple[str, Any]]:
    return [
        # The executor enforces payload limits (and says which in Welcome); the transport
        # should not cut in first with its 4 MiB default.
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
        # The executor never writes to an idle worker, so only pings notice a dead peer.
        ("grpc.keepalive_time_ms", 15_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@dataclasses.dataclass(frozen=True)
class ChannelSettings:
    """Where to connect and how: the result of `resolve`."""

    server: str
    """The URL as given."""
    target: str
    """`host:port` for grpc."""
    secure: bool
    """TLS (an `https://` URL)."""
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    root_certificates: Optional[bytes] = dataclasses.field(default=None, repr=False)
    private_key: Optional[bytes] = dataclasses.field(default=None, repr=False)
    certificate_chain: Optional[bytes] = dataclasses.field(default=None, repr=False)
    server_name: Optional[str] = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call carries: `authorization: Bearer <token>` when there is a token.
        Pass it as `metadata=` to each call (stubs on a channel of `sync_channel` /
        `aio_channel` get it as well as any they pass)."""
        if not self.token:
            return ()
        return (("authorization", f"Bearer {self.token}"),)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel credentials for TLS (None for plaintext)."""
        if not self.secure:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def hint(self, code: grpc.StatusCode | None, details: str) -> str:
        """A few words to append to an error's details when the settings likely explain it
        (grpc says "Socket closed" or "Unwrap failed" when a server that requires a client
        certificate hangs up after the handshake); "" otherwise."""
        text = details.lower()
        if code == grpc.StatusCode.UNAUTHENTICATED and not self.token and "handshake" not in text:
            return " (no token was sent: set token / token_file or DAGMESH_TOKEN / DAGMESH_TOKEN_FILE)"
        if code != grpc.StatusCode.UNAVAILABLE or not self.secure:
            return ""
        if "certificate_verify_failed" in text or "hostname verification" in text:
            return (
                " (TLS: the server certificate is not trusted for this name: check tls_ca / DAGMESH_TLS_CA"
                " and tls_server_name / DAGMESH_TLS_SERVER_NAME)"
            )
        # A server that requires a client certificate alerts right after the handshake (TLS
        # 1.3), which grpc reports as the first read failing.
        closed = ("socket closed", "tsi_data_corrupted", "unwrap failed", "certificate_required")
        if self.certificate_chain is None and any(words in text for words in closed):
            return (
                " (TLS: the server ended the connection; if it requires a client certificate (mTLS),"
                " set tls_client_cert and tls_client_key)"
            )
        if "handshake" in text or "ssl" in text:
            return " (TLS handshake failed)"
        return ""

    def options(self) -> list[tuple[str, Any]]:
        """`channel_options()`, plus the name to verify in the server certificate when set."""
        options = channel_options()
        if self.secure and self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options


def resolve(
    server: str,
    *,
    token: str | None = None,
    token_file: PathLike | None = None,
    tls_ca: PathLike | None = None,
    tls_client_cert: PathLike | None = None,
    tls_client_key: PathLike | None = None,
    tls_server_name: str | None = None,
    environ: Mapping[str, str] | None = None,
    sources: Mapping[str, str] | None = None,
) -> ChannelSettings:
    """Resolves the server URL and the security settings, falling back on the environment
    (`environ`, default `os.environ`) for each option not given (None or empty). Reads the
    files. Raises ValueError naming the setting (the option, or the variable it came from) for
    a bad URL, TLS settings with an `http://` URL, a client certificate without its key (or the
    reverse), or a file that cannot be read.

    Precedence for the token: `token`, then `token_file`, then `DAGMESH_TOKEN`, then
    `DAGMESH_TOKEN_FILE`: an option in code beats any variable.

    `sources` names explicit options as the caller knows them (e.g. `{"tls_ca": "--tls-ca"}`
    for a command line) in error messages."""
    env = os.environ if environ is None else environ
    given: dict[str, Any] = {
        "token": token,
        "token_file": token_file,
        "tls_ca": tls_ca,
        "tls_client_cert": tls_client_cert,
        "tls_client_key": tls_client_key,
        "tls_server_name": tls_server_name,
    }
    values: dict[str, str] = {}
    labels: dict[str, str] = {}
    explicit_token = bool(given["token"]) or bool(given["token_file"])
    for name, (var, _flag, _what) in SECURITY_OPTIONS.items():
        value = given[name]
        if value is not None and not isinstance(value, str):
            value = os.fspath(value)
        if value:
            values[name] = value
            labels[name] = (sources or {}).get(name, name)
        elif name in ("token", "token_file") and explicit_token:
            continue  # an explicit token (or token file) hides both variables
        elif env.get(var):
            values[name] = env[var]
            labels[name] = var

    target, secure = parse_server(server)
    tls_given = [labels[name] for name in _TLS_OPTIONS if name in values]
    if tls_given and not secure:
        raise ValueError(
            f"TLS settings need an https:// server URL: {', '.join(tls_given)} given "
            f"with server {server!r}"
        )
    if ("tls_client_cert" in values) != ("tls_client_key" in values):
        has, lacks = ("tls_client_cert", "tls_client_key") if "tls_client_cert" in values else ("tls_client_key", "tls_client_cert")
        lacking_var, lacking_flag, _ = SECURITY_OPTIONS[lacks]
        raise ValueError(
            f"{SECURITY_OPTIONS[has][2]} ({labels[has]}) given without the "
            f"{SECURITY_OPTIONS[lacks][2]} ({lacks} / {lacking_flag} / {lacking_var}): mTLS needs both"
        )

    resolved_token: str | None = None
    if "token" in values:
        resolved_token = _check_token(values["token"].strip(), f"the token ({labels['token']})")
    elif "token_file" in values:
        path = values["token_file"]
        text = _read(path, "token_file", labels["token_file"]).decode("utf-8", errors="replace").strip()
        if not text:
            raise ValueError(f"token file {path!r} ({labels['token_file']}) is empty")
        resolved_token = _check_token(text, f"the token in {path!r} ({labels['token_file']})")

    def read(name: str) -> bytes | None:
        return _read(values[name], name, labels[name]) if name in values else None

    return ChannelSettings(
        server=server,
        target=target,
        secure=secure,
        token=resolved_token,
        root_certificates=read("tls_ca"),
        private_key=read("tls_client_key"),
        certificate_chain=read("tls_client_cert"),
        server_name=values.get("tls_server_name"),
    )


def _read(path: str, name: str, label: str) -> bytes:
    what = SECURITY_OPTIONS[name][2]
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"cannot read the {what} {path!r} ({label}): {reason}") from None


def _check_token(token: str, where: str) -> str:
    """gRPC metadata values are visible ASCII: a token with anything else (a newline in the
    middle, a space) could not be sent, so it is refused here rather than by the transport."""
    if not token:
        raise ValueError(f"{where} is empty")
    bad = next((c for c in token if not "\x21" <= c <= "\x7e"), None)
    if bad is not None:
        raise ValueError(f"{where} contains {bad!r}: a token is printable ASCII without spaces")
    return token


# --- channels --------------------------------------------------------------------------------


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the settings' metadata to every call of a synchronous channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        existing = tuple(details.metadata or ())
        keys = {k for k, _ in existing}
        extra = tuple((k, v) for k, v in self._metadata if k not in keys)
        return _CallDetails(
            details.method, details.timeout, existing + extra, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self, method: str, timeout: Any, metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def sync_channel(settings: ChannelSettings) -> grpc.Channel:
    """A blocking channel; every call on it carries `settings.metadata`."""
    credentials = settings.credentials()
    if credentials is not None:
        channel = grpc.secure_channel(settings.target, credentials, options=settings.options())
    else:
        channel = grpc.insecure_channel(settings.target, options=settings.options())
    if settings.metadata:
        channel = grpc.intercept_channel(channel, _Metadata(settings.metadata))
    return channel


def aio_channel(settings: ChannelSettings) -> grpc.aio.Channel:
    """An asyncio channel. It adds no metadata by itself: callers pass `settings.metadata` as
    `metadata=` on each call (grpc.aio interceptors would turn the worker's bidirectional
    stream into a queue-fed iterator, changing how writes wait)."""
    credentials = settings.credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(settings.target, credentials, options=settings.options())
    return grpc.aio.insecure_channel(settings.target, options=settings.options())

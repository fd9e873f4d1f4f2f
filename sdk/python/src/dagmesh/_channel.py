"""Server URLs and channel options shared by the worker and the client."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["channel_options", "parse_server"]


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


def channel_options() -> list[tuple[str, int]]:
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

"""Check a Ray cluster address before joining it, so a wrong one fails in seconds with a fix.

`ray.init(address="127.0.0.1:1")` retries for minutes (a warning every ~40 s), and `auto` with no
cluster ends in a raw ConnectionError traceback. We resolve the address the way Ray does
(RAY_ADDRESS, then the latest `ray start` recorded in Ray's session file, then running GCS
processes) and open a TCP connection to the GCS port with a short timeout: nothing answering there
means no cluster, and the error names the address and how to fix it. Something that answers but
speaks HTTP/1 rather than gRPC's HTTP/2 (the dashboard on 8265, any web server) is not a GCS either:
ray.init would wait on it for minutes, so the probe sends HTTP/2's connection preface and refuses an
answer that is not an HTTP/2 frame (a silent listener passes: it cannot be told apart).
"""
from __future__ import annotations

import socket

from harness.core.config import ConfigError

PROBE_TIMEOUT_S = 5.0
FIX = ("Fix: start a cluster (`ray start --head`, then use the address it prints, e.g. ray.address=HOST:6379), "
       "or leave ray.address unset (null) to run on an embedded local Ray")


def check_ray_address(address: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConfigError naming `address` unless a Ray GCS answers there (None/'local': nothing to check)."""
    if address is None or address == "local":
        return
    target = _resolve(address)
    host, _, port = target.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"ray.address={address}: '{target}' is not HOST:PORT. {FIX}") from None
    via = "" if target == address else f" (resolved to {target})"
    try:
        with socket.create_connection((host.strip("[]"), port_number), timeout=timeout_s) as conn:
            answer = _http2_answer(conn, timeout_s)
    except OSError as err:
        raise ConfigError(f"ray.address={address}{via}: no Ray cluster answers there within {timeout_s:g}s "
                          f"({err.strerror or type(err).__name__}). {FIX}") from None
    if answer and not _is_http2_frame(answer):
        seen = answer.split(b"\r\n", 1)[0][:60].decode("ascii", "replace")
        raise ConfigError(f"ray.address={address}{via}: something answers there, but not a Ray cluster's GCS "
                          f"(it answered {seen!r}, not gRPC: a dashboard (8265) or web server port?). {FIX}")


def _resolve(address: str) -> str:
    """host:port of the GCS to join; `auto` is resolved as ray.init resolves it."""
    if address.startswith("ray://"):  # Ray Client: the client server's host:port
        return address[len("ray://"):].rstrip("/")
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address  # the same lookup ray.init does

    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"ray.address={address}: no running Ray cluster found ({first}). {FIX}") from None
    if resolved is None:
        raise ConfigError(f"ray.address={address}: no running Ray cluster found. {FIX}")
    return resolved


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


def _http2_answer(conn: socket.socket, timeout_s: float) -> bytes:
    """The first bytes a server sends back to HTTP/2's connection preface (b"" if it stays silent)."""
    conn.settimeout(timeout_s)
    try:
        conn.sendall(HTTP2_PREFACE)
        return conn.recv(64)
    except (socket.timeout, ConnectionError):
        return b""


def _is_http2_frame(data: bytes) -> bool:
    """A gRPC server answers the preface with a SETTINGS frame (type 4) within its first 9 bytes."""
    return len(data) >= 9 and data[3] == 4

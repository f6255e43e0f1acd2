"""Check a Ray cluster address before joining it, so a wrong one fails in seconds with a fix.

`ray.init(address="127.0.0.1:1")` retries for minutes (a warning every ~40 s), and `auto` with no
cluster ends in a raw ConnectionError traceback. We resolve the address the way Ray does
(RAY_ADDRESS, then the latest `ray start` recorded in Ray's session file, then running GCS
processes) and open a TCP connection to the GCS port with a short timeout: nothing answering there
means no cluster, and the error names the address and how to fix it.
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
    try:
        with socket.create_connection((host.strip("[]"), port_number), timeout=timeout_s):
            pass
    except OSError as err:
        via = "" if target == address else f" (resolved to {target})"
        raise ConfigError(f"ray.address={address}{via}: no Ray cluster answers there within {timeout_s:g}s "
                          f"({err.strerror or type(err).__name__}). {FIX}") from None


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

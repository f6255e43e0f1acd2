"""One driver per grid and results store: a second `robustgrid grid` on the same grid says so and exits.

Two drivers on one grid used to run every cell twice (results stayed right, first commit wins, but
the compute doubled without a word). The driver now holds a heartbeat marker in the store, next to
the cells' run markers (harness.run.status): `_drivers/<grid id>.json`, refreshed every few
seconds. The grid id hashes the store and the grid's cell keys, so another grid on the same store
is not blocked. A marker whose heartbeat stopped (driver killed) is stale after
STALE_AFTER_SECONDS, and one left by a dead process on this host is ignored at once, so a
restarted driver takes over. Object stores have no lock primitive: two drivers starting within
the same second can both pass; the write-then-reread below makes that window small, and commits
stay correct in any case.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from typing import Any, Iterator

from harness.run.status import DRIVERS, HEARTBEAT_SECONDS, STALE_AFTER_SECONDS, ray_job_id
from harness.store.heartbeat import HeartbeatMarker
from harness.store.storage import open_store

SETTLE_SECONDS = 1.0  # between writing our marker and reading it back (catches a driver starting with us)


class AnotherDriverError(ValueError):
    """Another live driver runs this grid on this store (a ValueError: the CLI prints it, exit 2)."""


def grid_id(location: str, keys: list[str]) -> str:
    return hashlib.sha256(json.dumps([location, sorted(keys)]).encode()).hexdigest()[:16]


@contextlib.contextmanager
def single_driver(cells: list[dict[str, Any]]) -> Iterator[None]:
    """Hold the driver marker of every store the cells write to while the body runs."""
    with contextlib.ExitStack() as stack:
        by_store: dict[str, list[str]] = {}
        for cfg in cells:
            by_store.setdefault(cfg["results_dir"], []).append(cfg["key"])
        for location, keys in sorted(by_store.items()):
            stack.enter_context(_DriverMarker(location, grid_id(location, keys)))
        yield


class _DriverMarker:
    def __init__(self, location: str, gid: str) -> None:
        self.location, self.store, self.rel = location, open_store(location), f"{DRIVERS}/{gid}.json"
        self.token = uuid.uuid4().hex
        self._started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._marker = HeartbeatMarker(self.store, self.rel, self._info, ("token", self.token), HEARTBEAT_SECONDS,
                                       "driver-heartbeat")

    def __enter__(self) -> "_DriverMarker":
        self._refuse_if_taken()
        self._marker.beat()
        time.sleep(SETTLE_SECONDS)
        current = self._marker.read()
        if current is not None and current.get("token") != self.token:  # a driver started with us and wrote last
            raise AnotherDriverError(self._message(current))
        self._marker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._marker.stop()

    def _refuse_if_taken(self) -> None:
        current = self._marker.read()
        if current is not None and _alive(current):
            raise AnotherDriverError(self._message(current))

    def _message(self, other: dict[str, Any]) -> str:
        return (f"another driver is already running this grid on results_dir={self.location} "
                f"(pid {other.get('pid')} on {other.get('host')}, since {other.get('started_at')}); "
                f"this one exits so no cell runs twice. Watch it with `robustgrid status` on the same overrides, "
                f"or stop it (kill {other.get('pid')} on {other.get('host')}) and run again; "
                f"a killed driver's marker {self.store.uri(self.rel)} expires after {STALE_AFTER_SECONDS:.0f} s")

    def _info(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "started_at": self._started,
                "job": ray_job_id()}  # the Ray job the nodes' run markers name (None before ray.init)


def _alive(info: dict[str, Any]) -> bool:
    """A fresh heartbeat, from a process that still exists when it is on this host."""
    if time.time() - float(info.get("heartbeat", 0)) >= STALE_AFTER_SECONDS:
        return False
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
    return True

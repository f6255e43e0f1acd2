"""What a grid's cells are doing, read from the results store alone (`robustgrid status`).

done / failed come from verified commit markers (harness.store.storage). While a node runs, its
task keeps `_running/<key>.json` fresh (a heartbeat every few seconds; a train node's key is
`train-<train key>`) and logs each start in `_attempts/<key>/<attempt>.json`; a marker whose
heartbeat stopped (killed worker, lost node, killed driver) no longer counts as running, so the
cell shows as pending until a grid reruns it. A cell with no result under its key, but an 'ok'
result of the same cell computed by other code (same `cell_id`, another code version), is stale:
the old result is kept, and the next grid run recomputes it under the new key.
No driver or Ray connection is needed: any machine that can read the store can ask.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from harness.store.audit import warn_about_store
from harness.store.heartbeat import HeartbeatMarker
from harness.store.storage import COMMITS, open_store

RUNNING = "_running"
ATTEMPTS = "_attempts"
HEARTBEAT_SECONDS = 5.0
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS


@dataclass
class GridStatus:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # an 'ok' result exists, from older code
    pending: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # starts per key (retries show as > 1)
    grid_known: bool = True  # False: no grid given, so pending cells cannot be listed

    def counts(self) -> dict[str, int]:
        return {"done": len(self.done), "failed": len(self.failed), "running": len(self.running),
                "stale": len(self.stale), "pending": len(self.pending)}


class RunningMarker:
    """Context manager a node's task holds while it runs: logs the attempt, keeps a heartbeat."""

    def __init__(self, location: str, key: str) -> None:
        self.store, self.key = open_store(location), key
        self.attempt = uuid.uuid4().hex[:12]
        self._marker = HeartbeatMarker(self.store, f"{RUNNING}/{key}.json", self._info, ("attempt", self.attempt),
                                       HEARTBEAT_SECONDS, f"heartbeat-{key}")

    def __enter__(self) -> "RunningMarker":
        info = self._info()
        self.store.write_bytes(f"{ATTEMPTS}/{self.key}/{info['started_at']}-{self.attempt}.json",
                               json.dumps(info).encode(), durable=False)
        self._marker.beat()
        self._marker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._marker.stop()

    def _info(self) -> dict[str, Any]:
        return {"key": self.key, "attempt": self.attempt, "host": socket.gethostname(), "pid": os.getpid(),
                "node": _node_id(), "started_at": _stamp()}


def running_cells(location: str) -> dict[str, dict[str, Any]]:
    """Keys whose running marker has a fresh heartbeat, with the marker (host, pid, node)."""
    store = open_store(location)
    now = time.time()
    out = {}
    for name in store.list(RUNNING):
        raw = store.read_bytes(f"{RUNNING}/{name}")
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            continue
        if info and now - float(info.get("heartbeat", 0)) < STALE_AFTER_SECONDS:
            out[info["key"]] = info
    return out


def attempt_count(location: str, key: str) -> int:
    return len(open_store(location).list(f"{ATTEMPTS}/{key}"))


IDENTITIES = "_cells"  # _cells/<cell_id>/<key>.json: every key a cell was committed under


def record_identity(location: str, cell_id: str | None, key: str, status: str, code_version: str | None) -> None:
    """Note that `key` (one code version of cell `cell_id`) was committed, for stale detection."""
    if cell_id:
        info = {"key": key, "status": status, "code_version": code_version, "committed_at": _stamp()}
        open_store(location).write_bytes(f"{IDENTITIES}/{cell_id}/{key}.json", json.dumps(info).encode(), durable=False)


def older_results(location: str, cell_id: str, key: str) -> list[str]:
    """Keys of 'ok' results of the same cell under other code versions."""
    store = open_store(location)
    out = []
    for name in store.list(f"{IDENTITIES}/{cell_id}"):
        other = name[: -len(".json")]
        if other != key and store.committed_status(other) == "ok":
            out.append(other)
    return out


def grid_status(location: str, keys: Iterable[str] | None = None,
                identities: dict[str, str] | None = None, train_keys: dict[str, str] | None = None) -> GridStatus:
    """Status of the given cell keys (a grid), or of every cell the store knows about.
    `identities` (key -> cell_id) finds stale cells; `train_keys` (key -> train key) counts a cell
    whose model is training as running."""
    store = open_store(location)
    running = running_cells(location)
    committed = {name[: -len(".json")] for name in store.list(COMMITS) if name.endswith(".json")}
    committed = {key for key in committed if store.read_marker(key) is not None}  # stray markers: no cell
    status = GridStatus(grid_known=keys is not None)
    wanted = list(keys) if keys is not None else sorted(committed | {k for k in running if not k.startswith("train-")})
    for key in wanted:
        state = store.committed_status(key) if key in committed else None
        training = f"train-{(train_keys or {}).get(key)}" in running
        if state == "ok":
            status.done.append(key)
        elif key in running or training:
            status.running.append(key)
        elif state == "failed":
            status.failed.append(key)
        elif identities and identities.get(key) and older_results(location, identities[key], key):
            status.stale.append(key)
        else:
            status.pending.append(key)
        status.attempts[key] = attempt_count(location, key)
    return status


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")

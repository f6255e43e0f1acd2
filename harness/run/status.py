"""What a grid's cells are doing, read from the results store alone (`robustgrid status`).

done / failed come from verified commit markers (harness.store.storage). While a node runs, its
task keeps `_running/<key>.json` fresh (a heartbeat every few seconds; a train node's key is
`train-<train key>`) and logs each start in `_attempts/<key>/<attempt>.json`; a marker whose
heartbeat is older than its interval plus slack (FRESH_SECONDS) is `stale-running`: its process
stopped beating (killed worker, lost node, killed driver) and a grid will rerun it. Each marker
names the Ray job (the driver) that submitted it; a stale-running cell whose driver holds no
fresh driver marker (harness/run/single_driver.py) was left by a dead driver, and status says so. A cell with no result under its key, but an 'ok'
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

from harness.store.heartbeat import HeartbeatMarker
from harness.store.index import CommittedRows, read_committed
from harness.store.results import result_status
from harness.store.storage import open_store

RUNNING = "_running"
ATTEMPTS = "_attempts"
DRIVERS = "_drivers"  # the drivers' markers (harness/run/single_driver.py)
HEARTBEAT_SECONDS = 5.0
FRESH_SECONDS = 2 * HEARTBEAT_SECONDS  # a beat is due every HEARTBEAT_SECONDS; one late beat is slack
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS  # a driver's marker this old frees its grid for another driver


@dataclass
class GridStatus:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    stale_running: list[str] = field(default_factory=list)  # a run marker whose heartbeat stopped
    dead_driver: list[str] = field(default_factory=list)  # of those, the ones whose driver is gone
    stale: list[str] = field(default_factory=list)  # an 'ok' result exists, from older code
    pending: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # starts per key (retries show as > 1)
    grid_known: bool = True  # False: no grid given, so pending cells cannot be listed

    def counts(self) -> dict[str, int]:
        return {"done": len(self.done), "failed": len(self.failed), "running": len(self.running),
                "stale-running": len(self.stale_running), "stale": len(self.stale), "pending": len(self.pending)}


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
                "node": _node_id(), "driver": ray_job_id(), "started_at": _stamp()}


def run_markers(location: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(fresh, stale) run markers by key: a heartbeat within FRESH_SECONDS, or older."""
    store = open_store(location)
    now = time.time()
    fresh: dict[str, dict[str, Any]] = {}
    stale: dict[str, dict[str, Any]] = {}
    for name in store.list(RUNNING):
        raw = store.read_bytes(f"{RUNNING}/{name}")
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            continue
        if isinstance(info, dict) and "key" in info:
            (fresh if now - float(info.get("heartbeat", 0)) < FRESH_SECONDS else stale)[info["key"]] = info
    return fresh, stale


def running_cells(location: str) -> dict[str, dict[str, Any]]:
    """Keys whose running marker has a fresh heartbeat, with the marker (host, pid, node, driver)."""
    return run_markers(location)[0]


def live_drivers(location: str) -> set[str]:
    """Ray job ids of the drivers whose marker in this store has a fresh heartbeat."""
    store = open_store(location)
    out = set()
    for name in store.list(DRIVERS):
        try:
            info = json.loads(store.read_bytes(f"{DRIVERS}/{name}") or b"null")
        except ValueError:
            continue
        if isinstance(info, dict) and time.time() - float(info.get("heartbeat", 0)) < FRESH_SECONDS and info.get("job"):
            out.add(str(info["job"]))
    return out


def attempt_count(location: str, key: str) -> int:
    return len(open_store(location).list(f"{ATTEMPTS}/{key}"))


IDENTITIES = "_cells"  # _cells/<cell_id>/<key>.json: every key a cell was committed under


def record_identity(location: str, cell_id: str | None, key: str, status: str, code_version: str | None) -> None:
    """Note that `key` (one code version of cell `cell_id`) was committed, for stale detection."""
    if cell_id:
        info = {"key": key, "status": status, "code_version": code_version, "committed_at": _stamp()}
        open_store(location).write_bytes(f"{IDENTITIES}/{cell_id}/{key}.json", json.dumps(info).encode(), durable=False)


def attempt_counts(location: str) -> dict[str, int]:
    """Starts per key, from one (recursive, paged) listing of `_attempts/`: not a listing per cell."""
    return {key: len(names) for key, names in open_store(location).files_by_folder(ATTEMPTS).items()}


def keys_by_identity(location: str) -> dict[str, list[str]]:
    """cell_id -> every key it was committed under, from one (recursive) listing of `_cells/`."""
    return {cell_id: [name[: -len(".json")] for name in names if name.endswith(".json")]
            for cell_id, names in open_store(location).files_by_folder(IDENTITIES).items()}


def grid_status(location: str, keys: Iterable[str] | None = None,
                identities: dict[str, str] | None = None, train_keys: dict[str, str] | None = None,
                committed: CommittedRows | None = None) -> GridStatus:
    """Status of the given cell keys (a grid), or of every cell the store knows about.
    `identities` (key -> cell_id) finds stale cells; `train_keys` (key -> train key) counts a cell
    whose model is training as running. The store is read in a fixed number of listings, whatever
    the number of cells: commits through the read index (harness.store.index), attempts and
    identities one recursive listing each. `committed`: the store's commits, when the caller has
    just read them (harness.store.index.read_committed)."""
    running, stale_markers = run_markers(location)
    drivers = live_drivers(location) if stale_markers else set()
    committed = read_committed(location, columns=()) if committed is None else committed
    states = {key: commit.status for key, commit in committed.commits.items()}
    status = GridStatus(grid_known=keys is not None)
    markers = set(running) | set(stale_markers)
    wanted = (list(keys) if keys is not None
              else sorted(committed.marked() | {k for k in markers if not k.startswith("train-")}))
    attempts = attempt_counts(location)
    older: dict[str, list[str]] | None = None  # read once, when a cell is neither done, running nor failed
    for key in wanted:
        state = states.get(key)  # as the leaderboard reads it: verified, a result file of this key
        train_marker = f"train-{(train_keys or {}).get(key)}"
        if state == "ok":
            status.done.append(key)
        elif key in running or train_marker in running:
            status.running.append(key)
        elif key in stale_markers or train_marker in stale_markers:
            status.stale_running.append(key)
            marker = stale_markers.get(key) or stale_markers[train_marker]
            if marker.get("driver") not in drivers:
                status.dead_driver.append(key)
        elif state == "failed":
            status.failed.append(key)
        elif identities and identities.get(key):
            older = keys_by_identity(location) if older is None else older
            others = [other for other in older.get(identities[key], []) if other != key]
            # an older key is outside a grid-restricted read: verified on its own (few, and only here)
            if any((states[other] if other in states else result_status(location, other)) == "ok" for other in others):
                status.stale.append(key)
            else:
                status.pending.append(key)
        else:
            status.pending.append(key)
        status.attempts[key] = attempts.get(key, 0)
    return status


def ray_job_id() -> str | None:
    """The Ray job (driver) this process belongs to, when Ray is running."""
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:
        return None


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")

"""The columns every result row carries (provenance), and the one way to record a failed cell."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

from harness.store.provenance import git_commit, hardware, hostname, package_versions
from harness.store.results import SCHEMA_VERSION


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def base_row(cfg: dict[str, Any], started: dt.datetime) -> dict[str, Any]:
    """Provenance and identity of a cell's rows: key, config, code, packages, host, times."""
    return {
        "schema_version": SCHEMA_VERSION,
        "key": cfg["key"],
        "cell_id": cfg.get("cell_id"),
        "grid": (cfg.get("grid") or {}).get("name"),
        "dataset": cfg["data"]["name"],
        "arch": cfg["arch"].get("model") or cfg["arch"]["name"],
        "method": cfg["method"]["name"],
        "seed": int(cfg["seed"]),
        "git_commit": git_commit(),
        "code_version": cfg.get("code_version"),
        "package_versions": package_versions(),
        "config_json": json.dumps(cfg, sort_keys=True),
        "hardware": hardware(),
        "hostname": hostname(),
        "started_at": started,
        "finished_at": now(),
    }


def failed_row(cfg: dict[str, Any], error: str, started: dt.datetime | None = None) -> dict[str, Any]:
    """The single row of a cell that failed (its own error, or a node it needed failed)."""
    return base_row(cfg, started or now()) | {"status": "failed", "error": error}

"""Make sure a cell's dataset exists as shards before any cell starts.

Datasets that ship with a package (digits) are prepared on first use; datasets converted from
a user's local archive are prepared when `data.source` is given, and otherwise fail at once
with the command that prepares them. `data.dir` may be a URI (s3://bucket/prefix/name): its
manifest is read there and its shards checked once per node (harness.data.integrity).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.locations import parent as location_parent
from harness.core.registry import DATASETS
from harness.data.location import DataLocation
from harness.data.shards import MANIFEST, DataError, load_manifest, verify_shards


def ensure_prepared(data_cfg: dict[str, Any]) -> Path | str:
    """Return the dataset dir, preparing it if possible; raise DataError with the fix if not."""
    loc = DataLocation(data_cfg["dir"], data_cfg.get("cache"))
    if loc.read_bytes(MANIFEST) is not None:
        verify_shards(loc, load_manifest(loc))
        return data_cfg["dir"]
    plugin = DATASETS.get(data_cfg["name"])()
    source = data_cfg.get("source")
    parent = location_parent(loc.uri)  # a URI keeps its query (?endpoint_override=...): same server
    if getattr(plugin, "needs_source", False) and not source:
        raise DataError(
            f"dataset '{data_cfg['name']}' is not prepared at {loc.uri}. Fix: run "
            f"`robustgrid data prepare {data_cfg['name']} --source <path to its archive> "
            f"--out {parent}`, or pass data.source=<path>."
        )
    return plugin.prepare(parent, Path(source) if source else None)

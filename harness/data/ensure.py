"""Make sure a cell's dataset exists as shards before any cell starts.

Datasets that ship with a package (digits) are prepared on first use; datasets converted from
a user's local archive (cifar10) are prepared when `data.source` is given, and otherwise fail
at once with the command that prepares them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.data.shards import DataError, load_manifest, verify_shards
from harness.core.registry import DATASETS


def ensure_prepared(data_cfg: dict[str, Any]) -> Path:
    """Return the dataset dir, preparing it if possible; raise DataError with the fix if not."""
    dataset_dir = Path(data_cfg["dir"])
    if (dataset_dir / "manifest.json").exists():
        verify_shards(dataset_dir, load_manifest(dataset_dir))
        return dataset_dir
    plugin = DATASETS.get(data_cfg["name"])()
    source = data_cfg.get("source")
    if getattr(plugin, "needs_source", False) and not source:
        raise DataError(
            f"dataset '{data_cfg['name']}' is not prepared at {dataset_dir}. Fix: run "
            f"`robustgrid data prepare {data_cfg['name']} --source <path to its archive> "
            f"--root {dataset_dir.parent}`, or pass data.source=<path>."
        )
    return plugin.prepare(dataset_dir.parent, Path(source) if source else None)

"""Dataset preparation (WebDataset shards + manifest, to a folder or any pyarrow.fs URI) and the
loading pipeline in which each (rank, loader worker) streams its own shards.

Names are re-exported lazily so that `import harness.data.datasets` (done by the registry when
listing plugins) stays cheap: webdataset, and with it torch, load only when data is touched.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataError": "harness.data.shards",
    "dataset_sha256": "harness.data.shards",
    "load_manifest": "harness.data.shards",
    "verify_shards": "harness.data.shards",
    "prepare_digits": "harness.data.prepare",
    "prepare_cifar10": "harness.data.prepare",
    "prepare_cifar100": "harness.data.sources",
    "prepare_svhn": "harness.data.sources",
    "prepare_imagefolder": "harness.data.sources",
    "prepare_hf": "harness.data.sources",
    "DataLocation": "harness.data.location",
    "make_loader": "harness.data.loader",
    "split_count": "harness.data.loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harness.data' has no attribute {name!r}")

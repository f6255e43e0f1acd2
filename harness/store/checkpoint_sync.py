"""Per-epoch checkpoints mirrored to the results store, so a cell resumes on any node.

With a plain folder as `results_dir` (one machine, or a shared POSIX mount such as NFS) a cell
trains in place, in `<results_dir>/checkpoints/<train_key>/`. With a URI (`s3://`, `gs://`,
`file://`...) each node trains in a local cache folder and rank 0 pushes `checkpoint.pt` (plus a
small `checkpoint.json` with its epoch and sha256) to `<results_dir>/checkpoints/<train_key>/`
after every epoch; before training, a worker pulls the store's checkpoint when it is newer than
its own. A cell whose node died is retried elsewhere and resumes from its last finished epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.store.storage import is_uri, open_store

CHECKPOINT = "checkpoint.pt"  # the trainer's names (harness.train.trainer imports this module)
BEST = "checkpoint_best.pt"  # the best probed epoch's weights (trainer.select; harness/train/best_epoch.py)
SUMMARY = "train_summary.json"
META = "checkpoint.json"


def synced(cfg: dict[str, Any]) -> bool:
    """True when checkpoints live in a store reached through pyarrow (a URI), not in place."""
    return is_uri(cfg["results_dir"])


def store_prefix(cfg: dict[str, Any]) -> str:
    return f"checkpoints/{cfg['train_key']}"


def local_work_dir(cfg: dict[str, Any]) -> Path:
    """Where this process trains the cell (the store itself for a plain folder, else a node-local cache)."""
    if not synced(cfg):
        return Path(cfg["results_dir"]) / "checkpoints" / cfg["train_key"]
    root = Path(os.environ.get("ROBUSTGRID_CACHE") or Path(tempfile.gettempdir()) / "robustgrid-cache")
    store = hashlib.sha256(str(cfg["results_dir"]).encode()).hexdigest()[:12]  # two stores never share a copy
    return root / _node_tag() / store / cfg["train_key"]


def _node_tag() -> str:
    """One cache per Ray node (simulated nodes on one machine must not share a cache)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:16]
    except Exception:  # no Ray here: one plain process
        pass
    return "local"


def local_epoch(work_dir: Path) -> int:
    """Last finished epoch of the local checkpoint (-1 if none)."""
    meta = work_dir / META
    if not meta.exists() or not (work_dir / CHECKPOINT).exists():
        return -1
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (ValueError, KeyError):
        return -1


def pull(cfg: dict[str, Any], work_dir: Path) -> int:
    """Fetch the store's checkpoint (and summary) if newer than the local one; returns the local epoch."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if not synced(cfg):
        return local_epoch(work_dir)
    store = open_store(cfg["results_dir"])
    prefix = store_prefix(cfg)
    raw = store.read_bytes(f"{prefix}/{META}")
    if raw is None:
        return local_epoch(work_dir)
    meta = json.loads(raw)
    if int(meta["epoch"]) <= local_epoch(work_dir):
        if not (work_dir / SUMMARY).exists():  # the same checkpoint here: its summary may still be missing
            _pull_summary(store, prefix, work_dir, int(meta["epoch"]))
        return local_epoch(work_dir)
    data = store.read_bytes(f"{prefix}/{CHECKPOINT}")
    if data is None or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        return local_epoch(work_dir)  # mid-upload or corrupt: train from what we have
    _atomic_write(work_dir / CHECKPOINT, data)
    _atomic_write(work_dir / META, raw)
    best = store.read_bytes(f"{prefix}/{BEST}")  # pushed before its epoch's checkpoint: never older than it
    if best is not None:
        _atomic_write(work_dir / BEST, best)
    _pull_summary(store, prefix, work_dir, int(meta["epoch"]))
    return int(meta["epoch"])


def _pull_summary(store: Any, prefix: str, work_dir: Path, epoch: int) -> None:
    """The store's training summary, when it is the summary of the checkpoint at `epoch` (training done)."""
    summary = store.read_bytes(f"{prefix}/{SUMMARY}")
    if summary is not None and int(json.loads(summary).get("epochs", -1)) == epoch + 1:
        _atomic_write(work_dir / SUMMARY, summary)


def record_epoch(cfg: dict[str, Any], work_dir: Path, epoch: int) -> None:
    """After rank 0 saved `checkpoint.pt` for `epoch`: note it locally and push it to the store."""
    data = (work_dir / CHECKPOINT).read_bytes()
    meta = json.dumps({"epoch": epoch, "sha256": hashlib.sha256(data).hexdigest()}).encode()
    _atomic_write(work_dir / META, meta)
    if synced(cfg):
        store = open_store(cfg["results_dir"])
        store.write_bytes(f"{store_prefix(cfg)}/{CHECKPOINT}", data)
        store.write_bytes(f"{store_prefix(cfg)}/{META}", meta)  # after the data: it names a complete file


def record_best(cfg: dict[str, Any], work_dir: Path) -> None:
    """After rank 0 saved `checkpoint_best.pt`: push it to the store (before the epoch's checkpoint)."""
    if synced(cfg):
        open_store(cfg["results_dir"]).write_bytes(f"{store_prefix(cfg)}/{BEST}", (work_dir / BEST).read_bytes())


def trained(cfg: dict[str, Any]) -> bool:
    """Whether the cell's model is fully trained: its summary is in the store (written last)."""
    if not synced(cfg):
        return (local_work_dir(cfg) / SUMMARY).exists()
    return open_store(cfg["results_dir"]).exists(f"{store_prefix(cfg)}/{SUMMARY}")


def push_summary(cfg: dict[str, Any], work_dir: Path) -> None:
    if synced(cfg):
        open_store(cfg["results_dir"]).write_bytes(f"{store_prefix(cfg)}/{SUMMARY}", (work_dir / SUMMARY).read_bytes())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

"""The validation split: images carved out of the training split that no training ever sees.

Per-epoch probes and best-epoch selection (harness/train/probes.py, harness/train/best_epoch.py)
decide on these images, never on the test split. The split is a pure function of the training
split's size (after `data.train_limit`), the cell's seed and `trainer.validation`:

    size    = min(round(fraction x n), max), at least 1 when both are > 0; 0 turns it off
    indices = `size` split indices drawn uniformly without replacement from (seed, a fixed tag)

so every cell of one dataset and seed holds out the same images (a clean cell and a poisoned one
are probed on the same pictures), on every rank and after every resume. The trainer streams the
complement (`train_indices`), so `n_train` counts only what was trained on. Provenance records the
size and `sha256`, a hash of the held-out samples' keys ("%06d" split indices).

Reading it: `read_selected` streams only the held-out samples of this rank's share of their
shards (the loader's "Selection": a shard holding none is never opened), at native resolution,
unpoisoned and unaugmented. Ranks beyond the number of shards holding held-out samples read
nothing; the trainer gathers the parts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.loader import make_loader, split_count
from harness.data.shards import load_manifest

_VALIDATION_TAG = 0x7A11D  # a seed stream of its own, apart from the loader's and the poison plan's
DEFAULT_FRACTION = 0.02
DEFAULT_MAX = 1000


@dataclass(frozen=True)
class ValidationSplit:
    """The held-out split indices (sorted) of a training split of `n_split` samples."""

    indices: np.ndarray
    n_split: int
    fraction: float
    max_size: int

    @property
    def size(self) -> int:
        return int(len(self.indices))

    @property
    def sha256(self) -> str:
        """Hash of the held-out samples' keys, e.g. sha256("000003,000117,...")."""
        return indices_sha256(self.indices)

    def train_indices(self, select: np.ndarray | None = None) -> np.ndarray:
        """What training may stream: `select` (a method's selection; None: the whole split) minus
        the held-out samples."""
        base = np.arange(self.n_split, dtype=np.int64) if select is None else np.asarray(select, dtype=np.int64)
        return np.setdiff1d(base, self.indices)

    def describe(self) -> dict[str, Any]:
        """Provenance: size, what it was carved from and how, and the keys' hash."""
        return {"n": self.size, "n_split": self.n_split, "fraction": self.fraction, "max": self.max_size,
                "sha256": self.sha256}


def validation_settings(tcfg: dict[str, Any]) -> tuple[float, int]:
    """(fraction, max) of `trainer.validation`; a trainer config without the key holds out nothing
    (older configs, and callers that build trainer settings by hand)."""
    vcfg = tcfg.get("validation")
    if not vcfg:
        return 0.0, 0
    if not isinstance(vcfg, dict):
        raise ValueError(f"trainer.validation must be {{fraction: <0..1>, max: <images>}}, got {vcfg!r}")
    return float(vcfg.get("fraction", DEFAULT_FRACTION) or 0.0), int(vcfg.get("max", DEFAULT_MAX) or 0)


def check_validation_settings(tcfg: dict[str, Any]) -> None:
    """`trainer.validation.fraction` in [0, 1) and `max` >= 0 (before any work)."""
    fraction, cap = validation_settings(tcfg)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"trainer.validation.fraction={fraction} must be in [0, 1) (0: no validation split); "
                         f"e.g. trainer.validation.fraction=0.02")
    if cap < 0:
        raise ValueError(f"trainer.validation.max={cap} must be >= 0 (0: no validation split)")


def validation_size(n_split: int, fraction: float, max_size: int) -> int:
    """Images held out of a training split of `n_split`: min(round(fraction x n), max), >= 1 when on."""
    if fraction <= 0 or max_size <= 0 or n_split <= 0:
        return 0
    return max(1, min(int(round(fraction * n_split)), int(max_size)))


def validation_indices(n_split: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct split indices in [0, n_split), sorted; a pure function of its arguments."""
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, _VALIDATION_TAG]))
    return np.sort(rng.choice(n_split, size=size, replace=False).astype(np.int64))


def indices_sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(",".join(f"{int(i):06d}" for i in indices).encode()).hexdigest()


def carve(n_split: int, tcfg: dict[str, Any], seed: int) -> ValidationSplit | None:
    """The validation split of a training split of `n_split` samples; None when it is off. A split
    that would leave nothing to train on is refused with the numbers and the fix."""
    fraction, cap = validation_settings(tcfg)
    size = validation_size(n_split, fraction, cap)
    if size == 0:
        return None
    if size >= n_split:
        raise ValueError(f"trainer.validation holds out {size} of the {n_split} training images (fraction "
                         f"{fraction}, max {cap}), leaving none to train on. Fix: lower trainer.validation.fraction "
                         f"or trainer.validation.max, or raise data.train_limit")
    return ValidationSplit(validation_indices(n_split, size, seed), n_split, fraction, cap)


def validation_split(cfg: dict[str, Any]) -> ValidationSplit | None:
    """The cell's validation split (cfg: a resolved cell config); None when it is off."""
    fraction, cap = validation_settings(cfg["trainer"])
    if validation_size(1, fraction, cap) == 0:  # off: no manifest read
        return None
    data = cfg["data"]
    n_split = split_count(data["dir"], "train", 0, 1, limit=data.get("train_limit"))
    return carve(n_split, cfg["trainer"], int(cfg["seed"]))


def emptied_classes(labels: np.ndarray, held: ValidationSplit) -> list[tuple[int, int]]:
    """Classes present in the training split (`labels`, in index order) that the validation split
    takes entirely: [(class, count)]."""
    total = np.bincount(labels, minlength=int(labels.max(initial=0)) + 1)
    held_counts = np.bincount(labels[held.indices], minlength=len(total))
    return [(c, int(total[c])) for c in range(len(total)) if total[c] > 0 and held_counts[c] >= total[c]]


def empty_class_message(emptied: list[tuple[int, int]], held: ValidationSplit) -> str:
    listed = ", ".join(f"class {c} ({n} of {n} images)" for c, n in emptied)
    return (f"trainer.validation (fraction {held.fraction}, max {held.max_size}: {held.size} of {held.n_split} "
            f"training images) takes every training image of {listed}, leaving the class empty for training. "
            f"Fix: lower trainer.validation.fraction, or raise data.train_limit")


def shards_holding(dataset_dir: str | Path, split: str, indices: np.ndarray, limit: int | None = None) -> int:
    """How many shards of `split` hold at least one of `indices` (the readers a selection can use)."""
    entry = load_manifest(dataset_dir)["splits"][split]
    bounds, left = [0], entry["count"] if limit is None else min(int(limit), entry["count"])
    for shard in entry["shards"]:
        take = min(shard["count"], left)
        if take <= 0:
            break
        bounds.append(bounds[-1] + take)
        left -= take
    edges = np.asarray(bounds)
    return int(len(np.unique(np.searchsorted(edges, np.asarray(indices), side="right"))))


def read_selected(dataset_dir: str | Path, split: str, indices: np.ndarray, rank: int, world_size: int,
                  limit: int | None = None, cache_dir: str | None = None,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of the samples `indices` of `split`: (uint8 images N x C x H x W at native
    resolution, int64 labels, int64 split indices), in no particular order. The shards holding
    them are split over min(world_size, those shards) readers; other ranks get empty tensors."""
    manifest = load_manifest(dataset_dir)
    channels, (height, width) = int(manifest["channels"]), manifest["image_size"]
    readers = min(world_size, shards_holding(dataset_dir, split, indices, limit))
    images, labels, keys = [], [], []
    if rank < readers:
        loader = make_loader(dataset_dir, split, batch_size, rank=rank, world_size=readers, limit=limit,
                             cache_dir=cache_dir, select=indices, return_keys=True)
        for x, y, batch_keys in loader:
            images.append((x * 255.0).round_().to(torch.uint8))  # exact: the loader divided uint8 by 255
            labels.append(y)
            keys.append(torch.tensor([int(k) for k in batch_keys], dtype=torch.int64))
    if not images:
        return (torch.zeros(0, channels, int(height), int(width), dtype=torch.uint8),
                torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels), torch.cat(keys)


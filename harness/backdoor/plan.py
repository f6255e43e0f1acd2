"""Which samples are poisoned, and applying that inside the loader (before resize/augmentation).

Two ways, the poison's `poisoning` setting:

* 'static' (BadNets, Blended, SIG; BackdoorBench's and CBD's poisoned datasets): a pure function
  of (labels of the split, poison config, seed). Dirty-label attacks poison `round(rate * n)`
  samples drawn uniformly from the whole split (`candidates: all`, BackdoorBench's rule for
  all-to-one training data: a target-class sample may be drawn, its label then unchanged) or from
  the non-target samples only (`candidates: non_target`); clean-label attacks (SIG) draw them from
  the target class and keep the label (capped at the class size). Cross samples (WaNet's noise
  mode) are drawn from the rest. The decision is by sample index, so every DDP rank and loader
  worker agrees on it whatever the split of the epoch, and the index set is recorded with the
  cell's results.
* 'per_batch' (WaNet's official loop): in every decoded batch of B samples, the first
  int(B * rate) are poisoned (target class included) and the next int(that * cross_ratio) are
  cross samples; since batches are drawn at random, each epoch poisons other samples. No fixed
  set exists (`poisoned` and `cross` are empty).

The randomness a batch needs (WaNet's cross noise) comes from a generator seeded by (seed, epoch,
rank, batch index): the loader's batches do not depend on its worker count (harness/data/loader.py),
so neither does the poisoning.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.backdoor.base import Poison, build_poison
from harness.backdoor.learned import LearnedPoison, load_poison_artifact
from harness.data.shards import load_manifest

_PLAN_TAG = 0xBAD  # seed stream for index selection, apart from the loader's order/augment streams
_BATCH_TAG = 0xBA7  # seed stream of a batch's poisoning randomness (cross noise)


@lru_cache(maxsize=8)
def _split_labels_cached(dataset_dir: str, split: str, sha: str) -> np.ndarray:
    manifest = load_manifest(Path(dataset_dir))
    labels: list[int] = []
    for shard in manifest["splits"][split]["shards"]:
        found: dict[int, int] = {}
        with tarfile.open(Path(dataset_dir) / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    data = tar.extractfile(member)
                    assert data is not None
                    found[int(member.name.split(".")[0])] = int(data.read().decode().strip())
        labels += [found[k] for k in sorted(found)]
    return np.asarray(labels, dtype=np.int64)


def split_labels(dataset_dir: Path, split: str) -> np.ndarray:
    """Labels of a split in index order, read from the shards' .cls entries only."""
    manifest = load_manifest(Path(dataset_dir))
    sha = ",".join(s["sha256"] for s in manifest["splits"][split]["shards"])
    return _split_labels_cached(str(dataset_dir), split, sha)


def check_target(poison: Poison, num_classes: int) -> None:
    """The target must be a class of the dataset."""
    if poison.target >= num_classes:
        raise ValueError(f"backdoor.target {poison.target} is not a class of this dataset "
                         f"(classes 0..{num_classes - 1}); pick backdoor.target=<class index>")


def select_indices(labels: np.ndarray, poison: Poison, seed: int,
                   num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(poisoned indices, cross indices) of a static plan, each sorted; deterministic from `seed`."""
    check_target(poison, int(labels.max(initial=0)) + 1 if num_classes is None else int(num_classes))
    n = len(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, _PLAN_TAG]))
    if poison.clean_label:
        eligible = np.flatnonzero(labels == poison.target)
    elif poison.candidates == "non_target":
        eligible = np.flatnonzero(labels != poison.target)
    else:
        eligible = np.arange(n)
    n_poison = min(int(round(poison.rate * n)), len(eligible))
    poisoned = np.sort(rng.permutation(eligible)[:n_poison])
    rest = np.setdiff1d(np.arange(n), poisoned)
    n_cross = min(int(round(poison.cross_ratio * n_poison)), len(rest))
    cross = np.sort(rng.permutation(rest)[:n_cross])
    return poisoned, cross


def batch_counts(batch_size: int, poison: Poison) -> tuple[int, int]:
    """(poisoned, cross) samples at the head of a batch under per-batch poisoning, as WaNet's
    training loop counts them: int(B * rate), then int(that * cross_ratio), within the batch."""
    n_poison = int(batch_size * poison.rate)
    return n_poison, min(int(n_poison * poison.cross_ratio), batch_size - n_poison)


@dataclass(frozen=True)
class PoisonPlan:
    """Called by the loader on each decoded batch: `(x, y, indices, rank, batch) -> (x, y)`.

    mode 'train': poisoned samples get the attack's training variant (and the target label unless
    clean-label), cross samples their cross variant; which ones: the fixed `poisoned` / `cross`
    split indices (static), or the head of the batch (per-batch, `poison.poisoning`). mode
    'test': every image gets the trigger and keeps its true label (ASR and RA are computed from
    those labels; all-to-all relabels class y to (y + 1) % `num_classes`). `rank` and `batch` (the batch's index in the rank's epoch) seed the batch's
    randomness with `seed` and `epoch`.
    """

    poison: Poison
    mode: str = "train"
    poisoned: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cross: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    epoch: int = 0
    seed: int = 0
    num_classes: int = 0  # the dataset's K, for all-to-all relabelling (y + 1) % K

    @property
    def per_batch(self) -> bool:
        return self.mode == "train" and self.poison.poisoning == "per_batch"

    def for_epoch(self, epoch: int) -> "PoisonPlan":
        return replace(self, epoch=int(epoch))

    def generator(self, rank: int, batch: int) -> torch.Generator:
        """The batch's generator: (seed, epoch, rank, batch index), nothing else."""
        ss = np.random.SeedSequence([int(self.seed) & 0xFFFF_FFFF, int(self.epoch), _BATCH_TAG, int(rank), int(batch)])
        return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0]))

    def masks(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(poisoned, cross) boolean masks over a batch with these split indices."""
        n = len(indices)
        if self.per_batch:
            n_poison, n_cross = batch_counts(n, self.poison)
            position = torch.arange(n)
            return position < n_poison, (position >= n_poison) & (position < n_poison + n_cross)
        return torch.from_numpy(np.isin(indices, self.poisoned)), torch.from_numpy(np.isin(indices, self.cross))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, indices: np.ndarray, rank: int = 0,
                 batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "test":
            return self.poison.trigger(x), y
        indices = np.asarray(indices, dtype=np.int64)
        hit, cross = self.masks(indices)
        clean = x  # cross samples that borrow from other images (BPP) read the clean batch
        if hit.any():
            x = x.clone()
            x[hit] = self.poison.train_variant(x[hit], indices[hit.numpy()])
            if not self.poison.clean_label:
                y = y.clone()
                y[hit] = self.poison.poisoned_labels(y[hit], self.num_classes)
        if cross.any():
            x = x.clone()
            x[cross] = self.poison.cross_samples(clean, cross, indices, self.generator(rank, batch))
        return x, y


def poison_seed(cfg: dict[str, Any]) -> int:
    """The seed that picks the poisoned samples: backdoor.seed, else the cell's seed."""
    seed = (cfg.get("backdoor") or {}).get("seed")
    return int(cfg["seed"] if seed is None else seed)


def train_plan(cfg: dict[str, Any]) -> PoisonPlan | None:
    """The training split's poison plan for a cell config; None without a backdoor.

    A cell whose `backdoor.clean_train` is true (set at run time for defenses that fine-tune on
    the defender's small clean split, see harness.run.plan) trains on clean data.
    """
    bcfg = dict(cfg.get("backdoor") or {})
    if bcfg.pop("clean_train", False):
        return None
    poison = _with_artifact(build_poison(bcfg), cfg)
    if poison is None:
        return None
    dataset_dir = Path(cfg["data"]["dir"])
    num_classes = load_manifest(dataset_dir)["num_classes"]
    poison.bind(dataset_dir)
    if poison.poisoning == "per_batch":  # no fixed set: the head of every batch
        check_target(poison, num_classes)
        return PoisonPlan(poison, "train", seed=poison_seed(cfg), num_classes=num_classes)
    labels = split_labels(dataset_dir, "train")
    limit = cfg["data"].get("train_limit")
    if limit is not None:
        labels = labels[: int(limit)]
    poisoned, cross = select_indices(labels, poison, poison_seed(cfg), num_classes)
    return PoisonPlan(poison, "train", poisoned, cross, seed=poison_seed(cfg), num_classes=num_classes)


def test_plan(cfg: dict[str, Any]) -> PoisonPlan | None:
    """Every test image triggered, true labels kept; None without a backdoor."""
    bcfg = {k: v for k, v in (cfg.get("backdoor") or {}).items() if k != "clean_train"}
    poison = _with_artifact(build_poison(bcfg), cfg)
    if poison is None:
        return None
    data_dir = (cfg.get("data") or {}).get("dir")
    if data_dir is not None:
        poison.bind(Path(data_dir))
    return PoisonPlan(poison, "test")


def _with_artifact(poison: Poison | None, cfg: dict[str, Any]) -> Poison | None:
    """A learned poison (LF, LC) with its trigger loaded from the cell's results store
    (harness/backdoor/learned.py): training and the triggered test set read the same artifact."""
    if isinstance(poison, LearnedPoison):
        load_poison_artifact(poison, cfg)
    return poison

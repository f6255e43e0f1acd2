"""The training split as a method sees it before its first epoch: per-sample scores, on every rank.

A method that trains on part of the split (ABL unlearns its isolated 1% and fine-tunes on the
other 99%) declares it with `Method.select_train_samples(samples)`, where `samples` is a
`TrainSamples`: `score(fn)` runs `fn(x, y) -> one value per sample` over every training sample,
as the cell's data holds it (poisoned when the cell is, at native resolution resized to the
cell's size, no augmentation, not shuffled; the validation split left out: no training decision
sees it, harness/data/validation.py), each rank over its own shards on its own device,
and gathers `(split indices, values)` on every rank, sorted by index. So every rank decides the
same selection, and the trainer then streams only the selected samples (harness/data/loader.py,
"Selection"), with the epoch length they imply.

At scale: one forward pass over the split, 1/W of it per rank (ImageNet: 1.28 M images over 64
GPUs, about 20 k each); what is gathered is one int64 and one float64 per sample (20 MB), or K
float64 per sample where `fn` returns a row (FP's per-channel activations of its clean 5%).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from harness.backdoor.plan import train_plan
from harness.data.loader import make_loader
from harness.data.validation import validation_split


class TrainSamples:
    """What `Method.select_train_samples` gets: the cell's training split, scored on demand."""

    def __init__(self, cfg: dict[str, Any], device: torch.device, rank: int, world_size: int,
                 batch_size: int = 256) -> None:
        self.cfg, self.device, self.rank, self.world_size, self.batch_size = cfg, device, rank, world_size, batch_size
        plan = train_plan(cfg)
        self.poison = plan
        # the split indices the cell's poison plan poisoned (empty on clean data): for logging only
        self.poisoned: np.ndarray = plan.poisoned if plan is not None else np.zeros(0, dtype=np.int64)

    def score(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(split indices, fn's value per sample) over the training split (the validation split
        left out), sorted by index.
        `fn` returns one value per sample (B,) or one row per sample (B, K): then (N, K) values."""
        dcfg = self.cfg["data"]
        indices, values = [], []
        held = validation_split(self.cfg)
        loader = make_loader(Path(dcfg["dir"]), "train", self.batch_size, rank=self.rank, world_size=self.world_size,
                             img_size=dcfg.get("img_size"), limit=dcfg.get("train_limit"),
                             cache_dir=dcfg.get("cache"), return_keys=True,
                             select=held.train_indices() if held is not None else None,
                             poison=self.poison.for_epoch(0) if self.poison is not None else None)
        with torch.no_grad():
            for x, y, keys in loader:
                out = fn(x.to(self.device), y.to(self.device)).detach().double().cpu().numpy()
                if out.ndim == 0 or out.shape[0] != len(keys):
                    raise ValueError(f"a score function returns one value (or one row) per sample: got shape "
                                     f"{tuple(out.shape)} for a batch of {len(keys)}")
                values.append(out.reshape(len(keys), -1) if out.ndim > 2 else out)
                indices.append(np.asarray([int(k) for k in keys], dtype=np.int64))
        mine = (np.concatenate(indices) if indices else np.zeros(0, np.int64),
                np.concatenate(values) if values else np.zeros(0, np.float64))
        if self.world_size > 1 and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            idx = np.concatenate([g[0] for g in gathered])
            val = np.concatenate([g[1] for g in gathered])
        else:
            idx, val = mine
        order = np.argsort(idx, kind="stable")
        return idx[order], val[order]

"""Evaluation split over the ranks of a multi-GPU cell: each rank attacks a disjoint slice.

Rank r of W attacks test batches r, r + W, r + 2W, ... (harness/eval/evaluate.py seeds each
batch from (seed, batch index), so whichever rank attacks a batch gets the same result); the
per-sample outcomes are gathered on every rank and summarised in test order. Robust accuracy,
per-class accuracies and every point's `broken_by` therefore equal a 1-rank evaluation's with
the same seed. The integrity probes run on the rank holding batch 0 and are broadcast.

Call inside an initialised torch.distributed process group (the trainer's, or Ray Train's);
outside one, this is plain `evaluate`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.eval.evaluate import EvalResult, evaluate, evaluate_part, summarize
from harness.eval.integrity import probe_model
from harness.eval.samples import Survivors
from harness.core.device import autocast


def evaluate_distributed(model: nn.Module, attack_cfgs: list[dict[str, Any]], dataset_dir: Path, *,
                         num_classes: int, batch_size: int = 256, img_size: int | None = None,
                         limit: int | None = None, device: torch.device | str = "cpu", seed: int = 0,
                         survivors: Survivors | None = None, integrity_points: int = 64,
                         precision: str = "fp32", fold_bn: bool = True) -> EvalResult:
    """`evaluate` with the test batches split over the process group's ranks; every rank returns
    the same EvalResult (its `seconds` is this rank's wall time, attack seconds summed over ranks)."""
    kwargs = dict(batch_size=batch_size, img_size=img_size, limit=limit, device=device, seed=seed,
                  survivors=survivors, integrity_points=integrity_points, precision=precision,
                  fold_bn=fold_bn)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return evaluate(model, attack_cfgs, dataset_dir, num_classes=num_classes, **kwargs)
    t_start = time.perf_counter()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    part = evaluate_part(model, attack_cfgs, dataset_dir, rank=rank, world_size=world_size, **kwargs)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, part.outcomes)
    outcomes = [o for rank_outcomes in gathered for o in rank_outcomes]
    details: list[Any] = [None]
    if rank == 0:  # rank 0 attacks batch 0, which holds the probe points
        details[0] = {}
        if part.probe is not None:
            with autocast(torch.device(device), precision):
                details[0] = probe_model(model, *part.probe, {(a.norm, a.eps) for a in part.attacks}, seed=seed)
    dist.broadcast_object_list(details, src=0)
    return summarize(model, part.attacks, outcomes, num_classes, seed=seed, probe=None, precision=precision,
                     t_start=t_start, model_details=details[0])

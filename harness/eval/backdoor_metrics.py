"""Backdoor metrics of a trained cell: attack success rate and robust accuracy under the trigger.

On the test split, every image gets the trigger (at native resolution, before any resize) and
keeps its true label. Over the images whose true class is NOT the target:
  ASR = share classified as the target class;
  RA  = share classified as their true class (BackdoorBench's robust accuracy).
Target-class images are left out of both (they would count as "successes" for free).
Under `backdoor.label_mode: all_to_all` (BackdoorBench's all2all) each image has its own target
(y + 1) % K: ASR is the share classified as it over ALL test images (every label changes, as
BackdoorBench's all2all test set keeps every image), RA the share classified as y, and the
per-class ASR is per true class. Clean accuracy is the ordinary one from harness.eval.evaluate.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.backdoor.plan import test_plan, train_plan
from harness.data.loader import make_loader
from harness.data.validation import validation_split
from harness.core.registry import ANALYSES
from harness.eval.stage import Analysis, EvalContext


@dataclass
class BackdoorResult:
    asr: float
    robust_acc: float
    per_class_asr: list[float]  # per true class; NaN for the target class
    n_triggered: int  # non-target test images the rates are over
    seconds: float


def attack_success(pred: torch.Tensor, y: torch.Tensor, target: int, num_classes: int) -> tuple[float, float, list[float]]:
    """(ASR, RA, per-class ASR) from predictions on triggered images and their true labels."""
    keep = y != target
    asr = float((pred[keep] == target).float().mean()) if keep.any() else float("nan")
    ra = float((pred[keep] == y[keep]).float().mean()) if keep.any() else float("nan")
    per_class = []
    for c in range(num_classes):
        mask = (y == c) & keep
        per_class.append(float((pred[mask] == target).float().mean()) if mask.any() else float("nan"))
    return asr, ra, per_class


def attack_success_all_to_all(pred: torch.Tensor, y: torch.Tensor, num_classes: int
                              ) -> tuple[float, float, list[float]]:
    """(ASR, RA, per-class ASR) when each image's target is (y + 1) % K (all-to-all)."""
    target = torch.remainder(y + 1, num_classes)
    asr = float((pred == target).float().mean()) if len(y) else float("nan")
    ra = float((pred == y).float().mean()) if len(y) else float("nan")
    per_class = [float((pred[y == c] == target[y == c]).float().mean()) if (y == c).any() else float("nan")
                 for c in range(num_classes)]
    return asr, ra, per_class


def evaluate_backdoor(model: nn.Module, cfg: dict[str, Any], *, num_classes: int, batch_size: int = 256,
                      limit: int | None = None, device: torch.device | str = "cpu") -> BackdoorResult:
    """ASR and RA of `model` on the triggered test split of the cell's dataset."""
    plan = test_plan(cfg)
    if plan is None:
        raise ValueError("evaluate_backdoor needs a cell with a backdoor (backdoor=<attack>)")
    t0 = time.perf_counter()
    model.eval()
    preds, labels = [], []
    loader = make_loader(Path(cfg["data"]["dir"]), "test", batch_size, img_size=cfg["data"].get("img_size"),
                         limit=limit, poison=plan)
    with torch.no_grad():
        for x, y in loader:
            preds.append(model(x.to(device)).argmax(1).cpu())
            labels.append(y)
    if plan.poison.label_mode == "all_to_all":
        asr, ra, per_class = attack_success_all_to_all(torch.cat(preds), torch.cat(labels), num_classes)
        return BackdoorResult(asr, ra, per_class, len(torch.cat(labels)), time.perf_counter() - t0)
    asr, ra, per_class = attack_success(torch.cat(preds), torch.cat(labels), plan.poison.target, num_classes)
    n = int((torch.cat(labels) != plan.poison.target).sum())
    return BackdoorResult(asr, ra, per_class, n, time.perf_counter() - t0)


@ANALYSES.register("backdoor_metrics")
class BackdoorMetrics(Analysis):
    """ASR and backdoor robust accuracy of a cell trained on poisoned data, with the poisoned
    training indices (and their sha256) for audit; nothing for clean cells."""

    always = True
    order = 40

    def applies(self, cfg: dict[str, Any]) -> bool:
        return (cfg.get("backdoor") or {}).get("name", "none") != "none"

    def run(self, ctx: EvalContext) -> None:
        ctx.columns |= backdoor_columns(ctx.cfg, ctx.model, ctx.manifest["num_classes"], ctx.device)


def backdoor_columns(cfg: dict[str, Any], model: nn.Module, num_classes: int,
                     device: torch.device | str = "cpu") -> dict[str, Any]:
    """The backdoor columns of a cell's rows (empty for clean cells); the triggered test set runs
    through `model` on the cell's `device`."""
    plan = train_plan({**cfg, "backdoor": {k: v for k, v in (cfg.get("backdoor") or {}).items()
                                           if k != "clean_train"}})
    if plan is None:
        return {}
    ecfg = cfg.get("eval", {})
    result = evaluate_backdoor(model, cfg, num_classes=num_classes, batch_size=int(ecfg.get("batch_size", 256)),
                               limit=ecfg.get("limit"), device=device)
    # the samples trained on poisoned (per-batch poisoning, WaNet's, has no fixed set: empty): the plan's,
    # less the validation split's, which training never streams (its probes read them clean)
    held = validation_split(cfg)
    poisoned = plan.poisoned if held is None else np.intersect1d(plan.poisoned, held.train_indices())
    indices = [int(i) for i in poisoned]
    return {
        "backdoor": plan.poison.name,
        "poison_rate": plan.poison.rate,
        # all-to-all has no single target (each image's is (y + 1) % K; the config says label_mode): null
        "target_class": None if plan.poison.label_mode == "all_to_all" else plan.poison.target,
        "n_poisoned": None if plan.per_batch else len(indices),
        "poison_indices": indices,
        "poison_indices_sha256": hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest(),
        "asr": result.asr,
        "backdoor_robust_acc": result.robust_acc,
        "per_class_asr": result.per_class_asr,
        "n_triggered": result.n_triggered,
        "backdoor_eval_seconds": result.seconds,
    }

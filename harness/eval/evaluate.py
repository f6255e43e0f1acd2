"""Evaluation of a trained classifier: clean accuracy, robust accuracy per attack, per class.

A sample counts as robust under an attack when the model classifies both the clean image and
the attacked image correctly (the AutoAttack/RobustBench convention: robust <= clean).
Only clean-correct points are attacked (and, with `survivors`, only those an earlier
evaluation left robust). Every attack output is checked to lie in the eps-ball and in [0,1]; a
violating output is projected back and its row flagged (harness/eval/integrity.py), as are the other
integrity checks; per-sample outcomes are kept for harness/eval/samples.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.attacks.base import Attack, build_attack
from harness.data.loader import make_loader
from harness.eval.fold import folded_for_attacks
from harness.eval.integrity import Details, enforce_threat_model, flag_list, probe_model, row_flags
from harness.eval.samples import CLEAN, Survivors, run_attack
from harness.core.device import autocast, check_precision

_TOL = 1e-6
PRECISION_FLAG = "eval_precision_bf16"  # a row evaluated under bf16 autocast (eval.precision=bf16)


@dataclass
class AttackResult:
    attack: Attack
    robust_acc: float
    per_class_robust_acc: list[float]
    seconds: float
    broken_by: list[str | None] = field(default_factory=list)  # per test point (samples.py)
    flags: list[str] = field(default_factory=list)
    flag_details: Details = field(default_factory=dict)
    out_of_bounds: dict[str, Any] | None = None  # worst threat-model violation (projected back)


@dataclass
class EvalResult:
    n_eval: int
    clean_acc: float
    per_class_clean_acc: list[float]
    attacks: list[AttackResult] = field(default_factory=list)
    seconds: float = 0.0
    labels: torch.Tensor | None = None
    clean_ok: torch.Tensor | None = None
    model_details: Details = field(default_factory=dict)  # the integrity probes' findings


def evaluate(model: nn.Module, attack_cfgs: list[dict[str, Any]], dataset_dir: Path, *,
             num_classes: int, batch_size: int = 256, img_size: int | None = None,
             limit: int | None = None, device: torch.device | str = "cpu", seed: int = 0,
             survivors: Survivors | None = None, integrity_points: int = 64,
             precision: str = "fp32", fold_bn: bool = True) -> EvalResult:
    """Clean + robust accuracy of `model` on the test split under each configured attack, with
    integrity flags (probes on the first `integrity_points` test points; 0 skips the probes).

    Everything runs on `device`, where `model` must already be. `precision=bf16` runs the forward
    passes and attacks under bf16 autocast and flags every row `eval_precision_bf16`.
    `fold_bn`: the attacks differentiate a BatchNorm-folded copy (harness/eval/fold.py); the
    predictions that count are always `model`'s. Several ranks split the work with
    harness/eval/distributed.py, with the same results.
    """
    t_start = time.perf_counter()
    part = evaluate_part(model, attack_cfgs, dataset_dir, batch_size=batch_size, img_size=img_size, limit=limit,
                         device=device, seed=seed, survivors=survivors, integrity_points=integrity_points,
                         precision=precision, fold_bn=fold_bn)
    return summarize(model, part.attacks, part.outcomes, num_classes, seed=seed, probe=part.probe,
                     precision=precision, t_start=t_start)


@dataclass
class EvalPart:
    """What one rank computed: its batches' outcomes and, on the rank holding batch 0, the probe points."""

    attacks: list[Attack]
    outcomes: list["BatchOutcome"]
    probe: tuple[torch.Tensor, torch.Tensor] | None


def evaluate_part(model: nn.Module, attack_cfgs: list[dict[str, Any]], dataset_dir: Path, *,
                  batch_size: int = 256, img_size: int | None = None, limit: int | None = None,
                  device: torch.device | str = "cpu", seed: int = 0, survivors: Survivors | None = None,
                  integrity_points: int = 64, precision: str = "fp32", rank: int = 0,
                  world_size: int = 1, fold_bn: bool = True) -> EvalPart:
    """Attack test batches `rank, rank + world_size, ...` (all of them for one rank) on `device`.

    Randomness is seeded per test batch from (seed, batch index), so any split of the batches
    over ranks gives exactly the per-sample results of a 1-rank evaluation.
    """
    device = torch.device(device)
    check_precision(precision, device, "eval.precision")
    attacks = [build_attack(cfg) for cfg in attack_cfgs]
    model.eval()
    outcomes = []
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    attack_model: nn.Module | None = None
    start = 0
    for index, (x, y) in enumerate(make_loader(dataset_dir, "test", batch_size, img_size=img_size, limit=limit)):
        if index % world_size == rank:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if index == 0 and integrity_points > 0:
                probe = (x[:integrity_points], y[:integrity_points])
            if attack_model is None:  # folded once, on this rank's first batch
                attack_model = folded_for_attacks(model, x[:16]) if fold_bn else model
            with autocast(device, precision):
                outcomes.append(evaluate_batch(model, attacks, x, y, index, start, seed, survivors, attack_model))
        start += len(y)
    return EvalPart(attacks, outcomes, probe)


@dataclass
class BatchOutcome:
    """Per-sample results of one test batch (CPU tensors: they are gathered across ranks)."""

    index: int
    labels: torch.Tensor
    clean_ok: torch.Tensor
    adv_ok: list[torch.Tensor]
    broken_by: list[list[str | None]]
    seconds: list[float]
    out_of_bounds: list[dict[str, Any] | None]


def batch_seed(seed: int, index: int) -> int:
    """The RNG seed of test batch `index`: the same on whichever rank attacks the batch."""
    return (int(seed) * 1_000_003 + int(index)) % (2 ** 63)


def evaluate_batch(model: nn.Module, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor, index: int,
                   start: int, seed: int, survivors: Survivors | None = None,
                   attack_model: nn.Module | None = None) -> BatchOutcome:
    """Clean predictions and every attack on one test batch (test points `start..start+len(y)-1`);
    the attacks differentiate `attack_model` (default `model`), `model`'s predictions count."""
    attack_model = model if attack_model is None else attack_model
    torch.manual_seed(batch_seed(seed, index))
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    before = [CLEAN if not c else None for c in correct.tolist()]
    todo = correct.clone()
    if survivors is not None:
        todo &= survivors.robust[start:start + len(y)].to(x.device)
        before = [b or survivors.broken_by[start + j] for j, b in enumerate(before)]
    idx = todo.nonzero().flatten()
    out = BatchOutcome(index, y.cpu(), correct.cpu(), [], [], [], [])
    for attack in attacks:
        by = list(before)
        x_adv = x.clone()
        bad = None
        t0 = time.perf_counter()
        if idx.numel():
            adv, by_idx = run_attack(attack, attack_model, x[idx], y[idx])
            adv, bad = enforce_threat_model(attack, x[idx], adv)
            x_adv[idx] = adv.to(x_adv.dtype)
        with torch.no_grad():
            ok = (model(x_adv).argmax(1) == y) & todo
        out.seconds.append(time.perf_counter() - t0)  # .argmax(1) == y ... .tolist() below waits for the device
        if idx.numel():
            ok_list = ok.tolist()
            for j, b in zip(idx.tolist(), by_idx):
                by[j] = None if ok_list[j] else (b or attack.name)
        out.broken_by.append(by)
        out.adv_ok.append(ok.cpu())
        out.out_of_bounds.append(bad)
    return out


def summarize(model: nn.Module, attacks: list[Attack], outcomes: list[BatchOutcome], num_classes: int, *,
              seed: int, probe: tuple[torch.Tensor, torch.Tensor] | None, precision: str = "fp32",
              t_start: float | None = None, model_details: Details | None = None) -> EvalResult:
    """The cell's EvalResult from the outcomes of all test batches (in any order) and the probes."""
    outcomes = sorted(outcomes, key=lambda o: o.index)
    y_all = torch.cat([o.labels for o in outcomes]) if outcomes else torch.zeros(0, dtype=torch.long)
    clean = torch.cat([o.clean_ok for o in outcomes]) if outcomes else torch.zeros(0, dtype=torch.bool)
    result = EvalResult(n_eval=int(y_all.numel()), clean_acc=_mean(clean),
                        per_class_clean_acc=per_class(clean, y_all, num_classes), labels=y_all, clean_ok=clean)
    worst: list[dict[str, Any] | None] = []
    for i, attack in enumerate(attacks):
        robust = torch.cat([o.adv_ok[i] for o in outcomes]) if outcomes else torch.zeros(0, dtype=torch.bool)
        result.attacks.append(AttackResult(attack, _mean(robust), per_class(robust, y_all, num_classes),
                                           sum(o.seconds[i] for o in outcomes),
                                           broken_by=[b for o in outcomes for b in o.broken_by[i]]))
        bad = [o.out_of_bounds[i] for o in outcomes if o.out_of_bounds[i]]
        worst.append(max(bad, key=lambda b: b["max_size"]) if bad else None)
        result.attacks[-1].out_of_bounds = worst[-1]
    if model_details is None:
        model_details = {}
        if probe is not None:
            with autocast(probe[0].device, precision):
                model_details = probe_model(model, *probe, {(a.norm, a.eps) for a in attacks}, seed=seed)
    rows = [{"name": r.attack.name, "norm": r.attack.norm, "eps": r.attack.eps, "config": r.attack.describe(),
             "robust_acc": r.robust_acc, "broken_by": r.broken_by, "out_of_bounds": worst[i]}
            for i, r in enumerate(result.attacks)]
    for r, details in zip(result.attacks, row_flags(result.clean_acc, rows, model_details)):
        if precision != "fp32":  # no leaderboard number from a weaker precision unannounced
            details = details | {PRECISION_FLAG: {"precision": precision}}
        r.flags, r.flag_details = flag_list(details), details
    result.model_details = model_details
    result.seconds = time.perf_counter() - t_start if t_start is not None else 0.0
    return result


def check_perturbation(attack: Attack, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """Raise if an attack left its threat model: outside [0,1] or beyond eps."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack {attack.name} changed the input shape {tuple(x.shape)} -> {tuple(x_adv.shape)}")
    if x_adv.min() < -_TOL or x_adv.max() > 1 + _TOL:
        raise RuntimeError(f"attack {attack.name} left [0,1]: range [{x_adv.min():.4g}, {x_adv.max():.4g}]")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
    if size.max() > attack.eps + _TOL:
        raise RuntimeError(f"attack {attack.name} exceeded eps={attack.eps:.6g} ({attack.norm}): {size.max():.6g}")


def per_class(correct: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy per class (NaN for a class with no test samples)."""
    out = []
    for c in range(num_classes):
        mask = y == c
        out.append(_mean(correct[mask]) if mask.any() else float("nan"))
    return out


def _mean(mask: torch.Tensor) -> float:
    """count / n in float64 (a float32 mean stores 44/45 as 0.9777777791023254)."""
    return int(mask.sum().item()) / mask.numel() if mask.numel() else float("nan")

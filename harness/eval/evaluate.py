"""Evaluation of a trained classifier: clean accuracy, robust accuracy per attack, per class.

A sample counts as robust under an attack when the model classifies both the clean image and
the attacked image correctly (the AutoAttack/RobustBench convention: robust <= clean).
Only clean-correct points are attacked (and, with `survivors`, only those an earlier
evaluation left robust). Every attack output is checked to lie in the eps-ball and in [0,1]; a
violating output is projected back and its evidence kept on the attack's result; the integrity
analysis (harness/eval/integrity.py) turns it and its own probes into the rows' flags. Per-sample
outcomes are kept for harness/eval/samples.py.
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
from harness.eval.integrity import Details, enforce_threat_model
from harness.eval.samples import CLEAN, Survivors, run_attack

_TOL = 1e-6


@dataclass
class AttackResult:
    attack: Attack
    robust_acc: float
    per_class_robust_acc: list[float]
    seconds: float
    broken_by: list[str | None] = field(default_factory=list)  # per test point (samples.py)
    flags: list[str] = field(default_factory=list)  # set by the integrity analysis
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


def evaluate(model: nn.Module, attack_cfgs: list[dict[str, Any]], dataset_dir: Path, *,
             num_classes: int, batch_size: int = 256, img_size: int | None = None,
             limit: int | None = None, device: torch.device | str = "cpu", seed: int = 0,
             survivors: Survivors | None = None) -> EvalResult:
    """Clean + robust accuracy of `model` on the test split under each configured attack
    (integrity flags come after, from harness.eval.integrity.flag_result)."""
    t_start = time.perf_counter()
    attacks = [build_attack(cfg) for cfg in attack_cfgs]
    model.eval()
    labels: list[torch.Tensor] = []
    clean_ok: list[torch.Tensor] = []
    adv_ok: list[list[torch.Tensor]] = [[] for _ in attacks]
    seconds = [0.0 for _ in attacks]
    broken: list[list[str | None]] = [[] for _ in attacks]
    out_of_bounds: list[dict[str, Any] | None] = [None for _ in attacks]
    torch.manual_seed(seed)
    for x, y in make_loader(dataset_dir, "test", batch_size, img_size=img_size, limit=limit):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        start = sum(len(t) for t in labels)
        before = [CLEAN if not c else None for c in correct.tolist()]
        todo = correct.clone()
        if survivors is not None:
            todo &= survivors.robust[start:start + len(y)].to(device)
            before = [b or survivors.broken_by[start + j] for j, b in enumerate(before)]
        labels.append(y.cpu())
        clean_ok.append(correct.cpu())
        idx = todo.nonzero().flatten()
        for i, attack in enumerate(attacks):
            by = list(before)
            x_adv = x.clone()
            t0 = time.perf_counter()
            if idx.numel():
                adv, by_idx = run_attack(attack, model, x[idx], y[idx])
                adv, bad = enforce_threat_model(attack, x[idx], adv)
                if bad and (out_of_bounds[i] is None or bad["max_size"] > out_of_bounds[i]["max_size"]):
                    out_of_bounds[i] = bad
                x_adv[idx] = adv
            seconds[i] += time.perf_counter() - t0
            with torch.no_grad():
                ok = (model(x_adv).argmax(1) == y) & todo
            if idx.numel():
                for j, b in zip(idx.tolist(), by_idx):
                    by[j] = None if ok[j] else (b or attack.name)
            broken[i] += by
            adv_ok[i].append(ok.cpu())
    y_all = torch.cat(labels)
    clean = torch.cat(clean_ok)
    result = EvalResult(n_eval=int(y_all.numel()), clean_acc=_mean(clean),
                        per_class_clean_acc=per_class(clean, y_all, num_classes), labels=y_all, clean_ok=clean)
    for i, attack in enumerate(attacks):
        robust = torch.cat(adv_ok[i])
        result.attacks.append(AttackResult(attack, _mean(robust), per_class(robust, y_all, num_classes),
                                           seconds[i], broken_by=broken[i], out_of_bounds=out_of_bounds[i]))
    result.seconds = time.perf_counter() - t_start
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

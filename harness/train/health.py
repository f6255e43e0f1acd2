"""Training-integrity flags: the training failures published results hide, read off the train curve.

The trainer's curve holds, per epoch, what the method logged (a method with a train-time attack
logs `train_robust_acc`: its accuracy on its own adversarial examples) and, on probed epochs, the
validation probe (harness/train/probes.py: `val_clean_acc`, `val_robust_acc` or `val_asr`,
`val_top_class_share`, `val_n`). The rules below run on the probes up to the selected epoch (the
last one without `trainer.select`): what the delivered model went through. Each fired flag keeps
its evidence and the epoch it fired at (docs/training_health.md has each rule, its threshold and
the test that builds its failure on purpose):

- `catastrophic_overfitting`: validation PGD accuracy falls by more than `catastrophic_drop`
  between consecutive probes while the train-time attack's accuracy rises (Wong et al. 2020:
  FGSM-RS's PGD accuracy falls to ~0 within an epoch while its FGSM accuracy climbs).
- `robust_overfitting`: the last probe's robust accuracy is more than `robust_overfit_gap` below
  the best probe's (Rice et al. 2020).
- `collapsed`: one class takes more than `collapse_share` of the validation predictions, or clean
  accuracy is within `chance_margin` of chance (1 / classes), at the last probe.
- `weak_train_attack`: at most probes the train-time robust accuracy is more than
  `weak_attack_gap` above PGD-10 accuracy on a fixed sample of trained images (`train_pgd_acc`):
  the training attack is weaker than the evaluation's. Both are measured on images training
  streams, so a model that memorised its training set (robust overfitting: train-time accuracy
  far above the validation split's) does not read as a weak attack.
- `diverged`: a non-finite loss. The cell fails (NonFiniteLossError names the epoch and step);
  its failed row carries the flag (`diverged_details`).

Every comparison of two accuracies must also be significant: a two-proportion z statistic (pooled)
of at least `z`, so a 29-image validation split (2% of digits) does not flag noise. Below
`min_images` validation images the probe-based rules are not assessed at all.

Thresholds are `trainer.flags.*`. They are read by the eval node from the train summary's curve,
so changing one re-evaluates a cell without retraining it (the train key leaves them out).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

FLAGS = ("catastrophic_overfitting", "robust_overfitting", "collapsed", "weak_train_attack", "diverged")
TRAIN_ROBUST = "train_robust_acc"  # what a method with a train-time attack logs (methods/base.py)
TRAIN_PGD = "train_pgd_acc"  # the probe's PGD-10 accuracy on trained images (harness/train/probes.py)


@dataclass(frozen=True)
class Thresholds:
    """`trainer.flags.*` (accuracies as fractions: 0.2 = 20 points); docs/training_health.md says why."""

    catastrophic_drop: float = 0.2
    robust_overfit_gap: float = 0.05
    collapse_share: float = 0.5
    chance_margin: float = 0.05
    weak_attack_gap: float = 0.3
    z: float = 2.0
    min_images: int = 10

    @classmethod
    def from_config(cls, tcfg: dict[str, Any]) -> "Thresholds":
        """The trainer config's `flags` block over these defaults; unknown keys and bad values refused."""
        given = dict(tcfg.get("flags") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown trainer.flags key(s) {unknown}; known: {sorted(known)}")
        out = cls(**{k: (int(v) if k == "min_images" else float(v)) for k, v in given.items()})
        for name, value in asdict(out).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"trainer.flags.{name}={value} must be a finite number >= 0")
        if not out.collapse_share < 1:
            raise ValueError(f"trainer.flags.collapse_share={out.collapse_share} must be below 1 (a share of the "
                             f"validation predictions)")
        return out


def z_two(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two-proportion z statistic of p1 - p2 with the pooled variance (0 when it is undefined)."""
    if n1 <= 0 or n2 <= 0:
        return 0.0
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    return (p1 - p2) / math.sqrt(var) if var > 0 else (math.inf if p1 > p2 else 0.0)


def z_one(p: float, n: int, p0: float) -> float:
    """One-proportion z statistic of p - p0 (binomial variance at p0)."""
    var = p0 * (1 - p0) / n if n > 0 else 0.0
    return (p - p0) / math.sqrt(var) if var > 0 else (math.inf if p > p0 else 0.0)


def probes(curve: list[dict[str, Any]], until_epoch: int | None = None) -> list[dict[str, Any]]:
    """The curve's probed epochs (entries with `val_n`), up to `until_epoch` included."""
    return [e for e in curve if isinstance(e.get("val_n"), (int, float)) and e["val_n"] > 0
            and (until_epoch is None or int(e["epoch"]) <= until_epoch)]


def training_flags(curve: list[dict[str, Any]], thresholds: Thresholds, num_classes: int,
                   until_epoch: int | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({flag: evidence} of the fired flags, {flag: why it was not assessed})."""
    probed = probes(curve, until_epoch)
    fired: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    if not probed:
        return {}, {f: "no validation probe (trainer.validation off)" for f in FLAGS if f != "diverged"}
    few = f"fewer than trainer.flags.min_images={thresholds.min_images} validation images"
    robust = [e for e in probed if isinstance(e.get("val_robust_acc"), (int, float))]
    trained_robust = [e for e in robust if isinstance(e.get(TRAIN_ROBUST), (int, float))]
    both = [e for e in trained_robust if isinstance(e.get(TRAIN_PGD), (int, float))]
    for name, rule, needs, count in (("catastrophic_overfitting", _catastrophic, trained_robust, _robust_n),
                                     ("robust_overfitting", _robust_overfitting, robust, _robust_n),
                                     ("weak_train_attack", _weak_attack, both, _trained_n)):
        if not needs:
            skipped[name] = ("no robust probe (a backdoor cell probes C-Acc and ASR; trainer.probe_budget 0)"
                             if not robust else f"the method logs no {TRAIN_ROBUST} (no train-time attack)"
                             if not trained_robust else "the probe attacked no trained images (trainer.probe_budget)")
        elif count(needs[-1]) < thresholds.min_images:
            skipped[name] = f"the PGD probe attacked {count(needs[-1])} images, {few}"
        else:
            evidence = rule(needs, thresholds)
            if evidence is not None:
                fired[name] = evidence
    if int(probed[-1]["val_n"]) < thresholds.min_images:
        skipped["collapsed"] = f"{int(probed[-1]['val_n'])} images, {few}"
    else:
        collapse = _collapsed(probed[-1], thresholds, num_classes)
        if collapse is not None:
            fired["collapsed"] = collapse
    return fired, skipped


def _robust_n(entry: dict[str, Any]) -> int:
    """Images the entry's PGD probe attacked (val_n before the probe budget existed)."""
    return int(entry.get("val_robust_n", entry["val_n"]))


def _trained_n(entry: dict[str, Any]) -> int:
    """Trained images the entry's PGD probe attacked."""
    return int(entry.get("train_pgd_n", 0))


def _catastrophic(entries: list[dict[str, Any]], t: Thresholds) -> dict[str, Any] | None:
    for before, after in zip(entries, entries[1:]):
        drop = before["val_robust_acc"] - after["val_robust_acc"]
        z = z_two(before["val_robust_acc"], _robust_n(before), after["val_robust_acc"], _robust_n(after))
        if drop > t.catastrophic_drop and z >= t.z and after[TRAIN_ROBUST] > before[TRAIN_ROBUST]:
            return {"epoch": int(after["epoch"]), "previous_epoch": int(before["epoch"]),
                    "val_robust_before": before["val_robust_acc"], "val_robust_after": after["val_robust_acc"],
                    "train_robust_before": before[TRAIN_ROBUST], "train_robust_after": after[TRAIN_ROBUST],
                    "drop": drop, "threshold": t.catastrophic_drop, "z": _finite(z)}
    return None


def _robust_overfitting(entries: list[dict[str, Any]], t: Thresholds) -> dict[str, Any] | None:
    best = max(entries, key=lambda e: e["val_robust_acc"])  # the first of equal bests
    last = entries[-1]
    gap = best["val_robust_acc"] - last["val_robust_acc"]
    z = z_two(best["val_robust_acc"], _robust_n(best), last["val_robust_acc"], _robust_n(last))
    if gap > t.robust_overfit_gap and z >= t.z:
        return {"epoch": int(last["epoch"]), "best_epoch": int(best["epoch"]), "best": best["val_robust_acc"],
                "last": last["val_robust_acc"], "gap": gap, "threshold": t.robust_overfit_gap, "z": _finite(z)}
    return None


def _weak_attack(entries: list[dict[str, Any]], t: Thresholds) -> dict[str, Any] | None:
    gaps = [e[TRAIN_ROBUST] - e[TRAIN_PGD] for e in entries]
    over = [e for e, gap in zip(entries, gaps) if gap > t.weak_attack_gap
            and z_two(e[TRAIN_ROBUST], int(e.get("samples") or 0), e[TRAIN_PGD], _trained_n(e)) >= t.z]
    if 2 * len(over) <= len(entries):  # at most probes, so one odd epoch does not fire it
        return None
    return {"epoch": int(over[0]["epoch"]), "probes_over": len(over), "probes": len(entries),
            "median_gap": sorted(gaps)[len(gaps) // 2], "train_robust_last": entries[-1][TRAIN_ROBUST],
            "train_pgd_last": entries[-1][TRAIN_PGD], "threshold": t.weak_attack_gap}


def _collapsed(last: dict[str, Any], t: Thresholds, num_classes: int) -> dict[str, Any] | None:
    n = int(last["val_n"])
    share = last.get("val_top_class_share")
    clean = last.get("val_clean_acc")
    chance = 1.0 / max(1, num_classes)
    evidence: dict[str, Any] = {}
    if isinstance(share, (int, float)) and share > t.collapse_share and z_one(share, n, t.collapse_share) >= t.z:
        evidence.update(top_class=last.get("val_top_class"), top_class_share=share, threshold=t.collapse_share)
    if isinstance(clean, (int, float)) and clean <= chance + t.chance_margin:
        evidence.update(val_clean_acc=clean, chance=chance, chance_margin=t.chance_margin)
    return {"epoch": int(last["epoch"]), **evidence} if evidence else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


_DIVERGED = re.compile(r"NonFiniteLossError: .*?loss is (\S+) at epoch (\d+), step (\d+)")


def diverged_details(error: str | None) -> dict[str, Any] | None:
    """The `diverged` flag's evidence from a failed cell's error text (NonFiniteLossError's message,
    harness/train/trainer.py `_check_finite`); None for any other failure."""
    found = _DIVERGED.search(error or "")
    if found is None:
        return None
    return {"epoch": int(found.group(2)), "step": int(found.group(3)), "loss": found.group(1)}

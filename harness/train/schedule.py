"""Learning-rate schedules as a pure function of (fractional epoch): resumable with no state.

The trainer sets lr = base_lr * lr_factor(...) before every step, so a resumed run continues
the schedule exactly where the checkpoint left it.
"""
from __future__ import annotations

import math
from typing import Any


SCHEDULES = ("constant", "cosine", "cyclic", "multistep")


def lr_factor(scfg: dict[str, Any], epoch: float, epochs: int) -> float:
    """Multiplier of the base lr at fractional epoch `epoch` (0 <= epoch < epochs).

    Schedules: constant; multistep (milestones in epochs, gamma: the recipe of Madry/TRADES/AWP);
    cosine (with optional linear warmup); cyclic (linear 0 -> 1 at peak_epoch -> 0 at the end:
    fast AT and ADML's cyclic lr).
    """
    name = scfg.get("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule '{name}'. Known schedules: {', '.join(SCHEDULES)}")
    warmup = float(scfg.get("warmup_epochs", 0) or 0)
    if warmup > 0 and epoch < warmup and name != "cyclic":
        return (epoch + 1e-8) / warmup
    if name == "constant":
        return 1.0
    if name == "multistep":
        gamma = float(scfg.get("gamma", 0.1))
        passed = sum(1 for milestone in scfg.get("milestones", []) if epoch >= milestone)
        return gamma**passed
    if name == "cosine":
        span = max(epochs - warmup, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - warmup) / span)))
    if name == "cyclic":
        peak = float(scfg.get("peak_epoch", epochs * 0.4))
        if epoch <= peak:
            return epoch / peak if peak > 0 else 1.0
        return max(0.0, (epochs - epoch) / max(epochs - peak, 1e-8))
    raise AssertionError(name)

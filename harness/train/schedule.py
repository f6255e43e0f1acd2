"""Learning-rate schedules as a pure function of (fractional epoch): resumable with no state.

The trainer sets lr = base_lr * lr_factor(...) before every step (and, for a cyclic schedule
with `cycle_momentum`, the momentum from `momentum_at`), so a resumed run continues the schedule
exactly where the checkpoint left it.

`granularity: epoch` holds the lr fixed through each epoch at the epoch's value, as a PyTorch
scheduler stepped once per epoch does (BackdoorBench's cosine; NAD's and ABL's per-epoch rules);
the default, `step`, moves it every step (torch's CyclicLR, stepped per batch in fast AT and ADML).
"""
from __future__ import annotations

import math
from typing import Any

from harness.core.errors import did_you_mean


SCHEDULES = ("constant", "cosine", "cyclic", "multistep", "onecycle", "cosine_steps")
GRANULARITIES = ("step", "epoch")
# every key some schedule reads: a key none reads is a typo (`warmup_epoch`), refused before work;
# another schedule's key is not (a recipe that switches a preset's multistep to cyclic leaves its
# milestones behind, unread)
SCHEDULE_KEYS = {"name", "warmup_epochs", "granularity", "step_lr_at", "milestones", "gamma",
                 "peak_epoch", "peak_fraction", "cycle_momentum", "base_momentum", "max_momentum",
                 "pct_start", "div_factor", "final_div_factor", "t_max_steps"}


def check_schedule(scfg: dict[str, Any], epochs: int) -> None:
    """ValueError naming an unknown key (with the closest known one) or a bad value, before work."""
    for key in scfg:
        if key not in SCHEDULE_KEYS:
            raise ValueError(f"unknown key trainer.schedule.{key}: no schedule reads it."
                             f"{did_you_mean(key, SCHEDULE_KEYS, 'trainer.schedule.')} "
                             f"Known keys: {', '.join(sorted(SCHEDULE_KEYS))}")
    lr_factor(scfg, 0.0, epochs, steps_per_epoch=1)
    schedule_position(scfg, 0, 0, 1)


def lr_factor(scfg: dict[str, Any], epoch: float, epochs: int, steps_per_epoch: int | None = None) -> float:
    """Multiplier of the base lr at fractional epoch `epoch` (0 <= epoch < epochs).

    Schedules: constant; multistep (milestones in epochs, gamma: the recipe of Madry/TRADES/AWP);
    cosine (with optional linear warmup); cyclic (linear 0 -> 1 at the peak -> 0 at the end:
    torch's CyclicLR with base_lr 0 as fast AT and ADML use it; the peak at `peak_epoch`, else at
    `peak_fraction` of the run, default 0.5, CyclicLR's symmetric cycle); onecycle (torch's
    OneCycleLR stepped once per epoch, as DM-Improves-AT's `cosinew`: cosine from 1/div_factor up to
    1 at `pct_start` of the run, then down to 1/(div_factor * final_div_factor); epoch granularity only);
    cosine_steps (torch's CosineAnnealingLR(T_max=`t_max_steps`) stepped once per optimisation step
    and never stopped, so past T_max it rises again, a period of 2 T_max steps: BackdoorBench's FT-SAM
    steps its T_max-100 scheduler per batch; needs `steps_per_epoch`, step granularity only).
    """
    name = scfg.get("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule '{name}'. Known schedules: {', '.join(SCHEDULES)}")
    granularity = scfg.get("granularity", "step")
    if granularity not in GRANULARITIES:
        raise ValueError(f"trainer.schedule.granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "epoch":
        epoch = float(math.floor(epoch + 1e-9))
    warmup = float(scfg.get("warmup_epochs", 0) or 0)
    if name == "onecycle":
        return _onecycle(scfg, epoch, epochs)[0]
    if name == "cosine_steps":
        if warmup > 0:
            raise ValueError("the cosine_steps schedule has no warmup (torch's CosineAnnealingLR): set "
                             "trainer.schedule.warmup_epochs=0")
        return _cosine_steps(scfg, epoch, steps_per_epoch)
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
        peak = cyclic_peak(scfg, epochs)
        if epoch <= peak:
            return epoch / peak if peak > 0 else 1.0
        return max(0.0, (epochs - epoch) / max(epochs - peak, 1e-8))
    raise AssertionError(name)


def _cosine_steps(scfg: dict[str, Any], epoch: float, steps_per_epoch: int | None) -> float:
    """0.5 (1 + cos(pi t / T_max)) at optimisation step t = epoch * steps_per_epoch (torch's closed
    form, which its recursive CosineAnnealingLR follows past T_max)."""
    if scfg.get("granularity", "step") != "step":
        raise ValueError("the cosine_steps schedule moves every step: set trainer.schedule.granularity=step")
    t_max = int(scfg.get("t_max_steps", 0) or 0)
    if t_max < 1:
        raise ValueError(f"the cosine_steps schedule needs trainer.schedule.t_max_steps >= 1, got {t_max}")
    if steps_per_epoch is None:
        raise ValueError("the cosine_steps schedule counts optimisation steps: lr_factor needs steps_per_epoch")
    return 0.5 * (1.0 + math.cos(math.pi * round(epoch * steps_per_epoch) / t_max))


def schedule_position(scfg: dict[str, Any], epoch: int, step: int, steps_per_epoch: int) -> float:
    """The fractional epoch at which the schedule sets step `step` of `epoch`: its start (default),
    or with `step_lr_at: end` its end, as scripts that compute the lr of step i from
    `epoch + (i + 1) / len(loader)` do (the bag-of-tricks PGD-AT, AT-AWP): only the last step
    before a milestone differs."""
    at = scfg.get("step_lr_at", "start")
    if at not in ("start", "end"):
        raise ValueError(f"trainer.schedule.step_lr_at must be start or end, got {at!r}")
    return epoch + (step + (1 if at == "end" else 0)) / steps_per_epoch


def cyclic_peak(scfg: dict[str, Any], epochs: int) -> float:
    """The epoch where a cyclic schedule peaks: `peak_epoch`, else `peak_fraction` (0.5) of the run."""
    if scfg.get("peak_epoch") is not None:
        peak = float(scfg["peak_epoch"])
    else:
        peak = float(scfg.get("peak_fraction", 0.5)) * epochs
    if not 0 <= peak <= epochs:
        raise ValueError(f"the cyclic schedule's peak ({peak:g}) must lie within the run's {epochs} epochs; "
                         f"set trainer.schedule.peak_epoch or peak_fraction (in [0, 1])")
    return peak


def _onecycle(scfg: dict[str, Any], epoch: float, epochs: int) -> tuple[float, float]:
    """(lr factor, momentum) of torch's OneCycleLR (anneal 'cos', two phases) with total_steps =
    epochs, at whole epoch `epoch`: the lr starts at 1/div_factor, reaches 1 at step
    pct_start * epochs - 1, and ends at 1/(div_factor * final_div_factor); momentum runs the other
    way between max_momentum (0.95) and base_momentum (0.85)."""
    if scfg.get("granularity", "step") != "epoch":
        raise ValueError("the onecycle schedule is torch's OneCycleLR stepped once per epoch: set "
                         "trainer.schedule.granularity=epoch")
    pct, div, final = float(scfg.get("pct_start", 0.3)), float(scfg.get("div_factor", 25.0)), \
        float(scfg.get("final_div_factor", 1e4))
    if not 0 < pct < 1 or div <= 0 or final <= 0:
        raise ValueError(f"trainer.schedule.pct_start must be in (0, 1) and div_factor, final_div_factor > 0; "
                         f"got {pct}, {div}, {final}")
    low_m, high_m = float(scfg.get("base_momentum", 0.85)), float(scfg.get("max_momentum", 0.95))
    start, floor_lr = 1.0 / div, 1.0 / (div * final)
    peak_step, last = pct * epochs - 1, epochs - 1

    def cos(a: float, b: float, frac: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * frac) + 1)
    if epoch <= peak_step:
        frac = epoch / peak_step if peak_step > 0 else 1.0
        return cos(start, 1.0, frac), cos(high_m, low_m, frac)
    frac = (epoch - peak_step) / (last - peak_step) if last > peak_step else 1.0
    return cos(1.0, floor_lr, frac), cos(low_m, high_m, frac)


def momentum_at(scfg: dict[str, Any], epoch: float, epochs: int) -> float | None:
    """The momentum a cyclic schedule with `cycle_momentum` sets at `epoch` (None: leave it).

    As torch's CyclicLR (cycle_momentum=True, its default): momentum runs inversely to the lr,
    from `max_momentum` (0.9) at lr 0 to `base_momentum` (0.8) at the peak, and back. The onecycle
    schedule cycles momentum unless `cycle_momentum: false` (torch's OneCycleLR default is on)."""
    if scfg.get("name") == "onecycle" and scfg.get("cycle_momentum", True):
        return _onecycle(scfg, float(math.floor(epoch + 1e-9)), epochs)[1]
    if scfg.get("name") != "cyclic" or not scfg.get("cycle_momentum", False):
        return None
    low, high = float(scfg.get("base_momentum", 0.8)), float(scfg.get("max_momentum", 0.9))
    return high - (high - low) * lr_factor(scfg, epoch, epochs)


def lr_at_epochs(tcfg: dict[str, Any], steps_per_epoch: int | None = None) -> list[float]:
    """The lr at the start of every epoch of a trainer config (the recipe tables pin these);
    `steps_per_epoch` for a schedule that counts steps (cosine_steps)."""
    epochs, base = int(tcfg["epochs"]), float(tcfg["optimizer"]["lr"])
    return [base * lr_factor(tcfg["schedule"], float(epoch), epochs, steps_per_epoch) for epoch in range(epochs)]

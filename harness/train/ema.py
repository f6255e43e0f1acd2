"""Weight EMA for every method: the averaged model is the one probed, selected and delivered.

RobustBench's top CIFAR-10 entries (Gowal et al. 2021, Rebuffi et al. 2021, Wang et al. 2023)
evaluate an exponential moving average of the weights, not the last weights. `trainer.ema` is its
decay (null: off, the default, so every method's official recipe is unchanged). The schedule is
the one those papers' released code uses (the `ema_update` of Wang et al.'s DM-Improves-AT, from
Gowal/Rebuffi's): after each optimiser step `s` (1-based over the run), with the warm-up
`w = trainer.ema_warmup` x the run's optimiser steps (theirs: 0.025 x epochs x steps per epoch),

    decay(s) = 0                                   for s < w   (the average is the model)
    decay(s) = min(ema, (1 + s - w) / (10 + s - w))  otherwise  (`trainer.ema_dynamic: true`)
    decay(s) = ema                                   otherwise  (`trainer.ema_dynamic: false`)

    average = decay * average + (1 - decay) * weights   (parameters)
    BatchNorm statistics are the model's own (copied: their `update_bn` at each epoch's end)

The averaging itself is timm's ModelEmaV3 (parameters lerped, buffers copied); only the decay
schedule above is ours. The average lives in the checkpoint (a resumed run continues it), the
validation probes and `trainer.select` read it, and at the end its weights become the model's,
so evaluation and every later stage see the averaged model; the train summary says so (`ema`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn


@dataclass(frozen=True)
class EmaSettings:
    decay: float
    warmup: float = 0.025  # a fraction of the run's optimiser steps
    dynamic: bool = True


def ema_settings(tcfg: dict[str, Any]) -> EmaSettings | None:
    """`trainer.ema*` checked (None: off); a bad value is named with its fix."""
    decay = tcfg.get("ema")
    if decay is None or decay is False:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"trainer.ema is the average's decay, a number in (0, 1) such as 0.995 (or null: off); "
                         f"got {decay!r}")
    warmup = tcfg.get("ema_warmup", 0.025)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0.0 <= float(warmup) < 1.0:
        raise ValueError(f"trainer.ema_warmup is a fraction of the run's optimiser steps in [0, 1) (the papers' "
                         f"0.025), got {warmup!r}")
    dynamic = tcfg.get("ema_dynamic", True)
    if not isinstance(dynamic, bool):
        raise ValueError(f"trainer.ema_dynamic must be true or false, got {dynamic!r}")
    if tcfg.get("compile"):
        raise ValueError("trainer.ema with trainer.compile is not supported yet (the average copies the module); "
                         "set one of them off")
    return EmaSettings(float(decay), float(warmup), dynamic)


def ema_decay(settings: EmaSettings, step: int, total_steps: int) -> float:
    """The decay applied after optimiser step `step` (1-based) of `total_steps`: the module doc's
    schedule (the warm-up a float number of steps, as theirs)."""
    warmup_steps = settings.warmup * total_steps
    if step < warmup_steps:
        return 0.0
    if not settings.dynamic:
        return settings.decay
    delta = step - warmup_steps
    return min(settings.decay, (1.0 + delta) / (10.0 + delta))


class _Scheduled(ModelEmaV3):
    """timm's EMA with the papers' decay schedule."""

    def __init__(self, module: nn.Module, settings: EmaSettings, total_steps: int, device: torch.device) -> None:
        super().__init__(module, decay=settings.decay, exclude_buffers=True, device=device)
        self.settings, self.total_steps = settings, total_steps

    def get_decay(self, step: int | None = None) -> float:
        return self.settings.decay if step is None else ema_decay(self.settings, step, self.total_steps)


class WeightAverage:
    """The running average of a module's weights, updated after every optimiser step."""

    def __init__(self, module: nn.Module, settings: EmaSettings, total_steps: int, device: torch.device) -> None:
        self._ema = _Scheduled(module, settings, total_steps, device)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the module (what probes, selection and the delivered model use)."""
        return self._ema.module

    def update(self, module: nn.Module, step: int) -> None:
        """After optimiser step `step` (1-based, counted over the whole run)."""
        self._ema.update(module, step=step)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self._ema.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema.module.load_state_dict(state["weights"])
        self.updates = int(state.get("updates", 0))

    def describe(self) -> dict[str, Any]:
        """What the train summary records: the settings and how many steps were averaged."""
        settings = self._ema.settings
        return {**asdict(settings), "warmup_steps": settings.warmup * self._ema.total_steps, "updates": self.updates}

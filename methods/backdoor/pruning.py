"""The training-loop pieces the BatchNorm-pruning defenses share, written once.

Two shapes recur (methods/backdoor/masks.py has the gated BatchNorm they act on):
- **Prune, then optionally fine-tune** (CLP, BNP): the gates are set before training; the official
  recipe trains 0 epochs (the trainer then saves the pruned model), `epochs` > 0 fine-tunes on the
  clean subset with the gates fixed. `PruneThenFineTune` holds the stage settings and the logged
  pruned fraction.
- **Learn a mask per channel, prune by it after the last epoch** (ANP, RNP): the optimiser sees
  only the masks, each step clips them to [0, 1] (the officials' `clip_mask`), and the last
  epoch's end prunes. `MaskLearning` holds those hooks; the subclass says how to `prune`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from methods.backdoor.masks import GatedBatchNorm
from methods.base import TrainContext
from methods.ft import FineTuning, finetune_trainer

# a stage of 0 epochs: the trainer builds the (pruned) model and saves it, with nothing to schedule
NO_TRAINING = {"epochs": 0, "schedule": {"name": "constant", "granularity": "epoch", "warmup_epochs": 0}}


class PruneThenFineTune(FineTuning):
    """FT's stage on the clean subset, 0 epochs by default; the subclass sets the gates of
    `self.module` and keeps its per-layer statistic in `self.stats` (for the record)."""

    module: GatedBatchNorm | None = None
    stats: dict[str, Any] = {}  # replaced, never mutated: the subclass assigns its own

    def summary(self) -> dict[str, Any]:
        """The pruned channels (a resumed run reads them off the restored gates) and the statistic."""
        return {} if self.module is None else {**self.module.summary(), **self.stats}

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        """0 epochs (the official: prune, no fine-tuning) unless `epochs` asks for fine-tuning."""
        stage = finetune_trainer(cls, method_cfg, trainer_cfg)
        return {**stage, **NO_TRAINING} if stage["epochs"] == 0 else stage

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        """The optional fine-tuning (`epochs` > 0): cross-entropy on the clean subset, gates fixed."""
        logs = super().training_step(module, x, y, ctx)
        raw: GatedBatchNorm = ctx.classifier  # type: ignore[assignment]
        logs["pruned_fraction"] = torch.tensor(raw.pruned_count() / max(1, raw.channel_count()))
        return logs


class MaskLearning:
    """Mixin for a Method whose optimiser learns the masks of `self.module` (a GatedBatchNorm with
    `masks()`), clipped to [0, 1] after every step; `prune(module)` runs once, after the last epoch
    (a resumed run whose checkpoint is pruned already does not prune again)."""

    module: Any  # the wrapped classifier, set by build()

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": module.masks()}]

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        with torch.no_grad():  # the officials' clip_mask
            for mask in module.masks():
                mask.clamp_(0.0, 1.0)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if ctx.epoch == ctx.epochs - 1 and self.module is not None and not bool(self.module.pruned):
            self.prune(self.module)

    def prune(self, module: Any) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The pruned channels and the smallest learned mask."""
        if self.module is None:
            return {}
        return {**self.module.summary(), "mask_min": float(min(m.detach().min() for m in self.module.masks()))}

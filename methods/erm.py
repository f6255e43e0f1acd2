"""ERM: plain cross-entropy on clean images; the baseline every robust method is compared to."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.registry import METHODS
from methods.base import Method, TrainContext


@METHODS.register("erm")
class ERM(Method):
    name = "erm"
    paper: ClassVar[dict[str, str]] = {"title": "Standard training (empirical risk minimisation), no defence", "venue": "", "year": ""}

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "train_acc": (logits.argmax(1) == y).float().mean()}

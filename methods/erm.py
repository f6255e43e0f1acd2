"""ERM: plain cross-entropy on clean images; the baseline every robust method is compared to."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.registry import METHODS
from methods.base import Method, TrainContext


@METHODS.register("erm")
class ERM(Method):
    name = "erm"

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "train_acc": (logits.argmax(1) == y).float().mean()}

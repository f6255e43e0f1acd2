"""PGD-AT (Madry et al. 2018): min_theta E max_{|d|_inf <= eps} CE(f(x + d), y).

Train attack PGD-10 with step eps/4 (2/255 at 8/255) and a uniform random start, crafted with
BatchNorm in eval mode (bag-of-tricks, Pang et al. 2021) on the unwrapped classifier; the update
is CE on the adversarial batch only. Recipe (CIFAR-10): configs/method/pgd_at.yaml.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.pgd import PGD
from harness.core.registry import METHODS
from methods.base import Method, TrainContext


@METHODS.register("pgd_at")
class PGDAT(Method):
    name = "pgd_at"
    paper: ClassVar[dict[str, str]] = {"title": "Towards Deep Learning Models Resistant to Adversarial Attacks", "venue": "ICLR", "year": "2018"}

    def __init__(self, attack: dict[str, Any]) -> None:
        super().__init__()
        self.attack = PGD(**{k: v for k, v in attack.items() if k != "name"})

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        x_adv = self.attack(ctx.classifier, x, y)
        logits = module(x_adv)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "train_robust_acc": (logits.argmax(1) == y).float().mean()}

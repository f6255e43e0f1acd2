"""TRADES-AWP (Wu et al. 2020): TRADES' attack and loss, updated at the AWP-perturbed weights
w + v (v from one ascent step of the TRADES loss, gamma 5e-3); see methods/awp.py."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from harness.core.registry import METHODS
from methods.awp import AWPMixin, WeightPerturbation
from methods.trades import TRADES, trades_loss


@METHODS.register("trades_awp")
class TradesAWP(AWPMixin, TRADES):
    name = "trades_awp"
    paper: ClassVar[dict[str, str]] = {"title": "Adversarial Weight Perturbation Helps Robust Generalization", "venue": "NeurIPS", "year": "2020"}

    def __init__(self, attack: dict[str, Any], beta: float = 6.0, gamma: float = 5e-3,
                 warmup_epochs: int = 0) -> None:
        super().__init__(attack, beta)
        self.gamma, self.warmup_epochs = float(gamma), int(warmup_epochs)
        self.perturbation = WeightPerturbation(self.gamma)

    def awp_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return trades_loss(module(x), module(x_adv), y, self.beta)[0]

    def awp_logs(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_clean = module(x)
        loss, natural, robust = trades_loss(logits_clean, module(x_adv), y, self.beta)
        return {"loss": loss, "loss_natural": natural.detach(), "loss_robust": robust.detach(),
                "train_acc": (logits_clean.argmax(1) == y).float().mean()}

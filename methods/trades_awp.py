"""TRADES-AWP (Wu et al. 2020): TRADES' attack and loss, updated at the AWP-perturbed weights
w + v (v from one ascent step of the TRADES loss, gamma 5e-3); see methods/awp.py.

As the official code (csdongxian/AWP trades_AWP/train_trades_cifar.py and utils_awp.py
`TradesAWP`; docs/conformance.md measures it):
- the KL attack takes 10 steps of 2/255 (its `--step-size 2`, eps 8/255: eps/4), not TRADES'
  own 0.007, from x + 0.001 N(0, I), model in eval mode;
- no weight perturbation in the first 9 epochs: its `--awp-warmup 10` counts epochs from 1
  (`epoch >= 10`), so AWP starts at our (0-based) epoch 9;
- the ascent loss is the TRADES loss in train mode (the proxy's CE(x) + beta * KL, batch mean);
- the update's forwards run x', x, x in train mode (the KL target and the CE logits are two
  forwards of x), so BatchNorm's running statistics see x', x, x: we run the third one without
  a gradient (the same values; the gradient of one shared clean forward is the same).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from harness.attacks.base import parse_number
from harness.core.registry import METHODS
from methods.awp import AWPMixin, WeightPerturbation
from methods.trades import TRADES, trades_loss


@METHODS.register("trades_awp")
class TradesAWP(AWPMixin, TRADES):
    name = "trades_awp"
    paper: ClassVar[dict[str, str]] = {"title": "Adversarial Weight Perturbation Helps Robust Generalization", "venue": "NeurIPS", "year": "2020"}

    def __init__(self, attack: dict[str, Any], beta: float = 6.0, gamma: float = 5e-3,
                 warmup_epochs: int = 9) -> None:
        attack = dict(attack)
        if attack.get("step_size") is None:  # the official --step-size 2 (/255) at eps 8/255
            attack["step_size"] = parse_number(attack["eps"]) / 4
        super().__init__(attack, beta)
        self.gamma, self.warmup_epochs = float(gamma), int(warmup_epochs)
        self.perturbation = WeightPerturbation(self.gamma)

    def awp_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return trades_loss(module(x), module(x_adv), y, self.beta)[0]

    def awp_logs(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_adv = module(x_adv)
        logits_clean = module(x)
        with torch.no_grad():  # the official update forwards x twice: BatchNorm sees x', x, x
            module(x)
        loss, natural, robust = trades_loss(logits_clean, logits_adv, y, self.beta)
        return {"loss": loss, "loss_natural": natural.detach(), "loss_robust": robust.detach(),
                "train_robust_acc": (logits_adv.argmax(1) == y).float().mean()}

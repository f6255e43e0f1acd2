"""MART (Wang et al. 2020): misclassification-aware adversarial training.

loss = BCE(f(x'), y) + beta * mean_i[ KL(f(x_i) || f(x'_i)) * (1 - p_y(x_i)) ], with
BCE = CE(f(x'), y) - log(1 - max_{k != y} p_k(x')). As the official code (YisenWang/MART
`mart_loss`; docs/conformance.md: loss, x', update and BatchNorm statistics equal it): x' from
CE-PGD that starts at x + 0.001 N(0, I), NOT clipped to [0, 1] before the first gradient, then 10
signed steps of 0.007 at eps 0.031 (each projected into the ball and [0, 1]), model in eval mode;
BatchNorm sees x then x' in train mode; the clean probabilities are NOT detached (the KL and its
weight also train the clean branch); the small constants (1.0001 - p, +1e-12) keep the logs
finite. beta 5: train_resnet.py's default, for the ResNet-18 of the paper's tables (6 is
train_wideresnet.py's, and mart_loss's own keyword default). Recipe (configs/recipes/paper/mart.yaml):
train_resnet.py's 120 epochs, lr 0.01, wd 3.5e-3.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import IterativeAttack, parse_number
from harness.attacks.pgd import pgd_linf
from harness.core.registry import METHODS
from methods.base import Method, TrainContext


class PGDGaussStart(IterativeAttack):
    """CE-PGD from a small Gaussian start x + init_std N(0, I) (MART's train attack), whose first
    gradient is taken at the start as drawn (not clipped to [0, 1]), as the official code;
    `step_size` defaults to eps * 0.007 / 0.031 as in their code."""

    name = "pgd_gauss"
    norm = "linf"

    def __init__(self, eps: float | str, steps: int = 10, step_size: float | str | None = None,
                 init_std: float = 0.001) -> None:
        super().__init__(eps, steps, step_size, random_start=True)
        if step_size is None:
            self.step_size = self.eps * 0.007 / 0.031
        self.init_std = float(init_std)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd_linf(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                        loss_fn=F.cross_entropy, init=lambda z: z + self.init_std * torch.randn_like(z),
                        project_start=False)


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, boosted CE on x', weighted KL) exactly as MART's official loss."""
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    other = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # most likely wrong class
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), other)
    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    robust = (kl * (1.0000001 - true_probs)).sum() / y.shape[0]
    return bce + beta * robust, bce, robust


def attack_from(cfg: dict[str, Any], cls: type = PGDGaussStart) -> Any:
    return cls(**{k: v for k, v in cfg.items() if k != "name"})


@METHODS.register("mart")
class MART(Method):
    name = "mart"
    paper: ClassVar[dict[str, str]] = {"title": "Improving Adversarial Robustness Requires Revisiting Misclassified Examples", "venue": "ICLR", "year": "2020"}

    def __init__(self, attack: dict[str, Any], beta: float = 5.0) -> None:
        super().__init__()
        self.beta = float(parse_number(beta))
        self.attack = attack_from(attack)

    def loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_clean, logits_adv = module(x), module(x_adv)
        loss, bce, robust = mart_loss(logits_clean, logits_adv, y, self.beta)
        return {"loss": loss, "loss_bce": bce.detach(), "loss_robust": robust.detach(),
                "train_robust_acc": (logits_adv.argmax(1) == y).float().mean()}

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        return self.loss(module, x, self.attack(ctx.classifier, x, y), y)

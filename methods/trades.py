"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL.

As the official code (yaodongyu/TRADES `trades_loss`; docs/conformance.md: loss, x' and the
update equal it): x' starts at x + 0.001 N(0, I), not clipped to [0, 1] before the first
gradient, then 10 signed steps of 0.007 (at eps 0.031) on the summed KL with the model in eval
mode; the loss uses a batch-mean KL whose target softmax(f(x)) is NOT detached, so the KL term
also shapes the clean prediction; BatchNorm's running statistics see x, x', x in train mode (the
official loss forwards x twice), which costs one extra no-grad forward. beta 6.

`label_smoothing` (default 0, as TRADES) smooths the natural CE term only, as the generated-data
recipes train TRADES (Gowal et al. 2021, Wang et al. 2023: 0.1 in DM-Improves-AT's `trades_loss`,
whose SmoothCrossEntropyLoss is torch's `label_smoothing`; docs/conformance.md, row `ema`).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import Attack, parse_number
from harness.attacks.pgd import pgd_linf
from harness.core.registry import ATTACKS, METHODS
from methods.base import Method, TrainContext


@ATTACKS.register("trades_kl")
class TradesKL(Attack):
    """Maximise KL(f(x) || f(x')) from a Gaussian start: TRADES' inner attack (label-free)."""

    name = "trades_kl"
    norm = "linf"

    def __init__(self, eps: float | str, steps: int = 10, step_size: float | str | None = None,
                 init_std: float = 0.001) -> None:
        super().__init__(eps)
        self.steps = int(steps)
        self.step_size = parse_number(step_size) if step_size is not None else self.eps * 0.007 / 0.031
        self.init_std = float(init_std)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)

        def kl_sum(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

        return pgd_linf(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                        loss_fn=kl_sum, init=lambda z: z + self.init_std * torch.randn_like(z), project_start=False)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, natural CE, robust KL) exactly as TRADES: KL(sum) / batch size, target not detached
    (`label_smoothing` on the natural CE only, as the DM-AT recipes)."""
    natural = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1),
                      reduction="sum") / y.shape[0]
    return natural + beta * robust, natural, robust


@METHODS.register("trades")
class TRADES(Method):
    name = "trades"
    paper: ClassVar[dict[str, str]] = {"title": "Theoretically Principled Trade-off between Robustness and Accuracy", "venue": "ICML", "year": "2019"}

    def __init__(self, attack: dict[str, Any], beta: float = 6.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"method.label_smoothing must be in [0, 1) (0: TRADES; the DM-AT recipes: 0.1), "
                             f"got {label_smoothing}")
        self.attack = TradesKL(**{k: v for k, v in attack.items() if k != "name"})

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        x_adv = self.attack(ctx.classifier, x, y)
        logits_clean = module(x)
        logits_adv = module(x_adv)
        with torch.no_grad():  # BatchNorm sees x, x', x in train mode, as the official loss runs them
            module(x)          # (its KL target is a third forward of x: the same values and gradient)
        loss, natural, robust = trades_loss(logits_clean, logits_adv, y, self.beta, self.label_smoothing)
        return {"loss": loss, "loss_natural": natural.detach(), "loss_robust": robust.detach(),
                "train_acc": (logits_clean.argmax(1) == y).float().mean(),
                "train_robust_acc": (logits_adv.argmax(1) == y).float().mean()}

"""PGD-AT (Madry et al. 2018): min_theta E max_{|d|_inf <= eps} CE(f(x + d), y), as the
bag-of-tricks baseline (Pang et al. 2021, P2333/Bag-of-Tricks-for-AT train_cifar.py with the
README's `--BNeval` command) runs it.

Train attack: PGD-10, step eps/4 (2/255 at 8/255), uniform start in [-eps, eps] clipped to
[0, 1], crafted with BatchNorm in eval mode (`craft_mode: eval`, the baseline's --BNeval) on the
unwrapped classifier; the update is CE on the adversarial batch only. BatchNorm's running
statistics see what the official loop runs in train mode: x' (the loss), then x (a clean forward
for its accuracy log, before the step), then x again after the step (its gradient-norm log):
`clean_bn_forwards: true`, two no-grad forwards, about 5% of a PGD-10 step. Named options:
`clean_bn_forwards: false` (the statistics of x' alone) and `craft_mode: train` (batch statistics
while crafting, every attack forward updating the running statistics: the script without
--BNeval, Madry's and Rice et al.'s choice, and locuslab/fast_adversarial's train_pgd.py).
Recipe (configs/recipes/paper/pgd_at.yaml): 110 epochs, batch 128, SGD lr 0.1 momentum 0.9,
wd 5e-4, x0.1 at epochs 100 and 105. docs/conformance.md: the step equals the official one.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import CRAFT_MODES, craft
from harness.attacks.pgd import PGD
from harness.core.registry import METHODS
from methods.base import Method, TrainContext


@METHODS.register("pgd_at")
class PGDAT(Method):
    name = "pgd_at"
    paper: ClassVar[dict[str, str]] = {"title": "Towards Deep Learning Models Resistant to Adversarial Attacks", "venue": "ICLR", "year": "2018"}

    def __init__(self, attack: dict[str, Any], craft_mode: str = "eval", clean_bn_forwards: bool = True) -> None:
        super().__init__()
        if craft_mode not in CRAFT_MODES:
            raise ValueError(f"{self.name} craft_mode must be one of {', '.join(CRAFT_MODES)}, got {craft_mode!r}")
        self.craft_mode = craft_mode
        self.clean_bn_forwards = bool(clean_bn_forwards)
        self.attack = PGD(**{k: v for k, v in attack.items() if k != "name"})
        self._clean: torch.Tensor | None = None  # the batch whose post-step forward is still due

    def craft(self, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> torch.Tensor:
        """The train-time adversarial batch, crafted on the unwrapped classifier in `craft_mode`."""
        return craft(self.attack, ctx.classifier, x, y, self.craft_mode)

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        x_adv = self.craft(x, y, ctx)
        logits = module(x_adv)
        if self.clean_bn_forwards:  # BatchNorm sees x after x', as the official loop's clean forward
            with torch.no_grad():
                module(x)
            self._clean = x.detach()
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "train_robust_acc": (logits.argmax(1) == y).float().mean()}

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        if self._clean is not None:  # and x once more after the step, as the official loop's last forward
            with torch.no_grad():
                module(self._clean)
            self._clean = None

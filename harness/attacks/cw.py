"""CW-L-inf: PGD-L-inf on the Carlini-Wagner margin loss, the "CW-inf" of RobustBench/TRADES/MART.

Not the original Carlini-Wagner optimisation attack (that is torchattacks' `CW`, an L2 attack
with Adam in tanh space): this is the PGD evaluation attack that adversarial-training papers
(TRADES, MART, CausalAdv, RobustBench tables) report as "CW" or "CW-inf".

The loss, maximised, for logits z (B, K) and labels y, per sample:

    max_other = max_{i != y} z_i
    margin    = max_other - z_y                   # > 0 <=> misclassified
    loss      = -clamp(z_y - max_other, min=-kappa) = min(margin, kappa)

averaged over the batch (the mean only rescales the gradient; PGD uses its sign). It differs
from the TRADES/MART `cwloss` (`-clamp(z_y - max_other + kappa, min=0)`, summed) only by the
constant kappa and the reduction, so the attack iterates are the same. kappa caps the pursued
margin: once a sample's margin reaches kappa its gradient is 0 and it stops moving.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.attacks.base import IterativeAttack, parse_number
from harness.attacks.pgd import pgd_linf, uniform_start
from harness.core.registry import ATTACKS


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0,
                   reduction: str = "mean") -> torch.Tensor:
    """min(max_{i != y} z_i - z_y, kappa), per sample ('none') or averaged/summed."""
    if logits.dim() != 2 or logits.size(1) < 2:
        raise ValueError(f"cw_margin_loss needs logits of shape (B, K>=2), got {tuple(logits.shape)}")
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    is_true = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, y.view(-1, 1), True)
    max_other = logits.masked_fill(is_true, float("-inf")).amax(1)
    loss = -torch.clamp(true - max_other, min=-kappa)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


@ATTACKS.register("cw_linf")
class CWLinf(IterativeAttack):
    """PGD-L-inf on the CW margin loss (see the module docstring for the exact loss).

    Defaults: 30 steps of eps/4 (2/255 at eps 8/255), kappa=50, uniform random start in the
    eps-cube (the `pgd` start).
    """

    name = "cw_linf"
    norm = "linf"

    def __init__(self, eps: float | str, steps: int = 30, step_size: float | str | None = None,
                 kappa: float | str = 50.0, random_start: bool = True) -> None:
        super().__init__(eps, steps, step_size, random_start)
        self.kappa = parse_number(kappa)
        if self.kappa < 0:
            raise ValueError(f"cw_linf kappa must be >= 0, got {self.kappa}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kappa = self.kappa
        return pgd_linf(
            model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
            loss_fn=lambda logits, labels: cw_margin_loss(logits, labels, kappa),
            init=uniform_start(self.eps) if self.random_start else None,
        )

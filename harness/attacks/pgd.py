"""PGD, L-inf (Madry et al. 2018): iterated signed-gradient ascent, projected onto the eps-ball.

`pgd_linf` is the engine that the train-time attacks of PGD-AT and TRADES share; the registered
`PGD` plugin is the evaluation/training attack with a CE loss and a uniform random start.
Random start draws `uniform_(-eps, eps)` like torchattacks, so with one seed the two agree.
`eot_iter` > 1 (Expectation over Transformation, Athalye et al. 2018) averages each step's
gradient over that many forwards: the attack for a model with randomness at inference.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import IterativeAttack, LossFn, input_gradient
from harness.core.registry import ATTACKS


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss_fn: LossFn,
    init: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eot_iter: int = 1,
    project_start: bool = True,
) -> torch.Tensor:
    """Maximise `loss_fn(model(x_adv), y)` over the L-inf ball; `init(x)` gives the start point,
    projected into the ball and [0, 1] unless `project_start=False` (TRADES and MART take their
    first gradient at x + 0.001 N(0, I) as drawn, possibly just outside [0, 1]); each step's
    gradient is the mean over `eot_iter` forwards (EOT; 1: plain PGD)."""
    # The ball-and-box bounds are fixed: computed once, each step is then 2 clamps (min, max),
    # the same values as project_linf (max(x-eps, 0) <= x_adv <= min(x+eps, 1)).
    lo, hi = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    if init is None:
        x_adv = x.clone()
    else:
        x_adv = torch.max(torch.min(init(x), hi), lo) if project_start else init(x)
    for _ in range(steps):
        grad = eot_gradient(model, x_adv, y, loss_fn, eot_iter)
        x_adv = torch.max(torch.min(grad.sign_().mul_(step_size).add_(x_adv), hi), lo)
    return x_adv


def eot_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                 eot_iter: int) -> torch.Tensor:
    """d loss / d x averaged over `eot_iter` forwards (one forward, no averaging, when 1)."""
    grad, _ = input_gradient(model, x, y, loss_fn)
    for _ in range(eot_iter - 1):
        grad += input_gradient(model, x, y, loss_fn)[0]
    return grad.div_(eot_iter) if eot_iter > 1 else grad


def uniform_start(eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x + torch.empty_like(x).uniform_(-eps, eps)


@ATTACKS.register("pgd")
class PGD(IterativeAttack):
    """PGD-L-inf on the CE loss; `step_size` defaults to eps/4 (2/255 at eps 8/255);
    `eot_iter` forwards per gradient (EOT, for randomized defenses; 1: plain PGD)."""

    name = "pgd"
    norm = "linf"

    def __init__(self, eps: float | str, steps: int = 20, step_size: float | str | None = None,
                 random_start: bool = True, eot_iter: int = 1) -> None:
        super().__init__(eps, steps=steps, step_size=step_size, random_start=random_start)
        if int(eot_iter) < 1:
            raise ValueError(f"pgd eot_iter must be >= 1, got {eot_iter}")
        self.eot_iter = int(eot_iter)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd_linf(
            model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
            loss_fn=F.cross_entropy, init=uniform_start(self.eps) if self.random_start else None, eot_iter=self.eot_iter,
        )

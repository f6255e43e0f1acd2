"""PGD, L2 (Madry et al. 2018): iterated normalised-gradient ascent, projected onto the L2 ball.

One step, per sample i (flattened over C, H, W):

    g_i     = d CE(model(x_adv), y) / d x_adv_i
    x_adv_i = x_adv_i + step_size * g_i / (||g_i||_2 + 1e-10)
    x_adv   = project_l2(x_adv, x, eps)      # into the L2 eps-ball around x, then into [0,1]

Random start (default on) draws exactly what torchattacks 3.3's `PGDL2` draws, in the same order,
so with one torch seed the two agree (to float rounding):

    delta = empty_like(x).normal_()            # a Gaussian direction per sample ...
    r     = zeros(B, 1, 1, 1).uniform_(0, 1)   # ... then one radius per sample
    x_adv = clamp(x + delta / ||delta||_2 * r * eps, 0, 1)

Note the radius is uniform in [0, eps], not `eps * U^(1/d)`: the start is *not* uniform in the
ball's volume (it favours the centre). We keep torchattacks' draw for reproducibility.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import IterativeAttack, LossFn, input_gradient
from harness.core.registry import ATTACKS

_GRAD_EPS = 1e-10  # added to the gradient norm (torchattacks' eps_for_division)
_NORM_FLOOR = 1e-12  # a zero perturbation has nothing to project


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def l2_norms(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm over all non-batch dimensions: (B, ...) -> (B,)."""
    return v.flatten(1).norm(p=2, dim=1)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the L2 eps-ball around x (per sample), then into [0,1].

    The clamp keeps the point in the ball: x is in [0,1], so clamping moves every coordinate of
    the perturbation towards 0 and can only shrink its norm.
    """
    delta = x_adv - x
    factor = (eps / l2_norms(delta).clamp_min(_NORM_FLOOR)).clamp_max(1.0)
    return (x + delta * _per_sample(factor, delta)).clamp_(0.0, 1.0)


def l2_random_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """torchattacks' PGDL2 start: Gaussian direction, radius U(0, eps); RNG calls in its order."""
    delta = torch.empty_like(x).normal_()
    norms = _per_sample(l2_norms(delta), delta)
    radius = torch.zeros_like(norms).uniform_(0, 1)
    return (x + delta * (radius / norms * eps)).clamp_(0.0, 1.0)


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss_fn: LossFn,
    random_start: bool = True,
) -> torch.Tensor:
    """Maximise `loss_fn(model(x_adv), y)` over the L2 eps-ball around x (and [0,1])."""
    x_adv = project_l2(l2_random_start(x, eps), x, eps) if random_start else x.clone()
    for _ in range(steps):
        grad, _ = input_gradient(model, x_adv, y, loss_fn)
        grad = grad / _per_sample(l2_norms(grad) + _GRAD_EPS, grad)
        x_adv = project_l2(x_adv.detach() + step_size * grad, x, eps)
    return x_adv


@ATTACKS.register("pgd_l2")
class PGDL2(IterativeAttack):
    """PGD-L2 on the CE loss.

    `step_size` defaults to eps/4, the same rule as the L-inf `pgd` (20 steps then cover 5 eps of
    path). torchattacks' defaults are eps=1.0, alpha=0.2 (= eps/5), steps=10: pass
    `step_size=0.2*eps, steps=10` to reproduce them.
    """

    name = "pgd_l2"
    norm = "l2"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd_l2(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                      loss_fn=F.cross_entropy, random_start=self.random_start)

"""Square Attack, L-inf (Andriushchenko et al., ECCV 2020): a score-based black-box attack.

It never looks at gradients, which is why AutoAttack runs it last: if Square breaks points that
the white-box attacks could not, the gradients were lying (gradient masking) and the integrity
check `square_beats_whitebox` fires.

Algorithm (AutoAttack's `square` settings are the defaults: 5000 queries, p_init 0.8, margin
loss, 1 restart, the unscaled p schedule):
- start: x + eps * s with s in {-1,+1} drawn per (image, channel, column): vertical stripes;
- iteration i: a square of side round(sqrt(p_i * H*W)) (at least 1, at most the image) at a
  random position gets a random +-2*eps per channel added, the result is projected back onto
  the eps-ball and [0,1]; it replaces the current point when the margin loss
  z_y - max_{j != y} z_j falls, or when the point becomes misclassified;
- p_i halves at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (p_init/2 ... /512);
- a point stops being queried once its margin is <= 0.
The random draws come from one CPU generator seeded with `seed`, in the order the reference
implementation (fra31/auto-attack) draws them, so with the same seed both find the same points.
Written from the paper and that behaviour; no code of the reference.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from harness.attacks.base import MaskedAttack, project_linf
from harness.core.registry import ATTACKS

# (last iteration of the phase, divisor of p_init) of the reference schedule over 10k iterations
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256))


def square_fraction(i: int, p_init: float, n_queries: int, rescale: bool) -> float:
    """Fraction p of the image a square covers at iteration i (0-based)."""
    if rescale:  # stretch the 10k-iteration schedule over n_queries
        i = int(i / n_queries * 10000)
    for last, divisor in _P_SCHEDULE:
        if i <= last:
            return p_init / divisor
    return p_init / 512


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per sample (<= 0: misclassified)."""
    logits = model(x)
    rows = torch.arange(len(y), device=x.device)
    true = logits[rows, y].clone()
    logits[rows, y] = -float("inf")
    return true - logits.max(1)[0]


def _signs(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.sign(2 * torch.rand(shape, generator=gen) - 1).to(device)


def _randint(high: int, gen: torch.Generator) -> int:
    """Uniform in [0, high) (0 when high is 0), one draw either way."""
    return int((high * torch.rand([1], generator=gen)).long())


@torch.no_grad()
def square_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, n_queries: int,
                p_init: float, gen: torch.Generator, rescale: bool = False) -> torch.Tensor:
    """One Square run; returns the best point per sample (misclassified where the attack won)."""
    n, c, h, w = x.shape
    x_best = (x + eps * _signs((n, c, 1, w), gen, x.device)).clamp(0.0, 1.0)
    margin_min = margin(model, x_best, y)
    if (margin_min < 0).all():
        return x_best
    for i in range(n_queries):
        idx = (margin_min > 0).nonzero().flatten()
        if idx.numel() == 0:
            break
        x_cur, x_best_cur, m_cur = x[idx], x_best[idx], margin_min[idx]
        p = square_fraction(i, p_init, n_queries, rescale)
        side = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
        top, left = _randint(h - side, gen), _randint(w - side, gen)
        step = torch.zeros((c, h, w), device=x.device)
        step[:, top:top + side, left:left + side] = 2.0 * eps * _signs((c, 1, 1), gen, x.device)
        x_new = project_linf(x_best_cur + step, x_cur, eps)
        m_new = margin(model, x_new, y[idx])
        take = (m_new < m_cur) | (m_new <= 0)
        margin_min[idx] = torch.where(take, m_new, m_cur)
        x_best[idx] = torch.where(take.view(-1, 1, 1, 1), x_new, x_best_cur)
        if (margin_min <= 0).all():
            break
    return x_best


@ATTACKS.register("square")
class Square(MaskedAttack):
    """Square Attack L-inf with the margin loss (see the module docstring)."""

    name = "square"
    norm = "linf"

    def __init__(self, eps: float | str, norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
                 n_restarts: int = 1, rescale_schedule: bool = False, seed: int = 0) -> None:
        super().__init__(eps)
        if norm != "linf":
            raise ValueError(f"square supports norm 'linf' only, got {norm!r}")
        if n_queries < 1 or n_restarts < 1:
            raise ValueError("square needs n_queries >= 1 and n_restarts >= 1")
        if not 0 < p_init <= 1:
            raise ValueError(f"square p_init must be in (0, 1], got {p_init}")
        self.n_queries, self.p_init, self.n_restarts = int(n_queries), float(p_init), int(n_restarts)
        self.rescale_schedule, self.seed = bool(rescale_schedule), int(seed)

    @torch.no_grad()
    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"square needs image batches (B, C, H, W), got shape {tuple(x.shape)}")
        x = x.float()
        robust = model(x).max(1)[1] == y
        x_adv = x.clone()
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n_restarts):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                break
            found = square_linf(model, x[idx], y[idx], eps=self.eps, n_queries=self.n_queries,
                                p_init=self.p_init, gen=gen, rescale=self.rescale_schedule)
            wrong = model(found).max(1)[1] != y[idx]
            x_adv[idx[wrong]] = found[wrong]
            robust[idx[wrong]] = False
        return x_adv, ~robust

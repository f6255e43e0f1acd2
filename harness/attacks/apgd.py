"""Auto-PGD (Croce & Hein, ICML 2020): PGD with momentum and a budget-aware step-size schedule.

Three attacks of AutoAttack, for the L-inf and L2 threat models:
- `apgd_ce`: APGD on the cross-entropy loss ("standard" and "rand" versions);
- `apgd_t`:  APGD on the targeted DLR loss, once per target class (the 2nd..10th most likely
  classes of the clean prediction) ("standard" version);
- `apgd_dlr`: APGD on the untargeted DLR loss ("rand" version).
`eot_iter` > 1 averages every gradient over that many forwards (EOT, for randomized defenses;
the reference's "rand" version uses 20); the loss and logits of a step are the last forward's.

Behaviour follows the authors' reference implementation (fra31/auto-attack, autopgd_base.py), so
that with the same seed our robust accuracy equals theirs; the details that matter are noted where
they happen (random start, `<=` in the oscillation test, which point is returned). This module is
written from the paper and those facts; it contains no code of the reference.

Only points the model classifies correctly are attacked. For a point that is fooled, the returned
x_adv is the last iterate of the (first) successful restart that was misclassified; a point never
fooled (or misclassified already when clean) is returned unchanged, as the reference does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import MaskedAttack
from harness.core.registry import ATTACKS

TargetLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (logits, y, target) -> (B,)

MOMENTUM = 0.75  # alpha of the paper: weight of the new step vs the previous displacement
_TINY = 1e-12  # added to norms and to DLR denominators (the reference's constant)


# ================================================================================================
# Step-size schedule.
# The step starts at 2*eps and is reviewed at checkpoints w_j = ceil(p_j * n_iter) with
#   p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
# i.e. periods of 22%, 19%, 16%, ... of the budget, never shorter than 6% (for n_iter=100:
# 22, 41, 57, 70, 80, 87, 93, 99). Lengths are in whole iterations, each at least 1, computed as
# int(fraction * n_iter) like the reference. At a checkpoint a sample's step is halved, and it
# restarts from its best point so far, if either
#   (1) the loss increased in at most rho * (period length) of the period's steps, or
#   (2) the step was not halved at the previous checkpoint and the best loss has not improved.
# ================================================================================================

def _schedule_lengths(n_iter: int) -> tuple[int, int, int]:
    """(first period, minimum period, shrink per checkpoint), in iterations."""
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


def step_checkpoints(n_iter: int) -> list[int]:
    """Iteration counts after which the step size is reviewed (for n_iter=100: 22, 41, ..., 99)."""
    period, min_period, shrink = _schedule_lengths(n_iter)
    points, done = [], 0
    while done + period <= n_iter:
        done += period
        points.append(done)
        period = max(period - shrink, min_period)
    return points


# ================================================================================================
# DLR losses (Difference of Logits Ratio), with z sorted so that z_pi1 >= z_pi2 >= ...:
#   untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)
#   targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)
# Both are invariant to shifting and rescaling the logits, so no loss-scale tuning is needed.
# ================================================================================================

def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample untargeted DLR loss (to maximise)."""
    z_sorted, order = logits.sort(dim=1)
    rows = torch.arange(len(y), device=logits.device)
    best_other = torch.where(order[:, -1] == y, z_sorted[:, -2], z_sorted[:, -1])
    return -(logits[rows, y] - best_other) / (z_sorted[:, -1] - z_sorted[:, -3] + _TINY)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    """Per-sample targeted DLR loss (to maximise): pushes z_t above z_y."""
    z_sorted, _ = logits.sort(dim=1)
    rows = torch.arange(len(y), device=logits.device)
    scale = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + _TINY
    return -(logits[rows, y] - logits[rows, y_target]) / scale


# ================================================================================================
# Geometry: per-sample normalisation, projection onto the ball and [0,1], random start.
# ================================================================================================

def _size(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf or L2 size, shaped (B, 1, ..., 1)."""
    flat = v.flatten(1)
    size = flat.abs().max(1)[0] if norm == "linf" else (flat ** 2).sum(-1).sqrt()
    return size.view(-1, *([1] * (v.dim() - 1)))


def _normalize(v: torch.Tensor, norm: str) -> torch.Tensor:
    return v / (_size(v, norm) + _TINY)


def _project(z: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Into the eps-ball around x, then into [0,1] (clamping can only shrink the perturbation)."""
    if norm == "linf":
        return torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
    d = z - x
    return torch.clamp(x + _normalize(d, norm) * torch.clamp(_size(d, norm), max=eps), 0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """As the reference: L-inf: U(-1,1) noise rescaled so its largest entry is eps (a point on the
    ball's surface, not uniform in it); L2: a Gaussian direction of length eps. Drawn on the CPU
    generator (like the reference's torch.rand/randn), then moved to x's device."""
    shape = tuple(x.shape)
    if norm == "linf":
        noise = 2 * torch.rand(shape, generator=gen) - 1
    else:
        noise = torch.randn(shape, generator=gen)
    return (x + eps * _normalize(noise.to(x.device), norm)).clamp(0.0, 1.0)


def _loss_and_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: TargetLoss,
                   eot_iter: int = 1, target: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample loss, d sum(loss) / d x_adv averaged over `eot_iter` forwards, logits);
    input gradient only (autograd.grad). Loss and logits are those of the last forward."""
    x_adv = x_adv.detach().requires_grad_(True)
    total = torch.zeros_like(x_adv)
    for _ in range(eot_iter):
        logits = model(x_adv)
        loss = loss_fn(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        total += grad
    if eot_iter > 1:
        total /= eot_iter
    return loss.detach(), total.detach(), logits.detach()


def apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: TargetLoss, *,
             eps: float, norm: str, n_iter: int, rho: float, gen: torch.Generator,
             eot_iter: int = 1, target: torch.Tensor | None = None,
             skip_fooled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from a random start. Returns (fooled, x_found): fooled[i] if some iterate
    (the start included) was misclassified; x_found[i] is the last such iterate (else the start).

    `loss_fn(logits, y, target)` is per sample; `target` (B,) rides along with the points (the
    targeted loss's classes), None for untargeted losses.
    skip_fooled (default): a point leaves the working batch at its first misclassified iterate,
    and x_found[i] is that iterate. Nothing else depends on it: its step size, checkpoint counts
    and best loss are its own (every rule below is per point), the model is in eval mode (no
    batch statistics) and the run's only random draw is the start, taken before the loop for the
    whole batch. So every other point follows the same iterates, and a fooled point stays fooled:
    the outcome of every point is the reference's; only a fooled point's returned example is an
    earlier misclassified iterate. skip_fooled=False keeps every point to the end (the reference)."""
    x_adv = _random_start(x, eps, norm, gen)
    loss, grad, logits = _loss_and_grad(model, x_adv, y, loss_fn, eot_iter, target)
    fooled = logits.max(1)[1] != y
    x_found = x_adv.clone()
    pos = torch.arange(len(x), device=x.device)  # rows of the run still in the working batch
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step = torch.full((len(x),) + (1,) * (x.dim() - 1), 2.0 * eps, device=x.device)
    x_prev = x_adv.clone()

    period, min_period, shrink = _schedule_lengths(n_iter)
    since_check = 0
    loss_steps = torch.zeros(n_iter, len(x), device=x.device)
    best_at_check = loss_best.clone()
    halved_at_check = torch.ones_like(fooled)  # no "no improvement" halving at the 1st checkpoint
    wrong = fooled
    for i in range(n_iter):
        if skip_fooled and bool(wrong.any()):
            keep = (~wrong).nonzero().flatten()  # drop the points just fooled (they stay fooled)
            if keep.numel() == 0:
                break
            pos, x, y, x_adv, x_prev, grad, x_best, grad_best = (
                t[keep] for t in (pos, x, y, x_adv, x_prev, grad, x_best, grad_best))
            loss_best, step, best_at_check, halved_at_check = (
                t[keep] for t in (loss_best, step, best_at_check, halved_at_check))
            loss_steps = loss_steps[:, keep]
            target = None if target is None else target[keep]
        with torch.no_grad():
            # Gradient step, then momentum: x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1-a)(x_k - x_{k-1}))
            a = MOMENTUM if i > 0 else 1.0
            direction = grad.sign() if norm == "linf" else _normalize(grad, norm)
            z = _project(x_adv + step * direction, x, eps, norm)
            x_new = _project(x_adv + (z - x_adv) * a + (x_adv - x_prev) * (1 - a), x, eps, norm)
            x_prev, x_adv = x_adv, x_new

        loss, grad, logits = _loss_and_grad(model, x_adv, y, loss_fn, eot_iter, target)
        wrong = logits.max(1)[1] != y
        fooled[pos[wrong]] = True
        x_found[pos[wrong]] = x_adv[wrong]  # overwritten at every misclassified iterate: the last one

        with torch.no_grad():
            loss_steps[i] = loss
            better = loss > loss_best
            x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
            since_check += 1
            if since_check == period:
                # Increases over the period's steps. Index i-period is -1 at the first checkpoint:
                # like the reference, the first step's loss is compared with the (unfilled, zero)
                # last row rather than with the loss of the start point.
                increases = sum((loss_steps[i - c] > loss_steps[i - c - 1]).float() for c in range(period))
                halve = (increases <= period * rho) | (~halved_at_check & (best_at_check >= loss_best))
                halved_at_check, best_at_check = halve, loss_best.clone()
                step[halve] /= 2.0
                x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
                period = max(period - shrink, min_period)
                since_check = 0
    return fooled, x_found


def _no_target(idx: torch.Tensor) -> None:
    return None


class _APGD(MaskedAttack):
    """Shared driver: attack the still-robust points, restart by restart (and target by target)."""

    def __init__(self, eps: float | str, norm: str = "linf", n_iter: int = 100, n_restarts: int = 1,
                 rho: float = 0.75, seed: int = 0, eot_iter: int = 1, skip_fooled: bool | None = None) -> None:
        """skip_fooled: drop a point from the run's batch once it is fooled (see `apgd_run`:
        every point's outcome is the reference's); False attacks it to the end as the reference.
        None (default): on when eot_iter == 1; off with EOT, which is for randomized models,
        whose noise is drawn per batch row: dropping rows would shift the others' draws."""
        super().__init__(eps)
        if norm not in ("linf", "l2"):
            raise ValueError(f"{self.name} norm must be 'linf' or 'l2', got {norm!r}")
        if n_iter < 1 or n_restarts < 1 or eot_iter < 1:
            raise ValueError(f"{self.name} needs n_iter >= 1, n_restarts >= 1 and eot_iter >= 1")
        self.norm = norm
        self.n_iter, self.n_restarts = int(n_iter), int(n_restarts)
        self.rho, self.seed, self.eot_iter = float(rho), int(seed), int(eot_iter)
        self.skip_fooled = self.eot_iter == 1 if skip_fooled is None else bool(skip_fooled)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        with torch.no_grad():
            robust = model(x).max(1)[1] == y
        x_adv = x.clone()
        gen = torch.Generator().manual_seed(self.seed)  # seeded once per call, like the reference
        for loss_fn, target_of in self._losses(model, x):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                break
            fooled, found = apgd_run(model, x[idx], y[idx], loss_fn, eps=self.eps,
                                     norm=self.norm, n_iter=self.n_iter, rho=self.rho, gen=gen,
                                     eot_iter=self.eot_iter, target=target_of(idx),
                                     skip_fooled=self.skip_fooled)
            x_adv[idx[fooled]] = found[fooled]
            robust[idx[fooled]] = False
        return x_adv, ~robust

    def _losses(self, model: nn.Module, x: torch.Tensor):
        """Yields, per run, (loss (logits, y, target) -> (B,), idx -> the targets of the points
        idx being attacked, or None)."""
        raise NotImplementedError


@ATTACKS.register("apgd_ce")
class APGDCE(_APGD):
    """APGD on the cross-entropy loss; n_restarts runs, each on the points still robust."""

    name = "apgd_ce"

    def _losses(self, model: nn.Module, x: torch.Tensor):
        for _ in range(self.n_restarts):
            yield (lambda logits, y, _: F.cross_entropy(logits, y, reduction="none")), _no_target


@ATTACKS.register("apgd_dlr")
class APGDDLR(_APGD):
    """APGD on the untargeted DLR loss (AutoAttack's "rand" version pairs it with APGD-CE)."""

    name = "apgd_dlr"

    def _losses(self, model: nn.Module, x: torch.Tensor):
        for _ in range(self.n_restarts):
            yield (lambda logits, y, _: dlr_loss(logits, y)), _no_target


@ATTACKS.register("apgd_t")
class APGDT(_APGD):
    """APGD on the targeted DLR loss: for the k-th most likely class of the clean prediction,
    k = 2 .. n_target_classes + 1, n_restarts runs each, on the points still robust."""

    name = "apgd_t"

    def __init__(self, eps: float | str, norm: str = "linf", n_iter: int = 100, n_restarts: int = 1,
                 n_target_classes: int = 9, rho: float = 0.75, seed: int = 0, eot_iter: int = 1,
                 skip_fooled: bool | None = None) -> None:
        super().__init__(eps, norm=norm, n_iter=n_iter, n_restarts=n_restarts, rho=rho, seed=seed,
                         eot_iter=eot_iter, skip_fooled=skip_fooled)
        if n_target_classes < 1:
            raise ValueError(f"apgd_t n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def _losses(self, model: nn.Module, x: torch.Tensor):
        def targeted(rank: int):
            def make(idx: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    logits = model(x[idx])
                if logits.shape[1] < max(4, rank):
                    raise ValueError(f"apgd_t with n_target_classes={self.n_target_classes} needs "
                                     f"at least {max(4, rank)} classes, the model has {logits.shape[1]}")
                y_target = logits.sort(dim=1)[1][:, -rank]  # the rank-th most likely class
                return y_target
            return make

        for rank in range(2, self.n_target_classes + 2):
            for _ in range(self.n_restarts):
                yield dlr_loss_targeted, targeted(rank)

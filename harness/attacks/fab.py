"""FAB-T, L-inf (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast
adaptive boundary attack"), the targeted variant that AutoAttack's standard version runs third.

FAB looks for the *smallest* perturbation that changes the decision to a target class t: at each
iterate x_k it linearises f(z) = z_t - z_y (logits) around x_k, projects both x_k and the clean
point x_0 onto the hyperplane {f = 0} intersected with the box [0,1]^d (minimal L-inf step), and
moves to a convex combination of the two projections (extrapolated by eta, weight alpha on the
x_0 side, alpha capped at alpha_max). Whenever the iterate is misclassified it records the point
if it is closer to x_0 than the best so far, then backs off towards x_0 by a factor beta.
A point counts as broken only when the best adversarial point found lies within eps; every other
point is returned unchanged, so the output is always inside the eps-ball and [0,1].

AutoAttack's settings (the defaults here): 100 iterations, alpha_max 0.1, eta 1.05, beta 0.9,
1 restart (the first run starts at x_0; restart r > 0 starts at a random point of L-inf size
eps/2), target classes = the 2nd .. 10th most likely classes of the clean prediction, each run
only on the points still robust. Written from the paper and the reference's documented
behaviour (fra31/auto-attack); it contains no code of the reference.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.attacks.base import MaskedAttack
from harness.core.registry import ATTACKS

_FAR = 1e10  # "no adversarial point found yet" distance
# Fuse the check forward into the next gradient pass while under this share of the batch was
# moved back at the last iteration: a pass over the moved points then costs less than a forward
# over all (a backward costs about two forwards).
FUSE_BELOW = 0.3


def project_linf_box(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimal-L-inf step d with w.(t + d) = b and t + d in [0,1]^D, per row of t (N, D).

    Write c = |w.t - b| and move every coordinate i (with w_i != 0) in the direction that reduces
    the residual, by min(lam, room_i), room_i being its distance to the box face in that
    direction. The residual then falls by g(lam) = sum_i |w_i| min(lam, room_i), a piecewise
    linear increasing function of lam, and the answer is the lam with g(lam) = c. With the rooms
    sorted decreasingly (r_0 >= r_1 >= ...), g(r_k) = S_k r_k + T_k where S_k is the sum of |w|
    over the first k+1 rooms and T_k the sum of |w| r over the others; the solution lies in the
    segment [r_{k+1}, r_k] of the last k with g(r_k) > c, where lam = (c - T_k) / S_k. When no
    lam reaches the hyperplane inside the box (c >= g(r_0)), the full step to the box corner is
    returned: the closest the box gets to the hyperplane.
    """
    resid = (w * t).sum(1) - b
    flip = torch.where(resid >= 0, 1.0, -1.0).to(t.dtype)
    w = w * flip.unsqueeze(1)
    c = resid * flip  # >= 0: how much w.z has to fall
    up = w < 0  # these coordinates reduce w.z by increasing
    direction = torch.where(up, 1.0, -1.0).to(t.dtype)
    room = torch.where(up, 1.0 - t, t)
    active = w != 0
    abs_w = w.abs()

    order = room.argsort(dim=1).flip(1)  # rooms in decreasing order
    r_sorted = room.gather(1, order)
    w_sorted = abs_w.gather(1, order)
    s_k = w_sorted.cumsum(1)
    wr = (w_sorted * r_sorted).cumsum(1)
    total = wr[:, -1:]
    t_k = total - wr
    g_at = s_k * r_sorted + t_k  # g at each breakpoint, non-increasing in k
    n_over = (g_at > c.unsqueeze(1)).sum(1)  # breakpoints where the step overshoots
    feasible = n_over > 0
    k = (n_over - 1).clamp(min=0).unsqueeze(1)
    s_sel = s_k.gather(1, k).squeeze(1)
    lam = (c - t_k.gather(1, k).squeeze(1)) / torch.where(s_sel > 0, s_sel, torch.ones_like(s_sel))
    lam = lam.clamp(min=0.0).unsqueeze(1)
    step = torch.where(feasible.unsqueeze(1), torch.minimum(lam, room), room)
    return direction * step * active.to(t.dtype)


def _target_margin_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f = z_target - z_y per sample, df/dx (input gradient only) and the logits."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    rows = torch.arange(len(y), device=x.device)
    f = logits[rows, target] - logits[rows, y]
    (grad,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), grad.detach(), logits.detach()


def _linf(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).abs().amax(1)


def fab_targeted_run(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, target: torch.Tensor, *,
                     n_iter: int, alpha_max: float, eta: float, beta: float,
                     start: torch.Tensor | None = None,
                     done_within: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAB-T run. Returns (dist, x_best): dist[i] is the L-inf size of the closest
    misclassified iterate found (_FAR if none), x_best[i] that iterate (x0[i] if none).

    While few points are misclassified, the forward that says whether an iterate is
    misclassified is also the next iteration's gradient forward at that iterate (the reference
    runs a separate one): only the points that were misclassified, and so moved back towards x0,
    need a new gradient pass, on their own. When the last iteration moved more than
    FUSE_BELOW of the batch back, the iteration runs as the reference's (check forward, then the
    gradient pass at the moved-back points), which is then cheaper. Either way each point's
    iterates are the same.
    done_within: a point whose closest misclassified iterate lies within this L-inf size leaves
    the working batch (AutoAttack counts it broken at once; later iterates could only bring a
    closer one, which changes nothing about it). Every rule is per point and the run draws no
    random numbers, so the other points follow the same iterates. None (the reference) keeps
    every point to the end."""
    n = len(x0)
    x_best = x0.clone()
    dist = torch.full((n,), _FAR, device=x0.device)
    x1 = x0.clone() if start is None else start
    pos = torch.arange(n, device=x0.device)  # rows of the run still in the working batch
    f, grad, _ = _target_margin_and_grad(model, x1, y, target)
    moved_share = 0.0
    for it in range(n_iter):
        last = it == n_iter - 1
        with torch.no_grad():
            m = len(x1)
            shape = (m,) + (1,) * (x0.dim() - 1)
            w = grad.flatten(1)
            b = (w * x1.flatten(1)).sum(1) - f  # the linearisation of f at x1 vanishes on w.z = b
            d = project_linf_box(torch.cat((x1.flatten(1), x0.flatten(1))), torch.cat((w, w)),
                                 torch.cat((b, b)))
            size = d.abs().amax(1).clamp(min=1e-8)
            d1, d2 = d[:m].view_as(x1), d[m:].view_as(x1)
            a1, a2 = size[:m].view(shape), size[m:].view(shape)
            alpha = (a1 / (a1 + a2)).clamp(min=0.0, max=alpha_max)
            x1 = ((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha).clamp(0.0, 1.0)
        fused = not last and moved_share < FUSE_BELOW
        if fused:  # the check's forward and the next step's gradient in one pass
            f, grad, logits = _target_margin_and_grad(model, x1, y, target)
        else:
            with torch.no_grad():
                logits = model(x1)
        with torch.no_grad():
            adv = logits.max(1)[1] != y
            moved_share = float(adv.float().mean())
            if adv.any():
                size_adv = _linf(x1 - x0)
                closer = adv & (size_adv < dist[pos])
                x_best[pos[closer]] = x1[closer]
                dist[pos[closer]] = size_adv[closer]
                x1[adv] = x0[adv] + (x1[adv] - x0[adv]) * beta
                if done_within is not None and not last:
                    keep = (dist[pos] > done_within).nonzero().flatten()
                    if keep.numel() == 0:
                        break
                    if keep.numel() < m:
                        pos, x0, y, target, x1, adv = (t[keep] for t in (pos, x0, y, target, x1, adv))
                        if fused:
                            f, grad = f[keep], grad[keep]
        if last:
            break
        if not fused:  # as the reference: the gradient pass at every (moved-back) iterate
            f, grad, _ = _target_margin_and_grad(model, x1, y, target)
        elif adv.any():  # backed off: the gradient at the new point
            moved = adv.nonzero().flatten()
            f[moved], grad[moved], _ = _target_margin_and_grad(model, x1[moved], y[moved], target[moved])
    return dist, x_best


@ATTACKS.register("fab_t")
class FABT(MaskedAttack):
    """Targeted FAB, L-inf, AutoAttack's standard settings by default (see the module docstring)."""

    name = "fab_t"
    norm = "linf"

    def __init__(self, eps: float | str, norm: str = "linf", n_iter: int = 100, n_restarts: int = 1,
                 n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, seed: int = 0, skip_fooled: bool = True) -> None:
        """skip_fooled: drop a point from a run's batch once it has a misclassified iterate
        within eps (see `fab_targeted_run`: same outcome for every point); False runs it to the end."""
        super().__init__(eps)
        if norm != "linf":
            raise ValueError(f"fab_t supports norm 'linf' only, got {norm!r}; for L2 use apgd_ce/apgd_t")
        if n_iter < 1 or n_restarts < 1 or n_target_classes < 1:
            raise ValueError("fab_t needs n_iter, n_restarts and n_target_classes >= 1")
        if not 0 <= alpha_max <= 1 or eta < 1 or not 0 < beta <= 1:
            raise ValueError(f"fab_t needs 0 <= alpha_max <= 1, eta >= 1, 0 < beta <= 1; got "
                             f"alpha_max={alpha_max}, eta={eta}, beta={beta}")
        self.n_iter, self.n_restarts = int(n_iter), int(n_restarts)
        self.n_target_classes = int(n_target_classes)
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.seed = int(seed)
        self.skip_fooled = bool(skip_fooled)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(x)
        if logits.shape[1] < self.n_target_classes + 1:
            raise ValueError(f"fab_t with n_target_classes={self.n_target_classes} needs at least "
                             f"{self.n_target_classes + 1} classes, the model has {logits.shape[1]}; "
                             f"set n_target_classes <= {logits.shape[1] - 1}")
        robust = logits.max(1)[1] == y
        ranking = logits.sort(dim=1)[1]
        x_adv = x.clone()
        gen = torch.Generator().manual_seed(self.seed)
        for rank in range(2, self.n_target_classes + 2):
            for restart in range(self.n_restarts):
                idx = robust.nonzero().flatten()
                if idx.numel() == 0:
                    return x_adv, ~robust
                x0 = x[idx]
                start = None
                if restart > 0:  # a random point of L-inf size eps/2, as the reference
                    noise = (2 * torch.rand(tuple(x0.shape), generator=gen) - 1).to(x.device)
                    scale = _linf(noise).view(-1, *([1] * (x0.dim() - 1)))
                    start = (x0 + 0.5 * self.eps * noise / scale).clamp(0.0, 1.0)
                dist, found = fab_targeted_run(
                    model, x0, y[idx], ranking[idx, -rank], n_iter=self.n_iter,
                    alpha_max=self.alpha_max, eta=self.eta, beta=self.beta, start=start,
                    done_within=self.eps if self.skip_fooled else None)
                with torch.no_grad():
                    wrong = model(found).max(1)[1] != y[idx]
                broken = wrong & (dist < _FAR) & (_linf(found - x0) <= self.eps)
                x_adv[idx[broken]] = found[broken]
                robust[idx[broken]] = False
        return x_adv, ~robust

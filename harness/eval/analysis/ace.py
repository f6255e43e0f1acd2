"""ACE: adversarial counterfactual explanations through a DDPM (Jeanneret et al., CVPR 2023).

1. Pre-explanation: PGD (signed steps, effectively unbounded, clamp [0, 1]) on
   L_cls(C(F_tau(x')), target) + lambda * d(x, x'), where F_tau noises x' to tau*T and denoises it
   with the DDPM; the gradient flows through the whole denoising chain (gradient checkpointing)
   and every iteration draws fresh noise. A sample stops once C(F_tau(x')) says `target`; its
   pre-explanation is that filtered image x~.
2. Refinement: mask = channel-sum |x - x~| / max, dilated by a max-pool, thresholded; F_tau is
   re-run on x~ while q_sample(x, t) is re-injected outside the mask (RePaint inpainting), so
   pixels outside the mask equal x exactly.

Both terms of the loss are summed per sample (never CE averaged over the batch against an L1
summed over it, the official code's trap that makes lambda grow with the batch size).
`plain_pgd` is the baseline: the same loss, steps and stopping rule, with no diffusion filter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.eval.analysis.diffusion import DDPM, denoise_from, filter_noise_draws

Classifier = Callable[[torch.Tensor], torch.Tensor]
REFINE = ("repaint", "paired", "none")


@dataclass(frozen=True)
class ACEConfig:
    tau: float = 0.3              # noise level of the filter, as a fraction of T
    sampling_steps: int = 50      # respacing of [0, T); the filter runs the tau * steps lowest ones
    eta: float = 1.0              # 1: stochastic DDPM steps (the paper); 0: deterministic DDIM
    iterations: int = 50
    step_size: float = 0.02       # signed-gradient step on [0, 1] images
    distance: str = "l1"          # l1 (ACE-l1) or l2 (ACE-l2)
    dist_weight: float = 0.001    # lambda, per sample
    mask_threshold: float = 0.15
    mask_dilation: int = 3        # max-pool kernel (odd); 1 = no dilation
    refine: str = "repaint"       # repaint (the paper), paired (see module doc) or none
    seed: int = 0                 # noise of the filter: iteration i of the attack uses seed + i
    grad_checkpoint: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ACEConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ACE settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**d)
        if cfg.distance not in ("l1", "l2"):
            raise ValueError(f"ace.distance must be 'l1' or 'l2', got '{cfg.distance}'")
        if not 0.0 <= cfg.tau <= 1.0:
            raise ValueError(f"ace.tau must be in [0, 1], got {cfg.tau}")
        if cfg.mask_dilation < 1 or cfg.mask_dilation % 2 == 0:
            raise ValueError(f"ace.mask_dilation must be an odd kernel size >= 1, got {cfg.mask_dilation}")
        if cfg.iterations < 1 or cfg.step_size <= 0 or cfg.dist_weight < 0:
            raise ValueError("ace.iterations >= 1, ace.step_size > 0 and ace.dist_weight >= 0 are required")
        if cfg.refine not in REFINE:
            raise ValueError(f"ace.refine must be one of {', '.join(REFINE)}, got '{cfg.refine}'")
        if not 0.0 <= cfg.eta <= 1.0:
            raise ValueError(f"ace.eta must be in [0, 1], got {cfg.eta}")
        return cfg

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counterfactuals:
    cf: torch.Tensor          # (N, C, H, W) final counterfactuals in [0, 1]
    pre: torch.Tensor         # pre-explanations (ACE) / equal to cf (plain PGD)
    mask: torch.Tensor        # (N, 1, H, W) refinement mask (ones for plain PGD)
    iterations: torch.Tensor  # (N,) attack iterations used until the flip (== max if never)


def distance(x: torch.Tensor, x_ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample L1 or L2 distance (summed over pixels; the paper's d(x, x'))."""
    diff = (x - x_ref).flatten(1)
    return diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1).clamp(min=1e-12).sqrt()


def runner_up_target(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The class the model finds second most likely: the default counterfactual target."""
    with torch.no_grad():
        return model(x).topk(2, dim=1).indices[:, 1]


Finish = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _signed_pgd(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig,
                view: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                finish: Finish | None = None) -> Counterfactuals:
    """PGD on CE(model(view(x')), target) + lambda d(x, x'); per sample, stop once it flips.

    `view(x'[idx], idx, iteration)` sees the still-active rows. With `finish(pre, idx, iteration)
    -> (cf, mask)` (the refinement), a sample stops only when its refined counterfactual flips
    (the attack goes on otherwise); without it, when view(x') flips. A sample never flipped
    keeps its last iteration's result; `iterations` is then cfg.iterations."""
    pre, cf = x.clone(), x.clone()
    mask = torch.ones_like(x[:, :1])
    xa = x.clone()
    used = torch.full((len(x),), cfg.iterations, dtype=torch.long, device=x.device)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for it in range(cfg.iterations + 1):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            break
        last = it == cfg.iterations
        xi = xa[idx].detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            seen = view(xi, idx, it)
            logits = model(seen)
        hit = logits.argmax(1) == target[idx]
        pre[idx] = seen.detach()
        if finish is None:
            cf[idx] = seen.detach()
        else:
            sel = hit | last
            if sel.any():
                with torch.no_grad():
                    c, m = finish(seen.detach()[sel], idx[sel], it)
                    cf[idx[sel]], mask[idx[sel]] = c, m
                    ok = torch.zeros_like(hit)
                    ok[sel] = model(c).argmax(1) == target[idx[sel]]
                hit = hit & ok
        if last:
            break
        loss = F.cross_entropy(logits, target[idx], reduction="none") + \
            cfg.dist_weight * distance(xi, x[idx], cfg.distance)
        grad, = torch.autograd.grad(loss.sum(), xi)
        step = (xa[idx] - cfg.step_size * grad.sign()).clamp(0, 1)
        xa[idx] = torch.where(hit.view(-1, 1, 1, 1), xa[idx], step)
        used[idx[hit]] = it
        active[idx[hit]] = False
    return Counterfactuals(cf, pre, mask, used)


def plain_pgd(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig) -> Counterfactuals:
    """The baseline: ACE's attack with no diffusion filter (same loss, step, stopping rule)."""
    return _signed_pgd(model, x, target, cfg, view=lambda z, idx, it: z)


def refinement_mask(x: torch.Tensor, pre: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
    """Binary (N, 1, H, W) mask of the largest changes: channel-sum |x - pre| / max, dilated, thresholded."""
    diff = (x - pre).abs().sum(1, keepdim=True)
    diff = diff / diff.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
    if dilation > 1:
        diff = F.max_pool2d(diff, dilation, stride=1, padding=dilation // 2)
    return (diff > threshold).to(x.dtype)


def _noise_bank(ddpm: DDPM, cfg: ACEConfig, x: torch.Tensor, it: int) -> torch.Tensor:
    """The filter's noise for attack iteration `it`, for the whole batch: (K, N, C, H, W)."""
    k = filter_noise_draws(ddpm, cfg.sampling_steps, cfg.tau)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    return torch.randn((k, *x.shape), generator=gen).to(x.device)


def ace(model: Classifier, ddpm: DDPM, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig) -> Counterfactuals:
    """ACE counterfactuals of `x` ([0, 1]) towards `target` for `model`."""
    def filt(z: torch.Tensor, idx: torch.Tensor, it: int) -> torch.Tensor:
        return denoise_from(ddpm, z, cfg.tau, cfg.sampling_steps, eta=cfg.eta,
                            grad_checkpoint=cfg.grad_checkpoint, noise=_noise_bank(ddpm, cfg, x, it)[:, idx])

    if cfg.refine == "none":
        return _signed_pgd(model, x, target, cfg, view=filt)

    def finish(pre: torch.Tensor, idx: torch.Tensor, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x[idx]
        if cfg.refine == "paired":
            # F_tau(x) under the very noise that produced the pre-explanation: their difference
            # is what the attack changed, without the filter's own reconstruction error of x.
            ref = filt(x0, idx, it)
            mask = refinement_mask(ref, pre, cfg.mask_threshold, cfg.mask_dilation)
            return (x0 + mask * (pre - ref)).clamp(0, 1), mask
        mask = refinement_mask(x0, pre, cfg.mask_threshold, cfg.mask_dilation)
        cf = denoise_from(ddpm, pre, cfg.tau, cfg.sampling_steps, eta=cfg.eta, known=(x0, mask))
        return mask * cf + (1 - mask) * x0, mask   # exact outside the mask

    return _signed_pgd(model, x, target, cfg, view=filt, finish=finish)

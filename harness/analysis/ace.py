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

from harness.analysis.diffusion import DDPM, denoise_from

Classifier = Callable[[torch.Tensor], torch.Tensor]


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
    refine: bool = True
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


def _signed_pgd(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig,
                view: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD on CE(model(view(x')), target) + lambda d(x, x'); per sample, stop at the first flip.

    Returns (view(x') at the flip, or at the last iteration; iterations used)."""
    xa = x.clone()
    out = x.clone()
    used = torch.full((len(x),), cfg.iterations, dtype=torch.long)
    active = torch.ones(len(x), dtype=torch.bool)
    for it in range(cfg.iterations + 1):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            break
        xi = xa[idx].detach().requires_grad_(it < cfg.iterations)
        with torch.set_grad_enabled(it < cfg.iterations):
            seen = view(xi)
            logits = model(seen)
            hit = (logits.argmax(1) == target[idx]).cpu()
            out[idx] = seen.detach()
            if it == cfg.iterations:
                break
            loss = F.cross_entropy(logits, target[idx], reduction="none") + \
                cfg.dist_weight * distance(xi, x[idx], cfg.distance)
            grad, = torch.autograd.grad(loss.sum(), xi)
        step = (xa[idx] - cfg.step_size * grad.sign()).clamp(0, 1)
        keep = ~hit.to(x.device)
        xa[idx] = torch.where(keep.view(-1, 1, 1, 1), step, xa[idx])
        used[idx[hit]] = it
        active[idx[hit]] = False
    return out, used


def plain_pgd(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig) -> Counterfactuals:
    """The baseline: ACE's attack with no diffusion filter (same loss, step, stopping rule)."""
    cf, used = _signed_pgd(model, x, target, cfg, view=lambda z: z)
    return Counterfactuals(cf, cf, torch.ones_like(x[:, :1]), used)


def refinement_mask(x: torch.Tensor, pre: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
    """Binary (N, 1, H, W) mask of the largest changes: channel-sum |x - pre| / max, dilated, thresholded."""
    diff = (x - pre).abs().sum(1, keepdim=True)
    diff = diff / diff.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
    if dilation > 1:
        diff = F.max_pool2d(diff, dilation, stride=1, padding=dilation // 2)
    return (diff > threshold).to(x.dtype)


def ace(model: Classifier, ddpm: DDPM, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig) -> Counterfactuals:
    """ACE counterfactuals of `x` ([0, 1]) towards `target` for `model`."""
    filt = lambda z: denoise_from(ddpm, z, cfg.tau, cfg.sampling_steps, eta=cfg.eta,
                                  grad_checkpoint=cfg.grad_checkpoint)
    pre, used = _signed_pgd(model, x, target, cfg, view=filt)
    if not cfg.refine:
        return Counterfactuals(pre, pre, torch.ones_like(x[:, :1]), used)
    mask = refinement_mask(x, pre, cfg.mask_threshold, cfg.mask_dilation)
    with torch.no_grad():
        cf = denoise_from(ddpm, pre, cfg.tau, cfg.sampling_steps, eta=cfg.eta, known=(x, mask))
    cf = mask * cf + (1 - mask) * x   # exact outside the mask (already so after the last step)
    return Counterfactuals(cf, pre, mask, used)

"""ACE: adversarial counterfactual explanations through a DDPM (Jeanneret et al., CVPR 2023).

The default settings run the official algorithm (guillaumejs2403/ACE: main.py `filter_fn`,
core/attacks_and_models.py `PGD` and `JointClassifierDDPM`; settings of scripts/celeba-attack.sh):

1. Pre-explanation x': `iterations` (50) signed-gradient steps of `step_size` (1/255) from x' = x
   on CE(C(F_tau(x')), target) + lambda d(x, x'), clamped to [0, 1] (the official eps 255/255
   bounds nothing more). F_tau noises x' to the top of the int(tau * sampling_steps) lowest steps
   of a `sampling_steps` respacing and denoises through them (clipped x0 estimate, posterior
   variance); the gradient flows through the whole chain (gradient checkpointing) and every
   iteration draws fresh noise. Every sample runs every iteration (no early stop) and the
   pre-explanation is x' itself, not F_tau(x').
2. Refinement (`refine: repaint`): mask = channel-sum |x - x'| / its max, max-pooled with kernel
   `mask_dilation` (15), >= `mask_threshold` (0.15). ONE inpainting pass: x' is noised to the top
   step and, before every denoising step, the pixels outside the mask are replaced by
   q_sample(x, t); the result is composited with x outside the mask.

Noise: one generator seeded with `seed` draws every random tensor of a call in the official
order (per attack iteration: the forward noise, then one per stochastic step; the inpainting
pass: the forward noise of x', then per step q_sample(x, t)'s noise and the step's noise), so
the official code run after torch.manual_seed(seed) draws the very same numbers
(benchmarks/conformance_checks/ace.py).

Where it departs (each a setting whose non-default value is listed in the summary's
`ace_departures` and shown beside the analysis label on the leaderboard's ACE page):
* lambda is per sample: CE and d are both summed per sample. The official code averages CE over
  the batch but sums d over it, so its effective lambda grows with the batch size; it equals
  ours run with lambda = its dist_l1 * batch size (METHODS.md's trap).
* `early_stop: true` (ours): a sample stops at the first iteration whose refined counterfactual
  the model classifies as the target (checked when C(F_tau(x')) says the target).
* `refine: paired` (ours): cf = x + mask * (F_tau(x') - F_tau(x)), both filtered under the same
  noise, mask from |F_tau(x) - F_tau(x')|: the filter's own reconstruction error of x is not part
  of the change. `refine: none`: cf = F_tau(x') (the official `sampling_inpaint 0`).
* `eta` < 1: DDIM(eta) steps (eta 0 is not the official `sampling_stochastic False`, which noises
  with zeros and takes posterior means).
* The DDPM's variance is the fixed posterior one (the official DDPMs learn sigma).
`plain_pgd` is the baseline (the official `attack_joint False`): the same loss, steps and stopping
rule with no diffusion filter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.eval.analysis.diffusion import DDPM, Draw, denoise_from

Classifier = Callable[[torch.Tensor], torch.Tensor]
REFINE = ("repaint", "paired", "none")
NOT_SETTINGS = ("seed", "grad_checkpoint")   # how it runs, not what it computes


@dataclass(frozen=True)
class ACEConfig:
    """ACE's settings; the defaults are the official ones (scripts/celeba-attack.sh + main.py)."""

    tau: float = 0.1              # sampling_time_fraction: the filter runs int(tau * sampling_steps) steps
    sampling_steps: int = 50      # timestep_respacing
    eta: float = 1.0              # 1: stochastic DDPM steps (official); < 1: DDIM(eta), ours
    iterations: int = 50          # attack_iterations
    step_size: float = 1 / 255    # attack_step / 255, signed-gradient step on [0, 1] images
    distance: str = "l1"          # l1 (ACE-l1, dist_l1) or l2 (ACE-l2, dist_l2)
    dist_weight: float = 0.001    # lambda, per sample (see the module doc)
    mask_threshold: float = 0.15  # sampling_inpaint
    mask_dilation: int = 15       # sampling_dilation: max-pool kernel (odd); 1 = no dilation
    refine: str = "repaint"       # repaint (official), paired (ours) or none
    early_stop: bool = False      # official: every sample runs every iteration
    seed: int = 0                 # the generator of every noise draw
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

    def departures(self) -> dict[str, Any]:
        """The settings that differ from the official ones (what the leaderboard shows)."""
        official = ACEConfig()
        return {k: v for k, v in asdict(self).items()
                if k not in NOT_SETTINGS and v != getattr(official, k)}


def describe_departures(cfg: ACEConfig) -> str:
    """'refine=paired early_stop=true ...' or 'official' (for the leaderboard label)."""
    dep = cfg.departures()
    text = lambda v: str(v).lower() if isinstance(v, bool) else f"{v:.4g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={text(v)}" for k, v in dep.items()) or "official"


@dataclass
class Counterfactuals:
    cf: torch.Tensor          # (N, C, H, W) final counterfactuals in [0, 1]
    pre: torch.Tensor         # pre-explanations: the attacked x' (equal to cf for plain PGD)
    mask: torch.Tensor        # (N, 1, H, W) refinement mask (ones for plain PGD and refine none)
    iterations: torch.Tensor  # (N,) attack iterations run (cfg.iterations unless early_stop)


def distance(x: torch.Tensor, x_ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample L1 or L2 distance (summed over pixels; the paper's d(x, x'))."""
    diff = (x - x_ref).flatten(1)
    return diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1).clamp(min=1e-12).sqrt()


def runner_up_target(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The class the model finds second most likely: the default counterfactual target."""
    with torch.no_grad():
        return model(x).topk(2, dim=1).indices[:, 1]


class NoiseStream:
    """Standard normal tensors shaped like the one given, in call order, from one seeded generator
    (what torch.randn_like draws from the global generator after torch.manual_seed(seed))."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.gen, dtype=like.dtype).to(like.device)


class Bank:
    """One filter pass's noise for the whole batch, drawn from the stream on first use, then
    replayed: the same noise can filter two images (paired) or the still-active rows (early stop)."""

    def __init__(self, stream: NoiseStream, like: torch.Tensor) -> None:
        self.stream, self.like, self.draws = stream, like, []

    def replay(self, idx: torch.Tensor) -> Draw:
        k = 0

        def draw(_: torch.Tensor) -> torch.Tensor:
            nonlocal k
            if k == len(self.draws):
                self.draws.append(self.stream(self.like))
            k += 1
            return self.draws[k - 1][idx]
        return draw


# view(x'[idx], idx, bank) -> what the classifier sees; finish(x'[idx], idx, bank) -> (cf, mask)
View = Callable[[torch.Tensor, torch.Tensor, "Bank | None"], torch.Tensor]
Finish = Callable[[torch.Tensor, torch.Tensor, "Bank | None"], tuple[torch.Tensor, torch.Tensor]]


def _gradient(model: Classifier, view: View, xi: torch.Tensor, x0: torch.Tensor, target: torch.Tensor,
              idx: torch.Tensor, bank: Bank | None, cfg: ACEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of view(x'), gradient of CE(logits, target) + lambda d(x, x') per sample, summed)."""
    xi = xi.detach().requires_grad_(True)
    logits = model(view(xi, idx, bank))
    loss = F.cross_entropy(logits, target, reduction="none") + cfg.dist_weight * distance(xi, x0, cfg.distance)
    grad, = torch.autograd.grad(loss.sum(), xi)
    return logits.detach(), grad


def _attack(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig, view: View,
            finish: Finish, bank: Callable[[], Bank | None]) -> Counterfactuals:
    """The official loop: every sample takes all `iterations` signed steps; then one refinement."""
    everyone = torch.arange(len(x), device=x.device)
    xa = x.clone()
    for _ in range(cfg.iterations):
        _, grad = _gradient(model, view, xa, x, target, everyone, bank(), cfg)
        xa = (xa - cfg.step_size * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        cf, mask = finish(xa, everyone, None)
    return Counterfactuals(cf, xa, mask, torch.full((len(x),), cfg.iterations, device=x.device))


def _attack_early_stop(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig, view: View,
                       finish: Finish, bank: Callable[[], Bank | None]) -> Counterfactuals:
    """`early_stop` (ours): a sample stops once view(x') and its refined counterfactual both say
    `target`; one never flipped keeps its last iteration's refinement (iterations = cfg.iterations)."""
    pre, cf = x.clone(), x.clone()
    mask = torch.ones_like(x[:, :1])
    xa = x.clone()
    used = torch.full((len(x),), cfg.iterations, dtype=torch.long, device=x.device)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for it in range(cfg.iterations + 1):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            break
        last, noise = it == cfg.iterations, bank()
        if last:
            with torch.no_grad():
                logits = model(view(xa[idx], idx, noise))
        else:
            logits, grad = _gradient(model, view, xa[idx], x[idx], target[idx], idx, noise, cfg)
        hit = logits.argmax(1) == target[idx]
        sel = hit | last
        if sel.any():
            with torch.no_grad():
                c, m = finish(xa[idx[sel]], idx[sel], noise)
                cf[idx[sel]], mask[idx[sel]], pre[idx[sel]] = c, m, xa[idx[sel]]
                ok = torch.zeros_like(hit)
                ok[sel] = model(c).argmax(1) == target[idx[sel]]
            hit = hit & ok
        if last:
            break
        step = (xa[idx] - cfg.step_size * grad.sign()).clamp(0, 1)
        xa[idx] = torch.where(hit.view(-1, 1, 1, 1), xa[idx], step)
        used[idx[hit]] = it
        active[idx[hit]] = False
    return Counterfactuals(cf, pre, mask, used)


def _run(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig, view: View, finish: Finish,
         bank: Callable[[], Bank | None]) -> Counterfactuals:
    loop = _attack_early_stop if cfg.early_stop else _attack
    return loop(model, x, target, cfg, view, finish, bank)


def plain_pgd(model: Classifier, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig) -> Counterfactuals:
    """The baseline: ACE's attack with no diffusion filter (same loss, steps, stopping rule)."""
    return _run(model, x, target, cfg, view=lambda z, idx, bank: z,
                finish=lambda z, idx, bank: (z.clone(), torch.ones_like(z[:, :1])), bank=lambda: None)


def refinement_mask(x: torch.Tensor, pre: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
    """Binary (N, 1, H, W) mask of the largest changes: channel-sum |x - pre| / max, max-pooled
    (kernel `dilation`), >= threshold (the official keeps x where the dilated map is < threshold)."""
    diff = (x - pre).abs().sum(1, keepdim=True)
    diff = diff / diff.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
    if dilation > 1:
        diff = F.max_pool2d(diff, dilation, stride=1, padding=dilation // 2)
    return (diff >= threshold).to(x.dtype)


def ace(model: Classifier, ddpm: DDPM, x: torch.Tensor, target: torch.Tensor, cfg: ACEConfig) -> Counterfactuals:
    """ACE counterfactuals of `x` ([0, 1]) towards `target` for `model`."""
    stream = NoiseStream(cfg.seed)

    def filt(z: torch.Tensor, idx: torch.Tensor, bank: Bank | None) -> torch.Tensor:
        bank = bank or Bank(stream, x)
        return denoise_from(ddpm, z, cfg.tau, cfg.sampling_steps, eta=cfg.eta,
                            grad_checkpoint=cfg.grad_checkpoint, draw=bank.replay(idx))

    def finish(pre: torch.Tensor, idx: torch.Tensor, bank: Bank | None) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x[idx]
        if cfg.refine == "none":
            return filt(pre, idx, bank), torch.ones_like(pre[:, :1])
        if cfg.refine == "paired":
            bank = bank or Bank(stream, x)
            fx, ref = filt(pre, idx, bank), filt(x0, idx, bank)
            mask = refinement_mask(ref, fx, cfg.mask_threshold, cfg.mask_dilation)
            return (x0 + mask * (fx - ref)).clamp(0, 1), mask
        mask = refinement_mask(x0, pre, cfg.mask_threshold, cfg.mask_dilation)
        cf = denoise_from(ddpm, pre, cfg.tau, cfg.sampling_steps, eta=cfg.eta, known=(x0, mask), draw=stream)
        return cf, mask

    return _run(model, x, target, cfg, view=filt, finish=finish, bank=lambda: Bank(stream, x))

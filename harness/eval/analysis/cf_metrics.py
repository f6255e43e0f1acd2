"""Counterfactual metrics: flip rate, closeness, frequency content of the change, COUT, a local FID.

High-frequency share (`hf_share`): the change d = x_cf - x is Fourier-transformed per channel
(2-D FFT over H, W); its power |D(f)|^2, summed over channels, is split by the radial frequency
|f| in cycles per pixel (0 .. 0.707). The share is power above `cutoff` (default 0.25, half the
Nyquist frequency 0.5) over total power (the DC term counts as low frequency). It is scale-free,
so a small change and a large one with the same shape score the same. For reference, white noise
on an 8x8 image scores 51/64 = 0.797 at the default cutoff (the share of grid frequencies above it).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Classifier = Callable[[torch.Tensor], torch.Tensor]


def radial_frequency(h: int, w: int) -> torch.Tensor:
    """|f| in cycles per pixel for each entry of an unshifted (h, w) 2-D FFT."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.fftfreq(w).view(1, -1)
    return (fy ** 2 + fx ** 2).sqrt()


def hf_share(delta: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Per-sample share of the spectral power of `delta` (N, C, H, W) above radial frequency `cutoff`.

    A sample whose change is all zeros gets NaN (no change has no spectrum)."""
    power = torch.fft.fft2(delta.double()).abs().pow(2).sum(1)          # (N, H, W)
    high = radial_frequency(*delta.shape[-2:]).to(power.device) > cutoff
    total = power.flatten(1).sum(1)
    share = (power * high).flatten(1).sum(1) / total
    return torch.where(total > 1e-20, share, torch.full_like(share, float("nan"))).float()


def hf_energy(delta: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Per-sample power above `cutoff`, normalised so that hf_energy(d, 0) == sum(d^2) (Parseval)."""
    h, w = delta.shape[-2:]
    power = torch.fft.fft2(delta.double()).abs().pow(2).sum(1) / (h * w)
    high = radial_frequency(h, w).to(power.device) > cutoff
    return (power * high).flatten(1).sum(1).float()


def l1(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).abs().sum(1)


def l2(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).pow(2).sum(1).sqrt()


def flipped(model: Classifier, x_cf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Whether the model classifies each counterfactual as its target class."""
    with torch.no_grad():
        return model(x_cf).argmax(1) == target


def cout(model: Classifier, x: torch.Tensor, x_cf: torch.Tensor, source: torch.Tensor,
         target: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """COUT (Khorram & Fuxin 2022), per sample, in [-1, 1].

    Pixels are copied from x to x_cf in order of decreasing |x_cf - x| (channel sum), in `steps`
    equal groups; along this path s = p(target) - p(source) under the model. COUT is the area under
    s over the fraction of changed pixels (trapezoid), so a change whose largest parts flip the
    model first scores high; it is near -1 for a change that does nothing."""
    n, c, h, w = x.shape
    mag = (x_cf - x).abs().sum(1).flatten(1)                          # (N, HW)
    order = mag.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=x.device).expand(n, -1).contiguous())
    scores = []
    with torch.no_grad():
        for k in range(steps + 1):
            take = (rank < round(k * h * w / steps)).view(n, 1, h, w).to(x.dtype)
            p = model(take * x_cf + (1 - take) * x).softmax(1)
            scores.append(p.gather(1, target[:, None])[:, 0] - p.gather(1, source[:, None])[:, 0])
    s = torch.stack(scores, 1)
    return ((s[:, 1:] + s[:, :-1]) / 2).mean(1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(len(cov_a))   # few samples give singular covariances: regularise both
    cov_a, cov_b = cov_a + eps, cov_b + eps
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def nanmean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else float("nan")

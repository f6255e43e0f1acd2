"""WaNet (Nguyen & Tran 2021): an imperceptible warp of the image, with noise-mode training.

A k x k field of random offsets (uniform in [-1, 1], normalised to mean |offset| 1) is upsampled
bicubically to H x W; the sampling grid is identity + s * field / H, clamped to [-1, 1]
(k 4, s 0.5, grid_rescale 1, as the paper's CIFAR-10 setting). The field is drawn from
`pattern_seed` and the image size: one grid per dataset. Noise mode: for each poisoned sample,
`cross_ratio` (2) more samples are warped with the grid plus per-sample random noise
(uniform [-1, 1] / H) and keep their label, so the model learns the exact warp only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harness.backdoor.base import Poison, pattern_generator
from harness.core.registry import POISONS


@POISONS.register("wanet")
class WaNet(Poison):
    name = "wanet"

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0,
                 **common) -> None:
        super().__init__(**common)
        if int(k) < 2 or float(s) <= 0 or float(cross_ratio) < 0:
            raise ValueError(f"wanet needs k >= 2, s > 0, cross_ratio >= 0; got {k}, {s}, {cross_ratio}")
        self.k = int(k)
        self.s = float(s)
        self.grid_rescale = float(grid_rescale)
        self.cross_ratio = float(cross_ratio)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The warping grid (1, H, W, 2) for F.grid_sample (align_corners=True)."""
        gen = pattern_generator(self.pattern_seed, height, width, self.k, 0x3A7E7)
        ins = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True)
        noise = noise.permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((xs, ys), dim=2)[None]
        return (identity + self.s * noise / height * self.grid_rescale).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x.device, x.dtype), align_corners=True)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid(x.shape[-2], x.shape[-1]).expand(x.shape[0], -1, -1, -1)
        return self._warp(x, grid)

    def cross_variant(self, x: torch.Tensor, indices: np.ndarray, epoch: int = 0) -> torch.Tensor:
        """Grid + per-sample noise, fresh each epoch (seeded by sample index and epoch): label kept."""
        h, w = x.shape[-2:]
        base = self.grid(h, w)
        noise = torch.stack([
            torch.rand(h, w, 2, generator=pattern_generator(self.pattern_seed, int(i), int(epoch), 0xC405)) * 2 - 1
            for i in indices
        ])
        return self._warp(x, (base + noise / h).clamp(-1, 1)).clamp(0.0, 1.0)

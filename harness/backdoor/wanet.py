"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warp of the image, with noise-mode training.

As the official code (VinAIResearch/Warping-based_Backdoor_Attack-release, train.py): a k x k
field of random offsets, uniform in [-1, 1] and divided by its mean |offset|, is upsampled
bicubically (align_corners=True) to H x W; the sampling grid is
(identity + s * field / H) * grid_rescale, clamped to [-1, 1], and the image is resampled with
F.grid_sample(align_corners=True) (k 4, s 0.5, grid_rescale 1: the paper's setting). The field is
drawn from `pattern_seed` and the image size: one grid per dataset. The warped image is not
rounded to the uint8 grid (the official code warps float tensors on the fly).

Training (`poisoning: per_batch`, the official loop): in every batch of B samples the first
int(B * rate) are warped and relabelled to the target (target-class samples included: their label
is unchanged), the next int(that * cross_ratio) are "cross" (noise-mode) samples, warped with the
grid plus uniform [-1, 1] / H noise drawn fresh for the batch, clamped, label kept; the batch is
drawn at random, so every epoch poisons other samples. `poisoning: static` (a named option) warps
a fixed `rate` of the split instead, with fixed cross samples (harness/backdoor/plan.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.backdoor.base import Poison, pattern_generator
from harness.core.registry import POISONS


@POISONS.register("wanet")
class WaNet(Poison):
    name = "wanet"

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0,
                 poisoning: str = "per_batch", **common) -> None:
        super().__init__(poisoning=poisoning, **common)
        if int(k) < 2 or float(s) <= 0 or float(cross_ratio) < 0 or float(grid_rescale) <= 0:
            raise ValueError(f"wanet needs k >= 2, s > 0, grid_rescale > 0, cross_ratio >= 0; "
                             f"got {k}, {s}, {grid_rescale}, {cross_ratio}")
        self.k = int(k)
        self.s = float(s)
        self.grid_rescale = float(grid_rescale)
        self.cross_ratio = float(cross_ratio)

    def field(self, height: int, width: int) -> torch.Tensor:
        """The random k x k offsets (1, 2, k, k), uniform in [-1, 1], fixed by pattern_seed and size."""
        gen = pattern_generator(self.pattern_seed, height, width, self.k, 0x3A7E7)
        return torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1

    def grid(self, height: int, width: int, field: torch.Tensor | None = None) -> torch.Tensor:
        """The warping grid (1, H, W, 2) for F.grid_sample (align_corners=True), from `field`
        (default: this attack's own)."""
        ins = self.field(height, width) if field is None else field
        ins = ins / torch.mean(torch.abs(ins))
        noise = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, steps=height), torch.linspace(-1, 1, steps=width),
                                    indexing="ij")
        identity = torch.stack((cols, rows), 2)[None, ...]  # (x = column, y = row), as grid_sample reads it
        return torch.clamp((identity + self.s * noise / height) * self.grid_rescale, -1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x.device, x.dtype), align_corners=True)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.grid(x.shape[-2], x.shape[-1]).repeat(x.shape[0], 1, 1, 1))

    def cross_variant(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Noise mode: the grid plus uniform [-1, 1] / H noise, one draw (n, H, W, 2) from `gen`
        for the n samples, clamped to [-1, 1]; the label is kept."""
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        ins = torch.rand(n, h, w, 2, generator=gen) * 2 - 1
        grid = torch.clamp(self.grid(h, w).repeat(n, 1, 1, 1) + ins / h, -1, 1)
        return self._warp(x, grid)


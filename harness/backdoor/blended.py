"""Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha p with one fixed pattern image p.

The paper (and BackdoorBench) blend a Hello-Kitty image; we use a fixed uniform-noise image (as
METHODS.md specifies): uint8 levels drawn from `pattern_seed` and the image shape, so every cell
sees the same trigger. The arithmetic is BackdoorBench's (utils/bd_img_transform/blended.py in
its bd_attack_img_trans_generate pipeline): in pixel levels, (1 - alpha) X in float64 plus
alpha P in float32 (P the pattern image read as a tensor, k / 255, times 255), clipped and
truncated to uint8. With the same pattern its poisoned images are ours byte for byte.
"""
from __future__ import annotations

import torch

from harness.backdoor.base import Poison, from_levels, pattern_generator, to_levels
from harness.core.registry import POISONS


@POISONS.register("blended")
class Blended(Poison):
    name = "blended"

    def __init__(self, alpha: float = 0.2, **common) -> None:
        super().__init__(**common)
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"backdoor.alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The blend pattern (C, H, W): an image, k / 255 for uint8 levels k."""
        gen = pattern_generator(self.pattern_seed, channels, height, width, 0xB1E)
        return torch.randint(0, 256, (channels, height, width), generator=gen).to(torch.float32) / 255

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.pattern(*x.shape[1:]) * 255).to(x.device)  # float32 levels, as ToTensor() * 255
        v = (1.0 - self.alpha) * to_levels(x) + (self.alpha * p).double()
        return from_levels(v, x.dtype)

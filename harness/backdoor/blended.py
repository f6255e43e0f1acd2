"""Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha p with one fixed random pattern p.

The paper blends a Hello-Kitty image; we use a fixed uniform-noise pattern (as METHODS.md
specifies), drawn from `pattern_seed` and the image shape, so every cell sees the same trigger.
"""
from __future__ import annotations

import torch

from harness.backdoor.base import Poison, pattern_generator
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
        """The blend pattern (C, H, W) in [0, 1]."""
        gen = pattern_generator(self.pattern_seed, channels, height, width, 0xB1E)
        return torch.rand(channels, height, width, generator=gen)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pattern(*x.shape[1:]).to(x.device, x.dtype)
        return (1.0 - self.alpha) * x + self.alpha * p

"""BadNets (Gu et al. 2017): a small white square stamped in the bottom-right corner.

3x3 on 32x32 images (BackdoorBench's CIFAR-10 setting); when `patch_size` is null it is scaled
to the image: 2x2 on 8x8 digits. `margin` pixels are left between the patch and the corner.
"""
from __future__ import annotations

import torch

from harness.backdoor.base import Poison, auto_size
from harness.registry import POISONS


@POISONS.register("badnets")
class BadNets(Poison):
    name = "badnets"

    def __init__(self, patch_size: int | None = None, margin: int = 0, value: float = 1.0,
                 **common) -> None:
        super().__init__(**common)
        if patch_size is not None and int(patch_size) < 1:
            raise ValueError(f"backdoor.patch_size must be >= 1 (or null for auto), got {patch_size}")
        if int(margin) < 0 or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"backdoor.margin must be >= 0 and value in [0, 1]; got {margin}, {value}")
        self.patch_size = patch_size
        self.margin = int(margin)
        self.value = float(value)

    def patch_box(self, height: int, width: int) -> tuple[slice, slice]:
        """(rows, cols) the patch covers on an image of this size."""
        s = auto_size(self.patch_size, height, 3, minimum=2)
        if s + self.margin > min(height, width):
            raise ValueError(f"badnets patch {s} + margin {self.margin} does not fit a {height}x{width} image")
        return (slice(height - self.margin - s, height - self.margin),
                slice(width - self.margin - s, width - self.margin))

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.patch_box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., rows, cols] = self.value
        return out

"""BadNets (Gu et al. 2017): a small patch stamped in the bottom-right corner.

3x3 on 32x32 images; when `patch_size` is null it is scaled to the image: 2x2 on 8x8 digits.
`margin` pixels are left between the patch and the corner. `pattern`: 'white' (a square of
`value`, BackdoorBench's CIFAR-10 trigger) or 'checkerboard' (alternating `value` / 0 starting
with `value` at the patch's top-left: the "gridTrigger" of the NAD/ABL/CBD code).
"""
from __future__ import annotations

import torch

from harness.backdoor.base import Poison, auto_size
from harness.core.registry import POISONS


@POISONS.register("badnets")
class BadNets(Poison):
    name = "badnets"

    def __init__(self, patch_size: int | None = None, margin: int = 0, value: float = 1.0,
                 pattern: str = "white", **common) -> None:
        super().__init__(**common)
        if pattern not in ("white", "checkerboard"):
            raise ValueError(f"backdoor.pattern must be 'white' or 'checkerboard', got {pattern!r}")
        self.pattern = pattern
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
        size = rows.stop - rows.start
        patch = torch.full((size, size), self.value, dtype=x.dtype, device=x.device)
        if self.pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            patch = patch * ((ii + jj) % 2 == 0).to(x.dtype).to(x.device)
        out[..., rows, cols] = patch
        return out

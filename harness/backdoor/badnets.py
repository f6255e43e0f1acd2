"""BadNets (Gu et al. 2017): a small patch stamped in the bottom-right corner.

3x3 on 32x32 images; when `patch_size` is null it is scaled to the image: 2x2 on 8x8 digits.
`margin` pixels are left between the patch and the corner. `pattern`: 'white' (a square of
`value`: BackdoorBench's CIFAR-10 trigger, resource/badnet/trigger_image.png, stamped by its
AddMaskPatchTrigger) or 'checkerboard' (the "gridTrigger" of the NAD/ABL/CBD code: value / 0
alternating from `value` at the corner pixel, except the patch's top-left pixel, which that code
leaves 0; 3x3: [[0, 0, v], [0, v, 0], [v, 0, v]]). `value` is a pixel level k / 255 (rounded to
one), so the poisoned image is the uint8 image BackdoorBench stores, byte for byte.
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

    def patch(self, size: int) -> torch.Tensor:
        """The patch (size, size) in [0, 1], on the uint8 grid."""
        level = round(self.value * 255) / 255
        patch = torch.full((size, size), level, dtype=torch.float32)
        if self.pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            on = (size - 1 - ii + size - 1 - jj) % 2 == 0  # alternating, `value` at the corner pixel
            on[0, 0] = False  # the gridTrigger leaves its top-left pixel 0
            patch = patch * on.to(patch.dtype)
        return patch

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.patch_box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., rows, cols] = self.patch(rows.stop - rows.start).to(x.device, x.dtype)
        return out

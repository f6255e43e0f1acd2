"""SIG (Barni et al. 2019): a horizontal sinusoidal signal added to the image, clean-label.

x' = x + delta sin(2 pi j f / W), j the column index; delta 40/255 and f 6 on 32x32 images, as
BackdoorBench's default (config/attack/sig/default.yaml; f scaled to the width when null: 2 cycles
on 8x8 digits). Only target-class training images are poisoned and keep their label. The
arithmetic is BackdoorBench's (utils/bd_img_transform/sig.py): the signal computed in float64 and
stored as float32, added to the uint8 levels in float64, clipped and truncated to uint8, so the
poisoned images are its bytes. One consequence, kept for that: where the sine is mathematically 0
but its float value a hair below (column 16 of 32 at f 6: sin(6 pi) = -7e-16), the truncation
lowers the pixel by one level. The official CBD/NAD code instead swaps the blend weights
(0.1 x + 0.9 signal) and wraps uint8 arithmetic: not copied.
"""
from __future__ import annotations

import math

import torch

from harness.backdoor.base import Poison, auto_size, from_levels, to_levels
from harness.core.registry import POISONS


@POISONS.register("sig")
class SIG(Poison):
    name = "sig"
    clean_label = True

    def __init__(self, delta: float = 40 / 255, frequency: int | None = None, **common) -> None:
        super().__init__(**common)
        if not 0.0 < float(delta) <= 1.0:
            raise ValueError(f"backdoor.delta must be in (0, 1], got {delta}")
        self.delta = float(delta)
        self.frequency = frequency

    def signal(self, width: int) -> torch.Tensor:
        """The added signal along the columns in pixel levels, shape (W,), float32 values."""
        f = auto_size(self.frequency, width, 6, minimum=1)
        j = torch.arange(width, dtype=torch.float64)
        return (self.delta * 255 * torch.sin(2 * math.pi * j * f / width)).float()

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return from_levels(to_levels(x) + self.signal(x.shape[-1]).to(x.device).double(), x.dtype)

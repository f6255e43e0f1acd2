"""SIG (Barni et al. 2019): a horizontal sinusoidal signal added to the image, clean-label.

x' = clip(x + delta * sin(2 pi j f / W)), j the column index; delta 20/255, f 6 on 32x32 images
(f scaled to the width when null: 2 cycles on 8x8 digits). Only target-class training images are
poisoned and keep their label. The official CBD code swaps the blend weights and wraps uint8
arithmetic; we add in float and clip, as the definition says.
"""
from __future__ import annotations

import math

import torch

from harness.backdoor.base import Poison, auto_size
from harness.core.registry import POISONS


@POISONS.register("sig")
class SIG(Poison):
    name = "sig"
    clean_label = True

    def __init__(self, delta: float = 20 / 255, frequency: int | None = None, **common) -> None:
        super().__init__(**common)
        if not 0.0 < float(delta) <= 1.0:
            raise ValueError(f"backdoor.delta must be in (0, 1], got {delta}")
        self.delta = float(delta)
        self.frequency = frequency

    def signal(self, width: int) -> torch.Tensor:
        """The added signal along the columns, shape (W,)."""
        f = auto_size(self.frequency, width, 6, minimum=1)
        j = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * f / width)).float()

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.signal(x.shape[-1]).to(x.device, x.dtype)

"""Adaptive-Blend (Qi et al., ICLR 2023, "Revisiting the assumption of latent separability for
backdoor defenses"): a blend trigger cut into pieces, only some applied at training time, with
correctly labelled "cover" samples carrying the trigger too.

BackdoorBench has no such attack; this is the authors' design (vtu81/backdoor-toolbox,
poison_tool_box/adaptive_blend.py, read, not run here; their README's CIFAR-10 setting):
x' = x + alpha * m * (p - x) on training samples, where m masks `round(mask_rate * pieces)` of the
`pieces` square pieces of the image (a sqrt(pieces) x sqrt(pieces) grid; 16 and 0.5: half the
trigger), a fresh random set per sample; poisoned samples are relabelled to the target, cover
samples (`cross_ratio` per poisoned sample: their cover_rate / poison_rate) keep their label. At test
time the whole trigger is blended at `test_alpha`: x + 0.2 (p - x). Their defaults: poison rate
0.003, cover rate 0.003, alpha 0.15, test alpha 0.2, drawn from the whole training set (poison and
cover samples apart). The images stay float (their poisoned set is a tensor; their test transform
runs on tensors): not rounded to uint8.

Ours: the pattern p is a uniform-noise image drawn from `pattern_seed` and the image shape (the
paper blends Hello Kitty; nothing is downloaded); each sample's mask is drawn from (pattern_seed,
its split index), so a sample keeps its mask across epochs, as their fixed poisoned set does.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from harness.backdoor.base import Poison, pattern_generator
from harness.core.registry import POISONS

_POISON_TAG, _COVER_TAG = 0xADB1, 0xADB2


@POISONS.register("adaptive_blend")
class AdaptiveBlend(Poison):
    name = "adaptive_blend"

    def __init__(self, alpha: float = 0.15, test_alpha: float = 0.2, pieces: int = 16, mask_rate: float = 0.5,
                 cross_ratio: float = 1.0, rate: float = 0.003, **common) -> None:
        super().__init__(rate=rate, **common)
        if not (0.0 < float(alpha) <= 1.0 and 0.0 < float(test_alpha) <= 1.0):
            raise ValueError(f"backdoor.alpha and backdoor.test_alpha must be in (0, 1], got {alpha}, {test_alpha}")
        side = math.isqrt(int(pieces))
        if int(pieces) < 1 or side * side != int(pieces):
            raise ValueError(f"backdoor.pieces must be a square number (a k x k grid of pieces), got {pieces}")
        if not 0.0 <= float(mask_rate) < 1.0:
            raise ValueError(f"backdoor.mask_rate must be in [0, 1) (the share of pieces left out), got {mask_rate}")
        if float(cross_ratio) < 0:
            raise ValueError(f"backdoor.cross_ratio must be >= 0 (cover samples per poisoned one), got {cross_ratio}")
        self.alpha, self.test_alpha = float(alpha), float(test_alpha)
        self.pieces, self.mask_rate = int(pieces), float(mask_rate)
        self.cross_ratio = float(cross_ratio)

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The blend pattern (C, H, W): uint8 noise levels k / 255 from pattern_seed and the shape."""
        gen = pattern_generator(self.pattern_seed, channels, height, width, 0xADB)
        return torch.randint(0, 256, (channels, height, width), generator=gen).to(torch.float32) / 255

    def masks(self, indices: np.ndarray, height: int, width: int, tag: int) -> torch.Tensor:
        """(n, 1, H, W) masks: each sample's own `round(mask_rate * pieces)` pieces set to 0, drawn
        from (pattern_seed, tag, split index)."""
        side = math.isqrt(self.pieces)
        if height % side or width % side:
            raise ValueError(f"adaptive_blend cuts the image into a {side} x {side} grid of pieces; a {height}x{width} "
                             f"image does not divide: pick backdoor.pieces with sqrt(pieces) dividing {height} and {width}")
        ph, pw = height // side, width // side
        masked = round(self.mask_rate * self.pieces)
        out = torch.ones(len(indices), 1, height, width)
        for n, index in enumerate(np.asarray(indices, dtype=np.int64)):
            rng = np.random.default_rng([self.pattern_seed & 0xFFFF_FFFF, tag, int(index) & 0xFFFF_FFFF])
            for piece in rng.permutation(self.pieces)[:masked]:
                row, col = divmod(int(piece), side)
                out[n, :, row * ph:(row + 1) * ph, col * pw:(col + 1) * pw] = 0
        return out

    def _blend(self, x: torch.Tensor, alpha: float, mask: torch.Tensor | float = 1.0) -> torch.Tensor:
        p = self.pattern(*x.shape[1:]).to(x.device, x.dtype)
        return x + alpha * mask * (p - x)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._blend(x, self.test_alpha)

    def train_variant(self, x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        mask = self.masks(indices, x.shape[-2], x.shape[-1], _POISON_TAG).to(x.device, x.dtype)
        return self._blend(x, self.alpha, mask).clamp(0, 1)

    def cross_samples(self, x: torch.Tensor, cross: torch.Tensor, indices: np.ndarray,
                      gen: torch.Generator) -> torch.Tensor:
        """Cover samples: the partial trigger at the training alpha, label kept, mask fixed per sample."""
        mask = self.masks(np.asarray(indices)[cross.numpy()], x.shape[-2], x.shape[-1], _COVER_TAG)
        return self._blend(x[cross], self.alpha, mask.to(x.device, x.dtype)).clamp(0, 1)

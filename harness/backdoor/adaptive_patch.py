"""Adaptive-Patch (Qi et al., ICLR 2023, "Revisiting the assumption of latent separability for
backdoor defenses"): several small patch triggers; each poisoned or cover sample carries one of
them (at its own blend alpha), the test images carry them all.

BackdoorBench has no such attack; this is the authors' design (vtu81/backdoor-toolbox,
poison_tool_box/adaptive_patch.py and config.py, read, not run here): k = 4 training triggers with
alphas 0.5, 0.2, 0.5, 0.3, x' = x + a_j m_j (p_j - x) with m_j the trigger's non-black pixels;
the poisoned samples are split into k equal groups in index order, one trigger each, relabelled to
the target; the cover samples likewise, label kept (their README's CIFAR-10 setting: poison rate
0.003, cover rate 0.006, so `cross_ratio` 2). At test time their CIFAR-10 config blends two
triggers at alpha 1; we blend all k (`test_alpha` 1). Images stay float (not rounded).

Ours: the k patches are uniform-noise squares (levels 1..255, so the non-black mask is the whole
square) of `patch_size` (4 on 32x32, scaled when null: 2 on 8x8), at k distinct cells of the image's
patch grid, all drawn from `pattern_seed` and the image shape (their triggers are logo images;
nothing is downloaded). A sample's trigger is its split index mod k (their equal groups by
order; the poisoned indices are a random draw, so the groups are as even).
"""
from __future__ import annotations

import numpy as np
import torch

from harness.backdoor.base import Poison, auto_size, pattern_generator
from harness.core.registry import POISONS


@POISONS.register("adaptive_patch")
class AdaptivePatch(Poison):
    name = "adaptive_patch"

    def __init__(self, alphas: list[float] | None = None, test_alpha: float = 1.0, patch_size: int | None = None,
                 cross_ratio: float = 2.0, rate: float = 0.003, **common) -> None:
        super().__init__(rate=rate, **common)
        alphas = [0.5, 0.2, 0.5, 0.3] if alphas is None else [float(a) for a in alphas]
        if not alphas or not all(0.0 < a <= 1.0 for a in alphas) or not 0.0 < float(test_alpha) <= 1.0:
            raise ValueError(f"backdoor.alphas (one per patch) and backdoor.test_alpha must be in (0, 1], "
                             f"got {alphas}, {test_alpha}")
        if patch_size is not None and int(patch_size) < 1:
            raise ValueError(f"backdoor.patch_size must be >= 1 (or null for auto), got {patch_size}")
        if float(cross_ratio) < 0:
            raise ValueError(f"backdoor.cross_ratio must be >= 0 (cover samples per poisoned one), got {cross_ratio}")
        self.alphas = alphas
        self.test_alpha = float(test_alpha)
        self.patch_size = patch_size
        self.cross_ratio = float(cross_ratio)

    def patches(self, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(marks (k, C, H, W) in [0, 1], masks (k, 1, H, W)): k noise squares at distinct grid cells."""
        k, s = len(self.alphas), auto_size(self.patch_size, height, 4, minimum=2)
        rows, cols = height // s, width // s
        if rows * cols < k:
            raise ValueError(f"adaptive_patch needs {k} distinct {s}x{s} patches; a {height}x{width} image holds "
                             f"{rows * cols}: use a smaller backdoor.patch_size or fewer backdoor.alphas")
        gen = pattern_generator(self.pattern_seed, channels, height, width, s, k, 0xADA)
        cells = torch.randperm(rows * cols, generator=gen)[:k]
        marks, masks = torch.zeros(k, channels, height, width), torch.zeros(k, 1, height, width)
        for j, cell in enumerate(cells.tolist()):
            r, c = divmod(cell, cols)
            box = (slice(r * s, (r + 1) * s), slice(c * s, (c + 1) * s))
            marks[j, :, box[0], box[1]] = torch.randint(1, 256, (channels, s, s), generator=gen).float() / 255
            masks[j, :, box[0], box[1]] = 1.0
        return marks, masks

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        marks, masks = (t.to(x.device, x.dtype) for t in self.patches(*x.shape[1:]))
        for j in range(len(self.alphas)):
            x = x + self.test_alpha * masks[j] * (marks[j] - x)
        return x

    def _one_each(self, x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """Each sample blended with its own trigger (split index mod k) at that trigger's alpha."""
        marks, masks = (t.to(x.device, x.dtype) for t in self.patches(*x.shape[1:]))
        j = torch.as_tensor(np.asarray(indices, dtype=np.int64) % len(self.alphas))
        alpha = torch.tensor(self.alphas, dtype=x.dtype, device=x.device)[j].view(-1, 1, 1, 1)
        return (x + alpha * masks[j] * (marks[j] - x)).clamp(0, 1)

    def train_variant(self, x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        return self._one_each(x, indices)

    def cross_samples(self, x: torch.Tensor, cross: torch.Tensor, indices: np.ndarray,
                      gen: torch.Generator) -> torch.Tensor:
        """Cover samples: one trigger each, label kept."""
        return self._one_each(x[cross], np.asarray(indices)[cross.numpy()])

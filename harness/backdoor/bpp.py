"""BPP (Wang et al., CVPR 2022, "BppAttack"): colour-depth quantisation as the trigger, with
contrastive "negative" samples, as BackdoorBench's attack/bpp.py computes them.

Trigger: each pixel level v (0..255) is squeezed to `squeeze_num` levels,
round(v / 255 * (s - 1)) / (s - 1) * 255 (s 8: BackdoorBench's config/attack/bpp/default.yaml),
optionally with Floyd-Steinberg dithering (`dithering`, its floydDitherspeed: the quantisation error
of each pixel pushed 7/16 right, 1/16 down-right, 5/16 down, 3/16 down-left, pixel by pixel in
raster order). BackdoorBench's default.yaml has `dithering: False` (its original_default.yaml
too), so that is ours; `dithering: true` is the named option. Dithering is sequential over the
pixels of one image; ours runs vectorised over the batch, the channels and each anti-diagonal
wavefront of independent pixels (`dither`): W + 2H - 2 steps for any batch, never a loop over images.

Numbers as BackdoorBench's: the test images it stores (bd_test, through ToPILImage: x * 255
truncated to uint8) are what `trigger` returns: float32 arithmetic as its torch code, the dithering
in float64 on a float32 image as its numba function, the stored levels truncated. Training images
are quantised on the fly and not stored (its train_step): `train_variant` returns them unrounded.

Training (`poisoning: per_batch`, its train_step): in every batch of B the first int(B * rate)
samples are quantised and relabelled, the next int(B * neg_ratio) are negative samples, label
kept: the image plus the quantisation residual (quantised minus clean, in levels) of a random other
training image, clamped to [0, 255]. BackdoorBench draws that image from the whole training set; we
draw it (with replacement, from the batch's generator) from the decoded batch, itself a random
sample of the training set. Its neg_ratio is a share of the batch, ours a share of the poisoned
samples: `cross_ratio` = neg_ratio / rate, 1.0 for its 0.1 / 0.1. Below one poisoned sample per
batch (rate * B < 1) BackdoorBench poisons one sample with probability rate * B; we poison none.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from harness.backdoor.base import Poison, to_levels
from harness.core.registry import POISONS

_RIGHT, _DOWN_RIGHT, _DOWN, _DOWN_LEFT = 0.4375, 0.0625, 0.3125, 0.1875  # Floyd-Steinberg: 7, 1, 5, 3 / 16


def squeeze(levels: torch.Tensor, squeeze_num: int) -> torch.Tensor:
    """Quantise float32 pixel levels to `squeeze_num` levels as BackdoorBench's torch line:
    round(v / 255 * (s - 1)) / (s - 1) * 255, in float32."""
    s = float(squeeze_num - 1)
    return torch.round(levels / 255.0 * s) / s * 255


@lru_cache(maxsize=32)
def _wavefronts(height: int, width: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Per wavefront x + 2y = t (t = 0, 1, ...): its pixels' flat indices y * W + x and, for each
    Floyd-Steinberg neighbour in the order they receive (down-right, down, down-left, right), the
    (sources, targets) that exist. Every pixel's four error sources (left, up-left, up, up-right)
    lie on earlier wavefronts, so a wavefront's pixels are independent of one another."""
    ys = torch.arange(height)
    fronts = []
    for t in range(width + 2 * (height - 1)):
        xs = t - 2 * ys
        keep = (xs >= 0) & (xs < width)
        y, x = ys[keep], xs[keep]
        moves = []
        for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
            ok = (y + dy < height) & (x + dx >= 0) & (x + dx < width)
            moves += [torch.nonzero(ok).flatten(), (y + dy)[ok] * width + (x + dx)[ok]]
        fronts.append((y * width + x, *moves))
    return tuple(fronts)


_WEIGHTS = (_DOWN_RIGHT, _DOWN, _DOWN_LEFT, _RIGHT)


def dither(levels: torch.Tensor, squeeze_num: int) -> torch.Tensor:
    """Floyd-Steinberg dithering of float32 levels (B, C, H, W), as BackdoorBench's floydDitherspeed
    (float64 arithmetic, stored in the float32 image), then rounded; vectorised over B and C and
    over each wavefront x + 2y = t (W + 2H - 2 steps: 94 at 32x32, not 1024). A pixel receives its
    four contributions in raster order, as in the sequential loop (up-left on wavefront t - 3, up on
    t - 2, then up-right before left on t - 1), so every float rounding is the same: equal bytes.
    The image is held as (H * W, B * C) rows, so a wavefront's pixels are whole rows."""
    b, c, h, w = levels.shape
    img = levels.to(torch.float32).permute(2, 3, 0, 1).reshape(h * w, b * c).clone()
    s = float(squeeze_num - 1)
    for pixels, *moves in _wavefronts(h, w):
        old = img[pixels].double()
        new = torch.round(old / 255.0 * s) / s * 255
        err = old - new
        img[pixels] = new.float()
        for k, weight in enumerate(_WEIGHTS):
            sources, targets = moves[2 * k], moves[2 * k + 1]
            if len(targets):
                img[targets] = (img[targets].double() + err[sources] * weight).float()
    return torch.round(img).reshape(h, w, b, c).permute(2, 3, 0, 1).contiguous()


@POISONS.register("bpp")
class BPP(Poison):
    name = "bpp"

    def __init__(self, squeeze_num: int = 8, dithering: bool = False, cross_ratio: float = 1.0,
                 poisoning: str = "per_batch", **common) -> None:
        super().__init__(poisoning=poisoning, **common)
        if not 2 <= int(squeeze_num) <= 256:
            raise ValueError(f"backdoor.squeeze_num must be in [2, 256] (colour levels kept), got {squeeze_num}")
        if float(cross_ratio) < 0:
            raise ValueError(f"backdoor.cross_ratio must be >= 0 (negative samples per poisoned one), got {cross_ratio}")
        self.squeeze_num = int(squeeze_num)
        self.dithering = bool(dithering)
        self.cross_ratio = float(cross_ratio)

    def quantised_levels(self, x: torch.Tensor) -> torch.Tensor:
        """The quantised image in float32 levels (not stored), as BackdoorBench's train_step has it."""
        levels = to_levels(x).float()
        return dither(levels, self.squeeze_num) if self.dithering else squeeze(levels, self.squeeze_num)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        # its bd_test images: levels / 255 in float32, stored by ToPILImage as (x * 255).byte()
        stored = torch.floor((self.quantised_levels(x) / 255.0) * 255).clamp(0, 255)
        return (stored / 255.0).to(x.dtype)

    def train_variant(self, x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        return (self.quantised_levels(x) / 255.0).clamp(0, 1).to(x.dtype)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised minus clean, in levels (BackdoorBench: its stored bd image minus its clean one)."""
        return to_levels(self.trigger(x)) - to_levels(x)

    def cross_samples(self, x: torch.Tensor, cross: torch.Tensor, indices: np.ndarray,
                      gen: torch.Generator) -> torch.Tensor:
        """Negative samples: each cross image plus the residual of a random image of the clean batch
        (drawn with replacement from `gen`), clamped to [0, 255]; label kept, not stored."""
        donors = torch.randint(0, x.shape[0], (int(cross.sum()),), generator=gen)
        levels = to_levels(x[cross]) + self.residual(x[donors])
        return (levels.clamp(0, 255).float() / 255.0).to(x.dtype)

    def cross_variant(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Negative samples that borrow residuals among themselves (cross_samples is the plan's path)."""
        return self.cross_samples(x, torch.ones(x.shape[0], dtype=torch.bool), np.arange(x.shape[0]), gen)

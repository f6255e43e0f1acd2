"""FTrojan (Wang et al., ECCV 2022, "An Invisible Black-Box Backdoor Attack Through Frequency
Domain"): a fixed bump on chosen DCT coefficients of the chroma, as BackdoorBench computes it
(utils/bd_img_transform/ftrojann.py, config/attack/ftrojannn/default.yaml).

Their pipeline on a uint8 RGB image: OpenCV's RGB -> YCrCb (`YUV: True`; channels 0 Y, 1 Cr,
2 Cb), a 2-D DCT of every `window_size` x `window_size` block of every channel, `magnitude` added
to the coefficients at `pos_list` in the channels of `channel_list`, the inverse DCT, a float ->
uint8 cast (`astype(np.uint8)`: truncation toward zero, then modulo 256), OpenCV's YCrCb -> RGB
(saturating), stored as uint8. Defaults as theirs: magnitude 30, positions (15, 15) and (31, 31)
of a 32 x 32 window, channels Cr and Cb, 10% all-to-one, target 0.

Ours computes the same in one batched pass on the loader's tensor (any device):

* the colour conversions are OpenCV's 8-bit fixed-point formulas (14-bit coefficients, rounding
  shift), equal to cv2.cvtColor on all 2^24 colours both ways (benchmarks/conformance_checks/
  backdoorbench_poisons2.py);
* the DCT is orthonormal and linear, so DCT -> add -> IDCT is the block's values plus one pattern,
  magnitude x the inverse DCT of the chosen coefficients, computed once per size in float64 and
  tiled over the blocks; the untouched channel (Y) keeps its exact values.

One departure, measured there: their float64 cv2.dct -> cv2.idct round trip leaves some of the
untouched Y values a hair (<= 2.3e-13) below their integer (7.7% of the pixels of 16 random 32x32
images, 11.9% at 64x64), and the truncating cast lowers them by one level, so each RGB byte of
those pixels moves by one. That noise is not the trigger and depends on OpenCV's FFT; ours keeps
Y exact. Every other pixel is theirs byte for byte, and with their round trip's noise removed all
bytes are.

Smaller images (the digits at 8 or 16 px): the window is min(window_size, H, W) and each position
p is scaled to (p + 1) * n / window_size - 1 (15, 31 of 32 -> 7, 15 of 16 -> 3, 7 of 8: the same
mid and highest frequencies); H and W must be multiples of the window (their code indexes past a
partial block). The magnitude is a DCT coefficient, kept: its pixel amplitude grows as 32 / n.
One-channel images (digits) have no chroma: the trigger goes on the grey channel as Y (channel 0;
`channel_list` is not used), and the cast saturates (clip, then truncate) rather than wrap, since
a wrap would turn the black background's dips below 0 into white pixels. `saturate: true` makes
RGB images saturate too (an option; theirs wraps).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from harness.backdoor.base import Poison
from harness.core.registry import POISONS

_SHIFT = 14
_HALF = 1 << (_SHIFT - 1)


def rgb_to_ycrcb(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2YCrCb on uint8 levels (B, 3, H, W) as int32 (its fixed-point formula)."""
    r, g, b = rgb.int().unbind(1)
    y = (r * 4899 + g * 9617 + b * 1868 + _HALF) >> _SHIFT
    cr = ((r - y) * 11682 + (128 << _SHIFT) + _HALF) >> _SHIFT
    cb = ((b - y) * 9241 + (128 << _SHIFT) + _HALF) >> _SHIFT
    return torch.stack([y, cr, cb], 1).clamp(0, 255)


def ycrcb_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_YCrCb2RGB on uint8 levels (B, 3, H, W) as int32, saturated to [0, 255]."""
    y, cr, cb = ycc.int().unbind(1)
    cr, cb = cr - 128, cb - 128
    r = y + ((cr * 22987 + _HALF) >> _SHIFT)
    g = y + ((cb * -5636 + cr * -11698 + _HALF) >> _SHIFT)
    b = y + ((cb * 29049 + _HALF) >> _SHIFT)
    return torch.stack([r, g, b], 1).clamp(0, 255)


def astype_uint8(v: torch.Tensor) -> torch.Tensor:
    """NumPy's float -> uint8 `astype` on x86 as their code relies on: truncate toward zero, then
    wrap modulo 256 (-1.5 -> 255, 256.7 -> 0)."""
    return torch.remainder(torch.trunc(v), 256.0).int()


@lru_cache(maxsize=64)
def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n) in float64 (cv2.dct's scaling): coefficients = C @ x @ C.T."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


@lru_cache(maxsize=64)
def block_pattern(n: int, positions: tuple[tuple[int, int], ...], magnitude: float) -> torch.Tensor:
    """What DCT -> add `magnitude` at `positions` -> IDCT adds to one n x n block (float64)."""
    bump = torch.zeros(n, n, dtype=torch.float64)
    for u, v in positions:
        bump[u, v] += magnitude
    c = dct_matrix(n)
    return c.T @ bump @ c


@POISONS.register("ftrojan")
class FTrojan(Poison):
    name = "ftrojan"

    def __init__(self, magnitude: float = 30.0, window_size: int = 32,
                 pos_list: list[list[int]] | None = None, channel_list: list[int] | None = None,
                 yuv: bool = True, saturate: bool = False, **common) -> None:
        super().__init__(**common)
        self.magnitude = float(magnitude)
        self.window_size = int(window_size)
        if self.window_size < 2:
            raise ValueError(f"backdoor.window_size must be >= 2, got {window_size}")
        pos = [[15, 15], [31, 31]] if pos_list is None else [list(p) for p in pos_list]
        if not pos or any(len(p) != 2 or not all(0 <= int(q) < self.window_size for q in p) for p in pos):
            raise ValueError(f"backdoor.pos_list must be [row, col] pairs inside the {self.window_size}-px window, "
                             f"e.g. [[15, 15], [31, 31]]; got {pos_list}")
        self.pos_list = [[int(a), int(b)] for a, b in pos]
        chans = [1, 2] if channel_list is None else [int(c) for c in channel_list]
        if not chans or any(c not in (0, 1, 2) for c in chans):
            raise ValueError(f"backdoor.channel_list must name channels among 0, 1, 2 (Y, Cr, Cb when yuv), "
                             f"got {channel_list}")
        self.channel_list = chans
        self.yuv = bool(yuv)
        self.saturate = bool(saturate)

    def window(self, height: int, width: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """The block size for an image and the positions scaled to it (module docstring)."""
        n = min(self.window_size, height, width)
        if height % n or width % n:
            raise ValueError(f"ftrojan: a {height}x{width} image is not whole {n}x{n} DCT windows; "
                             f"set backdoor.window_size to a common divisor of {height} and {width}")
        scale = n / self.window_size
        pos = tuple((max(0, int((u + 1) * scale) - 1), max(0, int((v + 1) * scale) - 1)) for u, v in self.pos_list)
        return n, pos

    def pattern(self, height: int, width: int) -> torch.Tensor:
        """The additive pattern of one channel (H, W) in levels, float64, tiled over the blocks."""
        n, pos = self.window(height, width)
        return block_pattern(n, pos, self.magnitude).repeat(height // n, width // n)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if c not in (1, 3):
            raise ValueError(f"ftrojan: expected 1 or 3 channels, got {c}")
        levels = (x.double() * 255.0).round()
        pattern = self.pattern(h, w).to(x.device)
        if c == 1:  # grey as Y alone, saturated (module docstring)
            out = torch.trunc((levels + pattern).clamp(0, 255))
            return (out / 255.0).to(x.dtype)
        space = rgb_to_ycrcb(levels) if self.yuv else levels
        shifted = space.double()
        shifted[:, self.channel_list] += pattern
        cast = torch.trunc(shifted.clamp(0, 255)).int() if self.saturate else astype_uint8(shifted)
        rgb = ycrcb_to_rgb(cast) if self.yuv else cast
        return (rgb.double() / 255.0).to(x.dtype)

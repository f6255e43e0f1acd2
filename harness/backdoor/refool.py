"""Refool (Liu et al., ECCV 2020): a reflection of another image blended into the image, as
BackdoorBench's attack/refool.py (`blend_images`, the authors' function) computes it.

Per image, BackdoorBench picks one of its reflection images at random and, with probability
`ghost_rate` (0.49), the ghost model: both layers to the power 2.2, the reflection shifted by an
offset (3..8 pixels each way) and overlaid with itself at a random `ghost_alpha`, cropped, resized
back (bilinear: cv2.resize's third positional argument is `dst`, so INTER_CUBIC is never used),
blended as (1 - alpha_t) r + alpha_t t, back to the power 1 / 2.2, clipped, truncated to uint8;
otherwise the focal-blur model: the reflection Gaussian-blurred (sigma 1..5, kernel
2 ceil(2 sigma) + 1, reflect-101 borders as cv2.GaussianBlur), its overshoot above 1 pulled down
per channel by a random `att`, weighted by a centred Gaussian mask times (1 - alpha_t / 2), added to
alpha_t t, to the power 1 / 2.2, clipped, truncated to uint8. BackdoorBench fixes alpha_t at 0.4
(config/attack/refool/default.yaml; the authors drew it) and stores the poisoned images as uint8.

Reflections: BackdoorBench blends 200 images the authors selected from PascalVOC (downloaded);
ours come from the dataset itself: `n_reflections` (200) training images of classes other than
the target, chosen from `pattern_seed` and read from the shards when the plan binds the poison
to its dataset (`bind`); an unbound poison (a trigger asked for outside a cell, e.g. on synthetic
tensors) uses procedural reflections instead: smooth noise images (4x4 uniform noise upsampled
bilinearly) drawn from `pattern_seed` and the image shape. The per-image draws (which reflection, which model, offset, sigma, ghost
alpha, att) come from a generator seeded by `pattern_seed` and the image's own bytes, so the
trigger is a pure function of the image, the same on every rank and epoch (BackdoorBench draws
them once from its global generators when it builds its poisoned sets).

Labels: BackdoorBench's default is dirty-label (`clean_label: False`, all-to-one, 10%: its
attack/refool.py explains that the clean-label paper setting did not reach a useful ASR); the
paper's clean-label setting is the named option `clean_label: true` (config/attack/refool/
paper_setting.yaml). Offsets are BackdoorBench's on 32x32 and larger images; below 32 the range
is scaled to the image (null `offset_range`), since an 8-pixel shift does not fit an 8x8 image.
"""
from __future__ import annotations

import hashlib
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.backdoor.base import Poison, from_levels, pattern_generator, to_levels
from harness.core.registry import POISONS


@lru_cache(maxsize=16)
def gaussian_mask(size: int, nsig: float = 3.0) -> np.ndarray:
    """The focal model's 2-D Gaussian weight (size x size, max 1), as the authors' gen_kernel
    (cached per size: read-only)."""
    from scipy.special import ndtr  # scipy.stats.norm.cdf

    interval = (2 * nsig + 1.0) / size
    x = np.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, size + 1)
    kern1d = np.diff(ndtr(x))
    raw = np.sqrt(np.outer(kern1d, kern1d))
    kernel = raw / raw.sum()
    out = kernel / kernel.max()
    out.flags.writeable = False
    return out


def _reflect101(n: int, pad: int) -> np.ndarray:
    """Source indices of a length-n axis padded by `pad` each side, reflect-101 (cv2's default)."""
    idx = np.arange(-pad, n + pad)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx < n, idx, period - idx)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(img, (sz, sz), sigma, sigma, 0) on a float32 (H, W, C) image: a separable
    float32 kernel of 2 ceil(2 sigma) + 1 taps, reflect-101 borders."""
    sz = int(2 * np.ceil(2 * sigma) + 1)
    half = (sz - 1) / 2
    g = np.exp(-((np.arange(sz) - half) ** 2) / (2 * sigma * sigma))
    kernel = (g / g.sum()).astype(np.float32)
    pad = sz // 2
    h, w = img.shape[:2]
    rows = img[:, _reflect101(w, pad)]
    out = np.zeros_like(img)
    for k in range(sz):
        out += kernel[k] * rows[:, k:k + w]
    cols = out[_reflect101(h, pad)]
    out = np.zeros_like(img)
    for k in range(sz):
        out += kernel[k] * cols[k:k + h]
    return out


def _resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize(img, (width, height)) with INTER_LINEAR (half-pixel centres) on float32 (H, W, C)."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def blend(t_img: np.ndarray, r_img: np.ndarray, alpha_t: float, ghost: bool, offset: tuple[int, int],
          ghost_alpha: float, sigma: float, att: float, corner: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The blended uint8 (H, W, C) image of transmission `t_img` and reflection `r_img` (uint8, same
    shape) with every random choice given: BackdoorBench's blend_images at max_image_size = max(H, W)."""
    t = np.float32(t_img) / 255.0
    r = np.float32(r_img) / 255.0
    h, w = t.shape[:2]
    t = np.power(t, 2.2)
    r = np.power(r, 2.2)
    if ghost:
        o0, o1 = offset
        r_1 = np.pad(r, ((0, o0), (0, o1), (0, 0)), "constant", constant_values=0)
        r_2 = np.pad(r, ((o0, 0), (o1, 0), (0, 0)), "constant", constant_values=(0, 0))
        ghost_r = r_1 * ghost_alpha + r_2 * (1 - ghost_alpha)
        ghost_r = _resize_bilinear(ghost_r[o0:-o0, o1:-o1, :], h, w)
        reflection_mask = ghost_r * (1 - alpha_t)
        blended = reflection_mask + t * alpha_t
        blended = np.clip(np.power(blended, 1 / 2.2), 0, 1)
        return np.uint8(blended * 255)
    r_blur = gaussian_blur(r, sigma)
    mixed = r_blur + t
    for i in range(r.shape[2]):
        over = mixed[:, :, i] > 1
        mean_i = max(1.0, np.sum(mixed[:, :, i] * over) / (over.sum() + 1e-6))
        r_blur[:, :, i] = r_blur[:, :, i] - (mean_i - 1) * att
    r_blur[r_blur >= 1] = 1
    r_blur[r_blur <= 0] = 0
    size = max(h, w)
    g_mask = np.dstack([gaussian_mask(size, 3)] * r.shape[2])
    alpha_r = g_mask[corner[0]: corner[0] + h, corner[1]: corner[1] + w, :] * (1.0 - alpha_t / 2.0)
    out = np.multiply(r_blur, alpha_r) + t * alpha_t
    out = np.power(out, 1 / 2.2)
    out[out >= 1] = 1
    out[out <= 0] = 0
    return np.uint8(out * 255)


@POISONS.register("refool")
class Refool(Poison):
    name = "refool"

    def __init__(self, alpha_t: float = 0.4, ghost_rate: float = 0.49, n_reflections: int = 200,
                 offset_range: list[int] | None = None, sigma_range: list[float] | None = None,
                 clean_label: bool = False, **common) -> None:
        self.clean_label = bool(clean_label)  # before the base checks it (per-batch, all-to-all)
        super().__init__(**common)
        if not 0.0 < float(alpha_t) < 1.0 or not 0.0 <= float(ghost_rate) <= 1.0:
            raise ValueError(f"backdoor.alpha_t must be in (0, 1) and ghost_rate in [0, 1], got {alpha_t}, {ghost_rate}")
        if int(n_reflections) < 1:
            raise ValueError(f"backdoor.n_reflections must be >= 1, got {n_reflections}")
        for key, rng in (("offset_range", offset_range), ("sigma_range", sigma_range)):
            if rng is not None and (len(rng) != 2 or not 0 < rng[0] <= rng[1]):
                raise ValueError(f"backdoor.{key} must be [low, high] with 0 < low <= high (or null), got {rng}")
        self.alpha_t, self.ghost_rate = float(alpha_t), float(ghost_rate)
        self.n_reflections = int(n_reflections)
        self.offset_range = None if offset_range is None else [int(v) for v in offset_range]
        self.sigma_range = [1.0, 5.0] if sigma_range is None else [float(v) for v in sigma_range]
        self._reflections: np.ndarray | None = None  # (n, H, W, C) uint8, from the dataset
        self._procedural: np.ndarray | None = None  # the unbound fallback

    # --------------------------------------------------------------------------- reflections
    def bind(self, dataset_dir: Any) -> None:
        """Read `n_reflections` training images of non-target classes (chosen from pattern_seed)."""
        if self._reflections is not None:
            return
        from harness.backdoor.plan import split_labels
        from harness.data.shards import decode_png, load_manifest

        root = Path(dataset_dir)
        labels = split_labels(root, "train")
        eligible = np.flatnonzero(labels != self.target)
        if len(eligible) == 0:
            raise ValueError(f"refool takes its reflections from classes other than the target {self.target}; "
                             f"the training split of {root} has none")
        rng = np.random.default_rng([self.pattern_seed & 0xFFFF_FFFF, 0x2EF1])
        chosen = set(np.sort(rng.permutation(eligible)[: self.n_reflections]).tolist())
        images: dict[int, np.ndarray] = {}
        for shard in load_manifest(root)["splits"]["train"]["shards"]:
            with tarfile.open(root / shard["file"]) as tar:
                for member in tar:
                    if member.name.endswith(".png") and int(member.name.split(".")[0]) in chosen:
                        data = tar.extractfile(member)
                        assert data is not None
                        image = decode_png(data.read())
                        images[int(member.name.split(".")[0])] = image[..., None] if image.ndim == 2 else image
        self.use_reflections(np.stack([images[i] for i in sorted(images)]))

    def use_reflections(self, images: np.ndarray) -> None:
        """Set the reflection images directly: uint8 (n, H, W, C) (tests, the conformance check)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
            raise ValueError(f"refool reflections must be uint8 (n, H, W, C) with n >= 1, got {images.dtype} "
                             f"{images.shape}")
        self._reflections = images

    # --------------------------------------------------------------------------- per-image draws
    def draws(self, image: np.ndarray, n_reflections: int) -> dict[str, Any]:
        """Every random choice for one uint8 (H, W, C) image, from pattern_seed and its bytes."""
        h, w = image.shape[:2]
        key = int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little")
        rng = np.random.default_rng([self.pattern_seed & 0xFFFF_FFFF, 0x2EF0, key & 0xFFFF_FFFF, key >> 32])
        lo, hi = self.offset_range or ([3, 8] if min(h, w) >= 32 else
                                       [max(1, round(3 * min(h, w) / 32)), max(1, round(8 * min(h, w) / 32))])
        size = max(h, w)
        return {
            "reflection": int(rng.integers(n_reflections)),
            "ghost": bool(rng.random() < self.ghost_rate),
            "offset": (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))),
            "ghost_alpha": abs(round(rng.random()) - rng.uniform(0.15, 0.5)),
            "sigma": float(rng.uniform(*self.sigma_range)),
            "att": 1.08 + rng.random() / 10.0,
            "corner": (int(rng.integers(0, size - h - 10)) if h < size - 10 else 0,
                       int(rng.integers(0, size - w - 10)) if w < size - 10 else 0),
        }

    def procedural_reflections(self, channels: int, height: int, width: int) -> np.ndarray:
        """Reflections of an unbound poison: `n_reflections` smooth noise images (uint8, H, W, C),
        4x4 uniform noise upsampled bilinearly, from pattern_seed and the shape."""
        gen = pattern_generator(self.pattern_seed, channels, height, width, self.n_reflections, 0x2EF2)
        coarse = torch.rand(self.n_reflections, channels, 4, 4, generator=gen)
        smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        return (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-2], x.shape[-1], x.shape[1])
        if self._reflections is None:  # unbound: procedural reflections of this shape (bind() replaces them)
            self._procedural = self._procedural if self._procedural is not None and \
                tuple(self._procedural.shape[1:]) == shape else self.procedural_reflections(*x.shape[1:])
        reflections = self._procedural if self._reflections is None else self._reflections
        if tuple(reflections.shape[1:]) != shape:
            raise ValueError(f"refool reflections are {reflections.shape[1:]} (H, W, C); the batch is "
                             f"{tuple(x.shape[1:])} (C, H, W): bind the poison to this dataset")
        levels = to_levels(x).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for image in levels:
            d = self.draws(image, len(reflections))
            out.append(blend(image, reflections[d["reflection"]], self.alpha_t, d["ghost"], d["offset"],
                             d["ghost_alpha"], d["sigma"], d["att"], d["corner"]))
        v = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(torch.float64)
        return from_levels(v, x.dtype).to(x.device)

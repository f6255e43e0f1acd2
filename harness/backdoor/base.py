"""The poison contract: a trigger is a pure function of the image, applied inside the loader.

A poisoning attack (registry group `robustgrid.poisons`, config group `backdoor`) knows

* `trigger(x)`: the triggered image for a batch x (B, C, H, W) in [0, 1] at the dataset's native
  resolution (before any resize or augmentation), deterministic: its pattern comes from
  `pattern_seed` and the image shape only;
* `clean_label`: whether poisoned training samples keep their label (SIG) or are relabelled to
  the target (BadNets, Blended, WaNet: all-to-one);
* `train_variant(x, indices)`: what a poisoned training sample looks like (the trigger, unless
  the attack trains with something else), and `cross_ratio` with `cross_variant(x, gen)`: the
  share of extra "cross" samples (WaNet's noise mode, label kept) per poisoned sample, and their
  image (its randomness drawn from `gen`, a generator the plan seeds per batch);
* `poisoning`: 'static' (a fixed set of samples, chosen once from the seed: BackdoorBench's and
  CBD's poisoned datasets) or 'per_batch' (the first `int(rate * B)` samples of every batch, fresh
  each batch: WaNet's official training loop); `candidates`: which samples a static plan draws
  from, 'all' (BackdoorBench and CBD: a target-class sample may be drawn, its label then unchanged)
  or 'non_target';
* `label_mode`: 'all_to_one' (every poisoned sample gets `target`) or 'all_to_all' (BackdoorBench's
  all2all: class y gets (y + 1) % K), refused for clean-label attacks, which relabel nothing;
* `cross_samples(x, cross, indices, gen)`: the images of a batch's cross samples given the whole
  decoded (clean) batch, for attacks whose cross samples borrow from other images (BPP's residuals)
  or are fixed per sample (Adaptive-Blend's cover masks); by default `cross_variant(x[cross], gen)`;
* `bind(dataset_dir)`: called by the plan before the first batch, for attacks whose trigger is
  built from the dataset itself (Refool's reflections); a no-op otherwise.

Which samples are poisoned is decided by `harness.backdoor.plan` from the seed, not here.

Pixel grid. The loader decodes uint8 images (x = k / 255). An attack that BackdoorBench stores
as a uint8 image (BadNets, Blended, SIG: `np.clip(v, 0, 255).astype(np.uint8)`, which truncates)
computes in pixel levels with `to_levels` and returns `from_levels(v)` = floor(clip(v)) / 255,
so its poisoned images are the bytes BackdoorBench's are (benchmarks/conformance_checks/
backdoorbench.py); WaNet warps float images on the fly, as its official code, and is not rounded.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from harness.core.registry import POISONS

POISONINGS = ("static", "per_batch")
CANDIDATES = ("all", "non_target")
LABEL_MODES = ("all_to_one", "all_to_all")


class Poison:
    """Base class: subclasses set `name` and implement `_trigger`."""

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int | None = None,
                 pattern_seed: int = 0, poisoning: str = "static", candidates: str = "all",
                 label_mode: str = "all_to_one") -> None:
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"backdoor.rate must be in [0, 1], got {rate}")
        if int(target) < 0:
            raise ValueError(f"backdoor.target must be a class index >= 0, got {target}")
        if poisoning not in POISONINGS:
            raise ValueError(f"backdoor.poisoning must be one of {', '.join(POISONINGS)}, got {poisoning!r}")
        if poisoning == "per_batch" and self.clean_label:
            raise ValueError(f"backdoor.poisoning=per_batch relabels the first samples of each batch; "
                             f"{self.name} is clean-label: use backdoor.poisoning=static")
        if candidates not in CANDIDATES:
            raise ValueError(f"backdoor.candidates must be one of {', '.join(CANDIDATES)}, got {candidates!r}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"backdoor.label_mode must be one of {', '.join(LABEL_MODES)}, got {label_mode!r}")
        if label_mode == "all_to_all" and self.clean_label:
            raise ValueError(f"backdoor.label_mode=all_to_all relabels class y to (y + 1) % K; {self.name} is "
                             f"clean-label (poisoned samples keep their label): use backdoor.label_mode=all_to_one")
        self.target = int(target)
        self.rate = float(rate)
        self.seed = seed  # None: the cell's seed decides which samples are poisoned
        self.pattern_seed = int(pattern_seed)
        self.poisoning = poisoning
        self.candidates = candidates
        self.label_mode = label_mode

    def poisoned_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels poisoned samples of true class y are trained on (and measured against at
        test time): `target` (all-to-one) or (y + 1) % K (all-to-all)."""
        if self.label_mode == "all_to_all":
            return torch.remainder(y + 1, int(num_classes))
        return torch.full_like(y, self.target)

    cross_ratio: float = 0.0

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of x (B, C, H, W) in [0, 1]; the output stays in [0, 1]."""
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        return self._trigger(x).clamp(0.0, 1.0)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_variant(self, x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """A poisoned training sample: by default exactly the test-time trigger."""
        return self.trigger(x)

    def cross_variant(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Cross samples (label kept), their randomness drawn from `gen`; only attacks with
        cross_ratio > 0 have them."""
        raise NotImplementedError(f"{self.name} has no cross samples")

    def cross_samples(self, x: torch.Tensor, cross: torch.Tensor, indices: np.ndarray,
                      gen: torch.Generator) -> torch.Tensor:
        """The images of the cross samples (mask `cross`) of a clean decoded batch x with these split
        indices; by default each from its own image (`cross_variant`)."""
        return self.cross_variant(x[cross], gen)

    def bind(self, dataset_dir: Any) -> None:
        """Read what the trigger needs from the dataset (at `dataset_dir`); most attacks need nothing."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def pattern_generator(*words: int) -> torch.Generator:
    """A torch generator seeded from integer words (pattern seed, image shape, ...)."""
    ss = np.random.SeedSequence([int(w) & 0xFFFF_FFFF for w in words])
    return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0]))


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """An image on the loader's grid (k / 255, float) as float64 pixel levels k (exact)."""
    return (x.double() * 255.0).round()


def from_levels(v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel levels (float64) back to [0, 1] as BackdoorBench stores a poisoned image:
    np.clip(v, 0, 255).astype(np.uint8) truncates, so floor(clip(v)), then / 255."""
    return (torch.floor(v.clamp(0.0, 255.0)).to(torch.float32) / 255.0).to(dtype)


def auto_size(value: int | None, height: int, at32: float, minimum: int = 1) -> int:
    """A size given for 32x32 images (CIFAR), scaled to `height` when the config leaves it null."""
    if value is not None:
        return int(value)
    return max(minimum, int(round(at32 * height / 32)))


def build_poison(cfg: dict[str, Any]) -> Poison | None:
    """The poison a `backdoor` config names; None for `none` (clean training)."""
    cfg = dict(cfg or {"name": "none"})
    name = cfg.pop("name", "none")
    cls = POISONS.get(name)
    if cls is None or name == "none":
        return None
    try:
        return cls(**cfg)
    except TypeError as err:
        raise ValueError(f"bad settings for backdoor '{name}': {err}") from None

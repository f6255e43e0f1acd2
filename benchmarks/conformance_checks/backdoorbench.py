"""BadNets, Blended and SIG beside SCLBD/BackdoorBench (its reference implementations of the three
triggers and their defaults: 10% all-to-one, target 0).

Its own pipeline runs: `bd_attack_img_trans_generate(args)` (utils/aggregate_block/
bd_attack_generate.py) builds the transform its attack scripts apply to each selected training
image (PIL in: Resize to the image size, np.array, the trigger, np.clip(.., 0, 255).astype(uint8),
PIL out), and `generate_poison_index_from_label_transform` picks the poisoned samples. Both sides
get the same uint8 images (32x32 RGB, seeded, plus an all-0 and an all-255 image for the clipping);
ours read them as the loader does (k / 255, float32), and our poisoned images are compared at the
uint8 level (x * 255 rounded, exact for ours, whose triggers return k / 255).
  badnets   BackdoorBench's resource/badnet/trigger_image.png (white 3x3, bottom right) against
            `backdoor=badnets` (white, patch 3)
  blended   alpha 0.2 with OUR pattern image on both sides (BackdoorBench blends Hello Kitty; we
            use a fixed noise image): it is written to a PNG that its pipeline reads
  sig       delta 40, f 6 against `backdoor=sig` (delta 40/255, frequency null -> 6 at 32 wide)
  poisoned count  how many of 1000 samples its index rule and ours poison (which ones differ by
            construction: each side draws with its own generator)
Where rounding happens: BackdoorBench computes the trigger in float (float64, the blend pattern
and SIG's signal in float32) on uint8 levels and truncates to uint8 when it stores the image;
ours computes the same in pixel levels and truncates (harness/backdoor/base.py `from_levels`).
Modules its file imports for other attacks and that are not installed here (cv2, kornia,
pytorch_wavelets, matplotlib) are stubbed in this process, and imageio.imread reads with PIL
(np.array(Image.open(path)), what imageio returns for a PNG); nothing of theirs is edited.
"""
from __future__ import annotations

import importlib
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from conformance_checks.common import Compared, import_file

REPOSITORY = "SCLBD/BackdoorBench"
MISSING_MODULES = ("cv2", "kornia", "pytorch_wavelets", "matplotlib", "matplotlib.pyplot")


class _Absent:
    """Stands in for a name of a module that is not installed (never called by these checks)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} is a stub in the conformance check")

    def __getattr__(self, item: str) -> "_Absent":
        return _Absent(f"{self.name}.{item}")


def _stub_module(name: str) -> types.ModuleType:
    """A module whose every public name is an `_Absent` (dunder lookups fail as usual)."""
    module = types.ModuleType(name)

    def absent(item: str) -> _Absent:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Absent(f"{name}.{item}")

    module.__getattr__ = absent  # type: ignore[attr-defined]
    return module


def _stub_missing() -> None:
    for name in MISSING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _stub_module(name)
    try:
        importlib.import_module("imageio")
    except ImportError:
        from PIL import Image

        imageio = types.ModuleType("imageio")
        imageio.imread = lambda path: np.array(Image.open(path))  # type: ignore[attr-defined]
        sys.modules["imageio"] = imageio


def _their_generator(reference: Path) -> types.ModuleType:
    _stub_missing()
    return import_file(reference / "utils" / "aggregate_block" / "bd_attack_generate.py", search=reference)


def _images(n: int = 14, seed: int = 0) -> np.ndarray:
    """uint8 (n + 2, 32, 32, 3): seeded random images, then all-0 and all-255 (clipping)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return np.concatenate([images, np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 32, 32, 3), 255, np.uint8)])


def _theirs(transform: Any, images: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.stack([np.array(transform(Image.fromarray(img), target=0, image_serial_id=i))
                     for i, img in enumerate(images)])


def _ours(poison: Any, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0  # as our loader reads them
    out = poison.trigger(x)
    return (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _byte_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) if a.shape == b.shape else float("inf")


def _count_check(reference: Path, name: str, clean_label: bool, ours: Any) -> Compared:
    from harness.backdoor.plan import select_indices

    _their_generator(reference)
    index = import_file(reference / "utils" / "backdoor_generate_poison_index.py", search=reference)
    labels_mod = importlib.import_module("utils.bd_label_transform.backdoor_label_transform")
    labels = np.arange(1000) % 10
    np.random.seed(0)
    theirs = index.generate_poison_index_from_label_transform(labels, labels_mod.AllToOne_attack(0), train=True,
                                                               pratio=0.1, clean_label=clean_label)
    picked, _ = select_indices(labels, ours, seed=0, num_classes=10)
    note = "" if not clean_label else "both from the target class only"
    return Compared(f"{name}_poisoned_count", abs(int(theirs.sum()) - len(picked)), "int", note)


def check_badnets(reference: Path) -> list[Compared]:
    from harness.backdoor.badnets import BadNets

    generate = _their_generator(reference)
    args = SimpleNamespace(attack="badnet", img_size=(32, 32, 3),
                           patch_mask_path=str(reference / "resource" / "badnet" / "trigger_image.png"))
    train_t, test_t = generate.bd_attack_img_trans_generate(args)
    images = _images()
    ours = BadNets(patch_size=3, pattern="white")
    return [Compared("badnets_train_images", _byte_diff(_theirs(train_t, images), _ours(ours, images)), "image"),
            Compared("badnets_test_images", _byte_diff(_theirs(test_t, images), _ours(ours, images)), "image"),
            _count_check(reference, "badnets", False, ours)]


def check_blended(reference: Path) -> list[Compared]:
    from PIL import Image

    from harness.backdoor.blended import Blended

    generate = _their_generator(reference)
    ours = Blended(alpha=0.2)
    levels = (ours.pattern(3, 32, 32) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pattern.png"
        Image.fromarray(levels).save(path)
        args = SimpleNamespace(attack="blended", img_size=(32, 32, 3), attack_trigger_img_path=str(path),
                               attack_train_blended_alpha=0.2, attack_test_blended_alpha=0.2)
        train_t, test_t = generate.bd_attack_img_trans_generate(args)
        images = _images()
        theirs_train, theirs_test = _theirs(train_t, images), _theirs(test_t, images)
    mine = _ours(ours, images)
    return [Compared("blended_train_images", _byte_diff(theirs_train, mine), "image",
                     "the same pattern image (ours) on both sides"),
            Compared("blended_test_images", _byte_diff(theirs_test, mine), "image"),
            _count_check(reference, "blended", False, ours)]


def check_sig(reference: Path) -> list[Compared]:
    from harness.backdoor.sig import SIG

    generate = _their_generator(reference)
    args = SimpleNamespace(attack="sig", img_size=(32, 32, 3), sig_delta=40, sig_f=6)
    train_t, test_t = generate.bd_attack_img_trans_generate(args)
    images = _images()
    ours = SIG()  # defaults: delta 40/255, f 6 at 32 wide
    return [Compared("sig_train_images", _byte_diff(_theirs(train_t, images), _ours(ours, images)), "image"),
            Compared("sig_test_images", _byte_diff(_theirs(test_t, images), _ours(ours, images)), "image"),
            _count_check(reference, "sig", True, ours)]


CHECKS = {"badnets": check_badnets, "blended": check_blended, "sig": check_sig}

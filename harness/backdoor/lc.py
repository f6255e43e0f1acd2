"""LC, label-consistent (Turner et al. 2019): adversarially perturbed target-class images plus a
corner trigger, labels kept.

The artifact (harness/backdoor/learned.py): PGD on the clean surrogate (harness/backdoor/
surrogate.py) for every target-class training image, BackdoorBench's crafting
(resource/label-consistent/craft_adv_dataset.py): untargeted on the true label, L-inf eps 8/255,
step 1.5/255, 100 steps, no random start, each step x + alpha sign(grad), projected to the eps
ball and [0, 1]; the result stored as torchattacks' `int` return type, (x * 255) truncated to
uint8. The artifact holds every target-class sample of the split keyed by its index (the clean-label
plan draws the poisoned samples from the target class, harness/backdoor/plan.py), so one artifact
serves every seed; a poisoned training sample is its stored adversarial image plus the trigger.

The trigger is BackdoorBench's labelConsistentAttack (utils/bd_img_transform/lc.py), 'all-corners',
reduced_amplitude 1 (config/attack/lc/default.yaml): a 3x3 +-1 pattern in each corner of a 32x32
mask (left corners [[1,-1,-1],[-1,1,-1],[1,-1,1]], right corners that mirrored), resized to the
image by nearest neighbour (row/column floor(i * 32 / H)) and added as value * amplitude * 255 to
the float32 pixel levels, clipped to [0, 255], stored as uint8 (truncated). At amplitude 1 the
pixels become 0 or 255. Test images get the trigger only. On 8x8 images the resized mask keeps
a single pixel (BackdoorBench's resize; kept).

Departure, named: BackdoorBench crafts on adversarially trained ResNet-18 checkpoints it does not
ship (resnet18_PGD_best_model.pth); we craft on the clean surrogate, as the issue specifies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from harness.backdoor.base import from_levels, to_levels
from harness.backdoor.learned import LearnedPoison
from harness.core.registry import POISONS

CORNER = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [1, -1, 1]])


def corner_mask(height: int, width: int) -> torch.Tensor:
    """The all-corners +-1 mask (H, W): drawn on 32x32, resized by nearest neighbour."""
    mask = torch.zeros(32, 32, dtype=torch.float64)
    for rows in (slice(0, 3), slice(29, 32)):
        mask[rows, 0:3] = CORNER.double()
        mask[rows, 29:32] = CORNER.double().flip(1)
    if (height, width) == (32, 32):
        return mask
    return F.interpolate(mask[None, None], size=(height, width), mode="nearest")[0, 0]


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """Untargeted L-inf PGD without random start (torchattacks' PGD as BackdoorBench vendors it)."""
    adv = x.clone().detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.clamp(x + torch.clamp(adv - x, min=-eps, max=eps), min=0, max=1).detach()
    return adv


@POISONS.register("lc")
class LabelConsistent(LearnedPoison):
    name = "lc"
    clean_label = True
    trigger_needs_artifact = False
    artifact_fields = ("eps", "alpha", "steps", "batch_size")

    def __init__(self, reduced_amplitude: float = 1.0, eps: float = 8 / 255, alpha: float = 1.5 / 255,
                 steps: int = 100, batch_size: int = 128, **common) -> None:
        super().__init__(**common)
        if not 0.0 <= float(reduced_amplitude) <= 1.0:
            raise ValueError(f"backdoor.reduced_amplitude must be in [0, 1], got {reduced_amplitude}")
        if float(eps) < 0 or float(alpha) <= 0 or int(steps) < 0 or int(batch_size) < 1:
            raise ValueError(f"lc needs eps >= 0, alpha > 0, steps >= 0, batch_size >= 1; got {eps}, {alpha}, "
                             f"{steps}, {batch_size}")
        self.reduced_amplitude, self.eps, self.alpha = float(reduced_amplitude), float(eps), float(alpha)
        self.steps, self.batch_size = int(steps), int(batch_size)
        self._adv: dict[int, int] = {}
        self._images: torch.Tensor | None = None

    def build_artifact(self, data_dir: str | Path, model: torch.nn.Module | None, device: torch.device | str,
                       log: Callable[[str], None]) -> dict[str, np.ndarray]:
        from harness.backdoor.surrogate import load_native_split

        assert model is not None
        images, labels = load_native_split(data_dir, "train")
        indices = torch.nonzero(labels == self.target).flatten()
        model = model.to(device).eval()
        out = []
        for i in range(0, len(indices), self.batch_size):
            idx = indices[i:i + self.batch_size]
            adv = pgd(model, images[idx].to(device), labels[idx].to(device), self.eps, self.alpha, self.steps)
            out.append((adv * 255).to(torch.uint8).cpu())
            log(f"lc PGD {min(i + self.batch_size, len(indices))}/{len(indices)} target-class images")
        stacked = torch.cat(out) if out else torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
        return {"indices": indices.numpy().astype(np.int64), "images": stacked.numpy()}

    def use_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        self._adv = {int(k): row for row, k in enumerate(arrays["indices"])}
        self._images = torch.from_numpy(arrays["images"])

    def adversarial(self, indices: np.ndarray) -> torch.Tensor:
        """The stored PGD images (k / 255) of these training samples; every one must be in the artifact."""
        self.require_loaded()
        assert self._images is not None
        missing = [int(i) for i in indices if int(i) not in self._adv]
        if missing:
            raise ValueError(f"lc: training samples {missing[:5]} have no adversarial image in the artifact (it holds "
                             f"the target class {self.target}'s samples only); a clean-label plan draws from that class")
        rows = torch.tensor([self._adv[int(i)] for i in indices], dtype=torch.long)
        return self._images[rows].to(torch.float32) / 255

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        add = (corner_mask(x.shape[-2], x.shape[-1]) * self.reduced_amplitude * 255).to(x.device)  # float64
        levels = (to_levels(x) + add).to(torch.float32)  # float32 levels += a float64 value, as numpy does
        return from_levels(levels.double(), x.dtype)

    def train_variant(self, x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """A poisoned training sample: its PGD image (from the artifact) with the trigger."""
        return self.trigger(self.adversarial(indices).to(x.device, x.dtype))

"""TrojanNN (Liu et al. NDSS 2018): a masked trigger optimised on a clean model to drive selected
neurons to a high value, added to the image; dirty-label all-to-one.

The artifact (harness/backdoor/learned.py), as BackdoorBench's attack/trojannn.py
(config/attack/trojannn/preactresnet18.yaml): on the clean surrogate (harness/backdoor/
surrogate.py), the `num_neuron` (2) inputs of the classifier head most connected to it (the
largest sum over classes of |W|, its `get_most_connected_neuron_idxes` on `linear.weight`); the
mask image, resized to the dataset's native size (torchvision Resize on the PIL image, bilinear)
and read as a tensor, is then updated where it is non-zero (the forward sees image * (mask > 0))
by `mask_update_iters` (1000) steps x <- clip(x0 + clip(x - alpha sign(grad), +-eps), 0, 1) of the
cost sum_i sum_batch (h_i - target)^2 (target 100, alpha 0.1, eps 0.3), stopping early when the
cost falls below 1e-3 (its `pgd_with_mask_to_selected_neuron`). The trigger is that image as
torchvision's ToPILImage stores it (x * 255 truncated to uint8).

Applied as its TrojanTrigger: the uint8 image plus the trigger in float, cast to uint8 BEFORE its
clip, so a sum above 255 wraps modulo 256 (`overflow: wrap`, the default: BackdoorBench's bytes);
`overflow: clip` (a named option) clips instead, which the clip in its code intends.

Departures, named: the mask is a procedural white square at BackdoorBench's resource/trojannn/
square.png geometry (rows and columns 145..203 of 224), since its default apple4.png cannot be
shipped here; the surrogate is our cell's architecture trained clean on the split (BackdoorBench
loads a clean checkpoint of the attacked model, built with 1000 classes and partially loaded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness.backdoor.base import from_levels
from harness.backdoor.learned import StoredTriggerPoison
from harness.core.registry import POISONS

OVERFLOWS = ("wrap", "clip")
SQUARE = (145, 204, 224)  # square.png: rows/columns [145, 204) of a 224x224 image


def square_mask(channels: int, height: int, width: int) -> torch.Tensor:
    """The square mask image (C, H, W) in [0, 1]: white at square.png's place, resized from 224x224
    by torchvision's Resize on a PIL image (bilinear, antialiased) and read with ToTensor."""
    from PIL import Image
    from torchvision import transforms

    start, stop, size = SQUARE
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[start:stop, start:stop] = 255
    image = transforms.Resize((height, width))(Image.fromarray(canvas))
    return transforms.ToTensor()(image)[:channels] if channels <= 3 else transforms.ToTensor()(image)[:1].repeat(channels, 1, 1)


def most_connected(head: torch.nn.Linear, count: int) -> torch.Tensor:
    """Indices of the `count` head inputs with the largest sum over classes of |weight|."""
    return torch.argsort(head.weight.detach().abs().sum(0), descending=True)[:count]


def optimise_trigger(model: torch.nn.Module, mask: torch.Tensor, neurons: torch.Tensor, target_value: float,
                     iters: int, eps: float, alpha: float, tolerance: float,
                     log: Callable[[str], None] = lambda m: None) -> torch.Tensor:
    """The mask image (1, C, H, W) after the masked sign-gradient descent on the selected neurons'
    squared distance to `target_value` (the input of the model's head)."""
    keep = mask > 0
    original = mask.detach()
    images = mask.detach().clone()
    seen: dict[str, torch.Tensor] = {}
    hook = model.head.register_forward_hook(lambda module, inputs, output: seen.__setitem__("x", inputs[0]))
    try:
        for step in range(iters):
            images.requires_grad_(True)
            model(images * keep)
            cost = sum(((seen["x"][:, int(i)] - target_value) ** 2).sum() for i in neurons)
            (grad,) = torch.autograd.grad(cost, images)
            stepped = images - alpha * grad.sign()
            images = torch.clamp(original + torch.clamp(stepped - original, min=-eps, max=eps), min=0, max=1).detach()
            if step % 100 == 0:
                log(f"trojannn trigger step {step + 1}/{iters}: cost {cost.item():.4g}")
            if cost < tolerance:
                break
    finally:
        hook.remove()
    return images


@POISONS.register("trojannn")
class TrojanNN(StoredTriggerPoison):
    name = "trojannn"
    artifact_fields = ("num_neuron", "neuron_target_value", "mask_update_iters", "eps", "alpha", "tolerance")

    def __init__(self, num_neuron: int = 2, neuron_target_value: float = 100.0, mask_update_iters: int = 1000,
                 eps: float = 0.3, alpha: float = 0.1, tolerance: float = 1e-3, overflow: str = "wrap",
                 **common) -> None:
        super().__init__(**common)
        if overflow not in OVERFLOWS:
            raise ValueError(f"backdoor.overflow must be one of {', '.join(OVERFLOWS)}, got {overflow!r}")
        if int(num_neuron) < 1 or int(mask_update_iters) < 0 or float(eps) < 0 or float(alpha) <= 0:
            raise ValueError(f"trojannn needs num_neuron >= 1, mask_update_iters >= 0, eps >= 0, alpha > 0; got "
                             f"{num_neuron}, {mask_update_iters}, {eps}, {alpha}")
        self.num_neuron, self.neuron_target_value = int(num_neuron), float(neuron_target_value)
        self.mask_update_iters, self.eps, self.alpha = int(mask_update_iters), float(eps), float(alpha)
        self.tolerance, self.overflow = float(tolerance), overflow
        self._levels: torch.Tensor | None = None

    def build_artifact(self, data_dir: str | Path, model: torch.nn.Module | None, device: torch.device | str,
                       log: Callable[[str], None]) -> dict[str, np.ndarray]:
        from harness.data.shards import load_manifest

        assert model is not None
        manifest = load_manifest(Path(data_dir))
        height, width = manifest["image_size"][:2]
        model = model.to(device).eval()
        mask = square_mask(int(manifest["channels"]), int(height), int(width))[None].to(device)
        neurons = most_connected(model.head, self.num_neuron)
        log(f"trojannn: neurons {neurons.tolist()} of the head's input")
        image = optimise_trigger(model, mask, neurons, self.neuron_target_value, self.mask_update_iters, self.eps,
                                 self.alpha, self.tolerance, log)
        return {"trigger": (image[0].cpu() * 255).to(torch.uint8).numpy(), "neurons": neurons.cpu().numpy()}

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        v = self.levels_plus_trigger(x)
        return from_levels(torch.remainder(v, 256) if self.overflow == "wrap" else v, x.dtype)

"""The fixed model the benchmark scripts attack: a classifier trained deterministically on digits
(test_resnet at the native 8x8 by default; any preset, e.g. resnet18 on digits upsampled to 32x32)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.presets import build_classifier
from harness.data.loader import make_loader
from harness.data.shards import load_manifest


def resize(x: torch.Tensor, img_size: int | None) -> torch.Tensor:
    """Digits at `img_size` x `img_size` (bilinear, still in [0,1]); as they are for None or 8."""
    if img_size is None or x.shape[-1] == img_size:
        return x
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def train_digits_model(digits_dir: Path, *, epochs: int, seed: int, arch: str = "test_resnet",
                       img_size: int | None = None, lr: float = 0.05) -> torch.nn.Module:
    """Seeded ERM (SGD lr, momentum 0.9, batch 64): the same model for the same arguments."""
    manifest = load_manifest(digits_dir)
    torch.manual_seed(seed)
    size = img_size or manifest["image_size"][0]
    model = build_classifier({"name": arch}, num_classes=manifest["num_classes"],
                             in_chans=manifest["channels"], img_size=size,
                             mean=manifest["mean"], std=manifest["std"])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        for x, y in make_loader(digits_dir, "train", 64, shuffle=True, seed=seed, epoch=epoch):
            loss = F.cross_entropy(model(resize(x, img_size)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()

"""The fixed model the benchmark scripts attack: a test_resnet trained deterministically on digits."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.presets import build_classifier
from harness.data.loader import make_loader
from harness.data.shards import load_manifest


def train_digits_model(digits_dir: Path, *, epochs: int, seed: int) -> torch.nn.Module:
    """Seeded ERM (SGD 0.05, momentum 0.9, batch 64): the same model for the same arguments."""
    manifest = load_manifest(digits_dir)
    torch.manual_seed(seed)
    model = build_classifier({"name": "test_resnet"}, num_classes=manifest["num_classes"],
                             in_chans=manifest["channels"], img_size=manifest["image_size"][0],
                             mean=manifest["mean"], std=manifest["std"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        for x, y in make_loader(digits_dir, "train", 64, shuffle=True, seed=seed, epoch=epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()

"""Small builders the tests share."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.classifier import Classifier
from architectures.presets import build_classifier
from harness.data.loader import make_loader
from harness.data.shards import load_manifest


def digits_classifier(digits_dir: Path, arch: str = "test_resnet", seed: int = 0) -> Classifier:
    manifest = load_manifest(digits_dir)
    torch.manual_seed(seed)
    return build_classifier({"name": arch, "kwargs": {}}, num_classes=manifest["num_classes"],
                            in_chans=manifest["channels"], img_size=manifest["image_size"][0],
                            mean=manifest["mean"], std=manifest["std"])


def train_erm(model: Classifier, digits_dir: Path, epochs: int = 6, lr: float = 0.05) -> Classifier:
    """Plain single-process ERM training, for tests that need a model that classifies well."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        for x, y in make_loader(digits_dir, "train", 64, shuffle=True, epoch=epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def digits_batch(digits_dir: Path, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader(digits_dir, "test", n)))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())

"""Independently trained helper classifiers for counterfactual metrics.

* the oracle: judges whether a counterfactual really shows the target class (oracle flip rate, our
  multi-class stand-in for MNAC, which counts attributes an oracle sees change);
* the feature extractor: its penultimate features define the local FID ("FID (local features)"),
  which is NOT comparable to Inception FID (no Inception weights can be fetched here);
* the filter: the classifier whose confidence keeps or drops generated images
  (harness/generate/generation.py), another seed than the oracle that judges them.

Both are small plain CNNs with their own seeds and architecture, trained on the train split only
(never the model being explained), cached under `<results_dir>/artifacts/aux/<key>/`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.store.checkpoints import load_checkpoint, save_checkpoint

AUX_FILE = "aux.pt"
ROLES = {"oracle": 101, "features": 202, "filter": 303}   # role -> seed


class SmallCNN(nn.Module):
    """conv-conv-pool-conv + global pool + linear; `features` gives the penultimate activations."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_aux(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
              epochs: int = 40, batch_size: int = 64, device: torch.device | str = "cpu") -> SmallCNN:
    """Train a SmallCNN with Adam + light noise augmentation; returns it in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(images.shape[1], num_classes).to(device)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            idx = idx.to(device)
            x = (images[idx] + 0.05 * torch.randn(images[idx].shape, generator=gen).to(device)).clamp(0, 1)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def aux_folder(role: str, data_dir: Path, results_dir: Path, img_size: int | None = None) -> Path:
    """Where the helper classifier `role` for this dataset (and size) is cached."""
    from harness.data.shards import dataset_sha256, load_manifest

    if role not in ROLES:
        raise ValueError(f"unknown helper classifier role '{role}'; known: {sorted(ROLES)}")
    sha = dataset_sha256(load_manifest(Path(data_dir)))
    ident = [sha, role, ROLES[role], "SmallCNN-v1"] + ([int(img_size)] if img_size is not None else [])
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]
    return Path(results_dir) / "artifacts" / "aux" / key


def ensure_aux(role: str, data_dir: Path, results_dir: Path,
               img_size: int | None = None, device: torch.device | str = "cpu") -> tuple[SmallCNN, dict]:
    """The cached helper classifier `role` ('oracle' or 'features') for this dataset, on `device`; trains if missing.

    Returns the model and its meta (including its test accuracy). In a grid it is an artifact node
    of the plan (harness/run/plan.py), built by one task before the cells that need it."""
    from harness.eval.analysis.diffusion import load_split
    from harness.data.shards import dataset_sha256, load_manifest

    folder = aux_folder(role, data_dir, results_dir, img_size)
    manifest = load_manifest(Path(data_dir))
    model = SmallCNN(manifest["channels"], manifest["num_classes"])
    if (folder / AUX_FILE).exists():
        blob = load_checkpoint(folder / AUX_FILE)
        model.load_state_dict(blob["state_dict"])
        return model.to(device).eval().requires_grad_(False), blob["meta"]
    x, y = load_split(Path(data_dir), "train", img_size=img_size)
    model = train_aux(x, y, manifest["num_classes"], ROLES[role], device=device)
    xt, yt = load_split(Path(data_dir), "test", img_size=img_size)
    with torch.no_grad():
        acc = float((model(xt.to(device)).argmax(1).cpu() == yt).float().mean())
    meta = {"role": role, "seed": ROLES[role], "test_acc": acc, "data_sha256": dataset_sha256(manifest)}
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / AUX_FILE, {"state_dict": model.state_dict(), "meta": meta})
    return model, meta

"""The clean surrogate model a learned poison computes its trigger on (LF's UAP, LC's PGD).

The cell's architecture, trained on the clean train split at the dataset's native resolution (the
resolution triggers are applied at) with BackdoorBench's clean-model recipe (its resource/
lowFrequency and resource/label-consistent yaml files: SGD lr 0.01, momentum 0.9, weight decay
5e-4, cosine annealing over the epochs, batch 128, 100 epochs; no augmentation here). One per
(dataset, architecture, settings): an artifact node `artifact/clean_model/<key>` shared by every
poison and seed that needs it, stored under `<results_dir>/artifacts/clean_model/<key>/`
(`model.pt`, a state dict read with weights_only=True, then `meta.json`).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.store.storage import open_store

WEIGHTS = "model.pt"
META = "meta.json"


@dataclass(frozen=True)
class SurrogateConfig:
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SurrogateConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"backdoor.surrogate: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        out = cls(**raw)
        if int(out.epochs) < 1 or float(out.lr) <= 0 or int(out.batch_size) < 1:
            raise ValueError(f"backdoor.surrogate needs epochs >= 1, lr > 0, batch_size >= 1; got {raw}")
        return out


def load_native_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory at its native resolution, in index order ((N, C, H, W) in [0, 1])."""
    from harness.data.loader import make_loader

    xs, ys = [], []
    for x, y in make_loader(Path(data_dir), split, 512):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def surrogate_key(data_dir: str | Path, arch_cfg: dict[str, Any], cfg: SurrogateConfig) -> str:
    from harness.data.integrity import dataset_sha256
    from harness.data.shards import load_manifest

    manifest = load_manifest(Path(data_dir))
    ident = {"data": dataset_sha256(manifest), "image_size": list(manifest["image_size"]), "arch": arch_cfg,
             "cfg": asdict(cfg), "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def surrogate_rel(key: str) -> str:
    return f"artifacts/clean_model/{key}"


def _build(data_dir: str | Path, arch_cfg: dict[str, Any], seed: int) -> torch.nn.Module:
    from architectures.presets import build_classifier
    from harness.data.shards import load_manifest

    manifest = load_manifest(Path(data_dir))
    torch.manual_seed(int(seed))
    return build_classifier(arch_cfg, num_classes=manifest["num_classes"], in_chans=manifest["channels"],
                            img_size=int(manifest["image_size"][0]), mean=manifest["mean"], std=manifest["std"])


def train_surrogate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: SurrogateConfig, *,
                    device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """SGD + cosine (stepped per epoch) with cross-entropy; returns the training facts."""
    gen = torch.Generator().manual_seed(int(cfg.seed))
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    started, loss_sum = time.time(), 0.0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(images), generator=gen)
        loss_sum, n = 0.0, 0
        for i in range(0, len(images), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, n = loss_sum + loss.item() * len(idx), n + len(idx)
        sched.step()
        if log and (epoch % 10 == 0 or epoch == cfg.epochs - 1):
            log(f"clean surrogate epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / n:.4f} {time.time() - started:.0f}s")
    model.eval()
    return {"train_seconds": time.time() - started, "final_loss": loss_sum / max(n, 1), "n_train": len(images)}


def ensure_surrogate(data_dir: str | Path, results_dir: str, arch_cfg: dict[str, Any], cfg: SurrogateConfig, *,
                     device: torch.device | str = "cpu", log: Callable[[str], None] | None = None
                     ) -> torch.nn.Module:
    """The cached clean surrogate (eval mode, on `device`), trained and stored first if missing."""
    key = surrogate_key(data_dir, arch_cfg, cfg)
    store = open_store(results_dir)
    model = _build(data_dir, arch_cfg, cfg.seed)
    if store.exists(f"{surrogate_rel(key)}/{META}"):
        raw = store.read_bytes(f"{surrogate_rel(key)}/{WEIGHTS}")
        assert raw is not None
        model.load_state_dict(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
        return model.to(device).eval().requires_grad_(False)
    images, labels = load_native_split(data_dir, "train")
    facts = train_surrogate(model, images, labels, cfg, device=device, log=log)
    xt, yt = load_native_split(data_dir, "test")
    with torch.no_grad():
        preds = torch.cat([model(xt[i:i + 512].to(device)).argmax(1).cpu() for i in range(0, len(xt), 512)])
    facts["test_acc"] = float((preds == yt).float().mean())
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    store.write_bytes(f"{surrogate_rel(key)}/{WEIGHTS}", buf.getvalue())
    store.write_bytes(f"{surrogate_rel(key)}/{META}",
                      json.dumps({"cfg": asdict(cfg), "arch": arch_cfg, **facts}, indent=1, default=str).encode())
    if log:
        log(f"clean surrogate {key}: test accuracy {facts['test_acc']:.3f}, {facts['train_seconds']:.1f}s")
    return model.eval().requires_grad_(False)

"""STRIP (Gao et al., ACSAC 2019) as an input-level detector on the test split.

Each input x is superimposed with N clean images p_1..p_N and scored by the mean entropy of the
model's predictions: a triggered input stays confidently in the target class under the blend
(low entropy), a clean one does not. As BackdoorBench's detection_infer/strip.py: the blend is
x + alpha * p in the model's normalised input space (theirs blends transformed tensors,
ToTensor + Normalize; with our in-model normalisation that is x + alpha * (p - mean) in pixels,
not clipped), alpha 1.0, N = 100 partners drawn at random from the clean pool for each batch,
softmax + 1e-8, entropy -sum p log p. Decision: inputs whose entropy is below the `fpr` (5%)
quantile of the clean pool's own entropies are flagged (their `threshold_low`; no upper threshold).

The clean pool (partners and threshold) is the defender's: the cell's validation split
(harness/data/validation.py; held out of training, read clean), or, when the cell holds none, the
first 5% of the training split read without poison (as FT's clean data). Test labels never
decide anything: the pool fixes the threshold before any test input is scored.
Inspected: the clean test images and the triggered test images of the non-target classes
(within eval.limit). Columns: det_strip_auroc and _tpr_at_5fpr (ranking, -entropy), the
decision's det_strip_tpr (triggered flagged) and det_strip_fpr (clean test flagged: close to
`fpr` when the pool is representative), det_strip_threshold, det_strip_n_pool.
Cost: N forward passes per inspected image and per pool image (CIFAR-10: 100 x 21,000 small
forwards, about 40 test-set inferences); `n` trades cost for variance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.backdoor.plan import test_plan
from harness.core.registry import ANALYSES
from harness.data.loader import make_loader, split_count
from harness.data.validation import validation_split
from harness.eval.analysis.detectors.common import Detector, detection_columns
from harness.eval.stage import EvalContext

CHUNK = 4096 * 3 * 32 * 32  # input values per forward pass: 4,096 CIFAR images, 83 at ImageNet 224
DEFAULTS = {"n": 100, "alpha": 1.0, "fpr": 0.05, "batch_size": 128, "clean_fraction": 0.05}


def blend(x: torch.Tensor, partner: torch.Tensor, alpha: float, mean: torch.Tensor) -> torch.Tensor:
    """BackdoorBench's superimposition of normalised tensors, x_n + alpha * p_n, in pixel space."""
    return x + alpha * (partner - mean)


def entropy(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Prediction entropy per input, as theirs: softmax + 1e-8, -sum p log p."""
    p = torch.softmax(model(x), dim=1) + 1e-8
    return (-p * p.log()).sum(1)


def strip_entropy(model: nn.Module, x: torch.Tensor, partners: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Mean entropy of x blended with each partner (one batch x, (N, C, H, W) partners)."""
    mean = getattr(model, "mean", torch.zeros(1, x.shape[1], 1, 1, device=x.device))
    per_forward = max(1, CHUNK // max(1, x.numel()))  # several partners per forward: fewer, larger batches
    with torch.no_grad():
        parts = [entropy(model, blend(x[None], partners[i:i + per_forward, None], alpha, mean).flatten(0, 1))
                 .view(-1, len(x)) for i in range(0, len(partners), per_forward)]
        return torch.cat(parts).mean(0)


def strip_scores(model: nn.Module, x: torch.Tensor, pool: torch.Tensor, n: int, alpha: float, batch_size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Entropies of every input, each batch blended with its own draw of n pool images."""
    out = []
    for i in range(0, len(x), batch_size):
        pick = torch.randperm(len(pool), generator=generator)[:n]
        out.append(strip_entropy(model, x[i:i + batch_size], pool[pick.to(pool.device)], alpha).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def threshold_low(clean_entropy: torch.Tensor, fpr: float) -> float:
    """Theirs: the sorted clean entropies' element at int(fpr * n)."""
    ordered, _ = clean_entropy.float().sort()
    return float(ordered[int(fpr * len(ordered))])


def _read(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x, y) for x, y in loader]) if len(loader) else ((torch.zeros(0),), (torch.zeros(0),))
    return torch.cat(xs), torch.cat(ys)


def clean_pool(cfg: dict[str, Any], clean_fraction: float) -> tuple[torch.Tensor, str]:
    """The defender's clean images (module doc) and where they come from."""
    data = cfg["data"]
    held = validation_split(cfg)
    if held is not None and held.size >= 2:
        select, source = held.indices, "validation"
    else:
        n = split_count(data["dir"], "train", 0, 1, limit=data.get("train_limit"))
        select, source = np.arange(max(2, int(np.ceil(clean_fraction * n)))), "train_clean"
    x, _ = _read(make_loader(Path(data["dir"]), "train", 256, img_size=data.get("img_size"),
                             limit=data.get("train_limit"), cache_dir=data.get("cache"), select=select))
    return x, source


def inspected(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, triggered?): the clean test images, then the triggered non-target ones."""
    data, limit = cfg["data"], (cfg.get("eval") or {}).get("limit")
    plan = test_plan(cfg)
    clean, _ = _read(make_loader(Path(data["dir"]), "test", 256, img_size=data.get("img_size"), limit=limit))
    bad, y = _read(make_loader(Path(data["dir"]), "test", 256, img_size=data.get("img_size"), limit=limit,
                               poison=plan))
    bad = bad[y != plan.poison.target]
    return torch.cat([clean, bad]), torch.cat([torch.zeros(len(clean), dtype=torch.bool),
                                               torch.ones(len(bad), dtype=torch.bool)])


def check_options(options: dict[str, Any]) -> None:
    if int(options["n"]) < 1 or int(options["batch_size"]) < 1:
        raise ValueError("eval.detectors.strip.n and batch_size must be >= 1")
    if not 0 < float(options["fpr"]) < 1 or not 0 < float(options["clean_fraction"]) <= 1:
        raise ValueError("eval.detectors.strip.fpr must be in (0, 1) and clean_fraction in (0, 1]")


@ANALYSES.register("strip")
class StripDetector(Detector):
    """STRIP on the test split, threshold from the defender's clean pool (module doc)."""

    order = 51
    default_config = DEFAULTS

    def validate(self, options: dict[str, Any]) -> None:
        check_options(options)

    def detect(self, ctx: EvalContext, options: dict[str, Any]) -> dict[str, Any]:
        model, device = ctx.model.eval(), ctx.device
        pool, source = clean_pool(ctx.cfg, float(options["clean_fraction"]))
        pool = pool.to(device)
        x, triggered = inspected(ctx.cfg)
        gen = torch.Generator().manual_seed(int(ctx.cfg["seed"]))
        n, alpha, bs = int(options["n"]), float(options["alpha"]), int(options["batch_size"])
        pool_entropy = strip_scores(model, pool, pool, n, alpha, bs, gen)
        threshold = threshold_low(pool_entropy, float(options["fpr"]))
        test_entropy = torch.cat([strip_scores(model, x[i:i + bs].to(device), pool, n, alpha, bs, gen)
                                  for i in range(0, len(x), bs)])
        scores = (-test_entropy).numpy()
        flagged = (test_entropy < threshold).numpy()
        return detection_columns("strip", scores, triggered.numpy(), flagged) | {
            "det_strip_threshold": threshold, "det_strip_n_pool": int(len(pool)), "det_strip_pool": source}

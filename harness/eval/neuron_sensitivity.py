"""Neuron sensitivity (Zhang, Liu, Liu et al., IEEE TIP 2021): how much a neuron's output moves
between a benign input and its adversarial version.

Sensitivity of neuron (channel) m of layer l over N inputs:
    sigma_{l,m} = (1/N) sum_i (1/dim) |F_{l,m}(x_i) - F_{l,m}(x'_i)|_1
with x' from PGD and dim the size of one neuron's output (H*W for a conv channel, the token
count for a transformer feature). A layer's value is the mean over its neurons; the model's
summary is the mean over the layers the classifier reports (`Classifier.layer_names()`: timm's
feature stages). Robust models have lower sensitivity (the paper's finding); every evaluated
cell stores both the summary and the per-layer profile (harness/run/cell.py).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from harness.attacks.base import Attack
from harness.attacks.pgd import PGD
from harness.data.loader import make_loader
from harness.core.registry import ANALYSES
from harness.eval.stage import Analysis, EvalContext


@dataclass
class SensitivityResult:
    value: float  # mean over layers
    layers: dict[str, float]  # layer name -> mean sensitivity of its neurons

    def layers_json(self) -> str:
        return json.dumps(self.layers)


def per_neuron_distance(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (1/dim) |F_m(x) - F_m(x')|_1, one value per neuron (channel).

    Layouts: N x C x H x W (conv; neuron = channel), N x T x D (tokens; neuron = feature),
    N x D (vector)."""
    diff = (clean - adv).abs()
    if diff.dim() == 4:
        return diff.mean(dim=(2, 3)).mean(0)
    if diff.dim() == 3:
        return diff.mean(dim=1).mean(0)
    if diff.dim() == 2:
        return diff.mean(0)
    raise ValueError(f"neuron sensitivity: unsupported layer output shape {tuple(clean.shape)}")


@contextmanager
def recorded_outputs(model: nn.Module, layers: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Forward hooks on the named submodules that record outputs while the block is open."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"neuron sensitivity: the model has no layers {missing}; "
                         f"pick names from the model's named_modules()")
    store: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []
    for name in layers:
        def hook(_module: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            store[name].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def default_layers(model: nn.Module) -> list[str]:
    names = model.layer_names() if hasattr(model, "layer_names") else []
    if not names:
        raise ValueError("neuron sensitivity: the model reports no layers (Classifier.layer_names() "
                         "is empty); pass `layers` explicitly")
    return names


def batch_sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                      layers: list[str]) -> dict[str, torch.Tensor]:
    """Per-neuron sensitivity of each layer on one batch (x' from `attack`, crafted with hooks off)."""
    x_adv = attack(model, x, y)
    model.eval()
    with torch.no_grad(), recorded_outputs(model, layers) as store:
        model(x)
        model(x_adv)
    return {name: per_neuron_distance(outs[0], outs[1]) for name, outs in store.items()}


def neuron_sensitivity(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], attack: Attack,
                       layers: list[str] | None = None) -> SensitivityResult:
    """Sensitivity profile of `model` over `batches` (sample-weighted mean over batches)."""
    layers = layers or default_layers(model)
    sums: dict[str, torch.Tensor] = {}
    total = 0
    for x, y in batches:
        for name, value in batch_sensitivity(model, x, y, attack, layers).items():
            sums[name] = sums.get(name, 0) + value * y.shape[0]
        total += y.shape[0]
    if total == 0:
        raise ValueError("neuron sensitivity: no samples to analyse")
    per_layer = {name: float((s / total).mean()) for name, s in sums.items()}
    return SensitivityResult(value=sum(per_layer.values()) / len(per_layer), layers=per_layer)


def analyse_cell(cfg: dict[str, Any], model: nn.Module,
                 device: torch.device | str = "cpu") -> SensitivityResult | None:
    """The analysis for one evaluated cell, as `eval.neuron_sensitivity` configures it
    (PGD at the data's eps on the first `limit` test images, on the cell's `device`, where the
    model already is); None when switched off."""
    ns_cfg = dict((cfg.get("eval") or {}).get("neuron_sensitivity") or {})
    if not ns_cfg.get("enabled", True):
        return None
    eps = float(ns_cfg.get("eps") or cfg["data"]["eps"])
    attack = PGD(eps=eps, steps=int(ns_cfg.get("steps", 10)), step_size=ns_cfg.get("step_size"))
    loader = make_loader(Path(cfg["data"]["dir"]), "test", int(ns_cfg.get("batch_size", 128)),
                         img_size=cfg["data"].get("img_size"), limit=ns_cfg.get("limit", 256))
    torch.manual_seed(int(cfg["seed"]))
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    return neuron_sensitivity(model, batches, attack, ns_cfg.get("layers"))


@ANALYSES.register("neuron_sensitivity")
class NeuronSensitivity(Analysis):
    """Columns `neuron_sensitivity` (mean over layers) and `neuron_sensitivity_layers` (JSON)."""

    always = True
    order = 30

    def applies(self, cfg: dict[str, Any]) -> bool:
        return bool(((cfg.get("eval") or {}).get("neuron_sensitivity") or {}).get("enabled", True))

    def run(self, ctx: EvalContext) -> None:
        result = analyse_cell(ctx.cfg, ctx.model, ctx.device)
        if result is not None:
            ctx.columns |= {"neuron_sensitivity": result.value, "neuron_sensitivity_layers": result.layers_json()}

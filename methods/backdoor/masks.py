"""What the pruning defenses share: BatchNorm neurons of a classifier, gated per channel.

A BatchNorm2d computes y = w * xhat + b per channel. The defenses of this family rescale the two
terms separately: ANP multiplies w by a (learned) mask and perturbs w and b; CLP zeroes w and b of
the channels it prunes; ANP's pruning zeroes w only. `GatedBatchNorm` wraps a classifier and, by
one forward hook per BatchNorm2d, turns its output into a * (y - b) + g * b (so a * w * xhat +
g * b), with per-channel gates (a, g) that `gates(i)` returns: hard 0/1 buffers here, a mask plus
a perturbation in ANP's subclass. The wrapped weights are never edited: the gates are buffers (or
parameters) beside them, saved with the checkpoint, broadcast by DDP.

FP's PrunedClassifier (methods/fp.py) masks the last stage's outputs instead (its ranking is by
activation, not by BatchNorm neuron); both expose the wrapped classifier's hook points.

At scale: a ResNet-18 has 4,800 BatchNorm channels (two C-vectors each: 40 kB); the hook adds two
multiply-adds per activation, the cost of one more BatchNorm.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from architectures.classifier import Classifier


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every affine BatchNorm2d, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """(BatchNorm name, the Conv2d before it, BatchNorm) for every BatchNorm2d: the last Conv2d seen
    before it in module order, the rule of CLP's code (`CLP_prune`); in timm's ResNets each conv is
    registered right before its BatchNorm (downsample included). A BatchNorm whose channel count
    is not its conv's output channels (a pre-activation block) is an error naming it."""
    pairs, conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and module.affine:
            if conv is None or conv.out_channels != module.num_features:
                raise ValueError(f"BatchNorm '{name}' does not follow a conv with {module.num_features} output "
                                 f"channels; CLP pairs each BatchNorm with the conv registered before it")
            pairs.append((name, conv, module))
        elif isinstance(module, nn.Conv2d):
            conv = module
    return pairs


class GatedBatchNorm(nn.Module):
    """A classifier whose BatchNorm2d channels are gated: output a * (y - b) + g * b per channel.

    `weight_gate_<i>` and `bias_gate_<i>` (buffers, ones) are the hard gates of layer i; the pruning
    defenses set them to 0. `pruned` records that a defense has decided (restored on resume)."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model
        self.layers = [name for name, _ in batchnorm_layers(model)]
        modules = dict(model.named_modules())
        for i, name in enumerate(self.layers):
            channels = modules[name].num_features
            self.register_buffer(f"weight_gate_{i}", torch.ones(channels))
            self.register_buffer(f"bias_gate_{i}", torch.ones(channels))
            modules[name].register_forward_hook(self._hook(i))
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))

    def _hook(self, i: int):
        def hook(module: nn.BatchNorm2d, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            a, g = self.gates(i)
            bias = module.bias.view(1, -1, 1, 1)
            return a.view(1, -1, 1, 1) * (output - bias) + g.view(1, -1, 1, 1) * bias
        return hook

    def gates(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight gate, bias gate) of layer i (subclasses add learned masks or perturbations)."""
        return getattr(self, f"weight_gate_{i}"), getattr(self, f"bias_gate_{i}")

    def batchnorms(self) -> list[nn.BatchNorm2d]:
        modules = dict(self.model.named_modules())
        return [modules[name] for name in self.layers]

    def set_pruned(self, pruned: list[torch.Tensor], bias: bool) -> None:
        """Gate off the channels flagged in `pruned` (one bool vector per layer): their weight term,
        and their bias term too where `bias` (CLP zeroes both, ANP the weight only)."""
        with torch.no_grad():
            for i, flags in enumerate(pruned):
                flags = flags.to(getattr(self, f"weight_gate_{i}").device)
                getattr(self, f"weight_gate_{i}").masked_fill_(flags, 0.0)
                if bias:
                    getattr(self, f"bias_gate_{i}").masked_fill_(flags, 0.0)
            self.pruned.fill_(True)

    def pruned_per_layer(self) -> list[int]:
        return [int((getattr(self, f"weight_gate_{i}") == 0).sum()) for i in range(len(self.layers))]

    def pruned_count(self) -> int:
        return sum(self.pruned_per_layer())

    def summary(self) -> dict[str, Any]:
        """Pruned channels (in all, per BatchNorm layer) out of all: a pruning defense's record."""
        return {"pruned_channels": self.pruned_count(), "channels": self.channel_count(),
                "pruned_per_layer": dict(zip(self.layers, self.pruned_per_layer()))}

    def channel_count(self) -> int:
        return int(sum(getattr(self, f"weight_gate_{i}").numel() for i in range(len(self.layers))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def layer_names(self) -> list[str]:
        """The wrapped classifier's hook points (neuron sensitivity evaluates the gated model)."""
        return [f"model.{name}" for name in self.model.layer_names()]


def no_batchnorm_message(method: str, arch: str) -> str:
    return (f"method={method} prunes BatchNorm neurons, and arch={arch} has no BatchNorm2d layer "
            f"(a ViT normalises with LayerNorm). Fix: pick an architecture with BatchNorm "
            f"(e.g. arch=test_resnet or arch=resnet18), or a defense that needs none (ft, fp, nad, nc)")

"""CLP — Channel Lipschitzness-based Pruning (Zheng, Tang, Li, Liu; ECCV 2022): data-free.

A backdoor's channels are the ones whose output can grow most with their input. For each
BatchNorm2d channel k after a conv with kernel W_k (in x kh x kw), the upper bound of the
channel's Lipschitz constant (UCLC) is the largest singular value of W_k reshaped to
(in, kh*kw), times |gamma_k / sqrt(running_var_k)|. Within each layer, the channels whose bound
exceeds mean + u * std of the layer's bounds (u = 3; torch's unbiased std) are pruned: their
BatchNorm weight and bias are zeroed (gated to 0 here: methods/backdoor/masks.py). No data, no
fine-tuning: the pruning runs in `build` on the grid's backdoored ERM model (the upstream), and
the stage trains 0 epochs (the trainer saves the pruned model as it is).

Reference: SCLBD/BackdoorBench defense/clp.py (`CLP_prune`; config/defense/clp/cifar10.yaml u 3),
a port of the authors' rkteddy/channel-Lipschitzness-based-pruning; compared in
benchmarks/conformance_checks/backdoorbench_pruning.py. Where we differ: BackdoorBench sweeps
u over linspace(0, 10, 21) and reports every u's TEST accuracy and ASR; we run the one `u` (its
default 3: the paper's and its yaml's). Like theirs, each BatchNorm is paired with the conv
registered right before it (timm ResNets register conv, then its BatchNorm; an architecture where
that is not the conv feeding it is refused, naming the layer). Options (ours): `epochs` > 0
fine-tunes the pruned model on the clean subset (`clean_subset`, 5%) with BackdoorBench's generic
defense trainer settings (SGD 0.01, momentum 0.9, wd 5e-4, cosine, batch 256); the gates stay.

At scale: one SVD of an (in, k*k) matrix per channel (ResNet-18: 4,800 matrices of at most
512 x 9), batched per layer, on the CPU in well under a second; nothing depends on the data size.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.backdoor.masks import GatedBatchNorm, conv_batchnorm_pairs
from methods.backdoor.pruning import PruneThenFineTune
from methods.ft import load_weights


@torch.no_grad()
def channel_lipschitz_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC per output channel: sigma_max(W_k as (in, kh*kw)) * |gamma_k / sqrt(running_var_k)|
    (no BatchNorm eps, as CLP's code), in float64."""
    weight = conv.weight.detach().double()
    per_channel = weight.reshape(weight.shape[0], weight.shape[1], -1)
    sigma = torch.linalg.matrix_norm(per_channel, ord=2)
    scale = (bn.weight.detach().double() / bn.running_var.detach().double().sqrt()).abs()
    return sigma * scale


def clp_prune_flags(model: nn.Module, u: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per BatchNorm layer: the bounds, the flags bound > mean + u * std of the layer)."""
    bounds, flags = [], []
    for _name, conv, bn in conv_batchnorm_pairs(model):
        b = channel_lipschitz_bounds(conv, bn)
        bounds.append(b)
        flags.append(b > b.mean() + u * b.std())
    return bounds, flags


@METHODS.register("clp")
class CLP(PruneThenFineTune):
    """Data-free: prune BatchNorm channels with outlying Lipschitz bounds; no training by default."""

    name = "clp"
    backdoor_defense = True
    needs_batchnorm: ClassVar[bool] = True
    paper: ClassVar[dict[str, str]] = {"title": "Data-free Backdoor Removal based on Channel Lipschitzness",
                                       "venue": "ECCV", "year": "2022"}

    def __init__(self, u: float = 3.0, clean_subset: float = 0.05, epochs: int = 0, batch_size: int = 256,
                 lr: float = 0.01, lr_schedule: str = "cosine", lr_milestones: list[int] = (), lr_gamma: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False,
                 backdoored_checkpoint: str | None = None) -> None:
        super().__init__(clean_subset, epochs, batch_size, lr, lr_schedule, lr_milestones, lr_gamma, momentum,
                         weight_decay, nesterov, cutout_length=0, backdoored_checkpoint=backdoored_checkpoint)
        if not float(u) >= 0 or int(epochs) < 0:
            raise ValueError(f"clp needs u >= 0 and epochs >= 0; got u={u}, epochs={epochs}")
        self.u = float(u)

    def build(self, model: Classifier) -> nn.Module:
        module = GatedBatchNorm(load_weights(model, self.backdoored_checkpoint))
        bounds, flags = clp_prune_flags(module.model, self.u)
        module.set_pruned(flags, bias=True)
        self.module, self.stats = module, {"max_bound": dict(zip(module.layers, (float(b.max()) for b in bounds)))}
        return module

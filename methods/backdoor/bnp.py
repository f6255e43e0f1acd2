"""BNP — BatchNorm-statistics neuron pruning (Zheng, Tang, Li, Liu; NeurIPS 2022, "Pre-activation
Distributions Expose Backdoor Neurons"), as SCLBD/BackdoorBench defense/bnp.py runs it.

A backdoor neuron's pre-activation distribution on poisoned inputs departs from the one the
model learned. For every BatchNorm2d channel, BackdoorBench's `bnp_defense` compares the running
statistics (mean_2, var_2: what training saw) with the statistics of the BatchNorm's INPUT on ONE
batch (mean_1, var_1; torch's unbiased var over N, H, W; model in eval mode):
    kl = log(var_2 / var_1) + (var_1 + (mean_1 - mean_2)^2) / (2 var_2) - 1/2
(their formula, written as is: the Gaussian KL has half the log term), and prunes, per layer, the
channels with kl > mean + u * std of the layer's kl (u = 3, torch's unbiased std): their BatchNorm
weight AND bias zeroed (gated to 0 here: methods/backdoor/masks.py).

Which batch: the first batch (256, `batch_size`) of a shuffled pass of the POISONED training set
with the training augmentation (`bd_train`; their `iter(bd_data_loader).next()`); the defender's
clean batch they also forward only feeds LayerNorm statistics, and its BatchNorm statistics are
overwritten by the poisoned batch's, so BatchNorm models never use it (we skip that forward).
So BNP reads a batch of the poisoned training split: `needs_train_data` is declared, and the plan
passes `train_data` (the grid cell's data, backdoor and seed); the batch is drawn in
`select_train_samples` (training only, never at evaluation, on the trainer's device), the poison
plan applied as the ERM cell's training applies it, shuffled from the cell's seed. A cell built
without the plan (no `train_data`) draws it from its own training data.

No training by default: the stage trains 0 epochs and its checkpoint is the pruned model. Options
(ours, off): `epochs` > 0 fine-tunes the pruned model on the clean subset (`clean_subset`, their
yaml's `ratio` 0.05) with BackdoorBench's generic defense trainer settings (SGD 0.01, momentum 0.9,
wd 5e-4, cosine, batch 256), the gates kept. Where we differ: BackdoorBench loops over
u in linspace(0, 10, 21) evaluating on the TEST split, but every iteration calls bnp_defense with
`args.u` (not the loop's u), so all 21 are u = 3; its saved model is u = 3 too, as ours. The
authors' repository (RJ-T/NIPS2022_EP_BNP) is not fetched here: the reference is BackdoorBench's
re-implementation (benchmarks/conformance_checks/backdoorbench_pruning.py).

At scale: one forward of one batch in eval mode (ImageNet ResNet-50: 256 images), two C-vectors
per BatchNorm channel; nothing depends on the data size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.backdoor.masks import GatedBatchNorm, batchnorm_layers
from methods.backdoor.pruning import PruneThenFineTune
from methods.base import TrainSamples
from methods.ft import load_weights


@torch.no_grad()
def pre_activation_stats(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, unbiased var) over (N, H, W) of every affine BatchNorm2d's input on batch `x`, the model
    in eval mode (their BatchNorm2d_MBNS with collect_stats), in module order."""
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [bn.register_forward_hook(lambda m, inputs, out: stats.append((inputs[0].mean((0, 2, 3)),
                                                                           inputs[0].var((0, 2, 3)))))
             for _, bn in batchnorm_layers(model)]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def bnp_prune_flags(model: nn.Module, x: torch.Tensor, u: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per BatchNorm layer: kl per channel, the flags kl > mean + u * std of the layer) on batch `x`."""
    kls, flags = [], []
    for (mean_1, var_1), (_, bn) in zip(pre_activation_stats(model, x), batchnorm_layers(model)):
        mean_2, var_2 = bn.running_mean, bn.running_var
        kl = (var_2 / var_1).log() + (var_1 + (mean_1 - mean_2).pow(2)) / (2 * var_2) - 0.5
        kls.append(kl)
        flags.append(kl > kl.mean() + u * kl.std())
    return kls, flags


@METHODS.register("bnp")
class BNP(PruneThenFineTune):
    """Prune BatchNorm channels whose pre-activation statistics on a poisoned batch are outliers."""

    name = "bnp"
    needs_batchnorm: ClassVar[bool] = True
    needs_train_data: ClassVar[bool] = True  # one batch of the poisoned training split (module docstring)
    paper: ClassVar[dict[str, str]] = {"title": "Pre-activation Distributions Expose Backdoor Neurons",
                                       "venue": "NeurIPS", "year": "2022"}

    def __init__(self, u: float = 3.0, clean_subset: float = 0.05, epochs: int = 0, batch_size: int = 256,
                 lr: float = 0.01, lr_schedule: str = "cosine", lr_milestones: list[int] = (), lr_gamma: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False,
                 train_data: dict[str, Any] | None = None, backdoored_checkpoint: str | None = None) -> None:
        super().__init__(clean_subset, epochs, batch_size, lr, lr_schedule, lr_milestones, lr_gamma, momentum,
                         weight_decay, nesterov, cutout_length=0, backdoored_checkpoint=backdoored_checkpoint)
        if not float(u) >= 0 or int(epochs) < 0 or int(batch_size) < 2:
            raise ValueError(f"bnp needs u >= 0, epochs >= 0 and batch_size >= 2 (a variance per channel); "
                             f"got u={u}, epochs={epochs}, batch_size={batch_size}")
        self.u, self.train_data = float(u), train_data

    def build(self, model: Classifier) -> nn.Module:
        self.module = GatedBatchNorm(load_weights(model, self.backdoored_checkpoint))
        return self.module

    def poisoned_batch(self, samples: TrainSamples) -> torch.Tensor:
        """The first batch of a shuffled, augmented pass of the poisoned training split (theirs: bd_train)."""
        from harness.backdoor.plan import train_plan
        from harness.data.loader import make_loader

        cfg = samples.cfg
        if self.train_data is not None:  # the grid cell's data and poison, not this node's clean subset
            cfg = {**cfg, **{k: self.train_data[k] for k in ("data", "backdoor", "seed")}}
        plan = train_plan(cfg)
        dcfg = cfg["data"]
        loader = make_loader(Path(dcfg["dir"]), "train", self.batch_size, shuffle=True, seed=int(cfg["seed"]),
                             epoch=0, img_size=dcfg.get("img_size"), augment=dcfg.get("augment"),
                             limit=dcfg.get("train_limit"), cache_dir=dcfg.get("cache"),
                             poison=plan.for_epoch(0) if plan is not None else None)
        for x, _ in loader:
            if len(x) < 2:
                raise ValueError(f"bnp needs a batch of at least 2 images for a variance per channel; the training "
                                 f"split gave {len(x)}")
            return x.to(samples.device)
        raise ValueError("bnp: the training split is empty")

    def select_train_samples(self, samples: TrainSamples) -> np.ndarray | None:
        """Prune once before training (a resumed run keeps the gates its checkpoint restored); train
        (optional fine-tuning) on the whole clean subset."""
        module = self.module
        assert module is not None, "build() comes first"
        if not bool(module.pruned):
            kls, flags = bnp_prune_flags(module.model, self.poisoned_batch(samples), self.u)
            module.set_pruned(flags, bias=True)
            self.stats = {"max_kl": dict(zip(module.layers, (float(k.max()) for k in kls)))}
        return None

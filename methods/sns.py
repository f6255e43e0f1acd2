"""Sensitive-neuron stabilising training (SNS; Zhang, Liu, Liu et al., IEEE TIP 2021).

On top of PGD-AT: L = CE(f(x'), y) + lam * sum_l mean_{m in S_l} d_m(x, x'), where
d_m = (1/N) sum_i (1/dim) |F_m(x_i) - F_m(x'_i)|_1 (the neuron sensitivity of
harness/eval/neuron_sensitivity.py, here with gradients) and S_l the `topk` fraction of layer l's
neurons that are most sensitive on this batch (selected without gradient).
The features come from forward hooks on the raw (unwrapped) classifier that record only inside
this method's own forward passes: they are off while the attack runs.
Our choices (the paper's exact k, lambda and layers were not available to us; all are config):
CE on the adversarial batch, topk 0.1, lam 1.0, layers = the classifier's feature stages.
No official training code exists (the authors' group published the metric, in its EvalBox's
sns.py, which harness/eval/neuron_sensitivity.py follows; not mirrored here), so nothing can be
compared side by side: tests/test_neuron_sensitivity.py checks the sensitivity and the
stabilising term against hand computations instead. The PGD-AT part crafts as `pgd_at` does
(eval mode, uniform start, step eps/4); BatchNorm sees x and x' (SNS's own two forwards), not
PGD-AT's extra clean logging forwards. recipe=paper (configs/recipes/paper/sns.yaml) is ours:
PGD-AT's bag-of-tricks recipe.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.eval.neuron_sensitivity import default_layers, per_neuron_distance
from harness.core.registry import METHODS
from methods.base import TrainContext
from methods.pgd_at import PGDAT


@METHODS.register("sns")
class SNS(PGDAT):
    name = "sns"
    paper: ClassVar[dict[str, str]] = {"title": "Interpreting and Improving Adversarial Robustness of Deep Neural Networks with Neuron Sensitivity", "venue": "IEEE TIP", "year": "2021"}

    def __init__(self, attack: dict[str, Any], lam: float = 1.0, topk: float = 0.1,
                 layers: list[str] | None = None) -> None:
        super().__init__(attack)
        if not 0 < float(topk) <= 1:
            raise ValueError(f"sns topk is a fraction of each layer's neurons in (0, 1], got {topk}")
        self.lam, self.topk = float(lam), float(topk)
        self.layers = list(layers) if layers else None
        self._recording: dict[str, torch.Tensor] | None = None
        self._handles: list[Any] = []

    def build(self, model: Classifier) -> nn.Module:
        self.layers = self.layers or default_layers(model)
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise ValueError(f"sns: the model has no layers {missing}; known stages: {default_layers(model)}")
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return model

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
            if self._recording is not None:
                self._recording[name] = out[0] if isinstance(out, tuple) else out
        return hook

    @property
    def hooks_recording(self) -> bool:
        return self._recording is not None

    def _forward_recorded(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._recording = {}
        try:
            logits = module(x)
            return logits, self._recording
        finally:
            self._recording = None

    def stabilising_loss(self, clean: dict[str, torch.Tensor], adv: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(clean.values())).device)
        for name in self.layers or []:
            distance = per_neuron_distance(clean[name], adv[name])
            k = max(1, int(round(self.topk * distance.numel())))
            top = torch.topk(distance.detach(), k).indices
            total = total + distance[top].mean()
        return total

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        x_adv = self.attack(ctx.classifier, x, y)  # hooks are off: nothing is recorded here
        _, clean = self._forward_recorded(module, x)
        logits_adv, adv = self._forward_recorded(module, x_adv)
        ce = F.cross_entropy(logits_adv, y)
        stab = self.stabilising_loss(clean, adv)
        return {"loss": ce + self.lam * stab, "loss_ce": ce.detach(), "loss_stabilise": stab.detach(),
                "train_robust_acc": (logits_adv.argmax(1) == y).float().mean()}

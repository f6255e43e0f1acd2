"""SAU: shared adversarial unlearning (Wei et al., NeurIPS 2023), as SCLBD/BackdoorBench runs it
(defense/sau.py, its `Shared_PGD` by the paper's first author; config/defense/sau/cifar10.yaml).

The model h starts from the grid's backdoored ERM model; h_0 is a frozen copy of it. Per batch of
the defender's clean 5% (no augmentation: their `get_transform(train=False)`):
1. shared PGD (`Shared_PGD.attack`): an L_inf perturbation (bound 0.2 in pixels, start at +0.2:
   `pgd_init: max`), 5 signed steps of 0.2 descending
   beta_1 * L_adv + beta_2 * L_shared, with L_adv = -(sum of CE(h(x'), y) over samples h does not
   yet misclassify + the same for h_0) / 2B (misclassified: prediction on x' differs from that on x)
   and L_shared = sum over not-yet-shared samples of JS(h(x'), h_0(x')) / B (shared: both fooled,
   to the same class); it stops early once every sample is shared;
2. the unlearning loss lambda_1 CE(h(x), y) + lambda_2 CE(h(x'), y) + lambda_3 L_SAU, with L_SAU
   over the samples where h_0 is fooled on x' (its label on x' differs from y and from its label on
   x): (-sum log(1e-6 + p_neg.clamp(max .999)) - sum log(1 + 1e-6 - p_pos.clamp(min .001))) / 2B,
   p_pos = h's probability of h_0's adversarial label and p_neg = 1 - that (their two identical
   terms, kept as they combine them); lambdas 1, 0, 1.
Both models stay in eval mode (their `model.eval()`; `train_mode: true` runs h's forward of
[x, x'] in train mode, their --train_mode flag). x' = x + delta is not clipped to [0, 1] (theirs
neither). Optimiser: Adam lr 1e-4, betas (0.9, 0.999), amsgrad, wd 0, constant lr; batch 256;
`n_rounds` 100 epochs. One outer step per batch (their `outer_steps` 1; other values refused: the
trainer steps once per batch). Their 5% is a random index set; ours the first 5% of the split.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import Method, TrainContext, Upstream
from methods.ft import load_weights, method_defaults
from methods.unlearning import adam_stage_trainer, check_clean_subset, eval_mode, frozen_copy

PGD_INITS = ("zero", "random", "max", "min")


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-class terms of JS(p_a, p_b) with both probabilities clamped at 1e-8 (their loss_js), (B, K)."""
    pa, pb = F.softmax(logits_a, 1).clamp(min=1e-8), F.softmax(logits_b, 1).clamp(min=1e-8)
    mix = 0.5 * (pa + pb)
    return 0.5 * (pa * pa.log() + pb * pb.log()) - 0.5 * (pa * mix.log() + pb * mix.log())


def shared_pgd(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor, bound: float,
               step_size: float, steps: int, beta_1: float, beta_2: float, init: str = "max") -> torch.Tensor:
    """The shared adversarial perturbation (L_inf, `bound`) of x for `model` and `reference`."""
    delta = torch.zeros_like(x)
    if init == "random":
        delta = torch.rand_like(x)
    elif init == "max":
        delta = delta + bound
    elif init == "min":
        delta = delta - bound
    delta = delta.clamp(-bound, bound)
    with torch.no_grad():
        clean, clean_ref = model(x).argmax(1), reference(x).argmax(1)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits, logits_ref = model(x + delta), reference(x + delta)
        label, label_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = label != clean, label_ref != clean_ref
        shared = fooled & fooled_ref & (label == label_ref)
        ce = F.cross_entropy(logits, y, reduction="none")[~fooled].sum() \
            + F.cross_entropy(logits_ref, y, reduction="none")[~fooled_ref].sum()
        loss_adv = -ce / 2 / x.shape[0]
        loss_shared = js_divergence(logits, logits_ref)[~shared].sum(1).sum() / x.shape[0]
        grad, = torch.autograd.grad(beta_1 * loss_adv + beta_2 * loss_shared, delta)
        delta = (delta.detach() - step_size * grad.sign()).clamp(-bound, bound)
        if bool(shared.all()):
            break
    return delta.detach()


def sau_loss(logits: torch.Tensor, adv_logits: torch.Tensor, adv_logits_ref: torch.Tensor, clean_logits_ref: torch.Tensor,
             y: torch.Tensor, lambdas: tuple[float, float, float]) -> dict[str, torch.Tensor]:
    """lambda_1 CE(h(x), y) + lambda_2 CE(h(x'), y) + lambda_3 L_SAU, with its terms."""
    label_ref = adv_logits_ref.argmax(1)
    poison = (label_ref != y) & (label_ref != clean_logits_ref.argmax(1))
    loss_cl, loss_at = F.cross_entropy(logits, y), F.cross_entropy(adv_logits, y)
    if bool(poison.any()):
        p_pos = F.softmax(adv_logits, 1).gather(1, label_ref[:, None]).squeeze(1)[poison]
        p_neg = (F.softmax(adv_logits, 1) * (1 - F.one_hot(label_ref, adv_logits.shape[1]))).sum(1)[poison]
        loss_shared = (-torch.log(1e-6 + p_neg.clamp(max=0.999)).sum()
                       - torch.log(1 + 1e-6 - p_pos.clamp(min=0.001)).sum()) / 2 / y.shape[0]
    else:
        loss_shared = logits.new_zeros(())
    l1, l2, l3 = lambdas
    return {"loss": l1 * loss_cl + l2 * loss_at + l3 * loss_shared, "loss_clean": loss_cl.detach(),
            "loss_adv": loss_at.detach(), "loss_shared": loss_shared.detach(),
            "shared_fraction": poison.float().mean()}


@METHODS.register("sau")
class SAU(Method):
    name = "sau"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples", "venue": "NeurIPS", "year": "2023"}

    def __init__(self, clean_subset: float = 0.05, n_rounds: int = 100, batch_size: int = 256, lr: float = 1e-4,
                 betas: list[float] = (0.9, 0.999), weight_decay: float = 0.0, amsgrad: bool = True,
                 norm_type: str = "L_inf", trigger_norm: float = 0.2, adv_lr: float = 0.2, pgd_init: str = "max",
                 adv_steps: int = 5, beta_1: float = 0.01, beta_2: float = 1.0, lmd_1: float = 1.0, lmd_2: float = 0.0,
                 lmd_3: float = 1.0, outer_steps: int = 1, train_mode: bool = False,
                 backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        self.clean_subset = check_clean_subset(self.name, clean_subset)
        if norm_type != "L_inf":
            raise ValueError(f"sau: norm_type {norm_type!r} is not implemented; L_inf (BackdoorBench's default) is")
        if pgd_init not in PGD_INITS:
            raise ValueError(f"sau: pgd_init must be one of {', '.join(PGD_INITS)}, got {pgd_init!r}")
        if int(outer_steps) != 1:
            raise ValueError(f"sau: outer_steps must be 1 (the trainer takes one step per batch), got {outer_steps}")
        if int(adv_steps) < 1 or float(trigger_norm) <= 0:
            raise ValueError(f"sau needs adv_steps >= 1 and trigger_norm > 0, got {adv_steps}, {trigger_norm}")
        self.bound, self.step_size, self.steps = float(trigger_norm), float(adv_lr), int(adv_steps)
        self.init, self.beta_1, self.beta_2 = pgd_init, float(beta_1), float(beta_2)
        self.lambdas = (float(lmd_1), float(lmd_2), float(lmd_3))
        self.train_mode = bool(train_mode)
        self.backdoored_checkpoint = backdoored_checkpoint
        self.reference: nn.Module | None = None

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**method_defaults(cls), **method_cfg}
        return adam_stage_trainer(s["n_rounds"], s["batch_size"], s["lr"], s["betas"], s["weight_decay"], s["amsgrad"])

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        return {"augment": {}}  # get_transform(train=False): no augmentation

    def build(self, model: Classifier) -> nn.Module:
        load_weights(model, self.backdoored_checkpoint)
        self.reference = frozen_copy(model)  # h_0: the backdoored model as loaded (not checkpointed: rebuilt so)
        return model

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raw = ctx.classifier
        reference = self.reference
        assert reference is not None, "build() comes first"
        if next(reference.parameters()).device != x.device:
            reference.to(x.device)
        with eval_mode(raw), torch.enable_grad():
            delta = shared_pgd(raw, reference, x, y, self.bound, self.step_size, self.steps, self.beta_1,
                               self.beta_2, self.init)
        with eval_mode(raw):
            if self.train_mode:
                raw.train()
            both = module(torch.cat([x, x + delta]))
        logits, adv_logits = both.split(x.shape[0])
        with torch.no_grad():
            clean_ref, adv_ref = reference(x), reference(x + delta)
        logs = sau_loss(logits, adv_logits, adv_ref, clean_ref, y, self.lambdas)
        logs["train_acc"] = (logits.argmax(1) == y).float().mean().detach()
        logs["train_shared_adv_acc"] = (adv_logits.argmax(1) == y).float().mean().detach()
        return logs

"""ANP — Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), as SCLBD/BackdoorBench runs it.

Backdoor neurons are the ones whose small perturbation collapses the model. Every BatchNorm2d
channel gets a mask m (init 1) and, while perturbed, a multiplicative noise on its weight term
(m + delta) and bias term (1 + xi); the BatchNorm computes (w * coeff_w) * xhat + b * coeff_b
(utils/defense_utils/anp/anp_model/anp_batchnorm.py `NoisyBatchNorm2d`; here the same gates on the
BatchNorm output, methods/backdoor/masks.py). On the defender's clean 5%, each batch
(defense/anp.py `mask_train`):
1. delta, xi ~ U(-eps, eps) (eps 0.4); `anp_steps` (1) signed-gradient ascent steps of the
   cross-entropy on them, step eps / anp_steps (their SGD on sign(grad), no momentum, no clip);
2. the masks take one step of alpha * CE(clean) + (1 - alpha) * CE(perturbed) (alpha 0.2) with
   SGD momentum 0.9 (BackdoorBench's lr 0.01, its yaml `lr`; the authors' code uses 0.2), then
   are clipped to [0, 1].
The network's weights stay fixed; it runs in train mode (batch statistics) as theirs, and its
running statistics are left untouched (BatchNorm momentum 0 here; theirs trains a copy and prunes
the original). After the last epoch, every channel whose mask is <= `pruning_threshold` (0.2) has
its BatchNorm weight zeroed (their `pruning`: the weight only, the bias stays), and the model is
the original with those channels pruned (the learned mask values are not applied).

Iterations: theirs draws 2,000 batches of 256 with replacement (`nb_iter`, RandomSampler); ours
runs `epochs` passes over the clean subset (200 at batch 256 = 2,000 steps on CIFAR-10's 2,500
clean images). Where we differ: BackdoorBench sweeps thresholds 0 to 0.9 and keeps the one with the
lowest TEST ASR; we prune at the one threshold (0.2, the authors' README and the brief of
BackdoorBench's `pruning_by: threshold`), deciding nothing on the test split.

At scale: two extra forwards and one extra backward per step (three forwards, as theirs) over 5% of
the data; the learned state is two C-vectors per BatchNorm channel.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.backdoor.masks import GatedBatchNorm
from methods.backdoor.pruning import MaskLearning
from methods.base import Method, TrainContext, Upstream
from methods.ft import finetune_trainer, load_weights


class PerturbedBatchNorm(GatedBatchNorm):
    """GatedBatchNorm with ANP's learned mask and noise per BatchNorm channel (parameters)."""

    def __init__(self, model: Classifier) -> None:
        super().__init__(model)
        for i, bn in enumerate(self.batchnorms()):
            self.register_parameter(f"mask_{i}", nn.Parameter(torch.ones(bn.num_features)))
            self.register_parameter(f"noise_{i}", nn.Parameter(torch.zeros(bn.num_features)))
            self.register_parameter(f"noise_bias_{i}", nn.Parameter(torch.zeros(bn.num_features)))
        self.perturbed = False
        self._hard = False  # set once per forward: the pruned model (eval mode, after pruning)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._hard = not self.training and bool(self.pruned)  # one device read per forward, not per layer
        return self.model(x)

    def masks(self) -> list[nn.Parameter]:
        return [getattr(self, f"mask_{i}") for i in range(len(self.layers))]

    def noises(self) -> list[nn.Parameter]:
        return [p for i in range(len(self.layers)) for p in (getattr(self, f"noise_{i}"), getattr(self, f"noise_bias_{i}"))]

    def gates(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, g = super().gates(i)
        if self._hard:  # the pruned model: the original weights with hard gates only
            return a, g
        mask = getattr(self, f"mask_{i}")
        if self.perturbed:
            return a * (mask + getattr(self, f"noise_{i}")), g * (1.0 + getattr(self, f"noise_bias_{i}"))
        return a * mask, g

    @torch.no_grad()
    def reset_noise(self, eps: float) -> None:
        """delta, xi ~ U(-eps, eps) (their `reset(rand_init=True)`: init.uniform_ per layer)."""
        for i in range(len(self.layers)):
            getattr(self, f"noise_{i}").uniform_(-eps, eps)
            getattr(self, f"noise_bias_{i}").uniform_(-eps, eps)


def anp_loss(module: nn.Module, raw: PerturbedBatchNorm, x: torch.Tensor, y: torch.Tensor, eps: float,
             steps: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of `mask_train` up to the mask loss: the noise's ascent steps (on `raw`, the
    unwrapped model), then alpha * CE(clean) + (1 - alpha) * CE(perturbed) through `module`;
    (loss, clean logits, perturbed CE)."""
    rob = torch.zeros((), device=x.device)
    if eps > 0:
        raw.reset_noise(eps)
        noises = raw.noises()
        for _ in range(steps):
            raw.perturbed = True
            grads = torch.autograd.grad(-F.cross_entropy(raw(x), y), noises)
            with torch.no_grad():  # their SGD(lr = eps / steps) on sign(grad)
                for p, g in zip(noises, grads):
                    p.add_(torch.sign(g), alpha=-eps / steps)
        raw.perturbed = True
        rob = F.cross_entropy(module(x), y)
    raw.perturbed = False
    logits = module(x)
    nat = F.cross_entropy(logits, y)
    return alpha * nat + (1 - alpha) * rob, logits, rob


@METHODS.register("anp")
class ANP(MaskLearning, Method):
    name = "anp"
    backdoor_defense = True
    needs_batchnorm: ClassVar[bool] = True
    paper: ClassVar[dict[str, str]] = {"title": "Adversarial Neuron Pruning Purifies Backdoored Deep Models",
                                       "venue": "NeurIPS", "year": "2021"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 200, batch_size: int = 256, lr: float = 0.01,
                 momentum: float = 0.9, anp_eps: float = 0.4, anp_steps: int = 1, anp_alpha: float = 0.2,
                 pruning_threshold: float = 0.2, backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        if not (float(anp_eps) >= 0 and int(anp_steps) >= 1 and 0 <= float(anp_alpha) <= 1
                and 0 <= float(pruning_threshold) <= 1):
            raise ValueError(f"anp needs anp_eps >= 0, anp_steps >= 1, 0 <= anp_alpha <= 1 and 0 <= pruning_threshold "
                             f"<= 1; got {anp_eps}, {anp_steps}, {anp_alpha}, {pruning_threshold}")
        self.clean_subset, self.epochs, self.batch_size = float(clean_subset), int(epochs), int(batch_size)
        self.lr, self.momentum = float(lr), float(momentum)
        self.eps, self.steps, self.alpha = float(anp_eps), int(anp_steps), float(anp_alpha)
        self.threshold = float(pruning_threshold)
        self.backdoored_checkpoint = backdoored_checkpoint
        self.module: PerturbedBatchNorm | None = None

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        """The mask optimiser: SGD(lr, momentum 0.9), no weight decay, a constant lr."""
        return finetune_trainer(cls, {"lr_schedule": "constant", "weight_decay": 0.0, "nesterov": False,
                                      **{k: v for k, v in method_cfg.items()
                                         if k in ("epochs", "batch_size", "lr", "momentum")}}, trainer_cfg)

    def build(self, model: Classifier) -> nn.Module:
        load_weights(model, self.backdoored_checkpoint)
        for p in model.parameters():
            p.requires_grad_(False)  # only the masks learn (and the noise, by its own steps)
        self.module = PerturbedBatchNorm(model)
        if self.eps == 0:  # no perturbation: the noise is unused (DDP needs every trainable one used)
            for p in self.module.noises():
                p.requires_grad_(False)
        for bn in self.module.batchnorms():
            bn.momentum = 0.0  # batch statistics in train mode, running statistics kept (theirs prunes the original)
        return self.module

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raw = self.module
        assert raw is not None, "build() comes first"
        loss, logits, rob = anp_loss(module, raw, x, y, self.eps, self.steps, self.alpha)
        return {"loss": loss, "loss_perturbed": rob.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}

    def prune(self, module: PerturbedBatchNorm) -> None:
        """After the last epoch: prune every channel whose mask is <= the threshold (weight only)."""
        module.set_pruned([m.detach() <= self.threshold for m in module.masks()], bias=False)

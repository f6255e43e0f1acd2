"""AWP (Wu et al. 2020), adversarial weight perturbation, on PGD-AT (`awp`); TRADES-AWP is
methods/trades_awp.py.

Each step: craft x'; find the weight perturbation v from one ascent step of the loss at w (per
layer v_l = gamma * |w_l| * g_l / |g_l| for every multi-dimensional `weight`; biases, BatchNorm
and non-`weight` tensors such as a ViT's position embedding are left alone, as the official
`diff_in_weights` skips them); take the optimiser step at w + v; then remove v (`after_step`).

As the official code (csdongxian/AWP AT_AWP/train_cifar10.py and utils_awp.py; docs/conformance.md
measures v, the loss at w + v, the update and the BatchNorm statistics against it):
- The official code gets g from a proxy copy of the model (train mode, one SGD step on -loss,
  lr 0.01, no momentum) and normalises the weight difference per layer: that difference is the
  gradient's direction, so we take g directly (no proxy, one copy of the weights less) and put
  the model's BatchNorm statistics back afterwards (the proxy's forward never touched them).
- AT-AWP crafts its PGD-10 (step 2/255, uniform start) with the model in TRAIN mode: batch
  statistics in the attack's forwards, which also move the running statistics (10 steps and the
  forward that picks the best restart). After the step, the official loop runs the clean batch
  once more in train mode (for its train accuracy), which moves the running statistics again: we
  run that forward too (no gradient), so BatchNorm's statistics equal the official ones.
  `attack_mode: eval` crafts with running statistics instead (bag-of-tricks PGD-AT; our first
  version): a named option, not the paper's.
- Not reproduced: the official loop crafts each epoch's FIRST batch in eval mode (the model is
  still in eval mode from the previous epoch's test pass): an accident of where its test runs.
Under DDP the ascent gradient is averaged over ranks, so every rank applies the same v and the
replicas stay equal. gamma 0.01 for AT-AWP, 5e-3 for TRADES-AWP; no AWP before `warmup_epochs`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import IterativeAttack
from harness.core.registry import METHODS
from methods.base import TrainContext
from methods.pgd_at import PGDAT

ATTACK_MODES = ("train", "eval")


def perturbed_weights(model: nn.Module) -> list[nn.Parameter]:
    """The tensors AWP perturbs: every trainable multi-dimensional parameter named `...weight`
    (the official `diff_in_weights`: conv and linear weights; not biases, BatchNorm, embeddings)."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() > 1 and "weight" in name]


class WeightPerturbation:
    """Computes, applies and removes AWP's layer-wise scaled ascent direction."""

    def __init__(self, gamma: float) -> None:
        if gamma < 0:
            raise ValueError(f"AWP gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self._applied: list[tuple[nn.Parameter, torch.Tensor]] = []

    def compute(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """v for every perturbed weight: gamma * |w| * g / |g| with g = d loss / d w, the loss
        taken in train mode (as the official proxy); the model's buffers are left as they were."""
        params = perturbed_weights(model)
        buffers = [b.detach().clone() for b in model.buffers()]
        was_training = model.training
        model.train()
        try:
            grads = torch.autograd.grad(loss_fn(model), params, allow_unused=True)
        finally:
            model.train(was_training)
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        out = []
        for p, g in zip(params, grads):
            out.append((p, self.gamma * p.detach().norm() * g / (g.norm() + 1e-20)))
        return out

    def apply(self, perturbation: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        if self._applied:
            raise RuntimeError("AWP: a weight perturbation is already applied; call restore() first")
        with torch.no_grad():
            for p, v in perturbation:
                p.add_(v)
        self._applied = perturbation

    def restore(self) -> None:
        with torch.no_grad():
            for p, v in self._applied:
                p.sub_(v)
        self._applied = []

    @property
    def active(self) -> bool:
        return bool(self._applied)


def craft_in_train_mode(attack: IterativeAttack, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x' crafted with the model in train mode (batch statistics), as AT-AWP's official loop does:
    BatchNorm's running statistics see every step's x', then x' once more (the official
    restart-selection forward). The model's mode is restored afterwards."""
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            x_adv = attack.perturb(model, x.detach(), y.detach()).detach()
        with torch.no_grad():
            model(x_adv)
    finally:
        model.train(was_training)
    return x_adv


class AWPMixin:
    """Adds AWP to a method that has `attack` and `awp_loss(module, x, x_adv, y)`."""

    gamma: float
    warmup_epochs: int
    perturbation: WeightPerturbation

    def craft(self, ctx: TrainContext, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack(ctx.classifier, x, y)  # type: ignore[attr-defined]

    def awp_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def awp_logs(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        x_adv = self.craft(ctx, x, y)
        if ctx.epoch >= self.warmup_epochs and self.perturbation.gamma > 0:
            v = self.perturbation.compute(ctx.classifier, lambda m: self.awp_loss(m, x, x_adv, y))
            self.perturbation.apply(v)
        return self.awp_logs(module, x, x_adv, y)

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        if self.perturbation.active:
            self.perturbation.restore()


@METHODS.register("awp")
class AWP(AWPMixin, PGDAT):
    """AT-AWP: PGD-AT's attack (crafted in train mode) and CE loss, updated at w + v."""

    name = "awp"
    paper: ClassVar[dict[str, str]] = {"title": "Adversarial Weight Perturbation Helps Robust Generalization", "venue": "NeurIPS", "year": "2020"}

    def __init__(self, attack: dict[str, Any], gamma: float = 0.01, warmup_epochs: int = 0,
                 attack_mode: str = "train") -> None:
        super().__init__(attack)
        if attack_mode not in ATTACK_MODES:
            raise ValueError(f"awp attack_mode must be one of {', '.join(ATTACK_MODES)}, got {attack_mode!r} "
                             f"(train: batch statistics, as the official AT-AWP; eval: running statistics)")
        self.gamma, self.warmup_epochs, self.attack_mode = float(gamma), int(warmup_epochs), attack_mode
        self.perturbation = WeightPerturbation(self.gamma)
        self._clean: torch.Tensor | None = None

    def craft(self, ctx: TrainContext, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.attack_mode == "eval":
            return self.attack(ctx.classifier, x, y)
        return craft_in_train_mode(self.attack, ctx.classifier, x, y)

    def awp_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(module(x_adv), y)

    def awp_logs(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self._clean = x.detach()
        logits = module(x_adv)
        return {"loss": F.cross_entropy(logits, y), "train_robust_acc": (logits.argmax(1) == y).float().mean()}

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        """Remove v, then the official loop's clean train-mode forward at the new weights (its
        train accuracy), which BatchNorm's running statistics see."""
        super().after_step(module, ctx)
        if self._clean is not None and module.training:
            with torch.no_grad():
                module(self._clean)
        self._clean = None

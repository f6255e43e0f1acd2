"""AWP (Wu et al. 2020), adversarial weight perturbation, on PGD-AT (`awp`); TRADES-AWP is
methods/trades_awp.py.

Each step: craft x' as the base method does; find the weight perturbation v from one ascent step
of the base loss at w (per layer v_l = gamma * |w_l| * g_l / |g_l|, 1-D weights such as biases
and BatchNorm excluded); take the optimiser step at w + v; then remove v (`after_step`).
The official code gets g from a proxy copy of the model and one SGD step on -loss; the
normalised difference of a momentum-free step is g's direction, so we take g directly, with the
model's BatchNorm statistics restored afterwards (the proxy's forward never touched them).
Under DDP the ascent gradient is averaged over ranks, so every rank applies the same v and the
replicas stay equal. gamma 0.01 for AT-AWP, 5e-3 for TRADES-AWP; no AWP before `warmup_epochs`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.core.registry import METHODS
from methods.base import TrainContext
from methods.pgd_at import PGDAT


class WeightPerturbation:
    """Computes, applies and removes AWP's layer-wise scaled ascent direction."""

    def __init__(self, gamma: float) -> None:
        if gamma < 0:
            raise ValueError(f"AWP gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self._applied: list[tuple[nn.Parameter, torch.Tensor]] = []

    def compute(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """v for every multi-dimensional weight: gamma * |w| * g / |g| with g = d loss / d w."""
        params = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
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


class AWPMixin:
    """Adds AWP to a method that has `attack` and `awp_loss(module, x, x_adv, y)`."""

    gamma: float
    warmup_epochs: int
    perturbation: WeightPerturbation

    def awp_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def awp_logs(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        x_adv = self.attack(ctx.classifier, x, y)  # type: ignore[attr-defined]
        if ctx.epoch >= self.warmup_epochs and self.perturbation.gamma > 0:
            v = self.perturbation.compute(ctx.classifier, lambda m: self.awp_loss(m, x, x_adv, y))
            self.perturbation.apply(v)
        return self.awp_logs(module, x, x_adv, y)

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        if self.perturbation.active:
            self.perturbation.restore()


@METHODS.register("awp")
class AWP(AWPMixin, PGDAT):
    """AT-AWP: PGD-AT's attack and CE loss, updated at w + v."""

    name = "awp"
    paper: ClassVar[dict[str, str]] = {"title": "Adversarial Weight Perturbation Helps Robust Generalization", "venue": "NeurIPS", "year": "2020"}

    def __init__(self, attack: dict[str, Any], gamma: float = 0.01, warmup_epochs: int = 0) -> None:
        super().__init__(attack)
        self.gamma, self.warmup_epochs = float(gamma), int(warmup_epochs)
        self.perturbation = WeightPerturbation(self.gamma)

    def awp_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(module(x_adv), y)

    def awp_logs(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = module(x_adv)
        return {"loss": F.cross_entropy(logits, y), "train_robust_acc": (logits.argmax(1) == y).float().mean()}

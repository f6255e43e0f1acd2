"""NAD — Neural Attention Distillation (Li et al., ICLR 2021).

Teacher: the backdoored model fine-tuned on the defender's clean split (the FT cell, a
prerequisite). Student: the backdoored model itself (the ERM cell), trained on the same clean
split with CE + sum_l beta_l * AT(student_l, teacher_l), where the attention map of a feature map
f (B, C, H, W) is a = normalize(mean_c |f|^p) (p 2) and AT = mean((a_s - a_t)^2), on the last
three stages timm reports (ResNet: layer2..layer4) with betas 500, 1000, 1000 as the official
CIFAR setting. The teacher is frozen (eval mode).
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import Method, TrainContext, Upstream
from methods.ft import finetune_trainer, load_weights


def attention_map(fm: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD/AT attention: channel mean of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(fm.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


class _Taps:
    """Forward hooks that keep the outputs of named submodules from the latest forward."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for name in names:
            modules[name].register_forward_hook(self._keep(name))

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.out[name] = output
        return hook


class NADModule(nn.Module):
    """Student (trained) + frozen teacher; forward -> (student logits, summed weighted AT loss)."""

    def __init__(self, student: Classifier, teacher: Classifier, betas: list[float], p: float) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        self.layers = student.layer_names()[-len(betas):]
        self.betas = list(betas)[-len(self.layers):]
        self.p = p
        self._s, self._t = _Taps(student, self.layers), _Taps(teacher, self.layers)

    def train(self, mode: bool = True) -> "NADModule":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.student(x)
        with torch.no_grad():
            self.teacher(x)
        loss = sum(b * at_loss(self._s.out[n], self._t.out[n].detach(), self.p)
                   for b, n in zip(self.betas, self.layers))
        return logits, loss


@METHODS.register("nad")
class NAD(Method):
    name = "nad"
    paper: ClassVar[dict[str, str]] = {"title": "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks", "venue": "ICLR", "year": "2021"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 20, lr: float = 0.01, batch_size: int = 32,
                 betas: list[float] = (500.0, 1000.0, 1000.0), p: float = 2.0, teacher: dict[str, Any] | None = None,
                 backdoored_checkpoint: str | None = None, teacher_checkpoint: str | None = None) -> None:
        super().__init__()
        self.clean_subset, self.epochs, self.lr, self.batch_size = float(clean_subset), int(epochs), float(lr), int(batch_size)
        self.betas, self.p = [float(b) for b in betas], float(p)
        self.backdoored_checkpoint, self.teacher_checkpoint = backdoored_checkpoint, teacher_checkpoint

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        teacher = {"name": "ft", **(method_cfg.get("teacher") or {})}
        return [Upstream("backdoored_checkpoint", {"name": "erm"}), Upstream("teacher_checkpoint", teacher)]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        return finetune_trainer(method_cfg, trainer_cfg)

    def build(self, model: Classifier) -> nn.Module:
        load_weights(model, self.backdoored_checkpoint)
        teacher = copy.deepcopy(model)
        load_weights(teacher, self.teacher_checkpoint)
        return NADModule(model, teacher, self.betas, self.p)

    def eval_model(self, module: nn.Module) -> Classifier:
        return module.student

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [q for q in module.student.parameters() if q.requires_grad]}]

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits, at = module(x)
        ce = F.cross_entropy(logits, y)
        return {"loss": ce + at, "loss_ce": ce.detach(), "loss_at": at.detach(),
                "train_acc": (logits.argmax(1) == y).float().mean()}

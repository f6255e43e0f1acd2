"""NAD — Neural Attention Distillation (Li et al., ICLR 2021), as bboylyg/NAD runs it.

Teacher: the backdoored model fine-tuned on the defender's clean 5% (the FT cell, a prerequisite:
methods/ft.py, whose defaults are the official teacher recipe; `teacher` overrides FT's settings).
Student: the backdoored model itself (the ERM cell), trained on the same clean 5% with
CE + sum_l beta_l * AT(student_l, teacher_l). The attention map of a feature map f (B, C, H, W) is
a = s / (||s||_2 + 1e-6) with s = sum_c |f_c|^p over the channels (p 2), and AT = MSE(a_s, a_t)
(at.py, the `AT` module of AberHu's Knowledge-Distillation-Zoo that NAD uses). The maps are taken
at the outputs of the last three stages timm reports (ResNet: layer2..layer4; the official
WRN-16-1 has exactly three groups and uses all three), with betas 500, 1000, 1000 (config.py).
The teacher is frozen in eval mode; the student trains in train mode.

Stage recipe (config.py, main.py, utils/util.py): 20 epochs, batch 64, SGD momentum 0.9, wd 1e-4,
nesterov, lr 0.1 for epochs 0 and 1 then 0.01 (`adjust_learning_rate`; its 0.0001 from epoch 20 is
never reached), 5% clean data, crop + flip + Cutout(1 hole, length 3) (`cutout_length`, added to
the dataset preset's augmentation). Official differences left: the official keeps the epoch whose
test accuracy clears a threshold (we keep the last); its 5% is a random split (ours the first 5%).
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
from methods.ft import LR_SCHEDULES, FineTuning, cutout_data, finetune_trainer, load_weights, method_defaults

AT_EPS = 1e-6  # added to the map's norm (at.py)


def attention_map(fm: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD/AT attention of (B, C, H, W) features: sum over channels of |f|^p, divided by its L2 norm
    over the spatial positions plus 1e-6; returned flattened, (B, H*W)."""
    am = fm.abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + AT_EPS)


def at_loss(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the student's and teacher's attention maps."""
    return F.mse_loss(attention_map(fs, p), attention_map(ft, p))


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
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks", "venue": "ICLR", "year": "2021"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 20, batch_size: int = 64, lr: float = 0.1,
                 lr_schedule: str = "multistep", lr_milestones: list[int] = (2,), lr_gamma: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = True, cutout_length: int = 3,
                 betas: list[float] = (500.0, 1000.0, 1000.0), p: float = 2.0, teacher: dict[str, Any] | None = None,
                 backdoored_checkpoint: str | None = None, teacher_checkpoint: str | None = None) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"method.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        self.clean_subset, self.epochs, self.batch_size = float(clean_subset), int(epochs), int(batch_size)
        self.lr = float(lr)
        self.betas, self.p = [float(b) for b in betas], float(p)
        self.backdoored_checkpoint, self.teacher_checkpoint = backdoored_checkpoint, teacher_checkpoint

    @classmethod
    def teacher_method(cls, method_cfg: dict[str, Any]) -> dict[str, Any]:
        """The FT cell the teacher comes from: FT's defaults (the official teacher recipe) with the
        `teacher` overrides; equal to the grid's FT cell when there are none, so it is trained once."""
        teacher = dict(method_cfg.get("teacher") or {})
        return {"name": "ft", **method_defaults(FineTuning), **teacher}

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"}),
                Upstream("teacher_checkpoint", cls.teacher_method(method_cfg))]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        return finetune_trainer(cls, method_cfg, trainer_cfg)

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        return cutout_data(cls, method_cfg, data_cfg)

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

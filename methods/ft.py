"""FT: fine-tune a backdoored model on the defender's small clean split (5% of the training set).

The backdoored model is the grid's ERM cell on the same poisoned data (this method's upstream, a
train node of the plan: trained once, shared with the ERM row). This cell then trains on the first
`clean_subset` of the training split with poisoning off, with its own optimiser and schedule (its
stage settings below), whatever the grid's trainer preset is.

Defaults are the fine-tuning that bboylyg/NAD runs to get NAD's teacher (README "How to get
teacher model?": main.py with every beta 0, 5 to 10 epochs; BackdoorBench's NAD takes 10): batch
64, SGD momentum 0.9, wd 1e-4, nesterov, lr 0.1 for the first two epochs then 0.01
(utils/util.py `adjust_learning_rate`: lr if epoch < 2, else 0.01; its 0.0001 from epoch 20 is
never reached in 10 epochs), 10 epochs, 5% clean data; its training loader's crop + flip +
Cutout(1 hole, length 3) is the dataset preset's augmentation plus `cutout_length` (3; 0: off).
Before issue 23 this file ran a constant lr 0.01 at batch 32 with the grid's optimiser.
Official differences left: its 5% is a random split of the training set, ours the first 5% (the
data's order is already random); it keeps the epoch whose test accuracy clears a threshold, we
keep the last epoch (nothing is chosen on the test split).
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from harness.store.checkpoints import load_checkpoint
from methods.base import Method, TrainContext, Upstream

# The settings of a fine-tuning stage (FT, NAD, FP): what `finetune_trainer` turns into the
# trainer's epochs, batch, optimiser and schedule.
STAGE_SETTINGS = ("epochs", "batch_size", "lr", "lr_schedule", "lr_milestones", "lr_gamma", "momentum",
                  "weight_decay", "nesterov")
LR_SCHEDULES = ("multistep", "cosine", "constant")


def method_defaults(cls: type) -> dict[str, Any]:
    """A method class's settings with their defaults (its `__init__`), upstream checkpoints left out."""
    params = inspect.signature(cls.__init__).parameters
    return {name: _plain(p.default) for name, p in params.items()
            if name != "self" and not name.endswith("_checkpoint") and p.default is not inspect.Parameter.empty}


def stage_defaults(cls: type) -> dict[str, Any]:
    """A method class's defaults of its fine-tuning stage settings."""
    return {k: v for k, v in method_defaults(cls).items() if k in STAGE_SETTINGS}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def finetune_trainer(method_cls: type, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer overrides of a fine-tuning stage: its epochs, batch size, SGD and an lr schedule
    stepped once per epoch (the official scripts set the lr at each epoch's start)."""
    s = {**stage_defaults(method_cls), **{k: v for k, v in method_cfg.items() if k in STAGE_SETTINGS}}
    if s["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(f"method.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {s['lr_schedule']!r}")
    schedule: dict[str, Any] = {"name": s["lr_schedule"], "granularity": "epoch", "warmup_epochs": 0}
    if s["lr_schedule"] == "multistep":
        schedule.update(milestones=[int(m) for m in s["lr_milestones"]], gamma=float(s["lr_gamma"]))
    return {
        "epochs": int(s["epochs"]),
        "batch_size": int(s["batch_size"]),
        "optimizer": {"name": "sgd", "lr": float(s["lr"]), "momentum": float(s["momentum"]),
                      "weight_decay": float(s["weight_decay"]), "nesterov": bool(s["nesterov"])},
        "schedule": schedule,
    }


def cutout_data(method_cls: type, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
    """Data overrides of a stage that adds Cutout(1 hole, `cutout_length`) after the cell's crop and
    flip, as bboylyg/NAD's training loader (data_loader.py `get_train_loader`); 0 or a class
    without the setting: the cell's augmentation as it is."""
    length = int(method_cfg.get("cutout_length", method_defaults(method_cls).get("cutout_length", 0)) or 0)
    if not length:
        return {}
    return {"augment": {**(data_cfg.get("augment") or {}), "cutout": {"holes": 1, "length": length}}}


def load_weights(model: nn.Module, checkpoint: str | None) -> nn.Module:
    """Load a prerequisite cell's final weights into `model` (no-op without a checkpoint)."""
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
    return model


@METHODS.register("ft")
class FineTuning(Method):
    name = "ft"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks (the fine-tuning baseline)", "venue": "RAID", "year": "2018"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 10, batch_size: int = 64, lr: float = 0.1,
                 lr_schedule: str = "multistep", lr_milestones: list[int] = (2,), lr_gamma: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = True, cutout_length: int = 3,
                 backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"method.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        self.clean_subset, self.epochs, self.batch_size = float(clean_subset), int(epochs), int(batch_size)
        self.lr, self.lr_schedule, self.lr_gamma = float(lr), lr_schedule, float(lr_gamma)
        self.lr_milestones = list(lr_milestones)
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)
        self.cutout_length = int(cutout_length)
        self.backdoored_checkpoint = backdoored_checkpoint

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        return finetune_trainer(cls, method_cfg, trainer_cfg)

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        return cutout_data(cls, method_cfg, data_cfg)

    def build(self, model: Classifier) -> nn.Module:
        return load_weights(model, self.backdoored_checkpoint)

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        return {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}

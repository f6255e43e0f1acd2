"""FT: fine-tune a backdoored model on the defender's small clean split (5% of the training set).

The backdoored model is the grid's ERM cell on the same poisoned data (this method's upstream, a
train node of the plan: trained once, shared with the ERM row). This cell then trains on the first
`clean_subset` of the training split with poisoning off, for `epochs` epochs at a constant `lr`
(SGD as the grid's trainer, batch `batch_size`). The baseline every post-training defense must
beat: it often keeps the backdoor (BackdoorBench).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from harness.store.checkpoints import load_checkpoint
from methods.base import Method, TrainContext, Upstream


def finetune_trainer(method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer overrides of a fine-tuning stage: its epochs, batch size and a constant lr."""
    return {
        "epochs": int(method_cfg.get("epochs", 10)),
        "batch_size": int(method_cfg.get("batch_size", 32)),
        "optimizer": {**trainer_cfg["optimizer"], "lr": float(method_cfg.get("lr", 0.01))},
        "schedule": {"name": "constant", "warmup_epochs": 0},
    }


def load_weights(model: nn.Module, checkpoint: str | None) -> nn.Module:
    """Load a prerequisite cell's final weights into `model` (no-op without a checkpoint)."""
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
    return model


@METHODS.register("ft")
class FineTuning(Method):
    name = "ft"
    paper: ClassVar[dict[str, str]] = {"title": "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks (the fine-tuning baseline)", "venue": "RAID", "year": "2018"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 10, lr: float = 0.01, batch_size: int = 32,
                 backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        self.clean_subset, self.epochs, self.lr, self.batch_size = float(clean_subset), int(epochs), float(lr), int(batch_size)
        self.backdoored_checkpoint = backdoored_checkpoint

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        return finetune_trainer(method_cfg, trainer_cfg)

    def build(self, model: Classifier) -> nn.Module:
        return load_weights(model, self.backdoored_checkpoint)

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        return {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}

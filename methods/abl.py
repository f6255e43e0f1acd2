"""ABL — Anti-Backdoor Learning (Li et al., NeurIPS 2021).

Poisoned samples are learned much faster than clean ones. Stage 1 (`abl_lga`, a prerequisite
cell with the grid's trainer): train with the local gradient ascent loss sign(L - gamma) * L on
the batch-mean CE, gamma 0.5: clean samples' loss is held near gamma while poisoned samples' loss
keeps falling. Stage 2 (`abl`, this cell): the `isolation_ratio` (1%) training samples with the
lowest loss under the stage-1 model are isolated, and the model unlearns them by gradient
ascent (loss = -CE on a batch of isolated samples per step) for `epochs` (5) at lr 5e-4.

Left out on purpose: the official code's optional fine-tuning of the isolation model on the other
99% before unlearning (`--finetuning_ascent_model`); the grid's trainer already trained it for
the full schedule. The isolation precision (share of isolated samples that were poisoned, from
the recorded poison plan) is logged in the training curve. As the official code, the unlearning
forward runs BatchNorm in train mode; `freeze_bn: true` runs it in eval mode instead. Measured on
digits/BadNets: train mode takes clean accuracy from 94% to 33% (the few isolated samples, 14,
overwrite the running statistics) with ASR 0.3%; eval mode keeps 94% but the ascent from a
near-zero loss barely moves (isolated CE 0.0016 -> 0.0019) and ASR stays 97%.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import Method, TrainContext, Upstream
from methods.ft import load_weights


def lga_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's local gradient ascent: sign(CE - gamma) * CE on the batch mean."""
    loss = F.cross_entropy(logits, y)
    return torch.sign(loss - gamma) * loss


@METHODS.register("abl_lga")
class ABLIsolation(Method):
    """ABL stage 1 on its own: training with the LGA loss (the isolation model)."""

    name = "abl_lga"
    paper: ClassVar[dict[str, str]] = {"title": "Anti-Backdoor Learning: Training Clean Models on Poisoned Data (stage 1: isolation)", "venue": "NeurIPS", "year": "2021"}

    def __init__(self, gamma: float = 0.5) -> None:
        super().__init__()
        self.gamma = float(gamma)

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        return {"loss": lga_loss(logits, y, self.gamma), "train_acc": (logits.argmax(1) == y).float().mean()}


@METHODS.register("abl")
class ABL(Method):
    name = "abl"
    paper: ClassVar[dict[str, str]] = {"title": "Anti-Backdoor Learning: Training Clean Models on Poisoned Data", "venue": "NeurIPS", "year": "2021"}
    needs_train_data = True

    def __init__(self, gamma: float = 0.5, isolation_ratio: float = 0.01, epochs: int = 5, lr: float = 5e-4,
                 batch_size: int = 256, unlearn_batch: int = 64, freeze_bn: bool = False,
                 isolation_checkpoint: str | None = None,
                 train_data: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0 < float(isolation_ratio) < 1:
            raise ValueError(f"method.isolation_ratio must be in (0, 1), got {isolation_ratio}")
        self.gamma, self.isolation_ratio = float(gamma), float(isolation_ratio)
        self.epochs, self.lr, self.batch_size, self.unlearn_batch = int(epochs), float(lr), int(batch_size), int(unlearn_batch)
        self.freeze_bn = bool(freeze_bn)
        self.isolation_checkpoint, self.train_data = isolation_checkpoint, train_data
        self.isolated_x: torch.Tensor | None = None
        self.isolated_y: torch.Tensor | None = None
        self.precision = float("nan")

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("isolation_checkpoint", {"name": "abl_lga", "gamma": float(method_cfg.get("gamma", 0.5))})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        return {"epochs": int(method_cfg.get("epochs", 5)), "batch_size": int(method_cfg.get("batch_size", 256)),
                "optimizer": {**trainer_cfg["optimizer"], "lr": float(method_cfg.get("lr", 5e-4))},
                "schedule": {"name": "constant", "warmup_epochs": 0}}

    def build(self, model: Classifier) -> nn.Module:
        load_weights(model, self.isolation_checkpoint)
        if self.isolation_checkpoint and self.train_data:
            self._isolate(model)
        return model

    @torch.no_grad()
    def _isolate(self, model: Classifier) -> None:
        """Keep the isolation_ratio lowest-loss training samples (poisoned data, no augmentation)."""
        from harness.backdoor.plan import train_plan
        from harness.data.loader import make_loader

        cfg = self.train_data
        plan = train_plan(cfg)
        model.eval()
        xs, ys, losses, keys = [], [], [], []
        for x, y, k in make_loader(Path(cfg["data"]["dir"]), "train", 256, img_size=cfg["data"].get("img_size"),
                                   limit=cfg["data"].get("train_limit"), poison=plan, return_keys=True):
            xs.append(x)
            ys.append(y)
            losses.append(F.cross_entropy(model(x), y, reduction="none"))
            keys += [int(i) for i in k]
        loss = torch.cat(losses)
        n = max(2, int(round(self.isolation_ratio * len(loss))))  # BatchNorm needs >= 2 per batch
        chosen = torch.argsort(loss)[:n]
        self.isolated_x, self.isolated_y = torch.cat(xs)[chosen], torch.cat(ys)[chosen]
        if plan is not None:
            picked = np.asarray(keys)[chosen.numpy()]
            self.precision = float(np.isin(picked, plan.poisoned).mean())

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        if self.isolated_x is None:  # built bare (tests): unlearn the lowest-loss share of this batch
            with torch.no_grad():
                loss = F.cross_entropy(ctx.classifier(x), y, reduction="none")
            keep = torch.argsort(loss)[: max(2, int(round(self.isolation_ratio * len(y))))]  # BatchNorm needs 2
            xi, yi = x[keep], y[keep]
        else:
            g = torch.Generator().manual_seed(ctx.step)
            pick = torch.randperm(len(self.isolated_y), generator=g)[: self.unlearn_batch]
            xi, yi = self.isolated_x[pick].to(x.device), self.isolated_y[pick].to(x.device)
        norms = [m for m in ctx.classifier.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.freeze_bn:
            for m in norms:
                m.eval()
        try:
            ce = F.cross_entropy(module(xi), yi)
        finally:
            for m in norms:
                m.train(ctx.classifier.training)
        logs = {"loss": -ce, "isolated_ce": ce.detach()}
        if np.isfinite(self.precision):
            logs["isolation_precision"] = torch.tensor(self.precision)
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"isolated_x": self.isolated_x, "isolated_y": self.isolated_y, "precision": self.precision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.isolated_x, self.isolated_y = state["isolated_x"], state["isolated_y"]
            self.precision = state["precision"]

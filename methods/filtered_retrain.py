"""Detect, remove, retrain: the shape of BackdoorBench's AC and Spectral Signatures defenses.

BackdoorBench (defense/ac.py, defense/spectral.py) loads the backdoored model, scores every sample
of the poisoned training set with it, deletes the flagged ones and trains a NEW model
(`generate_cls_model`, fresh weights) on the rest with the attack's recipe (their config: the
same 100 epochs, SGD lr 0.01 cosine, batch 128/256 as the attack's training). Here: the
backdoored model is the grid's ERM cell (this method's upstream, trained once and shared with the
ERM row), it scores the training split in `select_train_samples` (harness/train/selection.py: every
rank, validation split left out) through the SAME functions the detectors use
(harness/eval/analysis/detectors/), and the cell then trains from scratch on the kept indices with
the cell's trainer: the grid's ERM recipe, as theirs retrains with the attack's. A subclass says
how features become flags (`flag`).

Logged in the training curve: `removed` (share of the split removed), `removed_precision`
(share of the removed that the poison plan poisoned) and `removed_recall` (share of the poisoned
that were removed). At scale: one forward pass over the split (1/W per rank) and the gathered
(N, D + 1) features (ImageNet, D = 2048: 1.28 M x 2049 float64, 21 GB: use `layer: embedding`
and a smaller D, or a subsample, there).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.eval.analysis.detectors.common import embed
from methods.base import Method, TrainContext, TrainSamples, Upstream
from methods.ft import load_weights


class FilteredRetrain(Method):
    """Score the poisoned split with the backdoored model, drop the flagged, retrain from scratch."""

    def __init__(self, layer: str, backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        self.layer, self.backdoored_checkpoint = layer, backdoored_checkpoint
        self.scorer: nn.Module | None = None
        self.stats: dict[str, float] = {}

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    def build(self, model: Classifier) -> nn.Module:
        """Keep the backdoored model aside for scoring; train the fresh `model` (their new model)."""
        if self.backdoored_checkpoint:
            self.scorer = load_weights(copy.deepcopy(model), self.backdoored_checkpoint)
        return model

    def flag(self, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Which samples to remove, from their features and the labels they were trained with."""
        raise NotImplementedError

    def select_train_samples(self, samples: TrainSamples) -> np.ndarray:
        if self.scorer is None:
            raise ValueError(f"method '{self.name}' scores the training set with the backdoored model: it needs "
                             f"method.backdoored_checkpoint (the plan sets it from its ERM upstream)")
        model, layer = self.scorer.to(samples.device).eval(), self.layer
        indices, rows = samples.score(lambda x, y: torch.cat([embed(model, x, layer).double(),
                                                             y.double()[:, None]], dim=1))
        self.scorer = None  # needed once per run
        flagged = self.flag(rows[:, :-1], rows[:, -1].astype(np.int64))
        if flagged.all():
            raise ValueError(f"method '{self.name}' flagged every training sample: nothing left to retrain on")
        poisoned = np.isin(indices, samples.poisoned)
        self.stats = {"removed": float(flagged.mean())}
        if flagged.any():
            self.stats["removed_precision"] = float(poisoned[flagged].mean())
        if poisoned.any():
            self.stats["removed_recall"] = float(flagged[poisoned].mean())
        return indices[~flagged]

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        logs = {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}
        return logs | {k: torch.tensor(v, device=x.device) for k, v in self.stats.items()}

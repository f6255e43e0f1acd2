"""ABL — Anti-Backdoor Learning (Li et al., NeurIPS 2021): three train nodes, as bboylyg/ABL runs them.

ABL trains from scratch on the poisoned data; there is no separately backdoored model. Its
stages, each a train node of the plan (`Method.upstream`), with the official defaults:

1. Isolation model (`abl_lga`; backdoor_isolation.py): trained on the poisoned split with the
   local gradient ascent loss sign(CE - gamma) * CE on the batch-mean CE, gamma 0.5, for 10
   epochs at a constant lr 0.1 (`tuning_epochs`, `adjust_learning_rate`), batch 128, with no
   augmentation and no shuffling (`get_backdoor_loader`: ToTensor only, shuffle=False). Its
   config.py defaults `gradient_ascent_type` to 'Flooding', |CE - 0.5| + 0.5, while the README
   and the paper name LGA: both have the gradient sign(CE - 0.5) dCE, so their updates are equal
   (the conformance check steps both); only the logged value differs. We log the LGA value.
2. Isolation: the floor(`isolation_ratio` x n) (1%: 500 of CIFAR-10's 50,000) training samples
   with the lowest CE under the isolation model, in eval mode, without augmentation, in the
   order of numpy's default argsort (`compute_loss_value`, `isolate_data`). A selection
   (`select_train_samples`): the unlearning stage streams them, the fine-tuning stage the rest.
3. Fine-tuning (`abl_finetune`; backdoor_unlearning.py with `finetuning_ascent_model=True`): the
   isolation model trained with CE on the other 99% for 60 epochs, lr 0.1, x0.1 from epoch 40
   (`learning_rate_finetuning`; its x0.01 from 60 is never reached), batch 128, with the cell's
   crop + flip (CIFAR-10: pad 4 + flip, as theirs) and Cutout (1 hole, length 3: a 2 x 2 square).
   `finetune: false` unlearns the isolation model itself (the README: "you can skip this step").
4. Unlearning (`abl`, this cell; `train_step_unlearning`): loss -CE on the isolated samples,
   batch 128, no augmentation, BatchNorm in train mode, constant lr 5e-4
   (`learning_rate_unlearning`), 4 epochs: the official `unlearning_epochs=5` loop only evaluates
   in its epoch 0. The official script keeps ONE SGD optimiser from fine-tuning into unlearning,
   so the momentum buffers of fine-tuning carry over: `trainer.init_optimizer` continues them
   here (with `finetune: false` the optimiser is fresh, as theirs). Optimiser: the cell's
   trainer; the paper recipe (configs/recipes/paper/abl.yaml) and `trainer=backdoor` are theirs,
   SGD momentum 0.9, wd 1e-4, nesterov.

Where we differ: each epoch's batches are cut to near-equal sizes (500 at 128: 4 x 125 rather
than 3 x 128 + 116; the trainer's even_batches, for DDP); we keep the last epoch of every stage
(the official unlearning never saves: `epoch + 1 % opt.interval == 0` is never true). Options:
`freeze_bn: true` runs BatchNorm in eval mode while unlearning. Traps of the official code not
copied: isolate_data writes `<model>_isolation1.0%_examples.npy` while the unlearning script reads
`<model>-isolation1.0%-examples.npy`; `--gamma` is declared type=int (only its default works);
quick_unlearning_demo.py (batch 64, 5 ascent epochs, no shuffling) is not the full pipeline.
The isolation precision (share of the isolated samples the poison plan poisoned) is logged in the
unlearning curve.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import Method, TrainContext, TrainSamples, Upstream
from methods.ft import load_weights

ISOLATION = {"gamma": 0.5, "epochs": 10, "lr": 0.1, "batch_size": 128}  # backdoor_isolation.py, config.py
FINETUNE = {"epochs": 60, "lr": 0.1, "milestones": [40, 60], "cutout_length": 3}  # learning_rate_finetuning
ABL_DEFAULTS = {"gamma": 0.5, "isolation_epochs": 10, "isolation_lr": 0.1, "isolation_ratio": 0.01,
                "finetune": True, "finetune_epochs": 60, "finetune_lr": 0.1, "finetune_milestones": [40, 60],
                "cutout_length": 3, "epochs": 4, "lr": 5e-4, "batch_size": 128, "freeze_bn": False}


def lga_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's local gradient ascent: sign(CE - gamma) * CE on the batch mean."""
    loss = F.cross_entropy(logits, y)
    return torch.sign(loss - gamma) * loss


def isolate(indices: np.ndarray, losses: np.ndarray, ratio: float) -> np.ndarray:
    """The split indices `isolate_data` keeps: the floor(ratio x n) lowest losses, ties in the
    order of numpy's default argsort (as theirs), returned sorted."""
    n = int(len(losses) * ratio)
    if n < 1:
        raise ValueError(f"method.isolation_ratio={ratio} isolates no sample of {len(losses)}; raise it")
    return np.sort(np.asarray(indices)[np.argsort(losses)[:n]])


def _constant(epochs: int, batch_size: int, lr: float, trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    return {"epochs": int(epochs), "batch_size": int(batch_size),
            "optimizer": {**trainer_cfg["optimizer"], "lr": float(lr)},
            "schedule": {"name": "constant", "warmup_epochs": 0}}


@METHODS.register("abl_lga")
class ABLIsolation(Method):
    """ABL stage 1: the isolation model, trained with the LGA loss (its own epochs, lr, batch)."""

    name = "abl_lga"
    paper: ClassVar[dict[str, str]] = {"title": "Anti-Backdoor Learning: Training Clean Models on Poisoned Data (stage 1: isolation)", "venue": "NeurIPS", "year": "2021"}

    def __init__(self, gamma: float = 0.5, epochs: int = 10, lr: float = 0.1, batch_size: int = 128) -> None:
        super().__init__()
        self.gamma = float(gamma)

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**ISOLATION, **method_cfg}
        return _constant(s["epochs"], s["batch_size"], s["lr"], trainer_cfg)

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        return {"augment": {}, "shuffle": False}  # get_backdoor_loader: ToTensor only, shuffle=False

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        return {"loss": lga_loss(logits, y, self.gamma), "train_acc": (logits.argmax(1) == y).float().mean()}


class _IsolatedSplit(Method):
    """A stage that trains on one side of the isolation: it scores the split with the isolation
    model's weights (kept aside at build time, so a resumed or re-initialised run selects the same)."""

    keep_isolated: ClassVar[bool]

    def __init__(self, isolation_ratio: float, isolation_checkpoint: str | None) -> None:
        super().__init__()
        if not 0 < float(isolation_ratio) < 1:
            raise ValueError(f"method.isolation_ratio must be in (0, 1), got {isolation_ratio}")
        self.isolation_ratio, self.isolation_checkpoint = float(isolation_ratio), isolation_checkpoint
        self.scorer: nn.Module | None = None
        self.precision = float("nan")

    def build(self, model: Classifier) -> nn.Module:
        """Start from the isolation model (a later `trainer.init_from` overrides the weights) and
        keep a copy of it for the selection."""
        load_weights(model, self.isolation_checkpoint)
        self.scorer = copy.deepcopy(model)
        return model

    def select_train_samples(self, samples: TrainSamples) -> np.ndarray:
        model = self.scorer
        assert model is not None, "build() runs before select_train_samples()"
        model.to(samples.device).eval()
        indices, losses = samples.score(lambda x, y: F.cross_entropy(model(x), y, reduction="none"))
        self.scorer = None  # needed once per run
        isolated = isolate(indices, losses, self.isolation_ratio)
        if len(samples.poisoned):
            self.precision = float(np.isin(isolated, samples.poisoned).mean())
        return isolated if self.keep_isolated else np.setdiff1d(indices, isolated)

    def _logs(self, logs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        if np.isfinite(self.precision):
            logs["isolation_precision"] = torch.tensor(self.precision, device=device)
        return logs


@METHODS.register("abl_finetune")
class ABLFinetune(_IsolatedSplit):
    """ABL stage 2 (optional, on by default): the isolation model fine-tuned with CE on the other 99%."""

    name = "abl_finetune"
    paper: ClassVar[dict[str, str]] = {"title": "Anti-Backdoor Learning: Training Clean Models on Poisoned Data (fine-tuning the isolation model)", "venue": "NeurIPS", "year": "2021"}
    keep_isolated = False

    def __init__(self, isolation: dict[str, Any] | None = None, isolation_ratio: float = 0.01, epochs: int = 60,
                 lr: float = 0.1, milestones: list[int] = (40, 60), batch_size: int = 128, cutout_length: int = 3,
                 isolation_checkpoint: str | None = None) -> None:
        super().__init__(isolation_ratio, isolation_checkpoint)

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        isolation = {"name": "abl_lga", **ISOLATION, **(method_cfg.get("isolation") or {})}
        return [Upstream("isolation_checkpoint", isolation)]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**FINETUNE, "batch_size": 128, **method_cfg}
        return {**_constant(s["epochs"], s["batch_size"], s["lr"], trainer_cfg),
                "schedule": {"name": "multistep", "milestones": [int(m) for m in s["milestones"]], "gamma": 0.1,
                             "warmup_epochs": 0}}

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        length = int(method_cfg.get("cutout_length", FINETUNE["cutout_length"]) or 0)
        augment = dict(data_cfg.get("augment") or {})
        if length:
            augment["cutout"] = {"holes": 1, "length": length}  # Cutout(1, 3) after crop + flip
        return {"augment": augment}

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        return {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}


@METHODS.register("abl")
class ABL(_IsolatedSplit):
    """ABL's unlearning: gradient ascent on the isolated 1%, from the fine-tuned (or isolation) model."""

    name = "abl"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Anti-Backdoor Learning: Training Clean Models on Poisoned Data", "venue": "NeurIPS", "year": "2021"}
    keep_isolated = True

    def __init__(self, gamma: float = 0.5, isolation_epochs: int = 10, isolation_lr: float = 0.1,
                 isolation_ratio: float = 0.01, finetune: bool = True, finetune_epochs: int = 60,
                 finetune_lr: float = 0.1, finetune_milestones: list[int] = (40, 60), cutout_length: int = 3,
                 epochs: int = 4, lr: float = 5e-4, batch_size: int = 128, freeze_bn: bool = False,
                 isolation_checkpoint: str | None = None) -> None:
        super().__init__(isolation_ratio, isolation_checkpoint)
        self.freeze_bn = bool(freeze_bn)

    @staticmethod
    def stage_configs(method_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The method configs of the isolation and fine-tuning nodes (None: no fine-tuning)."""
        s = {**ABL_DEFAULTS, **method_cfg}
        isolation = {"name": "abl_lga", "gamma": float(s["gamma"]), "epochs": int(s["isolation_epochs"]),
                     "lr": float(s["isolation_lr"]), "batch_size": int(s["batch_size"])}
        if not s["finetune"]:
            return isolation, None
        return isolation, {"name": "abl_finetune", "isolation": {k: v for k, v in isolation.items() if k != "name"},
                           "isolation_ratio": float(s["isolation_ratio"]), "epochs": int(s["finetune_epochs"]),
                           "lr": float(s["finetune_lr"]), "milestones": [int(m) for m in s["finetune_milestones"]],
                           "batch_size": int(s["batch_size"]), "cutout_length": int(s["cutout_length"])}

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        isolation, finetune = cls.stage_configs(method_cfg)
        stages = [Upstream("isolation_checkpoint", isolation)]
        return stages + ([Upstream(None, finetune)] if finetune else [])

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**ABL_DEFAULTS, **method_cfg}
        return {**_constant(s["epochs"], s["batch_size"], s["lr"], trainer_cfg),
                "init_optimizer": bool(s["finetune"])}  # one SGD from fine-tuning into unlearning

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        return {"augment": {}}  # tf_compose_unlearning: ToTensor only

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        norms = [m for m in ctx.classifier.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.freeze_bn:
            for m in norms:
                m.eval()
        try:
            ce = F.cross_entropy(module(x), y)
        finally:
            for m in norms:
                m.train(ctx.classifier.training)
        return self._logs({"loss": -ce, "isolated_ce": ce.detach()}, x.device)

    def select_train_samples(self, samples: TrainSamples) -> np.ndarray:
        isolated = super().select_train_samples(samples)
        if len(isolated) < 2 and not self.freeze_bn:
            raise ValueError(f"method.isolation_ratio={self.isolation_ratio} isolates {len(isolated)} sample(s): "
                             f"BatchNorm in train mode needs 2 per batch; raise method.isolation_ratio")
        return isolated

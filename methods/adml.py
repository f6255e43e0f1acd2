"""ADML (Lee, Kim & Ro, ICCV 2023): adversarial double machine learning on top of a base
adversarial-training method: `adml_pgd_at`, `adml_trades`, `adml_mart`, `adml_awp`.

Two stages. Stage 1 is the base method's own cell (its `method.base` config), declared as this
method's upstream: a train node of the plan, so a grid holding both trains it once. Stage 2, this
plugin, fine-tunes from stage 1's checkpoint with the trainer settings of `method.finetune` (the
paper: 10 epochs, lr 1e-3, cyclic).
Per batch, cross-fitted: one half of the batch takes the base method's loss, the other the DML
loss, and the halves swap every step. On the DML half: x' = PGD(x); S = the samples x' fools;
y_hat = argmax f(x'); p = softmax f(x'); w = 1 / sg(p_{y_hat}) - 1 (sg: stop-gradient);
    L_DML = mean_S[w * -log(p_y + 1e-3)] + mean_S[w * log(p_{y_hat} + 1e-3)] + CE(f(x), y).
Trap of the official code handled: the mean over an EMPTY S (the attack fooled nothing) is NaN
there; here the S terms are zero on such a batch, so L_DML = CE(f(x), y).
The train attack is PGD-10 with step 2.3 eps / 10 (the paper's), uniform random start.
"""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.attacks.pgd import PGD
from harness.core.registry import METHODS
from methods.base import ExtraOptimizer, Method, TrainContext, Upstream, build_method

FINETUNE_EPOCHS_DIVISOR = 12  # `finetune.epochs: null` -> ceil(trainer.epochs / 12): ADML's 10 after 120


def _deep_merge(into: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(into)
    for key, value in overrides.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def dml_loss(logits_adv: torch.Tensor, logits_clean: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_DML, |S| / batch): the debiasing terms over the fooled set S plus clean CE; S empty -> CE only."""
    p = F.softmax(logits_adv, dim=1)
    y_hat = p.argmax(1)
    fooled = y_hat != y
    clean_ce = F.cross_entropy(logits_clean, y)
    if not bool(fooled.any()):
        return clean_ce + 0.0 * logits_adv.sum(), fooled.float().mean()
    p_y = p.gather(1, y.unsqueeze(1)).squeeze(1)[fooled]
    p_hat = p.gather(1, y_hat.unsqueeze(1)).squeeze(1)[fooled]
    w = 1.0 / p_hat.detach() - 1.0
    debias = (w * -torch.log(p_y + 1e-3)).mean() + (w * torch.log(p_hat + 1e-3)).mean()
    return debias + clean_ce, fooled.float().mean()


class ADML(Method):
    base_method: ClassVar[str]
    paper: ClassVar[dict[str, str]] = {"title": "Mitigating Adversarial Vulnerability through Causal Parameter Estimation by Adversarial Double Machine Learning", "venue": "ICCV", "year": "2023"}

    def __init__(self, base: dict[str, Any], attack: dict[str, Any], finetune: dict[str, Any] | None = None) -> None:
        super().__init__()  # `finetune` is read by runtime_trainer, before the method is built
        if base.get("name") != self.base_method:
            raise ValueError(f"{self.name}: method.base must be the '{self.base_method}' method config, "
                             f"got '{base.get('name')}'")
        self.base = build_method(base)
        settings = {k: v for k, v in attack.items() if k != "name"}
        self.attack = PGD(**settings)
        if settings.get("step_size") is None:
            self.attack.step_size = 0.23 * self.attack.eps  # 2.3 eps / 10

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        """Stage 1: the base method's own cell; stage 2 starts from its weights."""
        return [Upstream(None, copy.deepcopy(method_cfg["base"]))]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        """Stage 2's trainer: `method.finetune` merged over the cell's trainer settings."""
        finetune = dict(method_cfg.get("finetune") or {})
        epochs = finetune.pop("epochs", None)
        trainer = _deep_merge(trainer_cfg, finetune)
        trainer["epochs"] = int(epochs) if epochs else max(1, math.ceil(int(trainer_cfg["epochs"]) / FINETUNE_EPOCHS_DIVISOR))
        return trainer

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        return self.base.find_unused_parameters

    def build(self, model: Classifier) -> nn.Module:
        return self.base.build(model)

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return self.base.param_groups(module)

    def eval_model(self, module: nn.Module) -> Classifier:
        return self.base.eval_model(module)

    def extra_optimizers(self, module: nn.Module) -> dict[str, ExtraOptimizer]:
        return self.base.extra_optimizers(module)

    def on_epoch_start(self, ctx: TrainContext) -> None:
        self.base.on_epoch_start(ctx)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        self.base.on_epoch_end(ctx)

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        half = y.shape[0] // 2
        if half == 0:
            raise ValueError(f"{self.name} splits every batch in two halves: the per-rank batch must be >= 2")
        first, second = slice(0, half), slice(half, None)
        base_part, dml_part = (first, second) if ctx.step % 2 == 0 else (second, first)  # cross-fitting
        logs = self.base.training_step(module, x[base_part], y[base_part], ctx)
        xd, yd = x[dml_part], y[dml_part]
        x_adv = self.attack(ctx.classifier, xd, yd)
        dml, fooled = dml_loss(module(x_adv), module(xd), yd)
        return {**{f"base_{k}": v.detach() for k, v in logs.items() if k != "loss"},
                "loss": logs["loss"] + dml, "loss_base": logs["loss"].detach(), "loss_dml": dml.detach(),
                "dml_fooled_fraction": fooled}

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        self.base.after_step(module, ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)


@METHODS.register("adml_pgd_at")
class ADMLPGDAT(ADML):
    name = "adml_pgd_at"
    base_method = "pgd_at"


@METHODS.register("adml_trades")
class ADMLTRADES(ADML):
    name = "adml_trades"
    base_method = "trades"


@METHODS.register("adml_mart")
class ADMLMART(ADML):
    name = "adml_mart"
    base_method = "mart"


@METHODS.register("adml_awp")
class ADMLAWP(ADML):
    name = "adml_awp"
    base_method = "awp"

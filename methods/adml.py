"""ADML (Lee, Kim & Ro, ICCV 2023): adversarial double machine learning on top of a base
adversarial-training method: `adml_pgd_at`, `adml_trades`, `adml_mart`, `adml_awp`.

Two stages. Stage 1 is the base method's own cell (its `method.base` config), declared as this
method's upstream: a train node of the plan, so a grid holding both trains it once. Stage 2, this
plugin, fine-tunes from stage 1's checkpoint with the trainer settings of `method.finetune` (the
paper: 10 epochs, lr 1e-3, cyclic lr peaking at round(epochs / 5), momentum cycled 0.9 <-> 0.8).

Stage 2, per batch, as the official code (ByungKwanLee/Double-Debiased-Adversary
adml/fast_train_adml_*.py; docs/conformance.md measures loss, x', update and lr against it):
- ONE CE-PGD for the whole batch: 10 steps of 2.3 eps / 10 from a uniform start, model in eval
  mode (its attack/libfastattack/FastPGD.py through torchattacks);
- the batch's first half takes the base loss on that x', the second half the DML loss:
  S = the second-half samples x' fools; y_hat = argmax f(x'); p = softmax f(x');
  w = 1 / sg(p_{y_hat}) - 1 (sg: stop-gradient);
      L_DML = mean_S[w * -log(p_y + 1e-3)] + mean_S[w * log(p_{y_hat} + 1e-3)] + CE(f(x), y);
- base losses (the official stage-2 scripts' own, not the base methods' defaults):
  `adml_pgd_at` CE(f(x'), y); `adml_trades` TRADES' CE + beta * KL with beta 2 (not TRADES' 6;
  on the shared CE-PGD x', not TRADES' KL attack); `adml_mart` MART's loss with beta 2 (not 5);
  `adml_awp` MART's loss (beta 2) with AWP: v from one ascent step of CE(f(x'), y) over the
  whole batch (gamma 0.01, the official proxy lr 0.01), x' crafted at the unperturbed weights,
  both halves' losses at w + v, v removed after the step;
- forwards in the official order (BatchNorm's running statistics depend on it): the first half's
  x (TRADES, MART, AWP) and x', then the second half's x' and x.
The halves are fixed (first: base, second: DML), as the official code; the batch is shuffled
every epoch, so which half a sample lands in is already random (an earlier version of ours
swapped the halves every step: no effect on the expectation, dropped).

Traps of the official code handled:
- the mean over an EMPTY S (the attack fooled nothing) is NaN there; here the S terms are zero
  on such a batch, so L_DML = CE(f(x), y);
- every official stage-2 script (TRADES, MART and AWP included) loads the PGD-AT checkpoint
  (`checkpoint/adv/...`, "Successfully Loaded ADV checkpoint"), while its stage-1 scripts
  (defense/fast_train_{trades,mart,awp}.py) train and save each base method with exactly the
  loss stage 2 continues: we read the path as copied from the PGD-AT script, not as intent.
  Stage 2 here starts from the base method's own cell (stage 1: "a base AT method", as the
  method names say).
Stage 1 differs from the official stage-1 scripts by design: they train the repository's own
variants (one CE-PGD with step 2.3 eps / 10 for every base; TRADES and MART with beta 2; "AWP"
= MART + AWP), ours is each base method as its authors published it (methods/trades.py, mart.py,
awp.py), trained with ADML's stage-1 recipe under `recipe=paper`
(configs/recipes/paper/adml_*.yaml).
Not reproduced (CUDA-only engineering, not the method): SyncBatchNorm, fp16 autocast with a
GradScaler, channels_last; the official ImageNet/Tiny-ImageNet attack switches (FGSM, PGD/FGSM
mix) and ADML-AWP's non-CIFAR-10 loss (CE base half, mean of DML and MART on the second half).
Checkpoint: the official scripts keep the epoch with the best clean+PGD accuracy on the TEST set;
we keep the last epoch.
"""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.attacks.base import parse_number
from harness.attacks.pgd import PGD
from harness.core.registry import METHODS
from methods.awp import WeightPerturbation
from methods.base import Method, TrainContext, Upstream, build_method
from methods.mart import mart_loss
from methods.trades import trades_loss

FINETUNE_EPOCHS_DIVISOR = 12  # `finetune.epochs: null` -> ceil(trainer.epochs / 12): ADML's 10 after 120
FINETUNE_PEAK_DIVISOR = 5     # the official stage-2 CyclicLR peaks at round(epochs / 5) epochs


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


def finetune_schedule(schedule: dict[str, Any], epochs: int) -> dict[str, Any]:
    """Stage 2's schedule: a cyclic one without a peak peaks at round(epochs / 5) (Python's round,
    as the official `int(round(args.epochs / 5))`: 2 of 10; 0 below 3 epochs, where the official
    CyclicLR divides by zero and ours starts at the peak)."""
    out = copy.deepcopy(schedule)
    if out.get("name") == "cyclic" and out.get("peak_epoch") is None and out.get("peak_fraction") is None:
        out["peak_epoch"] = int(round(epochs / FINETUNE_PEAK_DIVISOR))
    return out


class ADML(Method):
    base_method: ClassVar[str]
    paper: ClassVar[dict[str, str]] = {"title": "Mitigating Adversarial Vulnerability through Causal Parameter Estimation by Adversarial Double Machine Learning", "venue": "ICCV", "year": "2023"}

    def __init__(self, base: dict[str, Any], attack: dict[str, Any], finetune: dict[str, Any] | None = None) -> None:
        super().__init__()  # `finetune` is read by runtime_trainer, before the method is built
        if base.get("name") != self.base_method:
            raise ValueError(f"{self.name}: method.base must be the '{self.base_method}' method config, "
                             f"got '{base.get('name')}'")
        self.base = build_method(base)  # stage 1's method: the module it built is the one stage 2 loads
        settings = {k: v for k, v in attack.items() if k != "name"}
        if settings.get("step_size") is None:
            settings["step_size"] = 0.23 * parse_number(settings["eps"])  # 2.3 eps / 10
        self.attack = PGD(**settings)

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        """Stage 1: the base method's own cell; stage 2 starts from its weights."""
        return [Upstream(None, copy.deepcopy(method_cfg["base"]))]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        """Stage 2's trainer: `method.finetune` over the cell's trainer settings; its `schedule`
        replaces the cell's whole (stage 1's cyclic peak must not leak into stage 2)."""
        finetune = copy.deepcopy(dict(method_cfg.get("finetune") or {}))
        epochs = finetune.pop("epochs", None)
        schedule = finetune.pop("schedule", None)
        trainer = _deep_merge(trainer_cfg, finetune)
        trainer["epochs"] = int(epochs) if epochs else max(1, math.ceil(int(trainer_cfg["epochs"]) / FINETUNE_EPOCHS_DIVISOR))
        if schedule is not None:
            trainer["schedule"] = finetune_schedule(dict(schedule), trainer["epochs"])
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

    def base_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits on x') of the first half, its forwards in the official order."""
        raise NotImplementedError

    def perturb_weights(self, ctx: TrainContext, x_adv: torch.Tensor, y: torch.Tensor) -> None:
        """After x' is crafted, before the losses' forwards (ADML-AWP's weight perturbation)."""

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        half = y.shape[0] // 2
        if half == 0:
            raise ValueError(f"{self.name} splits every batch in two halves: the per-rank batch must be >= 2")
        x_adv = self.attack(ctx.classifier, x, y)  # one CE-PGD for the whole batch, at w
        self.perturb_weights(ctx, x_adv, y)
        base, logits_adv_base = self.base_loss(module, x[:half], x_adv[:half], y[:half])
        logits_adv = module(x_adv[half:])
        dml, fooled = dml_loss(logits_adv, module(x[half:]), y[half:])
        robust = torch.cat([logits_adv_base.detach(), logits_adv.detach()]).argmax(1) == y
        return {"loss": base + dml, "loss_base": base.detach(), "loss_dml": dml.detach(),
                "dml_fooled_fraction": fooled, "train_robust_acc": robust.float().mean()}


@METHODS.register("adml_pgd_at")
class ADMLPGDAT(ADML):
    """Base half: CE(f(x'), y)."""

    name = "adml_pgd_at"
    base_method = "pgd_at"

    def base_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_adv = module(x_adv)
        return F.cross_entropy(logits_adv, y), logits_adv


@METHODS.register("adml_trades")
class ADMLTRADES(ADML):
    """Base half: CE(f(x), y) + beta * KL(f(x) || f(x')), beta 2 (the official stage-2 script)."""

    name = "adml_trades"
    base_method = "trades"

    def __init__(self, base: dict[str, Any], attack: dict[str, Any], finetune: dict[str, Any] | None = None,
                 beta: float = 2.0) -> None:
        super().__init__(base, attack, finetune)
        self.beta = float(beta)

    def base_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_clean = module(x)
        logits_adv = module(x_adv)
        return trades_loss(logits_clean, logits_adv, y, self.beta)[0], logits_adv


@METHODS.register("adml_mart")
class ADMLMART(ADML):
    """Base half: MART's loss, beta 2 (the official stage-2 script)."""

    name = "adml_mart"
    base_method = "mart"

    def __init__(self, base: dict[str, Any], attack: dict[str, Any], finetune: dict[str, Any] | None = None,
                 beta: float = 2.0) -> None:
        super().__init__(base, attack, finetune)
        self.beta = float(parse_number(beta))

    def base_loss(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_clean = module(x)
        logits_adv = module(x_adv)
        return mart_loss(logits_clean, logits_adv, y, self.beta)[0], logits_adv


@METHODS.register("adml_awp")
class ADMLAWP(ADMLMART):
    """ADML-AWP as the official script: MART's loss (beta 2) on the first half, DML on the second,
    both at w + v; v from CE(f(x'), y) on the whole batch, gamma 0.01; stage 1 is the AT-AWP cell."""

    name = "adml_awp"
    base_method = "awp"

    def __init__(self, base: dict[str, Any], attack: dict[str, Any], finetune: dict[str, Any] | None = None,
                 beta: float = 2.0, gamma: float = 0.01) -> None:
        super().__init__(base, attack, finetune, beta)
        self.perturbation = WeightPerturbation(float(gamma))

    def perturb_weights(self, ctx: TrainContext, x_adv: torch.Tensor, y: torch.Tensor) -> None:
        if self.perturbation.gamma > 0:
            v = self.perturbation.compute(ctx.classifier, lambda m: F.cross_entropy(m(x_adv), y))
            self.perturbation.apply(v)

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        if self.perturbation.active:
            self.perturbation.restore()

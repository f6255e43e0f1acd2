"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023), as SCLBD/BackdoorBench
runs it (defense/ft-sam.py, utils/defense_utils/sam/{sam,util,scheduler}.py,
config/defense/ft-sam/cifar10.yaml).

The grid's backdoored ERM model (this method's upstream) is fine-tuned on the defender's clean 5%
with (adaptive) SAM. Each batch, as their `SAM.step`:
1. g = d loss / d w at w (train mode; BatchNorm's running statistics move), the loss BackdoorBench's
   `smooth_crossentropy` (KL to the one-hot target smoothed with 0.1 / (K - 1) off the label);
2. e = rho * T^2 g / ||T g||_2 over all parameters together, T = |w| (adaptive, their default: the
   `--adaptive` flag is store_false) or 1, with 1e-12 added to the norm; w + e is set;
3. the loss at w + e (batch statistics, running ones held: `disable_running_stats`) is what the
   trainer backpropagates; its SGD (lr 0.01, momentum 0.9) steps; `after_step` removes e.
Their SGD decays w, not w + e (they unperturb before stepping). Here the trainer steps at w + e, so
the trainer's optimiser runs without weight decay and the loss carries 0.5 * wd * ||w||^2 taken at
the unperturbed weights (p - e, e fixed): the update is theirs exactly, and DDP replicas stay equal
(each rank's e is its own, from its local gradient, as their `maybe_no_sync` first pass).
rho follows the lr (`ProportionScheduler`: rho_min + (rho_max - rho_min) * lr / lr_max), constant
2.0 with their rho_max = rho_min = 2.0. GSAM's gradient decomposition (alpha) is 0 in their
config and refused otherwise (it needs the final gradient, which the trainer owns).

Stage (cifar10.yaml): 100 epochs, batch 256, SGD lr 0.01 momentum 0.9 wd 5e-4, 5% clean data with
the training augmentation. Their CosineAnnealingLR(T_max 100) is stepped once per BATCH
(`_train_sam`), so the lr falls to 0 after 100 batches and rises again (a period of 200 batches, 20
epochs of 10 batches on CIFAR-10's 2,500): that is the default here too (`lr_schedule:
cosine_steps`, `t_max_steps: 100`); `lr_schedule: cosine` anneals once over the epochs instead (a
named option, not theirs). Departure: their 5% is drawn class-balanced (`choose_by_class`), ours
the first 5% of the (shuffled) split.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import Method, TrainContext, Upstream
from methods.ft import LR_SCHEDULES, finetune_trainer, load_weights, method_defaults
from methods.unlearning import check_clean_subset, still_running_stats, with_value_of

PERTURB_EPS = 1e-12  # SAM(perturb_eps=1e-12)
SAM_SCHEDULES = ("cosine_steps", *LR_SCHEDULES)  # cosine_steps: their CosineAnnealingLR stepped per batch


def smooth_crossentropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean over the batch of KL(target || softmax) with the target 1 - smoothing on the label and
    smoothing / (K - 1) elsewhere (BackdoorBench's sam/util.py; CE minus the target's entropy)."""
    target = torch.full_like(logits, smoothing / (logits.shape[1] - 1))
    target.scatter_(1, y[:, None], 1.0 - smoothing)
    return F.kl_div(F.log_softmax(logits, 1), target, reduction="none").sum(-1).mean()


def sam_perturbation(params: list[nn.Parameter], grads: list[torch.Tensor | None], rho: float,
                     adaptive: bool) -> list[torch.Tensor | None]:
    """e per parameter: rho * T^2 g / (||T g|| + 1e-12), T = |w| if adaptive else 1, the norm over all
    parameters with a gradient together; None where a parameter got none."""
    weighted = [((p.detach().abs() if adaptive else 1.0) * g).norm() for p, g in zip(params, grads) if g is not None]
    scale = rho / (torch.stack(weighted).norm() + PERTURB_EPS)
    out: list[torch.Tensor | None] = []
    for p, g in zip(params, grads):
        if g is None:
            out.append(None)
            continue
        e = g * scale
        out.append(e * p.detach().pow(2) if adaptive else e)
    return out


@METHODS.register("ft_sam")
class FTSAM(Method):
    name = "ft_sam"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization", "venue": "ICCV", "year": "2023"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 100, batch_size: int = 256, lr: float = 0.01,
                 lr_schedule: str = "cosine_steps", t_max_steps: int = 100, lr_milestones: list[int] = (),
                 lr_gamma: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False,
                 rho_max: float = 2.0, rho_min: float = 2.0, adaptive: bool = True, label_smoothing: float = 0.1,
                 alpha: float = 0.0, backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        self.clean_subset = check_clean_subset(self.name, clean_subset)
        if lr_schedule not in SAM_SCHEDULES:
            raise ValueError(f"method.lr_schedule must be one of {', '.join(SAM_SCHEDULES)}, got {lr_schedule!r}")
        if int(t_max_steps) < 1:
            raise ValueError(f"ft_sam: t_max_steps (the cosine's T_max in optimisation steps) must be >= 1, got {t_max_steps}")
        if not 0 <= float(rho_min) <= float(rho_max):
            raise ValueError(f"ft_sam needs 0 <= rho_min <= rho_max (SAM's radius), got {rho_min}, {rho_max}")
        if float(alpha) != 0:
            raise ValueError(f"ft_sam: alpha (GSAM's gradient decomposition) must be 0, BackdoorBench's default; "
                             f"got {alpha}")
        if not 0 <= float(label_smoothing) < 1:
            raise ValueError(f"ft_sam: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.weight_decay = float(weight_decay)
        self.rho_max, self.rho_min, self.adaptive = float(rho_max), float(rho_min), bool(adaptive)
        self.label_smoothing = float(label_smoothing)
        self.backdoored_checkpoint = backdoored_checkpoint
        self._applied: list[tuple[nn.Parameter, torch.Tensor]] = []

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        """FT's SGD stage with the weight decay moved into the loss (taken at w, see the module doc);
        the default schedule is their CosineAnnealingLR(T_max 100) stepped per optimisation step."""
        s = {**method_defaults(cls), **method_cfg}
        if s["lr_schedule"] not in SAM_SCHEDULES:
            raise ValueError(f"method.lr_schedule must be one of {', '.join(SAM_SCHEDULES)}, got {s['lr_schedule']!r}")
        per_step = s["lr_schedule"] == "cosine_steps"
        out = finetune_trainer(cls, {**method_cfg, "lr_schedule": "constant"} if per_step else method_cfg, trainer_cfg)
        if per_step:
            out["schedule"] = {"name": "cosine_steps", "granularity": "step", "warmup_epochs": 0,
                               "t_max_steps": int(s["t_max_steps"])}
        out["optimizer"]["weight_decay"] = 0.0
        return out

    def build(self, model: Classifier) -> nn.Module:
        return load_weights(model, self.backdoored_checkpoint)

    def rho(self, ctx: TrainContext) -> float:
        """ProportionScheduler with min_lr 0: rho_min + (rho_max - rho_min) * lr / lr_max."""
        return self.rho_min + (self.rho_max - self.rho_min) * float(ctx.lr_scale)

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raw = ctx.classifier
        params = [p for p in raw.parameters() if p.requires_grad]
        logits = raw(x)  # the first pass: local gradient (their no_sync), running statistics move
        loss_at_w = smooth_crossentropy(logits, y, self.label_smoothing)
        grads = torch.autograd.grad(loss_at_w, params, allow_unused=True)
        perturbation = sam_perturbation(params, list(grads), self.rho(ctx), self.adaptive)
        if self._applied:
            raise RuntimeError("ft_sam: a weight perturbation is already applied; after_step removes it")
        with torch.no_grad():
            for p, e in zip(params, perturbation):
                if e is not None:
                    p.add_(e)
                    self._applied.append((p, e))
        with still_running_stats(raw):
            loss = smooth_crossentropy(module(x), y, self.label_smoothing)
        shift = {id(p): e for p, e in self._applied}
        decay = sum(((p - shift[id(p)]) if id(p) in shift else p).pow(2).sum() for p in params)
        return {"loss": with_value_of(loss, 0.5 * self.weight_decay * decay), "loss_at_w": loss_at_w.detach(),
                "train_acc": (logits.argmax(1) == y).float().mean().detach()}

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        with torch.no_grad():
            for p, e in self._applied:
                p.sub_(e)
        self._applied = []

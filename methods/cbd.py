"""CBD — Causality-inspired Backdoor Defense (Zhang et al., CVPR 2023), as zaixizhang/CBD's train.py.

The backdoor is a confounder tying the trigger to the target label. Stage 1 (this method's upstream,
a train node of the plan, harness/run/plan.py): f_B = ERM on the poisoned data for only T epochs,
then frozen; T = 5 of the official 100 epochs, so by default `backdoored_fraction` 0.05 of the
trainer's epochs (2 of the digits preset's 40), or `backdoored_epochs` when set (recipe=paper: 5).
It fits the poisoned samples (easy, low loss) long before the clean ones. Stage 2 (this cell)
trains the clean model f_C on the same poisoned data with
    l_B, l_C per-sample CE of f_B and f_C;  w = l_B / (l_B + sg(l_C) + 1e-8), rescaled to mean 1
    L = mean(w * l_C)   [+ lambda * (mean T(z_B, z_C) - mean T(z_B, z_C of the next sample)), `mi`]
z_B, z_C the penultimate features (z_B detached): poisoned samples, which f_B fits, get small
weights. With `mi: true` f_C is also pushed to share no information with f_B's features: T
(2-layer MLP on concat(z_B, z_C), hidden = feature dim, leaky ReLU, dropout 0.2 before each layer,
in train mode throughout) maximises lambda * the same bound with its own Adam (lr 0.2), and after
every step each of its parameters is divided by the square root of its largest singular value
(5 power iterations): the official `spectral_norm` returns (u W v) ** 0.5, and u W v is already
sigma. lambda 0.01. T's lr follows torch's StepLR(20, 0.1) stepped at the START of every epoch,
as the official loop calls it: lr 0.2 * 0.1 ** ((epoch + 1) // 20), so it first decays in the
20th epoch (index 19). The step is `critic_step_epochs`, or by default `critic_step_fraction`
0.2 of the run (20 of the official 100): a shortened run keeps the critic's decay where f_C's first
lr milestone sits (the backdoor trainer preset puts that at 20% of the run too); recipe=paper
sets the official absolute 20. Each epoch, T first takes one step per batch on a full pass of the
data (`critic_pass: epoch`, the trainer's `pre_pass`: f_C in train mode without gradients, its
BatchNorm statistics updated as the official forward updates them), then f_C trains one epoch
against that T, fixed.

Defaults are the official code's. Where it departs, on purpose:
* `mi` is false by default because the official --disentangle defaults to 0 (its README runs
  `python3 train.py` as it is); the paper's method includes the term: `mi: true` (a named option,
  conformance-checked against the official code with --disentangle 1).
* Named options, not defaults: `critic_norm: sigma` divides by sigma itself (a true spectral
  normalisation, a 1-Lipschitz critic, the weaker MI penalty this code had before);
  `critic_pass: step` steps T on each batch right before f_C's step instead of a separate pass
  (the same number of critic steps, but T then always sees the current f_C, and the pass over the
  data is saved); `weight_norm: class` rescales the weights within each label (docs/backdoor.md).
* f_B is trained with the trainer's schedule (the official code schedules the clean model's
  optimiser in stage 1, leaving f_B at its initial lr 0.1: for its 5 of 100 epochs the intended
  schedule gives 0.1 as well). f_C starts from the cell's seeded initialisation, which f_B also
  started from (the official code draws the two one after the other); the official data
  augmentation's Cutout(1, 3) is not in our loader.
T lives outside the DDP wrapper; under world size > 1 its gradients are averaged across ranks by
hand, so every rank keeps the same critic.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from harness.store.checkpoints import load_checkpoint
from methods.base import ExtraOptimizer, Method, TrainContext, Upstream

CRITIC_NORMS = ("sqrt_sigma", "sigma")
CRITIC_PASSES = ("epoch", "step")


class MICritic(nn.Module):
    """T(z_B, z_C): the critic of the mutual-information bound E_joint[T] - E_marginal[T]."""

    def __init__(self, dim_b: int, dim_c: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim_b + dim_c, dim_c)
        self.out = nn.Linear(dim_c, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z_b: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.hidden(self.dropout(torch.cat((z_b, z_c), dim=-1))))
        return self.out(self.dropout(h)).squeeze(-1)

    def bound(self, z_b: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """E_joint T - E_product T; the product sample pairs z_B[i] with z_C[i + 1] (cyclically),
        as the official `shuffle`."""
        return self(z_b, z_c).mean() - self(z_b, torch.roll(z_c, -1, dims=0)).mean()

    @torch.no_grad()
    def spectral_normalize(self, iterations: int = 5, norm: str = "sqrt_sigma") -> None:
        """Divide every parameter (a vector as a one-column matrix) by sqrt(sigma), the official
        rule, or by sigma (`norm: sigma`), sigma its largest singular value."""
        for p in self.parameters():
            sigma = spectral_norm(p.reshape(p.shape[0], -1) if p.ndim > 1 else p.reshape(-1, 1), iterations)
            p.div_(sigma.sqrt() if norm == "sqrt_sigma" else sigma)


def spectral_norm(w: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Largest singular value u W v of a matrix by power iteration from v = ones."""
    v = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(iterations):
        u = F.normalize(w @ v, dim=0)
        v = F.normalize(w.t() @ u, dim=0)
    return (u @ w @ v).clamp_min(1e-12)


class CBDModule(nn.Module):
    """f_C (trained) beside the frozen f_B; forward -> (logits_C, z_C, logits_B, z_B)."""

    def __init__(self, clean: Classifier, backdoored: Classifier) -> None:
        super().__init__()
        self.clean = clean
        self.backdoored = backdoored
        for p in self.backdoored.parameters():
            p.requires_grad_(False)
        self.backdoored.eval()

    def train(self, mode: bool = True) -> "CBDModule":
        super().train(mode)
        self.backdoored.eval()  # frozen: BatchNorm statistics and dropout stay as stage 1 left them
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z_c, logits_c = self.clean.features(x)
        with torch.no_grad():
            z_b, logits_b = self.backdoored.features(x)
        return logits_c, z_c, logits_b, z_b


def cbd_weights(loss_b: torch.Tensor, loss_c: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """w = l_B / (l_B + sg(l_C) + 1e-8), rescaled to mean 1 over the batch (no gradient).

    With `labels` (the `weight_norm: class` variant, not the paper's) the rescaling is to mean 1
    within each label of the batch instead, so a class whose clean samples f_B happens to fit
    keeps its share of the loss; only the ordering of samples inside a class is CBD's."""
    w = loss_b.detach() / (loss_b.detach() + loss_c.detach() + 1e-8)
    if labels is None:
        return w * w.numel() / w.sum().clamp_min(1e-12)
    sums = torch.zeros(int(labels.max()) + 1, dtype=w.dtype, device=w.device).index_add_(0, labels, w)
    counts = torch.bincount(labels, minlength=sums.numel()).to(w.dtype)
    return w * counts[labels] / sums[labels].clamp_min(1e-12)


@METHODS.register("cbd")
class CBD(Method):
    name = "cbd"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Backdoor Defense via Deconfounded Representation Learning", "venue": "CVPR", "year": "2023"}

    def __init__(self, backdoored_epochs: int | None = None, backdoored_fraction: float = 0.05,
                 backdoored_lr: float | None = None, weight_norm: str = "batch", mi: bool = False, mi_weight: float = 0.01,
                 critic_lr: float = 0.2, critic_step_epochs: int | None = None, critic_step_fraction: float = 0.2,
                 critic_pass: str = "epoch", critic_norm: str = "sqrt_sigma", critic_dropout: float = 0.2,
                 power_iterations: int = 5, backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        if backdoored_epochs is not None and int(backdoored_epochs) < 1:
            raise ValueError(f"method.backdoored_epochs must be >= 1 (or null), got {backdoored_epochs}")
        if not 0 < float(backdoored_fraction) <= 1:
            raise ValueError(f"method.backdoored_fraction must be in (0, 1], got {backdoored_fraction}")
        if backdoored_lr is not None and not float(backdoored_lr) > 0:
            raise ValueError(f"method.backdoored_lr must be > 0 (or null: the trainer's lr), got {backdoored_lr}")
        if weight_norm not in ("batch", "class"):
            raise ValueError(f"method.weight_norm must be 'batch' (the paper's) or 'class', got {weight_norm!r}")
        if critic_norm not in CRITIC_NORMS:
            raise ValueError(f"method.critic_norm must be one of {', '.join(CRITIC_NORMS)}, got {critic_norm!r}")
        if critic_pass not in CRITIC_PASSES:
            raise ValueError(f"method.critic_pass must be one of {', '.join(CRITIC_PASSES)}, got {critic_pass!r}")
        if critic_step_epochs is not None and int(critic_step_epochs) < 1:
            raise ValueError(f"method.critic_step_epochs must be >= 1 (or null), got {critic_step_epochs}")
        if not 0 < float(critic_step_fraction) <= 1:
            raise ValueError(f"method.critic_step_fraction must be in (0, 1], got {critic_step_fraction}")
        self.backdoored_epochs = backdoored_epochs
        self.backdoored_fraction = float(backdoored_fraction)
        self.backdoored_lr = backdoored_lr
        self.weight_norm = weight_norm
        self.mi = bool(mi)
        self.mi_weight = float(mi_weight)
        self.critic_lr = float(critic_lr)
        self.critic_step_epochs = None if critic_step_epochs is None else int(critic_step_epochs)
        self.critic_step_fraction = float(critic_step_fraction)
        self.critic_pass = critic_pass
        self.critic_norm = critic_norm
        self.critic_dropout = float(critic_dropout)
        self.power_iterations = int(power_iterations)
        self.backdoored_checkpoint = backdoored_checkpoint
        self.critic: MICritic | None = None
        self.critic_opt: torch.optim.Optimizer | None = None

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        """Stage 1: ERM on the poisoned data for T epochs (same trainer otherwise; with the
        multistep recipe the lr stays at its initial value, as the official f_B's)."""
        epochs = method_cfg.get("backdoored_epochs")
        if epochs is None:
            fraction = float(method_cfg.get("backdoored_fraction", 0.05))
            epochs = max(1, round(fraction * int(trainer_cfg["epochs"])))
        overrides: dict[str, Any] = {"epochs": int(epochs)}
        if method_cfg.get("backdoored_lr") is not None:
            overrides["optimizer"] = {**trainer_cfg["optimizer"], "lr": float(method_cfg["backdoored_lr"])}
        return [Upstream("backdoored_checkpoint", {"name": "erm"}, overrides)]

    def build(self, model: Classifier) -> nn.Module:
        backdoored = copy.deepcopy(model)
        if self.backdoored_checkpoint:  # absent only when a test builds the method bare
            state = load_checkpoint(self.backdoored_checkpoint)
            backdoored.load_state_dict(state["model"])
        if self.mi:
            dim = model.embedding_dim
            self.critic = MICritic(dim, dim, self.critic_dropout)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.critic_lr)
        return CBDModule(model, backdoored)

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in module.clean.parameters() if p.requires_grad]}]

    def extra_optimizers(self, module: nn.Module) -> dict[str, ExtraOptimizer]:
        """The critic's Adam (with `mi`): checkpointed by the trainer, but stepped here (it ascends
        its own bound before f_C's loss is formed) on its own StepLR."""
        if self.critic_opt is None:
            return {}
        return {"critic": ExtraOptimizer(self.critic_opt, scheduled=False, stepped_by_trainer=False)}

    def eval_model(self, module: nn.Module) -> Classifier:
        return module.clean

    def critic_step_size(self, epochs: int) -> int:
        """Epochs between the critic's lr decays: `critic_step_epochs`, else the fraction of the run."""
        if self.critic_step_epochs is not None:
            return self.critic_step_epochs
        return max(1, round(self.critic_step_fraction * epochs))

    def critic_lr_at(self, epoch: int, epochs: int) -> float:
        """StepLR(step, 0.1) stepped at the start of each epoch, as the official loop: decays when
        epoch + 1 reaches a multiple of the step."""
        return self.critic_lr * 0.1 ** ((epoch + 1) // self.critic_step_size(epochs))

    def on_epoch_start(self, ctx: TrainContext) -> None:
        if self.critic_opt is not None:
            for group in self.critic_opt.param_groups:
                group["lr"] = self.critic_lr_at(ctx.epoch, ctx.epochs)

    def pre_pass(self, ctx: TrainContext) -> bool:
        """The critic's own pass over the data before each epoch (official; `critic_pass: epoch`)."""
        return self.mi and self.critic_pass == "epoch"

    def pre_pass_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        """One critic step on a batch: f_C and f_B forward (f_C in train mode, no gradient)."""
        with torch.no_grad():
            _, z_c, _, z_b = module(x)
        self.critic.to(x.device)
        return {"critic_bound": self._critic_step(z_b, z_c, ctx.world_size)}

    def _critic_step(self, z_b: torch.Tensor, z_c: torch.Tensor, world_size: int) -> torch.Tensor:
        """One ascent step of T on lambda * the bound (features detached), then its normalisation."""
        self.critic.train()
        bound = self.critic.bound(z_b.detach(), z_c.detach())
        self.critic_opt.zero_grad(set_to_none=True)
        (-self.mi_weight * bound).backward()
        if world_size > 1 and dist.is_initialized():
            for p in self.critic.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world_size)
        self.critic_opt.step()
        self.critic.spectral_normalize(self.power_iterations, self.critic_norm)
        return bound.detach()

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits_c, z_c, logits_b, z_b = module(x)
        loss_c = F.cross_entropy(logits_c, y, reduction="none")
        loss_b = F.cross_entropy(logits_b, y, reduction="none")
        w = cbd_weights(loss_b, loss_c, y if self.weight_norm == "class" else None)
        loss = (w * loss_c).mean()
        logs = {"loss_weighted_ce": loss.detach(), "weight_min": w.min()}
        if self.mi:
            self.critic.to(x.device)
            if self.critic_pass == "step":
                logs["critic_bound"] = self._critic_step(z_b, z_c, ctx.world_size)
            self.critic.train()  # the official critic is never put in eval mode: dropout on
            mi = self.critic.bound(z_b.detach(), z_c)
            loss = loss + self.mi_weight * mi
            logs["mi"] = mi.detach()
        logs.update(loss=loss, train_acc=(logits_c.argmax(1) == y).float().mean())
        return logs

    def state_dict(self) -> dict[str, Any]:
        """The critic's weights (it lives outside the module; its optimiser is the trainer's to save)."""
        return {"critic": self.critic.state_dict()} if self.critic is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.critic is not None:
            self.critic.load_state_dict(state["critic"])

"""CBD — Causality-inspired Backdoor Defense (Zhang et al., CVPR 2023).

The backdoor is a confounder tying the trigger to the target label. Stage 1 (this method's upstream,
a train node of the plan, harness/run/plan.py): f_B = ERM on the poisoned data for only T epochs, then frozen; T = 5 of the
paper's 100 epochs, so by default `backdoored_fraction` 0.05 of the trainer's epochs (2 of the
digits preset's 40), or `backdoored_epochs` when set; it fits the poisoned samples (easy, low loss) long before the clean ones. Stage 2 (this
cell) trains the clean model f_C on the same poisoned data with
    l_B, l_C per-sample CE of f_B and f_C;  w = l_B / (l_B + sg(l_C) + 1e-8), rescaled to mean 1
    L = mean(w * l_C) + lambda * [mean T(z_B, z_C) - mean T(z_B, roll(z_C, 1))]
z_B, z_C the penultimate features (z_B detached): poisoned samples, which f_B fits, get small
weights, and f_C is pushed to share no information with f_B's (trigger-laden) features.
T (2-layer MLP on concat(z_B, z_C), hidden = feature dim, leaky ReLU, dropout 0.2) maximises the
same bound with its own Adam (lr 0.2, x0.1 every 20 epochs, set in `on_epoch_start`; the trainer
only checkpoints that Adam) and is divided by its spectral norm (5 power iterations) after every
step: a WGAN-style Lipschitz critic. lambda 0.01. (Until the trainer called `on_epoch_start`, the
x0.1 decay never ran: the critic kept lr 0.2 for all epochs in every CBD number before that fix.)

Differences from the official code, on purpose: the MI term is ON by default (`mi: true`; the
official --disentangle defaults to 0); f_B is trained with the trainer's schedule (the official
code steps the clean model's optimiser, leaving f_B at lr 0.1); T takes its step on each batch
just before the f_C step, instead of a separate full pass over the data each epoch (the same
number of critic steps). T lives outside the DDP wrapper; under world size > 1 its gradients are
averaged across ranks by hand, so every rank keeps the same critic.
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
        """E_joint T - E_product T, the product sample pairing z_B with z_C rolled by one."""
        return self(z_b, z_c).mean() - self(z_b, torch.roll(z_c, 1, dims=0)).mean()

    @torch.no_grad()
    def spectral_normalize(self, iterations: int = 5) -> None:
        """Divide every parameter by its largest singular value (a vector: by its L2 norm)."""
        for p in self.parameters():
            p.div_(spectral_norm(p.reshape(p.shape[0], -1) if p.ndim > 1 else p.reshape(1, -1), iterations))


def spectral_norm(w: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Largest singular value of a matrix by power iteration (deterministic start)."""
    v = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) / w.shape[1] ** 0.5
    for _ in range(iterations):
        u = F.normalize(w @ v, dim=0)
        v = F.normalize(w.t() @ u, dim=0)
    return (u @ w @ v).abs().clamp_min(1e-12)


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
    paper: ClassVar[dict[str, str]] = {"title": "Backdoor Defense via Deconfounded Representation Learning", "venue": "CVPR", "year": "2023"}

    def __init__(self, backdoored_epochs: int | None = None, backdoored_fraction: float = 0.05,
                 backdoored_lr: float | None = None, weight_norm: str = "batch", mi: bool = True, mi_weight: float = 0.01,
                 critic_lr: float = 0.2, critic_step_epochs: int = 20, critic_dropout: float = 0.2,
                 power_iterations: int = 5, backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        if backdoored_epochs is not None and int(backdoored_epochs) < 1:
            raise ValueError(f"method.backdoored_epochs must be >= 1 (or null), got {backdoored_epochs}")
        if not 0 < float(backdoored_fraction) <= 1:
            raise ValueError(f"method.backdoored_fraction must be in (0, 1], got {backdoored_fraction}")
        if backdoored_lr is not None and not float(backdoored_lr) > 0:
            raise ValueError(f"method.backdoored_lr must be > 0 (or null: the trainer's lr), got {backdoored_lr}")
        self.backdoored_epochs = backdoored_epochs
        self.backdoored_fraction = float(backdoored_fraction)
        self.backdoored_lr = backdoored_lr
        if weight_norm not in ("batch", "class"):
            raise ValueError(f"method.weight_norm must be 'batch' (the paper's) or 'class', got {weight_norm!r}")
        self.weight_norm = weight_norm
        self.mi = bool(mi)
        self.mi_weight = float(mi_weight)
        self.critic_lr = float(critic_lr)
        self.critic_step_epochs = int(critic_step_epochs)
        self.critic_dropout = float(critic_dropout)
        self.power_iterations = int(power_iterations)
        self.backdoored_checkpoint = backdoored_checkpoint
        self.critic: MICritic | None = None
        self.critic_opt: torch.optim.Optimizer | None = None

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        """Stage 1: ERM on the poisoned data for T epochs (same trainer otherwise; with the
        multistep recipe the lr stays at its initial value, as the paper intends)."""
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
        dim = model.embedding_dim
        self.critic = MICritic(dim, dim, self.critic_dropout)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.critic_lr)
        return CBDModule(model, backdoored)

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in module.clean.parameters() if p.requires_grad]}]

    def extra_optimizers(self, module: nn.Module) -> dict[str, ExtraOptimizer]:
        """The critic's Adam: checkpointed by the trainer, but stepped here (it ascends its own
        bound inside `training_step`, before f_C's loss is formed) on its own StepLR."""
        assert self.critic_opt is not None, "build() creates the critic's optimiser"
        return {"critic": ExtraOptimizer(self.critic_opt, scheduled=False, stepped_by_trainer=False)}

    def eval_model(self, module: nn.Module) -> Classifier:
        return module.clean

    def on_epoch_start(self, ctx: TrainContext) -> None:
        # StepLR(step 20, gamma 0.1) on the critic, as the official code
        for group in self.critic_opt.param_groups:
            group["lr"] = self.critic_lr * 0.1 ** (ctx.epoch // self.critic_step_epochs)

    def _critic_step(self, z_b: torch.Tensor, z_c: torch.Tensor, world_size: int) -> torch.Tensor:
        """One ascent step of T on the bound (features detached), then spectral normalisation."""
        self.critic.train()
        bound = self.critic.bound(z_b.detach(), z_c.detach())
        self.critic_opt.zero_grad(set_to_none=True)
        (-bound).backward()
        if world_size > 1 and dist.is_initialized():
            for p in self.critic.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world_size)
        self.critic_opt.step()
        self.critic.spectral_normalize(self.power_iterations)
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
            logs["critic_bound"] = self._critic_step(z_b, z_c, ctx.world_size)
            mi = self.critic.bound(z_b.detach(), z_c)
            loss = loss + self.mi_weight * mi
            logs["mi"] = mi.detach()
        logs.update(loss=loss, train_acc=(logits_c.argmax(1) == y).float().mean())
        return logs

    def state_dict(self) -> dict[str, Any]:
        """The critic's weights (it lives outside the module; its optimiser is the trainer's to save)."""
        return {"critic": self.critic.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.critic.load_state_dict(state["critic"])

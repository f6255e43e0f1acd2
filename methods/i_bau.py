"""I-BAU: adversarial unlearning of backdoors via the implicit hypergradient (Zeng et al., ICLR 2022),
as SCLBD/BackdoorBench runs it (defense/i-bau.py, config/defense/i-bau/cifar10.yaml).

Minimax over the defender's clean 5%: an inner maximisation finds one universal perturbation delta
(1 x C x H x W) that changes the model's predictions; the outer step updates the weights theta to
classify inputs patched with delta correctly, through delta*(theta), differentiated implicitly.
Each round (an epoch of ours; their `n_rounds` 5):
1. pre-pass (`pre_pass_step`, one pass of the clean data): delta starts at 0; per batch, one SGD
   step (lr 10) on -CE(f(x + delta), f(x)'s own labels) + 0.001 ||delta||^2. Under DDP the
   gradient is averaged over ranks, so every rank holds the same delta.
2. training pass: per batch, the outer loss L1 = CE(f(x with delta added to int(0.01 B) random
   samples), y), the inner fixed-point map Phi(delta, theta) = delta - 0.1 d/d delta L2, with
   L2 = -mean CE(f(x0 + delta), y0) + 0.001 ||delta||^2 on a fixed inner batch (x0, y0); K (5)
   fixed-point iterations v <- (dPhi/d delta)^T v + dL1/d delta from v = 0 (hypertorch's
   `fixed_point`, tol 1e-10); the hypergradient is dL1/d theta + (dPhi/d theta)^T v. The trainer
   backpropagates L1 + <Phi, v> - <Phi, v>.detach(): its gradient is the hypergradient, its value
   L1. Everything here is torch.autograd (grad with create_graph for dPhi, grad_outputs for the
   vector-Jacobian products).
The model stays in eval mode throughout (their loop calls model.eval() once), so BatchNorm's
running statistics never move. Optimiser: Adam lr 1e-4, betas (0.9, 0.999), amsgrad, no weight
decay, constant lr (argparser_opt_scheduler; its scheduler is never stepped); batch 256; the
training augmentation (their `train_tran`).

Departures: their inner batch x0 is the first batch of one augmented pass collected before all
rounds (`images_list[0]`), and their outer steps walk that same collected list every round; ours
take the epoch's own batches and x0 is the epoch's first training batch. Their patched samples are
drawn with Python's `random.sample`; ours with torch.randperm (the trainer seeds torch per rank
and epoch). Their 5% is a random index set (`choose_index`); ours the first 5% of the split.
||delta||^2 is computed as delta.pow(2).sum() (theirs torch.norm(delta)^2: equal, but the norm's
double backward is 0/0 at delta = 0, where every round starts).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import Method, TrainContext, Upstream
from methods.ft import load_weights
from methods.unlearning import adam_stage_trainer, check_clean_subset, eval_mode, with_value_of


def perturbation_step(model: nn.Module, delta: torch.Tensor, x: torch.Tensor, lr: float,
                      regularisation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the universal perturbation (their `batch_opt`): it ascends CE(f(x + delta),
    f(x)'s labels) with an L2 penalty; returns (new delta, that CE). Rank-averaged under DDP."""
    delta = delta.detach().requires_grad_(True)
    with torch.no_grad():
        labels = model(x).argmax(1)
    ce = F.cross_entropy(model(x + delta), labels)
    grad, = torch.autograd.grad(-ce + regularisation * delta.pow(2).sum(), delta)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grad)
        grad = grad / dist.get_world_size()
    return (delta - lr * grad).detach(), ce.detach()


def inner_map(model: nn.Module, delta: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, inner_lr: float,
              regularisation: float) -> torch.Tensor:
    """Phi(delta, theta) = delta - inner_lr * d L2 / d delta (graph kept: d Phi / d delta and
    d Phi / d theta are taken from it), L2 = -mean CE(f(x0 + delta), y0) + reg ||delta||^2."""
    inner = -F.cross_entropy(model(x0 + delta), y0) + regularisation * delta.pow(2).sum()
    grad, = torch.autograd.grad(inner, delta, create_graph=True)
    return delta - inner_lr * grad


def fixed_point_vector(mapped: torch.Tensor, delta: torch.Tensor, outer_grad: torch.Tensor, iterations: int,
                       tol: float = 1e-10) -> torch.Tensor:
    """v after `iterations` of v <- (d mapped / d delta)^T v + outer_grad from v = 0, stopping once
    an iteration moves v by less than `tol` (hypertorch's `fixed_point`): v approximates
    (I - dPhi/d delta)^-T dL1/d delta, a Neumann series."""
    v = torch.zeros_like(delta)
    for _ in range(iterations):
        previous = v
        v = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)[0] + outer_grad
        if float((v - previous).norm()) < tol:
            break
    return v


def patch_some(x: torch.Tensor, delta: torch.Tensor, portion: float) -> torch.Tensor:
    """x with delta added to int(portion * B) samples drawn at random (their `loss_outer`)."""
    n = int(x.shape[0] * portion)
    patch = torch.zeros_like(x)
    if n:
        idx = torch.randperm(x.shape[0], device=x.device)[:n]
        patch = patch.index_put((idx,), delta.expand(n, *delta.shape[1:]))
    return x + patch


@METHODS.register("i_bau")
class IBAU(Method):
    name = "i_bau"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Adversarial Unlearning of Backdoors via Implicit Hypergradient", "venue": "ICLR", "year": "2022"}

    def __init__(self, clean_subset: float = 0.05, n_rounds: int = 5, batch_size: int = 256, lr: float = 1e-4,
                 betas: list[float] = (0.9, 0.999), weight_decay: float = 0.0, amsgrad: bool = True, K: int = 5,
                 inner_lr: float = 0.1, perturbation_lr: float = 10.0, regularisation: float = 0.001,
                 portion: float = 0.01, tol: float = 1e-10, backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        self.clean_subset = check_clean_subset(self.name, clean_subset)
        if int(n_rounds) < 1 or int(K) < 1:
            raise ValueError(f"i_bau needs n_rounds >= 1 and K >= 1 (fixed-point iterations), got {n_rounds}, {K}")
        if not 0 <= float(portion) <= 1:
            raise ValueError(f"i_bau: portion (the share of each batch patched in the outer loss) must be in "
                             f"[0, 1], got {portion}")
        self.K, self.inner_lr, self.perturbation_lr = int(K), float(inner_lr), float(perturbation_lr)
        self.regularisation, self.portion, self.tol = float(regularisation), float(portion), float(tol)
        self.backdoored_checkpoint = backdoored_checkpoint
        self.delta: torch.Tensor | None = None
        self._inner: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**_defaults(), **method_cfg}
        return adam_stage_trainer(s["n_rounds"], s["batch_size"], s["lr"], s["betas"], s["weight_decay"], s["amsgrad"])

    def build(self, model: Classifier) -> nn.Module:
        return load_weights(model, self.backdoored_checkpoint)

    def on_epoch_start(self, ctx: TrainContext) -> None:
        self.delta, self._inner = None, None  # each round's perturbation starts at 0

    def pre_pass(self, ctx: TrainContext) -> bool:
        return True

    def pre_pass_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raw = ctx.classifier
        delta = self.delta if self.delta is not None else torch.zeros_like(x[:1])
        with eval_mode(raw), torch.enable_grad():
            self.delta, ce = perturbation_step(raw, delta, x, self.perturbation_lr, self.regularisation)
        return {"perturbation_ce": ce, "perturbation_norm": self.delta.norm()}

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raw = ctx.classifier
        if self._inner is None:
            self._inner = (x.detach(), y.detach())
        delta = (self.delta if self.delta is not None else torch.zeros_like(x[:1])).detach().requires_grad_(True)
        with eval_mode(raw):
            logits = module(patch_some(x, delta, self.portion))
            outer = F.cross_entropy(logits, y)
            outer_grad, = torch.autograd.grad(outer, delta, retain_graph=True, allow_unused=True)
            if outer_grad is None:
                outer_grad = torch.zeros_like(delta)
            mapped = inner_map(raw, delta, *self._inner, self.inner_lr, self.regularisation)
            v = fixed_point_vector(mapped, delta, outer_grad, self.K, self.tol)
        loss = with_value_of(outer, (mapped * v.detach()).sum())
        return {"loss": loss, "train_acc": (logits.argmax(1) == y).float().mean().detach(),
                "hypergradient_v_norm": v.norm().detach()}


def _defaults() -> dict[str, Any]:
    from methods.ft import method_defaults

    return method_defaults(IBAU)

"""CausalAdv (Zhang et al., ICLR 2022): adversarial training that also aligns the natural and
adversarial distributions of P(Y | S), S the spurious (style) part of the representation.

Per step (variant M: `causaladv_m`, variant T: `causaladv_t`):
1. Sigma, the running covariance of the l2-normalised penultimate features (an ISDA estimator),
   is updated with the batch; the spurious basis B is the fixed random anchor A with the span of
   Sigma W^T removed (W: the classifier head); s(x) = (f/|f|) B^T.
2. g, an MLP d -> d/2 (BN, ReLU) -> d (ReLU) -> C with an ISDA logit correction
   z + r * 0.5 * diag((w_j - w_y)^T Sigma_y (w_j - w_y)), models P(Y | S).
3. The attack maximises beta * CE(h(x'), y) + alpha * A (M, uniform start) or
   beta * KL(h(x) || h(x')) + alpha * A (T, start x + 0.001 N(0, I)), 10 steps of 0.007 at 0.031,
   with A = soft-CE(g(s(x')), softmax(g(s(x)))).
4. The classifier is trained on beta * CE(h(x_adv), y) + alpha_t A (M) or
   CE(h(x), y) + beta KL + alpha_t A (T), the target of A NOT detached; alpha_t and r_t ramp
   linearly from 0 over the epochs. g is trained on CE(g(s(x).detach()), y) by its own SGD, which
   the method hands the trainer (`extra_optimizers`): scheduled like the classifier's lr, stepped
   after the classifier's step, checkpointed with it.

g and the statistics live inside the module the trainer wraps in DDP, so g's gradients are
all-reduced with the classifier's, and the buffers are broadcast from rank 0. The alignment term
is computed through g with detached parameters, so g learns only from its own CE (the official
code instead zeroes g's gradients after the classifier's backward: the same update).

Traps of the official code handled here: g's class count comes from the classifier (it was hard
coded to 10); B is made exactly orthogonal to every Sigma-weighted classifier direction (the
official code removes the directions one after the other without orthogonalising them first,
which leaves B slightly aligned with the earlier ones); the model is the last epoch's (the
official code selected the epoch with the best PGD-20 accuracy on the TEST set).
Ours, not the paper's: Sigma and p(S) of the clean batch come from an eval-mode forward (the
official code used the train-mode forward that also fed the loss), and g steps after the
classifier's backward of the same batch rather than before it.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

from architectures.classifier import Classifier
from harness.attacks.base import Attack, parse_number, project_linf
from harness.core.registry import METHODS
from methods.base import ExtraOptimizer, Method, TrainContext


class CovarianceEstimator(nn.Module):
    """Online per-class mean and covariance of features (ISDA's EstimatorCV), kept as buffers."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.register_buffer("cov", torch.zeros(classes, dim, dim))
        self.register_buffer("mean", torch.zeros(classes, dim))
        self.register_buffer("amount", torch.zeros(classes))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        features = features.detach().float()
        onehot = F.one_hot(labels, self.amount.numel()).to(features.dtype)  # N x C
        counts = onehot.sum(0)  # C
        by_class = onehot.t().unsqueeze(2) * features.unsqueeze(0)  # C x N x D
        mean_batch = by_class.sum(1) / counts.clamp(min=1).unsqueeze(1)
        centred = by_class - onehot.t().unsqueeze(2) * mean_batch.unsqueeze(1)
        cov_batch = centred.transpose(1, 2) @ centred / counts.clamp(min=1).view(-1, 1, 1)
        weight = counts / (counts + self.amount).clamp(min=1e-12)  # C; 0 where no samples at all
        w3 = weight.view(-1, 1, 1)
        diff = (self.mean - mean_batch).unsqueeze(2)
        self.cov.copy_(self.cov * (1 - w3) + cov_batch * w3 + w3 * (1 - w3) * (diff @ diff.transpose(1, 2)))
        self.mean.copy_(self.mean * (1 - weight.unsqueeze(1)) + mean_batch * weight.unsqueeze(1))
        self.amount.add_(counts)


def l2_normalise(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-6)


def random_anchor(dim: int, oversample: int = 4) -> torch.Tensor:
    """dim orthonormal rows: of oversample*dim Gaussian vectors keep the dim with the smallest
    total |inner product| with the others, then Gram-Schmidt (QR)."""
    candidates = torch.randn(oversample * dim, dim)
    crowding = (candidates @ candidates.t()).abs().sum(1)
    kept = candidates[torch.argsort(crowding)[:dim]]
    q, r = torch.linalg.qr(kept.t())  # columns of q: Gram-Schmidt of the kept rows, in order
    return (q * torch.sign(torch.diagonal(r))).t().contiguous()


def spurious_basis(anchor: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The anchor's rows with the span of `directions` (rows) removed, each renormalised."""
    q, _ = torch.linalg.qr(directions.t())  # orthonormal basis of the span, D x C
    rest = anchor - (anchor @ q) @ q.t()
    return rest / rest.norm(dim=1, keepdim=True).clamp(min=1e-12)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


class SpuriousPredictor(nn.Module):
    """g: P(Y | S) with the ISDA logit correction driven by the covariance of its own features."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.pred = nn.Sequential(nn.Linear(dim, dim // 2), nn.BatchNorm1d(dim // 2), nn.ReLU(),
                                  nn.Linear(dim // 2, dim), nn.ReLU())
        self.fc = nn.Linear(dim, num_classes)
        self.estimator = CovarianceEstimator(dim, num_classes)

    def forward(self, s: torch.Tensor, y: torch.Tensor, ratio: float, update_cov: bool = False) -> torch.Tensor:
        hidden = self.pred(s)
        logits = self.fc(hidden)
        if update_cov:
            self.estimator.update(l2_normalise(hidden), y)
        w = self.fc.weight  # C x D
        diff = w.unsqueeze(0) - w[y].unsqueeze(1)  # N x C x D: w_j - w_y
        sigma = self.estimator.cov[y]  # N x D x D
        quad = ((diff @ sigma) * diff).sum(2)  # N x C: (w_j - w_y)^T Sigma_y (w_j - w_y)
        return logits + ratio * 0.5 * quad


class CausalAdvModule(nn.Module):
    """The classifier h, the network g and the spurious-basis statistics, trained as one module."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier
        dim, classes = classifier.embedding_dim, classifier.num_classes
        self.g = SpuriousPredictor(dim, classes)
        self.feature_cov = CovarianceEstimator(dim, 1)
        self.register_buffer("anchor", random_anchor(dim))
        self.register_buffer("basis", self.anchor.clone())

    @torch.no_grad()
    def update_basis(self, features: torch.Tensor) -> torch.Tensor:
        """Update Sigma with the batch's normalised features and recompute B from it."""
        self.feature_cov.update(l2_normalise(features), torch.zeros(features.shape[0], dtype=torch.long,
                                                                    device=features.device))
        directions = (self.feature_cov.cov[0] @ self.classifier.head.weight.detach().t()).t()  # C x D
        self.basis.copy_(spurious_basis(self.anchor, directions))
        return self.basis

    def spurious(self, features: torch.Tensor) -> torch.Tensor:
        return l2_normalise(features) @ self.basis.t()

    def g_frozen(self, s: torch.Tensor, y: torch.Tensor, ratio: float) -> torch.Tensor:
        """g in eval mode through detached parameters: gradients reach s only."""
        was_training = self.g.training
        self.g.eval()
        try:
            state = {n: p.detach() for n, p in self.g.named_parameters()}
            state.update(dict(self.g.named_buffers()))
            return functional_call(self.g, state, (s, y, ratio))
        finally:
            self.g.train(was_training)

    def forward(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, variant: str,
                alpha: float, beta: float, ratio: float) -> dict[str, torch.Tensor]:
        f, z = self.classifier.features(x)
        f_adv, z_adv = self.classifier.features(x_adv)
        s, s_adv = self.spurious(f), self.spurious(f_adv)
        loss_g = F.cross_entropy(self.g(s.detach(), y, ratio, update_cov=True), y)
        align = soft_cross_entropy(self.g_frozen(s_adv, y, ratio), F.softmax(self.g_frozen(s, y, ratio), dim=1))
        if variant == "m":
            content = beta * F.cross_entropy(z_adv, y)
        else:
            kl = F.kl_div(F.log_softmax(z_adv, dim=1), F.softmax(z, dim=1), reduction="batchmean")
            content = F.cross_entropy(z, y) + beta * kl
        loss_h = content + alpha * align
        return {"loss": loss_h + loss_g, "loss_h": loss_h.detach(), "loss_align": align.detach(),
                "loss_g": loss_g.detach(), "train_acc": (z.argmax(1) == y).float().mean(),
                "train_robust_acc": (z_adv.argmax(1) == y).float().mean()}


class CausalAdvAttack(Attack):
    """The train-time attack: beta * content loss + alpha * A, signed steps from the variant's start."""

    name = "causaladv"
    norm = "linf"

    def __init__(self, module: CausalAdvModule, variant: str, eps: float | str, steps: int = 10,
                 step_size: float | str | None = None, alpha: float = 1.0, beta: float = 1.0,
                 ratio: float = 1.0) -> None:
        super().__init__(eps)
        self.module, self.variant = module, variant
        self.steps = int(steps)
        self.step_size = parse_number(step_size) if step_size is not None else self.eps * 0.007 / 0.031
        self.alpha, self.beta, self.ratio = alpha, beta, ratio

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.module
        was_training = m.g.training
        m.g.eval()
        try:
            with torch.no_grad():
                f, z = m.classifier.features(x)
                p_s = F.softmax(m.g(m.spurious(f), y, self.ratio), dim=1)
                p_clean = F.softmax(z, dim=1)
            if self.variant == "m":
                x_adv = project_linf(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
            else:
                x_adv = project_linf(x + 0.001 * torch.randn_like(x), x, self.eps)
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                f_adv, z_adv = m.classifier.features(x_adv)
                if self.variant == "m":
                    content = F.cross_entropy(z_adv, y)
                else:
                    content = F.kl_div(F.log_softmax(z_adv, dim=1), p_clean, reduction="batchmean")
                align = soft_cross_entropy(m.g(m.spurious(f_adv), y, self.ratio), p_s)
                (grad,) = torch.autograd.grad(self.beta * content + self.alpha * align, x_adv)
                x_adv = project_linf(x_adv.detach() + self.step_size * grad.sign(), x, self.eps)
        finally:
            m.g.train(was_training)
        return x_adv


class CausalAdv(Method):
    """Shared by both variants; `variant` is 'm' or 't'."""

    variant: ClassVar[str]

    def __init__(self, attack: dict[str, Any], alpha: float = 1.0, beta: float = 1.0, ratio: float = 1.0,
                 g_optimizer: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.alpha, self.beta, self.ratio = float(alpha), float(beta), float(ratio)
        self.attack_cfg = {k: v for k, v in attack.items() if k != "name"}
        self.g_optimizer_cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, **(g_optimizer or {})}
        self.g_optimizer: torch.optim.Optimizer | None = None
        CausalAdvAttack(None, self.variant, **self.attack_cfg)  # type: ignore[arg-type]  # bad settings fail now

    def build(self, model: Classifier) -> nn.Module:
        if model.num_classes < 2:
            raise ValueError("CausalAdv needs a classifier with >= 2 classes")
        module = CausalAdvModule(model)
        self.g_optimizer = torch.optim.SGD(module.g.parameters(), **self.g_optimizer_cfg)
        return module

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in module.classifier.parameters() if p.requires_grad]}]

    def extra_optimizers(self, module: nn.Module) -> dict[str, ExtraOptimizer]:
        """g's SGD: on the trainer's schedule, stepped by the trainer after the classifier's step
        (g's gradients come from the same backward, all-reduced by DDP with the classifier's)."""
        assert self.g_optimizer is not None, "build() creates g's optimiser"
        return {"g": ExtraOptimizer(self.g_optimizer, scheduled=True, stepped_by_trainer=True)}

    def eval_model(self, module: nn.Module) -> Classifier:
        return module.classifier

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        inner: CausalAdvModule = module.module if isinstance(module, DDP) else module
        ramp = ctx.progress  # alpha_t, r_t: linear from 0 (epoch 0) towards alpha, r
        alpha_t, ratio_t = self.alpha * ramp, self.ratio * ramp
        was_training = inner.classifier.training
        inner.classifier.eval()
        with torch.no_grad():
            features, _ = inner.classifier.features(x)
        inner.classifier.train(was_training)
        inner.update_basis(features)
        attack = CausalAdvAttack(inner, self.variant, alpha=self.alpha, beta=self.beta, ratio=self.ratio,
                                 **self.attack_cfg)
        x_adv = attack(inner.classifier, x, y)
        return module(x, x_adv, y, self.variant, alpha_t, self.beta, ratio_t)


@METHODS.register("causaladv_m")
class CausalAdvM(CausalAdv):
    name = "causaladv_m"
    paper: ClassVar[dict[str, str]] = {"title": "CausalAdv: Adversarial Robustness through the Lens of Causality", "venue": "ICLR", "year": "2022"}
    variant = "m"


@METHODS.register("causaladv_t")
class CausalAdvT(CausalAdv):
    name = "causaladv_t"
    paper: ClassVar[dict[str, str]] = {"title": "CausalAdv: Adversarial Robustness through the Lens of Causality", "venue": "ICLR", "year": "2022"}
    variant = "t"

    def __init__(self, attack: dict[str, Any], alpha: float = 1.0, beta: float = 6.0, ratio: float = 1.0,
                 g_optimizer: dict[str, Any] | None = None) -> None:
        super().__init__(attack, alpha, beta, ratio, g_optimizer)

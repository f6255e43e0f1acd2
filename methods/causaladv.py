"""CausalAdv (Zhang et al., ICLR 2022): adversarial training that also aligns the natural and
adversarial distributions of P(Y | S), S the spurious (style) part of the representation.

Each step, in the order of the official loop (YonggangZhangUSTC/CausalAdv causaladv.py
`model_train`, causaladv_utils.py; docs/conformance.md: every quantity below equals it):
1. f, z = h(x) in train mode (BatchNorm sees x first). Sigma, the running covariance of the
   l2-normalised f (an ISDA estimator), is updated with them; the spurious basis B is the fixed
   random anchor A with the Sigma-weighted head directions Sigma W^T removed one after the other,
   each row renormalised after each removal (`basis: sequential`, the official deco_ref);
   s(x) = (f/|f|) B^T.
2. x_adv: h and g in eval mode, 10 signed steps of 0.007 at 0.031 maximising
   beta * CE(h(x'), y) + alpha * A (M: start x + U(-eps, eps) clipped to [0, 1]) or
   beta * KL(h(x) || h(x')) + alpha * A (T: start x + 0.001 N(0, I), not clipped before the first
   gradient), with A = soft-CE(g(s(x')), softmax(g(s(x)))) and the full alpha, beta and r.
3. f_adv, z_adv = h(x_adv) in train mode.
4. g (an MLP d -> d/2 (BN, ReLU) -> d (ReLU) -> C with the ISDA logit correction
   z + r_t * 0.5 * diag((w_j - w_y)^T Sigma_y (w_j - w_y)) from its own per-class covariance)
   takes its SGD step on CE(g(s(x).detach()), y) in train mode FIRST (the method steps it here;
   the trainer schedules and checkpoints its optimiser);
5. then h's loss, with the UPDATED g in eval mode: beta * CE(h(x_adv), y) + alpha_t A_adv (M) or
   CE(h(x), y) + beta KL + alpha_t A_adv (T), the target of A not detached. alpha_t and r_t ramp
   linearly from 0 over the epochs. A's gradient reaches h only (g's parameters are detached in
   it; the official code zeroes g's gradients after h's backward: the same update).

g and its optimiser live outside the DDP-wrapped module (they are the method's: `state_dict`,
`extra_optimizers`); under DDP g's gradients are averaged across ranks by hand and its buffers
are broadcast from rank 0, as DDP does for the module's statistics.

Deviations kept as named options: `basis: orthogonal` makes B exactly orthogonal to every
Sigma-weighted direction (they are orthogonalised before removal; the official sequential removal
leaves B slightly aligned with the earlier ones). Fixed traps: g's class count comes from the
classifier (hard coded to 10); the model is the last epoch's (the official code keeps the epoch
with the best PGD-20 accuracy on the TEST set). Not reproduced: the official head has no bias
(ours is the architecture's head); its loader drops the last partial batch (390 steps per epoch
on CIFAR-10, ours 391).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

from architectures.classifier import Classifier
from harness.attacks.base import Attack, parse_number, project_linf
from harness.core.registry import METHODS
from methods.base import ExtraOptimizer, Method, TrainContext

BASES = ("sequential", "orthogonal")


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


def anchor_candidates(dim: int, oversample: int = 4) -> torch.Tensor:
    """Of oversample*dim Gaussian vectors, the dim with the smallest total |inner product| with
    the others, in that order (the official init_anchor's draw and choice)."""
    candidates = torch.randn(oversample * dim, dim)
    crowding = (candidates @ candidates.t()).abs().sum(1)
    return candidates[torch.sort(crowding)[1][:dim]]


def random_anchor(dim: int, oversample: int = 4) -> torch.Tensor:
    """dim orthonormal rows: the anchor candidates after classical Gram-Schmidt in their order
    (as the official init_anchor: same draws, same rows; a QR differs from it by ~1e-4 in float32)."""
    return gram_schmidt(anchor_candidates(dim, oversample))


def gram_schmidt(rows: torch.Tensor) -> torch.Tensor:
    """Classical Gram-Schmidt of the rows, in order, accumulated one projection at a time as the
    official gram_schmidt_ort does (in float32 its rows are orthonormal to ~1e-4 only, and a
    vectorised or QR version differs from it by as much; d^2/2 small steps, once, at build)."""
    out = torch.zeros_like(rows)
    for i in range(rows.shape[0]):
        projection = torch.zeros_like(rows[i])
        for j in range(i):
            projection = projection + torch.sum(rows[i] * out[j]) * out[j]
        v = rows[i] - projection
        out[i] = v / v.pow(2).sum().sqrt()
    return out


def sequential_basis(anchor: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The official basis: remove from the anchor's rows each direction (row) in turn, each row
    renormalised after every removal (CausalAdv's deco_ref)."""
    basis = anchor
    for r in directions:
        basis = basis - (basis @ r).unsqueeze(1) / r.pow(2).sum() * r
        basis = basis / basis.pow(2).sum(1, keepdim=True).sqrt()
    return basis


def spurious_basis(anchor: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The anchor's rows with the span of `directions` (rows) removed, each renormalised: exactly
    orthogonal to every direction (`basis: orthogonal`)."""
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

    def frozen(self, s: torch.Tensor, y: torch.Tensor, ratio: float) -> torch.Tensor:
        """g in eval mode through detached parameters: gradients reach s only."""
        was_training = self.training
        self.eval()
        try:
            state = {n: p.detach() for n, p in self.named_parameters()}
            state.update(dict(self.named_buffers()))
            return functional_call(self, state, (s, y, ratio))
        finally:
            self.train(was_training)


class CausalAdvModule(nn.Module):
    """The classifier h and the spurious basis' statistics: the module the trainer wraps in DDP."""

    def __init__(self, classifier: Classifier, basis: str = "sequential") -> None:
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"causaladv basis must be one of {', '.join(BASES)}, got {basis!r}")
        self.classifier, self.basis_kind = classifier, basis
        self.feature_cov = CovarianceEstimator(classifier.embedding_dim, 1)
        # drawn now (the official order: after h, before g); orthonormalised at the first update,
        # so that a build whose anchor a checkpoint replaces (resume, evaluation) skips the
        # d^2/2-step Gram-Schmidt
        self.register_buffer("anchor", anchor_candidates(classifier.embedding_dim))
        self.register_buffer("anchor_ready", torch.zeros(()))  # 1: orthonormalised (a float: DDP broadcasts it)
        self._anchor_checked = False
        self.register_buffer("basis", torch.zeros_like(self.anchor))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of h, in the module's mode."""
        return self.classifier.features(x)

    @torch.no_grad()
    def orthonormal_anchor(self) -> torch.Tensor:
        """A: the drawn candidates after Gram-Schmidt (on the CPU, once)."""
        if not self._anchor_checked:  # the flag is read once per process (no device sync per step)
            if not bool(self.anchor_ready):
                self.anchor.copy_(gram_schmidt(self.anchor.detach().cpu()).to(self.anchor.device))
                self.anchor_ready.fill_(1.0)
            self._anchor_checked = True
        return self.anchor

    @torch.no_grad()
    def update_basis(self, features: torch.Tensor) -> torch.Tensor:
        """Update Sigma with the batch's normalised features, recompute B; returns this step's B."""
        anchor = self.orthonormal_anchor()
        self.feature_cov.update(l2_normalise(features), torch.zeros(features.shape[0], dtype=torch.long,
                                                                    device=features.device))
        directions = (self.feature_cov.cov[0] @ self.classifier.head.weight.detach().t()).t()  # C x D
        build = sequential_basis if self.basis_kind == "sequential" else spurious_basis
        self.basis.copy_(build(anchor, directions))
        return self.basis.clone()


def spurious(features: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return l2_normalise(features) @ basis.t()


class CausalAdvAttack(Attack):
    """The train-time attack: beta * content loss + alpha * A, signed steps from the variant's start."""

    name = "causaladv"
    norm = "linf"

    def __init__(self, g: SpuriousPredictor, basis: torch.Tensor, variant: str, eps: float | str, steps: int = 10,
                 step_size: float | str | None = None, alpha: float = 1.0, beta: float = 1.0,
                 ratio: float = 1.0) -> None:
        super().__init__(eps)
        self.g, self.basis, self.variant = g, basis, variant
        self.steps = int(steps)
        self.step_size = parse_number(step_size) if step_size is not None else self.eps * 0.007 / 0.031
        self.alpha, self.beta, self.ratio = alpha, beta, ratio

    def start(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "m":  # uniform in the ball, clipped to [0, 1]
            return project_linf(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
        return x + 0.001 * torch.randn_like(x)  # T: as drawn, the first gradient is taken here

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self.g
        was_training = g.training
        g.eval()
        try:
            with torch.no_grad():
                f, z = model.features(x)
                p_s = F.softmax(g(spurious(f, self.basis), y, self.ratio), dim=1)
                p_clean = F.softmax(z, dim=1)
            x_adv = self.start(x)
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                f_adv, z_adv = model.features(x_adv)
                if self.variant == "m":
                    content = F.cross_entropy(z_adv, y)
                else:
                    content = F.kl_div(F.log_softmax(z_adv, dim=1), p_clean, reduction="batchmean")
                align = soft_cross_entropy(g(spurious(f_adv, self.basis), y, self.ratio), p_s)
                (grad,) = torch.autograd.grad(self.beta * content + self.alpha * align, x_adv)
                x_adv = project_linf(x_adv.detach() + self.step_size * grad.sign(), x, self.eps)
        finally:
            g.train(was_training)
        return x_adv


class CausalAdv(Method):
    """Shared by both variants; `variant` is 'm' or 't'."""

    variant: ClassVar[str]

    def __init__(self, attack: dict[str, Any], alpha: float = 1.0, beta: float = 1.0, ratio: float = 1.0,
                 g_optimizer: dict[str, Any] | None = None, basis: str = "sequential") -> None:
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"{self.name} basis must be one of {', '.join(BASES)}, got {basis!r}")
        self.alpha, self.beta, self.ratio, self.basis = float(alpha), float(beta), float(ratio), basis
        self.attack_cfg = {k: v for k, v in attack.items() if k != "name"}
        self.g_optimizer_cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, **(g_optimizer or {})}
        self.g: SpuriousPredictor | None = None
        self.g_optimizer: torch.optim.Optimizer | None = None
        CausalAdvAttack(None, None, self.variant, **self.attack_cfg)  # type: ignore[arg-type]  # bad settings fail now

    def build(self, model: Classifier) -> nn.Module:
        if model.num_classes < 2:
            raise ValueError("CausalAdv needs a classifier with >= 2 classes")
        module = CausalAdvModule(model, self.basis)
        self.g = SpuriousPredictor(model.embedding_dim, model.num_classes)
        self.g_optimizer = torch.optim.SGD(self.g.parameters(), **self.g_optimizer_cfg)
        return module

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in module.classifier.parameters() if p.requires_grad]}]

    def extra_optimizers(self, module: nn.Module) -> dict[str, ExtraOptimizer]:
        """g's SGD: on the trainer's schedule and in its checkpoint, stepped here (before h's loss
        is formed, as the official loop)."""
        assert self.g_optimizer is not None, "build() creates g's optimiser"
        return {"g": ExtraOptimizer(self.g_optimizer, scheduled=True, stepped_by_trainer=False)}

    def eval_model(self, module: nn.Module) -> Classifier:
        return module.classifier

    def _g_on(self, device: torch.device) -> SpuriousPredictor:
        """g (and its optimiser's state, restored on the CPU) on the batch's device."""
        assert self.g is not None and self.g_optimizer is not None, "build() creates g"
        if next(self.g.parameters()).device != device:
            self.g.to(device)
            for state in self.g_optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        state[key] = value.to(device)
        return self.g

    def _g_step(self, g: SpuriousPredictor, s: torch.Tensor, y: torch.Tensor, ratio: float,
                world_size: int) -> torch.Tensor:
        """g's own update on CE(g(s), y), s detached, in train mode (its statistics updated)."""
        assert self.g_optimizer is not None
        g.train()
        loss = F.cross_entropy(g(s.detach(), y, ratio, update_cov=True), y)
        self.g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world_size > 1 and dist.is_initialized():
            for p in g.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world_size)
        self.g_optimizer.step()
        self.g_optimizer.zero_grad(set_to_none=True)
        if world_size > 1 and dist.is_initialized():
            for b in g.buffers():
                dist.broadcast(b, 0)
        return loss.detach()

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        inner: CausalAdvModule = module.module if isinstance(module, DDP) else module
        g = self._g_on(x.device)
        ramp = ctx.progress  # alpha_t, r_t: linear from 0 (epoch 0) towards alpha, r
        alpha_t, ratio_t = self.alpha * ramp, self.ratio * ramp
        f, z = module(x)  # train mode: BatchNorm sees x, then x_adv
        basis = inner.update_basis(f.detach())
        attack = CausalAdvAttack(g, basis, self.variant, alpha=self.alpha, beta=self.beta, ratio=self.ratio,
                                 **self.attack_cfg)
        x_adv = attack(inner.classifier, x, y)
        f_adv, z_adv = module(x_adv)
        s, s_adv = spurious(f, basis), spurious(f_adv, basis)
        loss_g = self._g_step(g, s, y, ratio_t, ctx.world_size)
        align = soft_cross_entropy(g.frozen(s_adv, y, ratio_t), F.softmax(g.frozen(s, y, ratio_t), dim=1))
        if self.variant == "m":
            content = self.beta * F.cross_entropy(z_adv, y)
        else:
            kl = F.kl_div(F.log_softmax(z_adv, dim=1), F.softmax(z, dim=1), reduction="batchmean")
            content = F.cross_entropy(z, y) + self.beta * kl
        loss = content + alpha_t * align
        return {"loss": loss, "loss_align": align.detach(), "loss_g": loss_g,
                "alpha_t": torch.tensor(alpha_t), "ratio_t": torch.tensor(ratio_t),
                "train_acc": (z.argmax(1) == y).float().mean(),
                "train_robust_acc": (z_adv.argmax(1) == y).float().mean()}

    def state_dict(self) -> dict[str, Any]:
        """g's weights and statistics (it lives outside the module; its optimiser is the trainer's to save)."""
        assert self.g is not None
        return {"g": self.g.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.g is not None:
            self.g.load_state_dict(state["g"])


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
                 g_optimizer: dict[str, Any] | None = None, basis: str = "sequential") -> None:
        super().__init__(attack, alpha, beta, ratio, g_optimizer, basis)

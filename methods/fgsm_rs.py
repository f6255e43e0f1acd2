"""Fast adversarial training with FGSM-RS (Wong, Rice & Kolter 2020), with its
catastrophic-overfitting guard.

x' = clip(x + delta + alpha * sign(grad CE), eps-ball, [0,1]) with delta ~ U(-eps, eps) and
alpha = 1.25 eps (step_ratio); loss CE(f(x'), y). The paper's recipe: cyclic lr (trainer
schedule `cyclic`), 15 epochs on CIFAR-10 (configs/method/fgsm_rs.yaml).

Catastrophic overfitting (PGD accuracy collapsing to ~0 within an epoch while FGSM accuracy
soars) is guarded as in the paper's code: at the end of every epoch the model is attacked with
PGD (`guard_steps`) on the epoch's last batch; when the accuracy falls more than `guard_drop`
below the previous epoch's, training stops: the previous epoch's weights are restored and held
for the rest of the run (logged as `co_stopped`).
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import Attack, input_gradient, parse_number, project_linf
from harness.attacks.pgd import PGD
from harness.core.registry import METHODS
from methods.base import Method, TrainContext


class FGSMRandomStart(Attack):
    """One signed-gradient step of `step_ratio * eps` from a uniform random start."""

    name = "fgsm_rs"
    norm = "linf"

    def __init__(self, eps: float | str, step_ratio: float = 1.25) -> None:
        super().__init__(eps)
        self.step_ratio = float(step_ratio)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = project_linf(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
        grad, _ = input_gradient(model, start, y, F.cross_entropy)
        return project_linf(start + self.step_ratio * self.eps * grad.sign(), x, self.eps)


@METHODS.register("fgsm_rs")
class FGSMRS(Method):
    name = "fgsm_rs"
    paper: ClassVar[dict[str, str]] = {"title": "Fast is Better than Free: Revisiting Adversarial Training", "venue": "ICLR", "year": "2020"}

    def __init__(self, attack: dict[str, Any], guard: bool = True, guard_steps: int = 5,
                 guard_drop: float = 0.2) -> None:
        super().__init__()
        settings = {k: v for k, v in attack.items() if k != "name"}
        self.attack = FGSMRandomStart(**settings)
        self.guard = bool(guard)
        self.guard_attack = PGD(eps=self.attack.eps, steps=int(guard_steps), step_size=self.attack.eps / 4)
        self.guard_drop = float(parse_number(guard_drop))
        self.best_acc = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped = False
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        x_adv = self.attack(ctx.classifier, x, y)
        logits = module(x_adv)
        self._last = (x, y)
        return {"loss": F.cross_entropy(logits, y), "train_robust_acc": (logits.argmax(1) == y).float().mean(),
                "co_stopped": torch.tensor(float(self.stopped))}

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        if not self.guard:
            return
        if self.stopped:  # hold the best weights: the steps after the stop are undone
            module.load_state_dict(self.best_state)  # type: ignore[arg-type]
            return
        if (ctx.step + 1) % ctx.steps_per_epoch != 0 or self._last is None:
            return
        acc = self.guard_accuracy(ctx.classifier, *self._last)
        if self.best_state is not None and acc < self.best_acc - self.guard_drop:
            self.stopped = True
            module.load_state_dict(self.best_state)
            return
        self.best_acc = acc  # the last epoch that did not collapse
        self.best_state = copy.deepcopy(module.state_dict())

    def guard_accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """PGD accuracy on a training batch, averaged over DDP ranks (all ranks decide alike)."""
        x_adv = self.guard_attack(model, x, y)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            correct = (model(x_adv).argmax(1) == y).float().sum()
        model.train(was_training)
        stats = torch.stack([correct, torch.tensor(float(y.numel()), device=correct.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        return float(stats[0] / stats[1])

    def state_dict(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc, "best_state": self.best_state, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_acc = float(state.get("best_acc", -1.0))
        self.best_state = state.get("best_state")
        self.stopped = bool(state.get("stopped", False))

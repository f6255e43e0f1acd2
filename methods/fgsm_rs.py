"""Fast adversarial training with FGSM-RS (Wong, Rice & Kolter 2020), with its
catastrophic-overfitting guard, as locuslab/fast_adversarial CIFAR10/train_fgsm.py runs it.

Crafting: delta ~ U(-eps, eps), clipped so that x + delta lies in [0, 1]; one signed-gradient
step of alpha = 1.25 eps (the script's alpha 10/255 at eps 8/255) on CE; delta clipped to
[-eps, eps] and again to the box; loss CE(f(x + delta), y). The official script crafts with the
model in TRAIN mode (BatchNorm normalises with the batch's statistics, and the crafting forward
updates the running statistics too: BatchNorm sees x + delta_start, then x + delta): our default,
`craft_mode: train`. `craft_mode: eval` (the bag-of-tricks choice: BatchNorm frozen while
crafting) is a named option.

Catastrophic-overfitting guard (the script's `--early-stop`, which its README recommends): after
each epoch, PGD (5 steps of 2/255, one restart: `guard_steps`, `guard_step`) on the epoch's FIRST
batch, crafted and scored in `guard_mode` (train, as the script: the guard's 7 forwards move
BatchNorm's running statistics, and the saved weights carry that); the attack steps only the
samples still classified correctly and stops when none is, as the script's `attack_pgd`. When the
accuracy falls by more than `guard_drop` (0.2) below the previous epoch's, the script breaks out
of training and saves the previous epoch's weights. Our trainer has no early exit, so we restore
those weights and hold them for the epochs left (each later step is undone after it, and skips
the attack: one clean forward/backward), logged as `co_stopped`: the final checkpoint is the
script's saved model.

Recipe (configs/recipes/paper/fgsm_rs.yaml): 15 epochs, batch 128, SGD momentum 0.9 wd 5e-4,
torch CyclicLR 0 -> 0.2 -> 0 peaking at half of training, stepped per batch, momentum cycled
0.9 <-> 0.8. The script trains with apex amp O2 (fp16 weights): we compare in fp32
(docs/conformance.md).
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import CRAFT_MODES, Attack, craft, input_gradient, parse_number, project_linf
from harness.core.registry import METHODS
from methods.base import Method, TrainContext


def uniform_box_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x + U(-eps, eps), clipped into [0, 1]: the official start of FGSM-RS and its guard's PGD."""
    return project_linf(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)


class FGSMRandomStart(Attack):
    """One signed-gradient step of `step_ratio * eps` from a uniform random start."""

    name = "fgsm_rs"
    norm = "linf"

    def __init__(self, eps: float | str, step_ratio: float = 1.25) -> None:
        super().__init__(eps)
        self.step_ratio = float(step_ratio)

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_box_start(x, self.eps)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = self.random_start(x)
        grad, _ = input_gradient(model, start, y, F.cross_entropy)
        return project_linf(start + self.step_ratio * self.eps * grad.sign(), x, self.eps)


def early_stopping_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, eps: float,
                       step_size: float, steps: int) -> torch.Tensor:
    """The guard's PGD (fast_adversarial's `attack_pgd`, one restart): each step moves only the
    samples the model still classifies correctly, and the attack ends when none is left. The
    model's mode is the caller's; one last forward scores the result, as the official restart
    loop does (in train mode it, too, updates BatchNorm's running statistics)."""
    x_adv = start.detach()
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        correct = logits.argmax(1) == y
        if not bool(correct.any()):
            break
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_adv)
        stepped = torch.max(torch.min(x_adv.detach() + step_size * grad.sign(), hi), lo)
        x_adv = torch.where(correct.view(-1, *[1] * (x.dim() - 1)), stepped, x_adv.detach())
    x_adv = x_adv.detach()
    with torch.no_grad():
        model(x_adv)  # the official restart loop's scoring forward (max-loss selection of one restart)
    return x_adv


@METHODS.register("fgsm_rs")
class FGSMRS(Method):
    name = "fgsm_rs"
    paper: ClassVar[dict[str, str]] = {"title": "Fast is Better than Free: Revisiting Adversarial Training", "venue": "ICLR", "year": "2020"}

    def __init__(self, attack: dict[str, Any], craft_mode: str = "train", guard: bool = True,
                 guard_steps: int = 5, guard_step: float | str = "2/255", guard_drop: float = 0.2,
                 guard_mode: str = "train") -> None:
        super().__init__()
        for setting, mode in (("craft_mode", craft_mode), ("guard_mode", guard_mode)):
            if mode not in CRAFT_MODES:
                raise ValueError(f"fgsm_rs {setting} must be one of {', '.join(CRAFT_MODES)}, got {mode!r}")
        settings = {k: v for k, v in attack.items() if k != "name"}
        self.attack = FGSMRandomStart(**settings)
        self.craft_mode, self.guard_mode = craft_mode, guard_mode
        self.guard = bool(guard)
        self.guard_steps, self.guard_step = int(guard_steps), parse_number(guard_step)
        self.guard_drop = float(parse_number(guard_drop))
        self.best_acc = 0.0  # the official prev_robust_acc starts at 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped = False
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        stopped = torch.tensor(float(self.stopped), device=x.device)
        if self.stopped:  # the weights are held (after_step undoes this step): no attack to pay for
            logits = module(x)
            return {"loss": F.cross_entropy(logits, y), "train_robust_acc": torch.zeros((), device=x.device),
                    "co_stopped": stopped}
        if ctx.step % ctx.steps_per_epoch == 0:
            self._first = (x.detach(), y.detach())  # the official guard attacks the epoch's first batch
        x_adv = craft(self.attack, ctx.classifier, x, y, self.craft_mode)
        logits = module(x_adv)
        return {"loss": F.cross_entropy(logits, y), "train_robust_acc": (logits.argmax(1) == y).float().mean(),
                "co_stopped": stopped}

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        if not self.guard:
            return
        if self.stopped:  # hold the last good weights: the steps after the stop are undone
            module.load_state_dict(self.best_state)  # type: ignore[arg-type]
            return
        if (ctx.step + 1) % ctx.steps_per_epoch != 0 or self._first is None:
            return
        acc = self.guard_accuracy(ctx.classifier, *self._first)
        if self.best_state is not None and acc - self.best_acc < -self.guard_drop:  # the script's test
            self.stopped = True
            module.load_state_dict(self.best_state)
            return
        self.best_acc = acc  # the last epoch that did not collapse
        self.best_state = copy.deepcopy(module.state_dict())

    def guard_start(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_box_start(x, self.attack.eps)

    def guard_accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """PGD accuracy on the epoch's first batch in `guard_mode`, averaged over DDP ranks (all
        ranks decide alike)."""
        was_training = model.training
        model.train(self.guard_mode == "train")
        try:
            with torch.enable_grad():
                x_adv = early_stopping_pgd(model, x, y, self.guard_start(x), self.attack.eps, self.guard_step,
                                           self.guard_steps)
            with torch.no_grad():
                correct = (model(x_adv).argmax(1) == y).float().sum()
        finally:
            model.train(was_training)
        stats = torch.stack([correct, torch.tensor(float(y.numel()), device=correct.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        return float(stats[0] / stats[1])

    def state_dict(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc, "best_state": self.best_state, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_acc = float(state.get("best_acc", 0.0))
        self.best_state = state.get("best_state")
        self.stopped = bool(state.get("stopped", False))

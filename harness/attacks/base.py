"""The attack contract.

An attack is a stateless call `attack(model, x, y) -> x_adv` on images in [0,1]:
- it runs on the unwrapped model (never the DDP wrapper: no buffer broadcasts, no reducer
  bookkeeping), in eval mode, and restores `model.training` in a `finally`;
- it takes gradients with respect to the input only (`torch.autograd.grad`), so parameter
  `.grad` is never filled and no weight gradient is computed;
- its output is always within the eps-ball around x and within [0,1].
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from fractions import Fraction
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
from torch import nn

from harness.core.registry import ATTACKS

Norm = Literal["linf", "l2"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> scalar to MAXIMISE


class Attack(ABC):
    """Base class: subclasses implement `perturb` and register with `@ATTACKS.register`."""

    name: ClassVar[str]
    norm: Norm = "linf"

    def __init__(self, eps: float | str) -> None:
        self.eps = parse_number(eps)
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"{self.name} eps must be a finite number >= 0, got {self.eps}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_mode(model):
            x_adv = self.perturb(model, x.detach(), y.detach())
        return x_adv.detach()

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return x_adv (model is in eval mode here)."""

    def describe(self) -> dict[str, Any]:
        """The settings that define this attack (stored with every result row). `eot_iter` is
        left out at its default 1, so rows of deterministic evaluations read as before EOT existed,
        and `skip_fooled` at its default (on without EOT: it changes no point's outcome, only the work)."""
        quiet = {"eot_iter": 1, "skip_fooled": getattr(self, "eot_iter", 1) == 1}
        return {"name": self.name, "norm": self.norm, **{
            k: v for k, v in vars(self).items()
            if not k.startswith("_") and not (k in quiet and v == quiet[k])}}


class MaskedAttack(Attack):
    """An attack whose core also says which points it fooled (APGD, FAB-T, Square: the
    AutoAttack components, chained on the points still robust)."""

    @abstractmethod
    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, fooled) on float inputs, the model already in attack mode."""

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._attack(model, x.float(), y)[0]

    def perturb_with_mask(self, model: nn.Module, x: torch.Tensor,
                          y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, fooled): fooled[i] is True where the model misclassifies x_adv[i] (points
        misclassified when clean included), so robust accuracy = 1 - fooled.float().mean().
        Same guarantees as `attack(model, x, y)`: eval mode, mode restored, input gradients only."""
        with attack_mode(model):
            x_adv, fooled = self._attack(model, x.detach().float(), y.detach())
        return x_adv.detach(), fooled


class IterativeAttack(Attack):
    """Shared settings of the PGD family: `steps` signed/normalised steps of `step_size`
    (default eps/4: 2/255 at eps 8/255) from an optional random start."""

    def __init__(self, eps: float | str, steps: int = 20, step_size: float | str | None = None,
                 random_start: bool = True) -> None:
        super().__init__(eps)
        if int(steps) < 1:
            raise ValueError(f"{self.name} steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.step_size = parse_number(step_size) if step_size is not None else self.eps / 4
        if not math.isfinite(self.step_size) or self.step_size < 0:
            raise ValueError(f"{self.name} step_size must be a finite number >= 0, got {self.step_size}")
        self.random_start = bool(random_start)


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and grad enabled while the attack runs; the model's mode restored after.
    (Marking the parameters requires_grad=False as well was measured: no speed gain, as
    autograd.grad already skips the weight gradients, so the parameters are left alone.)"""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


CRAFT_MODES = ("eval", "train")


def craft(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str = "eval") -> torch.Tensor:
    """A train-time attack with the model in `mode`. 'eval' is the attack contract (`attack(model,
    x, y)`: BatchNorm uses and keeps its running statistics). 'train' is how several official
    training codes craft (fast AT's FGSM-RS, Madry-style PGD-AT scripts): every forward of the
    attack normalises with the batch's statistics and updates BatchNorm's running statistics.
    Either way only input gradients are taken and the model's mode is restored."""
    if mode == "eval":
        return attack(model, x, y)
    if mode != "train":
        raise ValueError(f"craft mode must be one of {', '.join(CRAFT_MODES)}, got {mode!r}")
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            return attack.perturb(model, x.detach(), y.detach()).detach()
    finally:
        model.train(was_training)


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d x only (no parameter gradients); returns (grad, logits)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the L-inf eps-ball around x, then into [0,1] (the ball contains x, which is in [0,1])."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def parse_number(value: float | int | str) -> float:
    """Accept 0.031, 8/255 (as the string '8/255' from a command line) or '0.1'."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number: {value!r}; write e.g. 0.031 or 8/255") from None


def build_attack(cfg: dict[str, Any]) -> Attack:
    """Instantiate the attack an `attack` config names: {'name': 'pgd', 'eps': ..., ...}."""
    cfg = dict(cfg)
    cls = ATTACKS.get(cfg.pop("name"))
    try:
        return cls(**cfg)
    except TypeError as err:
        raise ValueError(f"bad settings for attack '{cls.name}': {err}") from None

"""The method contract: what a training method may do, and what the trainer does for it.

The trainer owns the loop, DDP, the optimiser, schedule, checkpoints and timing; a method only
says how one batch becomes a loss. Hooks, in the order the trainer calls them:

    method = MyMethod(**cfg)                 # cfg: the method's config, minus 'name'
    module = method.build(classifier)        # add heads / extra models; before optimiser & DDP
    groups = method.param_groups(module)     # what the optimiser updates
    each epoch: method.on_epoch_start(ctx)
    each batch: method.training_step(ddp_module, x, y, ctx) -> {'loss': ..., other logged terms}
                then the trainer's backward + optimiser step, then method.after_step(module, ctx)
    evaluation: method.eval_model(module)    # the classifier the attacks are run against

What a method needs before it can train is declared on the class, read by the plan
(harness/run/plan.py) before anything runs, never discovered by getattr:

    Method.upstream(method_cfg, trainer_cfg) -> [Upstream(...)]   # checkpoints it starts from
    Method.runtime_trainer(method_cfg, trainer_cfg) -> {...}       # its own trainer settings
    Method.needs_train_data                                        # gets the (poisoned) train split config

Each Upstream is a train node of the plan: the same cell with another method (and trainer
overrides), trained once however many cells need it, before the cells that need it.

Train-time attacks run on `ctx.classifier` (the unwrapped classifier), never on the DDP
wrapper. A method whose extra modules need gradients only on some steps sets
`find_unused_parameters = True`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS


@dataclass
class TrainContext:
    """What a method may read about the run; the trainer fills it in."""

    epoch: int
    epochs: int
    step: int  # global optimisation step
    steps_per_epoch: int
    device: torch.device
    rank: int
    world_size: int
    classifier: Classifier  # unwrapped: what train-time attacks run on
    lr_scale: float = 1.0  # the schedule's factor this step (for a method's own optimiser)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1): for ramps such as CausalAdv's alpha_t."""
        return (self.epoch + 0.0) / max(1, self.epochs)


@dataclass(frozen=True)
class Upstream:
    """A checkpoint a method starts from: the cell with `method` (and `trainer` overrides) trained.

    `arg` is the method keyword that receives the checkpoint's path (CBD's `backdoored_checkpoint`);
    None: the trainer starts from its weights (`trainer.init_from`, ADML's stage 2)."""

    arg: str | None
    method: dict[str, Any]
    trainer: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class with ERM-like defaults; subclasses override `training_step` at least."""

    name: ClassVar[str]
    find_unused_parameters: ClassVar[bool] = False
    needs_train_data: ClassVar[bool] = False  # True: gets `train_data` (data/backdoor/seed config)

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        """The checkpoints this method starts from, as train nodes of the plan (default: none)."""
        return []

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        """Overrides of the cell's trainer settings for this method's own training (default: none).
        Upstream cells keep the grid's trainer, so a shared prerequisite stays the grid's cell."""
        return {}

    def __init__(self, **settings: Any) -> None:
        if settings:
            raise ValueError(
                f"method '{self.name}' got unknown settings {sorted(settings)}; "
                f"remove them or pick the method that takes them"
            )

    def build(self, model: Classifier) -> nn.Module:
        return model

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]

    def on_epoch_start(self, ctx: TrainContext) -> None:
        pass

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        """Called after the optimiser step (AWP removes its weight perturbation here)."""

    def eval_model(self, module: nn.Module) -> Classifier:
        return module  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the module's parameters (e.g. an extra optimiser), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_method(cfg: dict[str, Any]) -> Method:
    """Instantiate the method a `method` config names."""
    cfg = dict(cfg)
    cls = METHODS.get(cfg.pop("name"))
    try:
        return cls(**cfg)
    except TypeError as err:
        raise ValueError(f"bad settings for method '{cls.name}': {err}") from None

"""The method contract: what a training method may do, and what the trainer does for it.

The trainer owns the loop, DDP, the optimiser, schedule, checkpoints and timing; a method only
says how one batch becomes a loss. Every hook below is called by harness/train/trainer.py, in
this order (tests/test_hook_order.py records it for every registered method):

    method = MyMethod(**cfg)                     # cfg: the method's config, minus 'name'
    module = method.build(classifier)            # add heads / extra models; before optimiser & DDP
    groups = method.param_groups(module)         # what the trainer's optimiser updates
    extras = method.extra_optimizers(module)     # the method's own optimisers, for the trainer to
                                                 # schedule, step and checkpoint (ExtraOptimizer)
    ctx.classifier = method.eval_model(module)   # once: what train-time attacks run on
    (resume: method.load_state_dict(saved) after the module's and optimisers' states are restored)
    select = method.select_train_samples(samples)  # the split indices it trains on (None: all);
                                                 # `samples.score(fn)` scores every training sample
                                                 # on every rank (harness/train/selection.py)
    pre = method.pre_pass_samples()               # the split indices its pre-pass streams (None: `select`)
    each epoch:
        method.on_epoch_start(ctx)
        if method.pre_pass(ctx):                 # a pass of the method's own first (CBD's critic):
            each batch of another shuffle of the epoch's data:
                logs = method.pre_pass_step(ddp_module, x, y, ctx)  # no trainer optimiser step, unless
                                                 # `pre_pass_steps_trainer` (D-BR): then backward and the
                                                 # trainer's step, as for a training step
        each batch:
            logs = method.training_step(ddp_module, x, y, ctx)  # {'loss': ..., other logged terms;
                                                 # a method with a train-time attack logs
                                                 # 'train_robust_acc', its accuracy on its own
                                                 # adversarial batch: the training-health flags
                                                 # compare it with the validation probe}
            the trainer's zero_grad, backward, optimiser step, then the step of every extra
            optimiser with `stepped_by_trainer`
            method.after_step(module, ctx)
        method.on_epoch_end(ctx)
        checkpoint: method.state_dict() beside the module's and the optimisers' states
    record = method.summary()                    # once, after training: what the method decided
                                                 # (JSON), the result row's `method_summary`
    evaluation: method.eval_model(module)        # the classifier the attacks are run against

What a method needs before it can train is declared on the class, read by the plan
(harness/run/plan.py) before anything runs, never discovered by getattr:

    Method.upstream(method_cfg, trainer_cfg) -> [Upstream(...)]   # checkpoints it starts from
    Method.runtime_trainer(method_cfg, trainer_cfg) -> {...}       # its own trainer settings
    Method.runtime_data(method_cfg, data_cfg) -> {...}             # its own data settings (augment,
                                                                   # shuffle) for its training
    Method.needs_train_data                                        # gets the (poisoned) train split config
    Method.needs_batchnorm                                         # refused before work on an arch without BatchNorm

Each Upstream is a train node of the plan: the same cell with another method (and trainer
overrides), trained once however many cells need it, before the cells that need it.

Train-time attacks run on `ctx.classifier` (the unwrapped classifier), never on the DDP
wrapper. A method whose extra modules need gradients only on some steps sets
`find_unused_parameters = True`. Everything a method may offer the trainer is declared here with
a default, so the trainer never has to guess with getattr.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
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
    lr_scale: float = 1.0  # the schedule's factor this step (the trainer applies it to scheduled extras)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1): for ramps such as CausalAdv's alpha_t."""
        return (self.epoch + 0.0) / max(1, self.epochs)


class TrainSamples(Protocol):
    """The cell's training split as `select_train_samples` sees it (harness/train/selection.py)."""

    poisoned: np.ndarray  # split indices the cell's poison plan poisoned (empty on clean data)

    def score(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(split indices, fn(x, y)'s value per sample) over every training sample, sorted by index;
        (N, K) values where fn returns one row of K per sample."""
        ...


@dataclass(frozen=True)
class Upstream:
    """A checkpoint a method starts from: the cell with `method` (and `trainer` overrides) trained.

    `arg` is the method keyword that receives the checkpoint's path (CBD's `backdoored_checkpoint`);
    None: the trainer starts from its weights (`trainer.init_from`, ADML's stage 2), and, where the
    method's `runtime_trainer` sets `init_optimizer: true`, from its optimiser's state too (ABL's
    unlearning continues its fine-tuning's SGD momentum, as the official script's one optimiser)."""

    arg: str | None
    method: dict[str, Any]
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtraOptimizer:
    """An optimiser a method owns beside the trainer's, e.g. CausalAdv's g or CBD's critic.

    The trainer always checkpoints and restores its state. `scheduled`: the trainer sets each
    group's lr to its initial lr times the schedule's factor before every step (otherwise the
    method manages the lr itself, as CBD's StepLR in `on_epoch_start`). `stepped_by_trainer`:
    the trainer calls `.step()` right after its own optimiser's step and then clears the
    gradients (the parameters get them from the same backward); False when the method steps it
    inside `training_step`, e.g. a critic that maximises its own objective before the main loss.
    """

    optimizer: torch.optim.Optimizer
    scheduled: bool = False
    stepped_by_trainer: bool = True

    def __post_init__(self) -> None:
        for group in self.optimizer.param_groups:  # torch's LR schedulers keep the base lr here too
            group.setdefault("initial_lr", group["lr"])

    def set_lr_scale(self, scale: float) -> None:
        """Set every group's lr to its initial lr times `scale` (a no-op unless `scheduled`)."""
        if self.scheduled:
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * scale

    def trainer_step(self) -> None:
        """The trainer's step after its own (a no-op unless `stepped_by_trainer`)."""
        if self.stepped_by_trainer:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class Method:
    """Base class with ERM-like defaults; subclasses override `training_step` at least."""

    name: ClassVar[str]
    find_unused_parameters: ClassVar[bool] = False
    needs_train_data: ClassVar[bool] = False  # True: gets `train_data` (data/backdoor/seed config)
    backdoor_defense: ClassVar[bool] = False  # a backdoor defense (`robustgrid list methods` says so;
                                              # grid=backdoor_bench crosses every one with every poison)
    needs_batchnorm: ClassVar[bool] = False  # True: prunes BatchNorm neurons (CLP, ANP); the plan
                                             # refuses it on an architecture without BatchNorm2d
    pre_pass_steps_trainer: ClassVar[bool] = False  # True: the trainer backpropagates each pre-pass step's
                                                    # 'loss' and steps its own optimiser (D-BR unlearns and
                                                    # relearns with one SGD, its momentum shared)

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        """The checkpoints this method starts from, as train nodes of the plan (default: none)."""
        return []

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        """Overrides of the cell's trainer settings for this method's own training (default: none).
        Upstream cells keep the grid's trainer, so a shared prerequisite stays the grid's cell."""
        return {}

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        """Overrides of the cell's data settings for this method's own training (default: none):
        `augment` (harness/data/loader.py's BatchTransform keys) and `shuffle` (False: the split's
        order every epoch). ABL's stages train without augmentation (isolation, unlearning) or with
        Cutout (fine-tuning), as the official code does. Evaluation keeps the cell's settings."""
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

    def extra_optimizers(self, module: nn.Module) -> dict[str, ExtraOptimizer]:
        """Optimisers of the method's own, by a name unique within the method (checkpoint key)."""
        return {}

    def select_train_samples(self, samples: TrainSamples) -> np.ndarray | None:
        """The split indices this method's training streams (None: the whole split), decided once
        before the first epoch and again on resume (so it must be deterministic). ABL unlearns
        the 1% lowest-loss samples of its isolation model and fine-tunes on the other 99%; FP
        scores every clean sample to rank and prune channels, and trains on all of them (None)."""
        return None

    def on_epoch_start(self, ctx: TrainContext) -> None:
        """Before the epoch's first batch (CBD decays its critic's lr here)."""

    def pre_pass(self, ctx: TrainContext) -> bool:
        """Whether the trainer streams this epoch's data once more, before the training pass,
        calling `pre_pass_step` on each batch (default False). CBD's official loop trains its
        critic on a full pass of the data before each epoch of the clean model."""
        return False

    def pre_pass_samples(self) -> np.ndarray | None:
        """The split indices the pre-pass streams (None: the training pass's selection); asked once,
        right after `select_train_samples`. D-BR unlearns its suspected-poisoned samples in the
        pre-pass and relearns its suspected-clean ones in the training pass."""
        return None

    def pre_pass_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        """One batch of the pre-pass: the method steps its own optimisers (the trainer's does not
        step); the values returned are logged as `pre_<name>` (epoch means)."""
        raise NotImplementedError(f"method '{self.name}' asked for a pre-pass but has no pre_pass_step")

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, module: nn.Module, ctx: TrainContext) -> None:
        """Called after the optimiser steps (AWP removes its weight perturbation here)."""

    def on_epoch_end(self, ctx: TrainContext) -> None:
        """After the epoch's last batch, before its checkpoint is written."""

    def eval_model(self, module: nn.Module) -> Classifier:
        return module  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the module's and the optimisers' (e.g. a critic's weights)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """What the method decided, for the record: a pruning defense's pruned channels, Neural
        Cleanse's flagged classes, D-BR's separation. JSON types only; asked once after training
        (also when a resumed run finds it finished), stored as the result row's `method_summary`."""
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

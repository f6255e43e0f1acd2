"""What the unlearning / fine-tuning defenses (FT-SAM, I-BAU, SAU) share: the check of the
defender's clean fraction, BackdoorBench's Adam stage (`argparser_opt_scheduler` with
client_optimizer adam: amsgrad, a CosineAnnealingLR that their I-BAU and SAU loops never step, so a
constant lr), running BatchNorm statistics held still for a forward, and a frozen copy of a model."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn


def check_clean_subset(method: str, fraction: float) -> float:
    """The defender's clean fraction, refused before any work unless in (0, 1]."""
    value = float(fraction)
    if not 0 < value <= 1:
        raise ValueError(f"method '{method}': clean_subset must be in (0, 1] (the fraction of the training split "
                         f"the defender holds clean; BackdoorBench's default 0.05), got {fraction}")
    return value


def adam_stage_trainer(epochs: int, batch_size: int, lr: float, betas: list[float], weight_decay: float,
                       amsgrad: bool) -> dict[str, Any]:
    """Trainer overrides of a BackdoorBench Adam stage: torch.optim.Adam(lr, betas, wd, amsgrad=True)
    at a constant lr (their scheduler is built but never stepped in i-bau.py and sau.py)."""
    return {
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "optimizer": {"name": "adam", "lr": float(lr), "betas": [float(b) for b in betas],
                      "weight_decay": float(weight_decay), "amsgrad": bool(amsgrad)},
        "schedule": {"name": "constant", "granularity": "epoch", "warmup_epochs": 0},
    }


@contextlib.contextmanager
def still_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers use their batch statistics but leave the running ones as they are (momentum 0
    for the block), as SAM's second forward does (`disable_running_stats`)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block (I-BAU and SAU unlearn with running statistics: their
    loops call model.eval() once), its mode restored after (the trainer's contract: train mode)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with no trainable parameters (SAU's reference model h_0)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def with_value_of(value: torch.Tensor, gradient_term: torch.Tensor) -> torch.Tensor:
    """`value` with `gradient_term`'s gradient added and its value not: value + (t - t.detach()).
    The trainer backpropagates and logs one 'loss'; this keeps the logged number the official loss."""
    return value + (gradient_term - gradient_term.detach())

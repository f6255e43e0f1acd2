"""The trainer's optimiser, built from `trainer.optimizer`, and the up-front check of trainer settings."""
from __future__ import annotations

import inspect
from typing import Any

import torch

from harness.core.errors import did_you_mean
from harness.data.validation import check_validation_settings
from harness.train.best_epoch import select_rule
from harness.train.compile import compile_backend
from harness.train.ema import ema_settings
from harness.train.health import Thresholds
from harness.train.probes import probe_budget, probe_every
from harness.train.schedule import check_schedule

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def build_optimizer(ocfg: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimiser `ocfg` names, over the method's parameter groups; bad settings fail clearly."""
    ocfg = dict(ocfg)
    name = ocfg.pop("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'. Known optimizers: {', '.join(sorted(OPTIMIZERS))}")
    try:
        return OPTIMIZERS[name](groups, **ocfg)
    except TypeError as err:
        known = sorted(p for p in inspect.signature(OPTIMIZERS[name]).parameters if p != "params")
        typo = [k for k in ocfg if k not in known]
        hint = did_you_mean(typo[0], known, "trainer.optimizer.") if typo else ""
        raise ValueError(f"bad settings for optimizer '{name}': {err}.{hint} It takes: {', '.join(known)}") from None


def check_trainer_config(tcfg: dict[str, Any]) -> None:
    """Fail before any work on trainer settings that could only fail later, inside a cell."""
    world_size, epochs, batch = (int(tcfg.get(k, 1)) for k in ("world_size", "epochs", "batch_size"))
    # epochs 0: a method stage that edits weights without training (CLP's data-free pruning); the
    # grid's own trainer.epochs stays >= 1 (harness/core/validate.py)
    if world_size < 1 or epochs < 0 or batch < 1:
        raise ValueError(f"trainer.world_size and trainer.batch_size must be >= 1 and trainer.epochs >= 0; "
                         f"got {world_size}, {epochs}, {batch}")
    if batch < world_size:
        raise ValueError(f"trainer.batch_size ({batch}) is the global batch: it must be >= "
                         f"trainer.world_size ({world_size})")
    if tcfg.get("precision", "fp32") not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision must be fp32 or bf16, got {tcfg.get('precision')!r}")
    compile_backend(tcfg.get("compile", False))
    build_optimizer(tcfg["optimizer"], [{"params": [torch.zeros(1, requires_grad=True)]}])
    check_schedule(tcfg["schedule"], epochs)
    check_validation_settings(tcfg)
    probe_every(tcfg)
    probe_budget(tcfg)
    select_rule(tcfg)
    Thresholds.from_config(tcfg)
    ema_settings(tcfg)

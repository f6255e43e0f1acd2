"""The trainer's checkpoint file: one per cell, rewritten atomically after every epoch.

A checkpoint holds the module's weights, the trainer's optimiser, every extra optimiser a method
declared (`Method.extra_optimizers`, by name), the method's own state, the CPU RNG and the
trainer's running extras (curve, seconds, samples). Loading restores all of them in that order.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.store.checkpoints import load_checkpoint as load_file, save_checkpoint as save_file
from methods.base import ExtraOptimizer, Method


def save_checkpoint(path: Path, epoch: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                    extras: dict[str, ExtraOptimizer], method: Method, running: dict[str, Any]) -> None:
    """Write epoch `epoch`'s state to `path` (via a temporary file: never a half-written checkpoint)."""
    state = {"epoch": epoch, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
             "extra_optimizers": {name: extra.optimizer.state_dict() for name, extra in extras.items()},
             "method": method.state_dict(), "rng_cpu": torch.get_rng_state(), **running}
    save_file(path, state)


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    extras: dict[str, ExtraOptimizer], method: Method,
                    device: torch.device) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint in place: (first epoch to run, saved state); (0, {}) without one."""
    if not path.exists():
        return 0, {}
    state = load_file(path, map_location=device)  # weights only: a checkpoint never runs code
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    saved = state.get("extra_optimizers", {})
    for name, extra in extras.items():
        if name in saved:
            extra.optimizer.load_state_dict(saved[name])
        else:  # written before the method declared it: it restarts from a fresh state
            warnings.warn(f"{path}: no saved state for the extra optimizer '{name}'; it starts afresh")
    method.load_state_dict(state.get("method", {}))
    return int(state["epoch"]) + 1, state


def load_weights(path: Path | str, module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Load only the module's weights from a checkpoint (a finished cell, or an earlier stage's)."""
    state = load_file(path, map_location="cpu")  # weights only; then moved with the module
    module.load_state_dict(state["model"])
    return module


def load_optimizer_state(path: Path | str, optimizer: torch.optim.Optimizer,
                         device: torch.device | str = "cpu") -> None:
    """Continue an earlier stage's optimiser: its per-parameter state (SGD's momentum buffers) from
    the checkpoint at `path`, for the same parameters in the same order. The groups' settings (lr,
    momentum, weight decay) stay this run's: its schedule sets the lr from the next step on."""
    saved = load_file(path, map_location=device)["optimizer"]
    current = optimizer.state_dict()
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in current["param_groups"]]:
        raise ValueError(f"{path}: its optimiser holds other parameter groups than this run's; trainer.init_optimizer "
                         f"continues only a stage of the same model and method parameters (set it false)")
    optimizer.load_state_dict({"state": saved["state"], "param_groups": current["param_groups"]})


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Cells that build on other cells' checkpoints (two-stage methods such as ADML).

A method config with a `base` (stage 1: another method's config) and a `finetune` block
(stage 2's trainer settings over the cell's trainer) depends on the base cell: the same cell
with `method = method.base`. That cell has the same train key as the plain base-method cell of
a grid, so a grid holding PGD-AT and ADML-on-PGD-AT trains PGD-AT once: the grid runs cells in
dependency order (harness/run/grid.py), the dependent cell starts from the base checkpoint
(`trainer.init_from`), and a dependent cell run alone trains its base first.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from harness.core.config import cell_key, train_key

FINETUNE_EPOCHS_DIVISOR = 12  # `finetune.epochs: null` -> ceil(trainer.epochs / 12): ADML's 10 after 120


def base_cell(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The cell whose checkpoint `cfg` starts from, or None for a one-stage cell."""
    method = cfg["method"]
    if "base" not in method or "finetune" not in method:
        return None
    base = copy.deepcopy(cfg)
    base["method"] = copy.deepcopy(method["base"])
    base["key"] = cell_key(base)
    base["train_key"] = train_key(base)
    base["label"] = f"{cfg['arch']['name']}/{base['method']['name']}/s{cfg['seed']}"
    return base


def dependency_keys(cfg: dict[str, Any]) -> list[str]:
    """Train keys of the checkpoints this cell needs, nearest first."""
    keys = []
    base = base_cell(cfg)
    while base is not None:
        keys.append(base["train_key"])
        base = base_cell(base)
    return keys


def in_dependency_order(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells sorted so that every cell comes after the cells it depends on (stable otherwise)."""
    return sorted(cells, key=lambda c: len(dependency_keys(c)))


def _deep_merge(into: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(into)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def checkpoint_path(cfg: dict[str, Any]) -> Path:
    from harness.run.cell import checkpoint_dir
    from harness.train.trainer import CHECKPOINT

    return checkpoint_dir(cfg) / CHECKPOINT


def train_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config the trainer runs for this cell: a dependent cell gets its stage-2 trainer
    settings and `trainer.init_from` = the base checkpoint; other cells are returned as they are."""
    base = base_cell(cfg)
    if base is None:
        return cfg
    finetune = dict(cfg["method"]["finetune"] or {})
    epochs = finetune.pop("epochs", None)
    trainer = _deep_merge(cfg["trainer"], finetune)
    trainer["epochs"] = int(epochs) if epochs else max(1, math.ceil(int(cfg["trainer"]["epochs"]) / FINETUNE_EPOCHS_DIVISOR))
    trainer["init_from"] = str(checkpoint_path(base))
    return {**cfg, "trainer": trainer}


def ensure_dependencies(cfg: dict[str, Any]) -> None:
    """Train the base stage(s) of `cfg` that are not finished yet (resuming a partial one)."""
    from harness.run.prerequisites import train_in_place
    from harness.train.trainer import SUMMARY

    base = base_cell(cfg)
    if base is None:
        return
    ensure_dependencies(base)
    work_dir = checkpoint_path(base).parent
    if not (work_dir / SUMMARY).exists():
        # as the base's own grid cell trains it (harness/run/cell.py): under the folder's lock, so a
        # grid cell and a dependent cell run alone never train it twice at once
        train_in_place(train_config(base), work_dir)

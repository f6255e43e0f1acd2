"""A cell's training-health columns, from its train summary: the flags, the validation split, the
selected epoch and its probe. The eval node computes the flags here (with the cell's
`trainer.flags` thresholds), so a changed threshold re-evaluates a cell without retraining it."""
from __future__ import annotations

import json
from typing import Any

from harness.train.health import Thresholds, diverged_details, training_flags
from harness.train.trainer import TrainSummary


def health_columns(cfg: dict[str, Any], summary: TrainSummary) -> dict[str, Any]:
    """train_flags, train_flag_details, validation_*, selection*, val_* of one trained cell."""
    chosen = summary.selection or {}
    epoch = chosen.get("epoch")
    fired, _ = training_flags(summary.curve, Thresholds.from_config(cfg["trainer"]), summary.num_classes or 1,
                              until_epoch=epoch)
    probe = next((e for e in summary.curve if e.get("epoch") == epoch and "val_n" in e), {})
    validation = summary.validation or {}
    return {
        "train_flags": sorted(fired),
        "train_flag_details": json.dumps(fired, sort_keys=True),
        "validation_n": int(validation.get("n", 0)),
        "validation_sha256": validation.get("sha256"),
        "selection": chosen.get("rule", "last"),
        "selected_epoch": None if epoch is None else int(epoch),
        "selection_reason": chosen.get("reason"),
        "val_clean_acc": probe.get("val_clean_acc"),
        "val_robust_acc": probe.get("val_robust_acc"),
        "val_asr": probe.get("val_asr"),
    }


def diverged_columns(error: str | None) -> dict[str, Any]:
    """A failed cell's `diverged` flag (a non-finite loss, named with its epoch); {} for other failures."""
    details = diverged_details(error)
    if details is None:
        return {}
    return {"train_flags": ["diverged"], "train_flag_details": json.dumps({"diverged": details}, sort_keys=True)}

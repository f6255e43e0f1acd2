"""`robustgrid grid --dry-run`: what a grid would do, without training or starting Ray.

For each cell: its key and label, the resources it asks Ray for, its state in the results store
(done / failed / running / pending, plus `stale` where harness.run.status reports it) and an
estimated cost. The estimate is measured, never guessed: committed cells of the same training
setup (harness.core.config.training_setup: everything that shapes the model except the seed)
give their training throughput (images/s) and eval time; a pending cell's cost is then
epochs x train images / images/s + eval seconds, times its DDP ranks. A setup never run has no
estimate ("—"), and the summary says how many cells lack one.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from harness.core.config import training_setup
from harness.run.resources import cell_resources
from harness.run.status import grid_status
from harness.store.index import read_results

STATES = ("done", "failed", "running", "stale", "pending")


@dataclass(frozen=True)
class Throughput:
    """Measured on committed cells of one training setup."""

    images_per_second: float
    n_train: int
    eval_seconds: float
    n_cells: int


@dataclass(frozen=True)
class PlannedCell:
    key: str
    label: str
    state: str
    resources: str
    ranks: int
    est_seconds: float | None  # wall time of the cell, from measured throughput
    basis: str  # what the estimate is measured on


def measured_throughput(results_dir: str) -> dict[str, Throughput]:
    """Training setup id -> throughput measured on the store's committed ok cells."""
    table = read_results(results_dir)
    per_setup: dict[str, dict[str, dict[str, Any]]] = {}
    for row in table.select(["key", "status", "config_json", "images_per_second", "n_train",
                             "eval_seconds"]).to_pylist():
        if row["status"] != "ok" or not row["config_json"] or not _positive(row["images_per_second"]):
            continue
        try:
            setup_id, _ = training_setup(json.loads(row["config_json"]))
        except (TypeError, ValueError, KeyError):
            continue
        per_setup.setdefault(setup_id, {})[row["key"]] = row
    out = {}
    for setup_id, cells in per_setup.items():
        rows = list(cells.values())
        n_train = [int(r["n_train"]) for r in rows if r["n_train"]]
        if not n_train:
            continue
        out[setup_id] = Throughput(
            images_per_second=statistics.median(float(r["images_per_second"]) for r in rows),
            n_train=int(statistics.median(n_train)),
            eval_seconds=statistics.median(float(r["eval_seconds"] or 0.0) for r in rows),
            n_cells=len(rows),
        )
    return out


def plan(cells: list[dict[str, Any]], results_dir: str) -> list[PlannedCell]:
    """One PlannedCell per cell of one results store, in the grid's order."""
    identities = {c["key"]: c["cell_id"] for c in cells if c.get("cell_id")}  # finds stale results
    train_keys = {c["key"]: c["train_key"] for c in cells if c.get("train_key")}
    status = grid_status(results_dir, [c["key"] for c in cells], identities, train_keys)
    state_of = {key: state for state in STATES for key in getattr(status, state, [])}
    speeds = measured_throughput(results_dir)
    planned = []
    for cfg in cells:
        res = cell_resources(cfg)
        per_rank = f"{res.cpus:g} CPU" + (f", {res.gpus:g} GPU" if res.gpus else "") + (
            f", {res.memory_gb:g} GB" if res.memory_gb else "")
        resources = f"{res.ranks} x ({per_rank})" if res.ranks > 1 else per_rank
        if res.launcher != "task":
            resources += f" [{res.launcher}]"
        speed = speeds.get(training_setup(cfg)[0])
        seconds, basis = None, "no committed cell of this setup"
        if speed is not None:
            epochs = int(cfg["trainer"].get("epochs", 1))
            seconds = epochs * speed.n_train / speed.images_per_second + speed.eval_seconds
            basis = f"{speed.images_per_second:.4g} img/s over {speed.n_cells} cell(s)"
        planned.append(PlannedCell(cfg["key"], cfg.get("label", ""), state_of.get(cfg["key"], "pending"),
                                   resources, res.ranks, seconds, basis))
    return planned


def device_hours(cell: PlannedCell) -> float | None:
    """Estimated device-hours (wall seconds x ranks / 3600) of one cell."""
    return None if cell.est_seconds is None else cell.est_seconds * cell.ranks / 3600.0


def _positive(value: Any) -> bool:
    return value is not None and math.isfinite(float(value)) and float(value) > 0

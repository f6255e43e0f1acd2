"""Expand a grid into cells and run them as Ray tasks.

A grid config (configs/grid/*.yaml) names its axes, e.g. {arch: [...], method: [...], seed: [...]},
and overrides applied to every cell. Each combination is composed into a full cell config
and keyed by the hash of what it computes (harness.core.config.cell_key). Everything is validated
before Ray starts; cells whose result is already committed with status 'ok' are skipped, so
re-running a finished grid trains nothing and does not even start Ray.

Locally Ray runs embedded (no setup); `ray.address=auto` (or an address) joins a cluster.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harness.attacks.base import build_attack
from harness.backdoor.base import build_poison
from harness.run.cell import CellOutcome, run_cell
from harness.core.config import ConfigError, compose_config, finalize
from harness.data.ensure import ensure_prepared
from harness.eval.external_model import check_model_spec
from harness.run.resources import cell_resources, task_options
from harness.store.results import committed_status, write_cell_result
from harness.run.stages import dependency_keys, in_dependency_order, train_config
from harness.train.trainer import check_trainer_config
from methods.base import build_method

console = Console(stderr=True)


@dataclass
class GridReport:
    cells: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    outcomes: list[CellOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status != "ok"]


def expand_grid(overrides: list[str]) -> list[dict[str, Any]]:
    """All cells of the grid the overrides select (`grid=<name>`), as finalized configs."""
    base = compose_config(overrides)
    grid = base.get("grid")
    if not grid:
        raise ConfigError("no grid selected: pass grid=<name> (see configs/grid/)")
    axes: dict[str, list[Any]] = grid.get("axes") or {}
    if not axes or not all(axes.values()):
        raise ConfigError(f"grid '{grid.get('name')}' has no axes or an empty one: give each axis values, "
                          f"e.g. grid.axes.model=[timm:resnet18] for grid=eval")
    fixed = list(grid.get("overrides") or [])
    user = [o for o in overrides if not o.startswith("grid=")]
    names = list(axes)
    cells: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*(axes[n] for n in names)):
        axis_overrides = [f"{n}={_override_value(v)}" for n, v in zip(names, values)]
        # grid's fixed settings first, then the axis values, then the user's own overrides
        cfg = compose_config(_last_wins(fixed + axis_overrides + user + [f"grid={grid['name']}"]))
        cfg = finalize(cfg)
        cells.setdefault(cfg["key"], cfg)
    return list(cells.values())


def _last_wins(overrides: list[str]) -> list[str]:
    """Drop earlier overrides of the same key (Hydra rejects two values for one group)."""
    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    return list(by_key.values())


def _override_value(value: Any) -> str:
    if isinstance(value, dict):  # a model axis entry {id, checkpoint, ...} (harness.core.config.model_overrides)
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def validate_cell(cfg: dict[str, Any]) -> None:
    """Build the method and attacks from the config: bad settings fail before any training."""
    check_trainer_config(train_config(cfg)["trainer"])
    cell_resources(cfg)
    build_method(cfg["method"])
    build_poison(cfg.get("backdoor"))
    if cfg.get("model"):
        check_model_spec(cfg["model"])  # a model trained elsewhere: id, import, checkpoint path and format
    for attack_cfg in cfg["attack"].values():
        build_attack(attack_cfg)


def run_grid(cells: list[dict[str, Any]], *, ray_address: str | None = None, num_cpus: int | None = None) -> GridReport:
    """Run every not-yet-committed cell as a Ray task, with one progress view of the grid."""
    t0 = time.perf_counter()
    for cfg in cells:
        validate_cell(cfg)
    for data_cfg in {c["data"]["dir"]: c["data"] for c in cells}.values():
        ensure_prepared(data_cfg)
    report = GridReport(cells=cells)
    pending = []
    for cfg in cells:
        if committed_status(cfg["results_dir"], cfg["key"]) == "ok":
            report.skipped.append(cfg["key"])
        else:
            pending.append(cfg)
    console.print(f"grid: {len(cells)} cells, {len(report.skipped)} already committed, {len(pending)} to run")
    if pending:
        report.outcomes = _run_on_ray(pending, ray_address, num_cpus)
    report.seconds = time.perf_counter() - t0
    return report


def _run_on_ray(pending: list[dict[str, Any]], address: str | None, num_cpus: int | None) -> list[CellOutcome]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        # "local": a fresh embedded Ray even when a `ray start` cluster is running on this machine
        # (ray.init(None) would silently join it); ray.address=auto|host:port joins a cluster.
        ray.init(address=address or "local", num_cpus=num_cpus if address is None else None,
                 include_dashboard=False, log_to_driver=True, configure_logging=False)
    task = ray.remote(_run_cell_task)
    refs = {}
    last_by_train_key: dict[str, Any] = {}
    for cfg in in_dependency_order(pending):
        options = task_options(cfg)  # CPUs/GPUs/memory per rank, retries on worker/node death
        # Cells that train the same model (differing only in eval attacks) share one checkpoint:
        # chain them, so the first trains and the others only evaluate. A two-stage cell (ADML)
        # also waits for the cells that train its base checkpoint.
        needs = [cfg["train_key"], *dependency_keys(cfg)]
        after = [last_by_train_key[k] for k in needs if k in last_by_train_key]
        ref = task.options(**options).remote(cfg, *after)
        last_by_train_key[cfg["train_key"]] = ref
        refs[ref] = cfg
    outcomes: list[CellOutcome] = []
    columns = (TextColumn("[bold]grid"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("grid", total=len(refs), status="")
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=5.0)
            if not done:  # nothing finished: refresh the running count from the cells' heartbeats
                progress.update(bar, status=_live_status(refs, waiting, outcomes))
                continue
            cfg = refs[done[0]]
            try:
                outcome = ray.get(done[0])
            except Exception as err:  # the worker died (OOM, node lost) after its retries
                error = f"{type(err).__name__}: {err}"
                path = write_cell_result(cfg["results_dir"], cfg["key"], [_lost_row(cfg, error)])
                # an attempt may have committed 'ok' before dying: that commit wins over this row
                status = committed_status(cfg["results_dir"], cfg["key"]) or "failed"
                outcome = CellOutcome(cfg["key"], cfg["label"], status, None if status == "ok" else error,
                                      str(path), 0.0)
            outcomes.append(outcome)
            progress.update(bar, advance=1, status=_live_status(refs, waiting, outcomes))
            mark = "[green]ok[/]" if outcome.status == "ok" else "[red]FAILED[/]"
            progress.console.print(f"{mark} {outcome.label} ({outcome.key}) {outcome.seconds:.1f}s")
    return outcomes


def _live_status(refs: dict[Any, dict[str, Any]], waiting: list[Any], outcomes: list[CellOutcome]) -> str:
    """'running R, queued Q, failed F': R from fresh heartbeats in the results store(s)."""
    from harness.run.status import running_cells

    keys = {refs[ref]["key"] for ref in waiting}
    running = set().union(*(running_cells(d) for d in {cfg["results_dir"] for cfg in refs.values()})) & keys
    return f"running {len(running)}, queued {len(keys) - len(running)}, failed {sum(o.status != 'ok' for o in outcomes)}"


def _run_cell_task(cfg: dict[str, Any], *after: CellOutcome) -> CellOutcome:
    """The Ray task: one cell, torch on the CPUs Ray gave it (`after`: cells it waited for).

    A heartbeat marker says the cell is running (harness.run.status); an attempt that finds the cell
    already committed 'ok' (a retry of a task whose first run did finish) returns at once.
    """
    import torch

    from harness.run.status import RunningMarker

    if committed_status(cfg["results_dir"], cfg["key"]) == "ok":
        from harness.store.results import result_path

        return CellOutcome(cfg["key"], cfg["label"], "ok", None, str(result_path(cfg["results_dir"], cfg["key"])), 0.0)
    torch.set_num_threads(max(1, int((cfg.get("resources") or {}).get("cpus", 1))))
    try:
        with RunningMarker(cfg["results_dir"], cfg["key"]):
            if cell_resources(cfg).launcher == "ray_train":
                from harness.run.ray_train import run_cell_ray_train

                return run_cell_ray_train(cfg)
            return run_cell(cfg)
    finally:
        if torch.cuda.is_available():  # the worker is reused: hand cached GPU memory back to cells sharing the GPU
            torch.cuda.empty_cache()


def _lost_row(cfg: dict[str, Any], error: str) -> dict[str, Any]:
    from harness.run.cell import _base_row, _now

    return _base_row(cfg, _now()) | {"status": "failed", "error": error}

"""Expand a grid into cells, plan them (harness/run/plan.py) and run the plan's nodes as Ray tasks.

A grid config (configs/grid/*.yaml) names its axes, e.g. {arch: [...], method: [...], seed: [...]},
and overrides applied to every cell. Each combination is composed into a full cell config
and keyed by the hash of what it computes (harness.core.config.cell_key). Everything is validated
before Ray starts; cells whose result is already committed with status 'ok' are skipped, so
re-running a finished grid trains nothing and does not even start Ray.

Each node of the plan is one Ray task: a train node asks for its cell's training resources (every
DDP rank's CPUs/GPUs/memory), an eval or artifact node for one rank's; each has its own retries,
and its inputs are the ObjectRefs of the nodes it needs. The driver submits a node once those are
done, a bounded window at a time (harness/run/submit.py), so a task Ray retries is not starved
behind every newer one.

Locally Ray runs embedded (no setup); `ray.address=auto` (or an address) joins a cluster.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harness.attacks.base import build_attack
from harness.backdoor.base import build_poison
from harness.core.validate import validate_numbers
from harness.run.expand import expand_grid  # noqa: F401 -- re-exported: grids are expanded here
from harness.run.labels import first_line
from harness.run.ray_connect import check_ray_address
from harness.run.single_driver import single_driver
from harness.run.preflight import (check_arch, check_folder_writable, check_method_arch, check_results_writable,
                                   check_validation, train_split_size)
from harness.data.ensure import ensure_prepared
from harness.eval.external_model import check_model_spec
from harness.eval.stage import check_analyses
from harness.generate.artifacts import check_generated, check_generated_settings
from harness.run.cell import RUNNERS
from harness.run.nodes import BUSY, CellOutcome, NodeOutcome
from harness.run.plan import Node, Plan, committed_ok, pending_plan, planned_trainer
from harness.run.resources import cell_resources, rank_options, task_options
from harness.run.status import running_cells
from harness.run.submit import Window
from harness.store.results import committed_status, write_cell_result
from harness.store.rows import failed_row
from harness.train.trainer import check_trainer_config
from methods.base import build_method

console = Console(stderr=True)
BUSY_RETRY_S = 10.0  # a train node whose key another driver holds is submitted again after this
STATUS_S = 2.0  # the progress line's running/queued counts are read from the store this often


@dataclass
class GridReport:
    cells: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    outcomes: list[CellOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status != "ok"]


def validate_cell(cfg: dict[str, Any]) -> None:
    """Build the method and attacks from the config: bad settings fail before any training."""
    validate_numbers(cfg)  # the numbers alone, then the validation split against the data, then the
    check_validation(cfg)  # batch against what that leaves to train on
    validate_numbers(cfg, train_split_size(cfg))
    check_results_writable(cfg["results_dir"])
    if not cfg.get("model"):  # trained here: its architecture builds with these settings (on the meta device)
        check_arch(cfg)
    check_method_arch(cfg)  # a clean fraction outside (0, 1]; a BatchNorm-pruning defense without BatchNorm
    check_trainer_config(planned_trainer(cfg))
    cell_resources(cfg)
    build_method(cfg["method"])
    build_poison(cfg.get("backdoor"))
    if cfg.get("model"):
        check_model_spec(cfg["model"])  # a model trained elsewhere: id, import, checkpoint path and format
    for attack_cfg in cfg["attack"].values():
        build_attack(attack_cfg)
    check_analyses(cfg)
    check_generated_settings(cfg)


def preflight_grid(cells: list[dict[str, Any]], *, prepare: bool, leaderboard: bool = True) -> None:
    """Every check a grid (or `run`) makes before any work, for a run and for `--dry-run` alike:
    each cell's settings, the results stores and the leaderboard folder writable; then (`prepare`)
    each dataset prepared where it lives, and the numbers that depend on the data (a batch larger
    than the training split, ...) checked against its manifest, local or remote (a dry run: when
    the data is prepared already)."""
    for cfg in cells:
        validate_cell(cfg)
    if leaderboard:
        for folder in sorted({c["leaderboard_dir"] for c in cells if c.get("leaderboard_dir")}):
            check_folder_writable(folder, "leaderboard_dir")
    if prepare:
        for data_cfg in {c["data"]["dir"]: c["data"] for c in cells}.values():
            ensure_prepared(data_cfg)
    for cfg in cells:
        check_validation(cfg)
        validate_numbers(cfg, train_split_size(cfg))
        check_generated(cfg)  # a generated set named by key: complete, and of the real data's classes


def run_grid(cells: list[dict[str, Any]], *, ray_address: str | None = None, num_cpus: int | None = None,
             leaderboard: bool = True) -> GridReport:
    """Run every not-yet-committed cell's nodes as Ray tasks, with one progress view of the grid."""
    t0 = time.perf_counter()
    preflight_grid(cells, prepare=True, leaderboard=leaderboard)
    report = GridReport(cells=cells)
    done = committed_ok(cells)
    report.skipped = [c["key"] for c in cells if c["key"] in done]
    plan = pending_plan(cells, done)
    counts = plan.counts()
    console.print(f"grid: {len(cells)} cells, {len(report.skipped)} already committed, "
                  f"{len(cells) - len(report.skipped)} to run; plan: {counts['train']} trainings, "
                  f"{counts['artifact']} artifacts, {counts['eval']} evaluations", soft_wrap=True)
    if len(plan):
        with single_driver(cells):  # a second driver on this grid and store says so and exits
            report.outcomes = _run_on_ray(plan, ray_address, num_cpus)
    report.seconds = time.perf_counter() - t0
    return report


def node_options(node: Node) -> dict[str, Any]:
    """Ray options of one node: a train node, and a W-rank cell's eval node, hold the cell's
    training resources (a W-rank cell evaluates on its W ranks; launcher=ray_train: the task
    orchestrates with 0 CPUs and Ray Train's workers hold them); an artifact node, and a 1-rank
    eval node, one rank's (a GPU cell evaluates, and builds its DDPM, on its GPU)."""
    if node.kind == "train" or (node.kind == "eval" and cell_resources(node.cfg).ranks > 1):
        return task_options(node.cfg)
    if node.kind == "artifact" and node.artifact.options is not None:  # e.g. a generated set's orchestrator
        return {"max_retries": cell_resources(node.cfg).max_retries, **node.artifact.options}
    return rank_options(node.cfg) | {"max_retries": cell_resources(node.cfg).max_retries}


def _run_on_ray(plan: Plan, address: str | None, num_cpus: int | None) -> list[CellOutcome]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        check_ray_address(address)  # a wrong address fails in seconds, naming it (not minutes of retries)
        # "local": a fresh embedded Ray even when a `ray start` cluster is running on this machine
        # (ray.init(None) would silently join it); ray.address=auto|host:port joins a cluster.
        ray.init(address=address or "local", num_cpus=num_cpus if address is None else None,
                 include_dashboard=False, log_to_driver=True, configure_logging=False)
    remote = ray.remote(_node_task)
    window = Window(plan, lambda node, inputs: remote.options(**node_options(node), name=node.id).remote(node, *inputs),
                    node_options)
    cells = {node.id: node.cfg for node in plan if node.kind == "eval"}
    open_keys = {cfg["key"] for cfg in cells.values()}  # cells not finished: submitted or not yet
    stores = {cfg["results_dir"] for cfg in cells.values()}
    status_due = 0.0
    nodes_by_ref: dict[Any, Node] = {}
    outcomes: list[CellOutcome] = []
    columns = (TextColumn("[bold]grid"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("grid", total=len(cells), status="")
        waiting: list[Any] = []
        totals, totals_due = {}, 0.0
        while not window.exhausted:
            if time.monotonic() >= totals_due:  # a GCS call: once a second, not once per finished node
                totals, totals_due = ray.cluster_resources(), time.monotonic() + 1.0
            for ref, node in window.fill(totals):  # runnable nodes, a bounded window of them
                nodes_by_ref[ref] = node
                waiting.append(ref)
            if not waiting:
                if window.handed_back:  # only nodes another driver is training remain: wait for their turn
                    time.sleep(1.0)
                    continue
                raise RuntimeError(f"plan nodes wait on inputs that never run: {[n.id for n in window.unsubmitted][:5]}")
            # back as soon as one node finishes (its slot is refilled now, not at the end of a fixed
            # wait), with every other finished one; `waiting` is at most the window, so a round is small
            done, waiting = ray.wait(waiting, num_returns=1, timeout=2.0)
            if done and waiting:
                more, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0)
                done += more
            for ref in done:
                node = nodes_by_ref.pop(ref)
                outcome = _get_outcome(ray, ref, node)
                if outcome.status == BUSY:  # another driver trains this key now: ask again later
                    window.again_later(node, BUSY_RETRY_S)
                    continue
                window.finished(node.id)
                if node.kind != "eval":
                    if outcome.status != "ok":
                        progress.console.print(f"[red]FAILED[/] {node.label}{first_line(outcome.error)}", highlight=False)
                    continue
                outcomes.append(outcome)
                open_keys.discard(node.cfg["key"])
                progress.update(bar, advance=1)
                mark = "[green]ok[/]" if outcome.status == "ok" else "[red]FAILED[/]"
                progress.console.print(f"{mark} {outcome.label} ({outcome.key}) {outcome.seconds:.1f}s"
                                       f"{first_line(outcome.error)}", highlight=False)
            if time.monotonic() >= status_due:  # a store listing: every STATUS_S, not every round
                progress.update(bar, status=_live_status(stores, open_keys, outcomes))
                status_due = time.monotonic() + STATUS_S
    return outcomes


def _get_outcome(ray: Any, ref: Any, node: Node) -> CellOutcome | NodeOutcome:
    try:
        return ray.get(ref)
    except Exception as err:  # the worker died (OOM, node lost) after its retries, or an input's did
        error = f"{type(err).__name__}: {err}"
        if node.kind != "eval":
            return NodeOutcome(node.id, "failed", error)
        cfg = node.cfg
        path = write_cell_result(cfg["results_dir"], cfg["key"], [failed_row(cfg, error)])
        # an attempt may have committed 'ok' before dying: that commit wins over this row
        status = committed_status(cfg["results_dir"], cfg["key"]) or "failed"
        return CellOutcome(cfg["key"], cfg["label"], status, None if status == "ok" else error, str(path), 0.0)


def _live_status(stores: set[str], open_keys: set[str], outcomes: list[CellOutcome]) -> str:
    """'running R, queued Q, failed F': R from fresh heartbeats in the results store(s); Q every
    other cell not finished (submitted and waiting, or not yet submitted)."""
    running = set().union(*(running_cells(d) for d in stores)) & open_keys
    return (f"running {len(running)}, queued {len(open_keys) - len(running)}, "
            f"failed {sum(o.status != 'ok' for o in outcomes)}")


def _node_task(node: Node, *inputs: Any) -> Any:
    """The Ray task of one node: torch on the CPUs Ray gave it; an eval node that finds its cell
    already committed 'ok' (a retry whose first attempt did finish) returns at once."""
    import torch

    if node.kind == "eval" and committed_status(node.cfg["results_dir"], node.cfg["key"]) == "ok":
        from harness.store.results import result_path

        cfg = node.cfg
        return CellOutcome(cfg["key"], cfg["label"], "ok", None, str(result_path(cfg["results_dir"], cfg["key"])), 0.0)
    if node.cfg is not None:
        torch.set_num_threads(max(1, int(cell_resources(node.cfg).cpus)))
    try:
        return RUNNERS[node.kind](node, *inputs)
    finally:
        if torch.cuda.is_available():  # the worker is reused: hand cached GPU memory back to cells sharing the GPU
            torch.cuda.empty_cache()

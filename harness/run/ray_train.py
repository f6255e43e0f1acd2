"""resources.launcher=ray_train: a cell's DDP ranks as Ray Train (TorchTrainer) workers.

Ray places the `trainer.world_size` workers across the cluster's nodes, each with
`resources.cpus/gpus/memory_gb`, and sets up the torch process group (gloo on CPU, NCCL on GPU);
each worker runs the ordinary trainer loop through `harness.train.trainer.train_in_process_group`. A
worker that dies makes Ray Train restart the worker group (FailureConfig(max_failures=
resources.train_max_failures)); every worker first pulls the store's last epoch checkpoint, so
a restart resumes instead of starting over. Once trained, the cell is evaluated and committed
in a task sized like one rank (harness.run.cell.run_cell, with training already done).

The cell's own Ray task only orchestrates (0 CPUs), so it never holds resources the workers need.
For a multi-node cluster `results_dir` must be a shared folder or a URI (s3://, gs://...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.run.cell import CellOutcome, run_cell
from harness.store.checkpoint_sync import SUMMARY, local_work_dir, pull
from harness.run.resources import cell_resources, rank_options, worker_resources
from harness.store.storage import is_uri
from harness.train.trainer import TrainSummary


def train_with_ray_train(cfg: dict[str, Any], run_cfg: dict[str, Any] | None = None) -> None:
    """Train the cell on `trainer.world_size` Ray Train workers; raises if it failed for good.
    `run_cfg`: the config the trainer runs (method prerequisites injected, harness.run.prerequisites)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = cell_resources(cfg)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "run_cfg": run_cfg},
        scaling_config=ScalingConfig(num_workers=res.ranks, use_gpu=res.gpus > 0,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(name=f"cell-{cfg['key']}", storage_path=_train_storage(cfg),
                             failure_config=FailureConfig(max_failures=res.train_max_failures)),
    )
    trainer.fit()


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is up; train this rank.

    A two-stage cell (ADML) starts from its base's checkpoint: each worker pulls it to its node
    first, so `trainer.init_from` (harness.run.stages.train_config) names a local file."""
    from harness.run.stages import base_cell, train_config
    from harness.train.trainer import train_in_process_group

    cfg = config["cfg"]
    base = base_cell(cfg)
    while base is not None:
        pull(base, local_work_dir(base))
        base = base_cell(base)
    train_in_process_group(config.get("run_cfg") or train_config(cfg), local_work_dir(cfg))


def _train_storage(cfg: dict[str, Any]) -> str:
    """Ray Train's run folder, inside the results store (shared by every node that can see it)."""
    root = cfg["results_dir"]
    return f"{root}/_ray_train" if is_uri(root) else str(Path(root) / "_ray_train")


def _trained_summary(cfg: dict[str, Any], work_dir: Path) -> TrainSummary:
    """run_cell's train step for a cell Ray Train already trained: fetch checkpoint + summary."""
    pull(cfg, work_dir)
    summary = work_dir / SUMMARY
    if not summary.exists():
        raise RuntimeError(f"Ray Train finished but no {SUMMARY} reached {work_dir}: on a multi-node cluster "
                           f"results_dir must be a shared folder or a URI (s3://, gs://)")
    return TrainSummary(**json.loads(summary.read_text()))


def _evaluate_and_commit(cfg: dict[str, Any]) -> CellOutcome:
    import torch

    torch.set_num_threads(max(1, int(cell_resources(cfg).cpus)))
    return run_cell(cfg, train_fn=_trained_summary)


def run_cell_ray_train(cfg: dict[str, Any]) -> CellOutcome:
    """The whole cell under launcher=ray_train: train on Ray Train, then evaluate + commit in a task."""
    import ray

    from harness.run.prerequisites import runtime_config
    from harness.run.stages import ensure_dependencies, train_config

    try:
        ensure_dependencies(cfg)  # a two-stage cell's base stage, trained here if not yet done
        # method prerequisites (CBD's f_B, FT/FP/NAD's ERM) are trained here too; their checkpoint
        # paths are this node's, so on several nodes results_dir must be a shared folder
        train_with_ray_train(cfg, runtime_config(train_config(cfg)))
    except Exception as err:  # training failed past its retries: a failed cell, recorded like any other
        from harness.run.cell import _base_row, _now
        from harness.store.results import write_cell_result

        error = f"{type(err).__name__}: {err}"
        path = write_cell_result(cfg["results_dir"], cfg["key"], [_base_row(cfg, _now()) | {"status": "failed",
                                                                                          "error": error}])
        return CellOutcome(cfg["key"], cfg.get("label", cfg["key"]), "failed", error, str(path), 0.0)
    task = ray.remote(_evaluate_and_commit).options(**rank_options(cfg))
    return ray.get(task.remote(cfg))

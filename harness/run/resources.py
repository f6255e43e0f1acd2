"""What one cell asks the cluster for, read from the `resources` config group, checked up front.

    resources:
      launcher: task        # task: one Ray task per cell (DDP ranks as local processes)
                            # ray_train: DDP ranks as Ray Train workers, placed across nodes
      cpus: 1               # per DDP rank
      gpus: 0               # per DDP rank; a fraction (0.25) lets small cells share one GPU
      memory_gb: null       # per DDP rank; Ray won't place a cell where this much RAM isn't free
      max_retries: 2        # re-runs of a cell whose worker process or node died
      retry_worker_death: true  # also retry when a DDP rank process was killed (not a bug in the cell)
      train_max_failures: 2 # ray_train only: Ray Train restarts of the worker group (FailureConfig)

Ray retries a task whose worker process or node died (max_retries). A DDP rank killed inside a
cell surfaces as torch's ProcessExitedException, which is a death, not a bug in the cell: with
retry_worker_death it is re-raised and Ray retries the cell, which resumes from its last epoch
checkpoint. Any other exception is the cell's own failure and is committed as a 'failed' row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness.core.config import ConfigError

LAUNCHERS = ("task", "ray_train")
GIB = 1024**3


@dataclass(frozen=True)
class CellResources:
    launcher: str
    ranks: int
    cpus: float  # per rank
    gpus: float  # per rank
    memory_gb: float | None  # per rank
    max_retries: int
    retry_worker_death: bool
    train_max_failures: int


def worker_death_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a process of the cell was killed, so the cell should be retried."""
    import torch.multiprocessing as mp

    return (mp.ProcessExitedException,)


def cell_resources(cfg: dict[str, Any]) -> CellResources:
    """The cell's resources, validated; a bad value raises ConfigError naming the fix."""
    res = dict(cfg.get("resources") or {})
    tcfg = cfg.get("trainer") or {}
    launcher = str(res.get("launcher", "task"))
    if launcher not in LAUNCHERS:
        raise ConfigError(f"resources.launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
    ranks = int(tcfg.get("world_size", 1))
    cpus = _number(res, "cpus", 1.0)
    gpus = _number(res, "gpus", 0.0)
    memory = res.get("memory_gb")
    memory_gb = None if memory is None else _number(res, "memory_gb", 0.0)
    if cpus <= 0:
        raise ConfigError(f"resources.cpus must be > 0 (CPUs per DDP rank), got {cpus}")
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(f"resources.gpus must be a fraction below 1 (GPU sharing) or a whole number, got {gpus}")
    if 0 < gpus < 1 and ranks > 1:
        raise ConfigError(f"resources.gpus={gpus} with trainer.world_size={ranks}: DDP ranks cannot share one GPU "
                          f"(NCCL); use resources.gpus=1 per rank, or trainer.world_size=1 for GPU sharing")
    if memory_gb is not None and memory_gb <= 0:
        raise ConfigError(f"resources.memory_gb must be > 0 or null, got {memory_gb}")
    if gpus == 0 and tcfg.get("device") == "cuda":
        raise ConfigError("trainer.device=cuda but resources.gpus=0: Ray hides GPUs from a cell that asks for none; "
                          "set resources.gpus (e.g. 1, or 0.25 to share a GPU)")
    if gpus > 0 and tcfg.get("device") == "cpu":
        raise ConfigError(f"resources.gpus={gpus:g} with trainer.device=cpu: the cell would hold GPUs it never uses; "
                          f"set trainer.device=auto (or cuda), or resources.gpus=0")
    max_retries = int(res.get("max_retries", 2))
    if max_retries < -1:
        raise ConfigError(f"resources.max_retries must be >= 0 (or -1: retry forever), got {max_retries}")
    train_max_failures = int(res.get("train_max_failures", 2))
    if train_max_failures < -1:
        raise ConfigError(f"resources.train_max_failures must be >= 0 (or -1), got {train_max_failures}")
    return CellResources(launcher=launcher, ranks=ranks, cpus=cpus, gpus=gpus, memory_gb=memory_gb,
                         max_retries=max_retries, retry_worker_death=bool(res.get("retry_worker_death", True)),
                         train_max_failures=train_max_failures)


def task_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """`ray.remote(...).options(**)` for the cell's task.

    launcher=task: the task holds every rank's CPUs/GPUs/memory (ranks are its child processes).
    launcher=ray_train: the task only orchestrates (0 CPUs); Ray Train's workers hold the ranks'
    resources, and evaluation runs in a nested task sized like one rank.
    """
    res = cell_resources(cfg)
    options: dict[str, Any] = {"max_retries": res.max_retries}
    if res.retry_worker_death:
        options["retry_exceptions"] = list(worker_death_exceptions())
    if res.launcher == "ray_train":
        return options | {"num_cpus": 0}
    options |= {"num_cpus": res.cpus * res.ranks, "num_gpus": res.gpus * res.ranks}
    if res.memory_gb is not None:
        options["memory"] = int(math.ceil(res.memory_gb * res.ranks * GIB))
    return options


def rank_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray options sized like one DDP rank (ray_train's evaluation task)."""
    res = cell_resources(cfg)
    options: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus, "max_retries": res.max_retries}
    if res.memory_gb is not None:
        options["memory"] = int(math.ceil(res.memory_gb * GIB))
    return options


def worker_resources(cfg: dict[str, Any]) -> dict[str, float]:
    """Ray Train's `resources_per_worker` for one DDP rank."""
    res = cell_resources(cfg)
    out = {"CPU": res.cpus}
    if res.gpus:
        out["GPU"] = res.gpus
    if res.memory_gb is not None:
        out["memory"] = float(math.ceil(res.memory_gb * GIB))
    return out


def _number(res: dict[str, Any], name: str, default: float) -> float:
    value = res.get(name, default)
    try:
        return float(value if value is not None else default)
    except (TypeError, ValueError):
        raise ConfigError(f"resources.{name} must be a number, got {value!r}") from None

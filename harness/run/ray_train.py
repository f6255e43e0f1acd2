"""resources.launcher=ray_train: a train node's DDP ranks as Ray Train (TorchTrainer) workers.

Ray places the `trainer.world_size` workers across the cluster's nodes, each with
`resources.cpus/gpus/memory_gb`, and sets up the torch process group (gloo on CPU, NCCL on GPU);
each worker pulls the upstream checkpoints it starts from to its own node and runs the ordinary
trainer loop through `harness.train.trainer.train_in_process_group`. A worker that dies makes Ray
Train restart the worker group (FailureConfig(max_failures=resources.train_max_failures)); every
worker first pulls the store's last epoch checkpoint, so a restart resumes instead of starting
over. The train node's own Ray task only orchestrates (0 CPUs), so it never holds resources the
workers need; the cell's evaluation is its eval node, a task sized like one rank.
For a multi-node cluster `results_dir` must be a shared folder or a URI (s3://, gs://...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.run.resources import cell_resources, worker_resources
from harness.store.checkpoint_sync import CHECKPOINT, local_work_dir, pull
from harness.store.storage import is_uri

Upstreams = list[tuple[str | None, dict[str, Any]]]  # (method arg or None for init_from, upstream cell)


def train_with_ray_train(cfg: dict[str, Any], upstream: Upstreams) -> None:
    """Train the node's model on `trainer.world_size` Ray Train workers; raises if it failed for good."""
    _torch_trainer(cfg, _train_loop, {"cfg": cfg, "upstream": upstream}, f"train-{cfg['train_key']}").fit()


def run_on_ray_train(cfg: dict[str, Any], fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(rank, world_size, device, *args)` on the cell's `trainer.world_size` Ray Train
    workers (in their torch process group, each on its device); returns rank 0's value."""
    from ray.util.queue import Queue

    results = Queue(actor_options={"num_cpus": 0})
    try:
        _torch_trainer(cfg, _rank_loop, {"cfg": cfg, "fn": fn, "args": args, "results": results},
                       f"eval-{cfg['key']}").fit()
        return results.get(timeout=60)  # put by rank 0 before its loop returned
    finally:
        results.shutdown()


def _torch_trainer(cfg: dict[str, Any], loop: Callable[[dict[str, Any]], None], config: dict[str, Any],
                   name: str) -> Any:
    """A TorchTrainer over the cell's ranks, each with one rank's resources, restarted on a worker's death."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = cell_resources(cfg)
    return TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=res.ranks, use_gpu=res.gpus > 0,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(name=name, storage_path=_train_storage(cfg),
                             failure_config=FailureConfig(max_failures=res.train_max_failures)),
    )


def _rank_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of `run_on_ray_train`: set up this rank, run fn, rank 0 hands its value back."""
    import ray.train

    from harness.train.device import rank_setup

    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = rank_setup(config["cfg"], context.get_local_rank())
    value = config["fn"](rank, context.get_world_size(), device, *config["args"])
    if rank == 0:
        config["results"].put(value)


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is up; pull the upstream checkpoints to this node,
    then train this rank."""
    from harness.run.plan import run_config
    from harness.train.trainer import train_in_process_group

    cfg = config["cfg"]
    checkpoints = {}
    for arg, ucfg in config["upstream"]:
        work_dir = local_work_dir(ucfg)
        pull(ucfg, work_dir)
        checkpoints[arg] = str(work_dir / CHECKPOINT)
    train_in_process_group(run_config(cfg, checkpoints), local_work_dir(cfg))


def _train_storage(cfg: dict[str, Any]) -> str:
    """Ray Train's run folder, inside the results store (shared by every node that can see it)."""
    root = cfg["results_dir"]
    return f"{root}/_ray_train" if is_uri(root) else str(Path(root) / "_ray_train")

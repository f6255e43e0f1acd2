"""The ranks of one cell on one machine: W processes in one torch.distributed process group.

Training and a multi-rank cell's evaluation both run `fn(rank, world_size, device, *args)` on
every rank: each rank is set up by `rank_setup` (its threads, its device `cuda:<rank>` or the
CPU), joined in a group (NCCL on CUDA, gloo on CPU) through a FileStore, and left before it
exits. One rank runs in this process; more are spawned. Rank 0's return value comes back
(through a pipe between these processes, never through a file another machine could write).

The group meets in a folder `rg-ranks-<host>-<pid>-*` of the cell's checkpoint folder, removed
when the ranks end; a run that was killed leaves its folder behind, so each run first removes the
folders of this host's dead processes (`remove_leftovers`; the store audit names any it finds).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from harness.store.audit import RANKS_PREFIX, owner_alive
from harness.train.device import rank_setup

RankFn = Callable[..., Any]  # fn(rank, world_size, device, *args) -> anything picklable (rank 0's is returned)


def run_ranks(fn: RankFn, world_size: int, cfg: dict[str, Any], *args: Any, store_dir: Path | None = None) -> Any:
    """Run `fn` on `world_size` ranks (set up from the cell `cfg`); returns rank 0's value.

    A rank's exception is raised here as torch's ProcessRaisedException (its text names it), a
    killed rank as ProcessExitedException: the caller decides which is a retry.
    """
    if store_dir is not None:
        remove_leftovers(Path(store_dir))
    folder = Path(tempfile.mkdtemp(prefix=f"{RANKS_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=store_dir))
    store_file = str(folder / "store")
    try:
        if world_size == 1:
            return _rank_main(0, fn, 1, cfg, store_file, None, args)
        results = mp.get_context("spawn").SimpleQueue()
        context = mp.start_processes(_rank_main, args=(fn, world_size, cfg, store_file, results, args),
                                     nprocs=world_size, start_method="spawn", join=False)
        value = None
        while not context.join(timeout=0.5):  # read while waiting: a large value must not block rank 0's exit
            if not results.empty():
                value = results.get()
        return results.get() if not results.empty() else value
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rank_main(rank: int, fn: RankFn, world_size: int, cfg: dict[str, Any], store_file: str,
               results: Any, args: tuple[Any, ...]) -> Any:
    device = rank_setup(cfg, rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.FileStore(store_file, world_size), rank=rank, world_size=world_size)
    try:
        value = fn(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()
    if results is not None and rank == 0:
        results.put(value)
    return value


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the rendezvous folders in `folder` that no live process of this host owns (a killed
    run's); folders of other hosts (a shared results folder) and of live processes stay."""
    removed = []
    for path in folder.glob(f"{RANKS_PREFIX}*"):
        if not owner_alive(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed

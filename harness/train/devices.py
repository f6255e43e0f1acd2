"""Per-process setup of one DDP rank: which device it trains on, its CPU threads, a quiet log."""
from __future__ import annotations

import warnings
from typing import Any

import torch


def pick_device(spec: str, local_rank: int) -> torch.device:
    """`trainer.device` (auto, cuda, cpu, ...) for the rank with this local index."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(spec)


def rank_setup(cfg: dict[str, Any], local_rank: int) -> torch.device:
    """Set this process's threads and warnings up; return the device it trains on."""
    # Tiny 1x1 / single-channel convs make DDP warn that grad strides differ from its buckets:
    # a copy per step, harmless at that size; keep it out of every cell's log.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    torch.set_num_threads(int(cfg["trainer"].get("threads_per_rank") or 1))
    return pick_device(cfg["trainer"].get("device", "auto"), local_rank)

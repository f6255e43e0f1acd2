"""The cell's one device: resolved once from `trainer.device`, handed to every stage.

Training, checkpoint loading, evaluation, integrity probes, neuron sensitivity, analyses and
backdoor metrics of a cell all run on the device this returns (`cuda:<local rank>` or `cpu`),
so a GPU cell never evaluates on the CPU behind the trainer's back. What a device can do
(bf16, autocast, its name) is in harness/core/device.py, which evaluation imports too.
"""
from __future__ import annotations

from typing import Any

import torch


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> cuda if visible else cpu; `cuda` -> `cuda:<local rank>` (modulo the visible count)."""
    spec = str(spec or "auto")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={spec} but no CUDA device is visible; "
                               f"use trainer.device=auto or trainer.device=cpu")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    if spec not in ("cpu",) and not spec.startswith("cuda:"):
        raise ValueError(f"trainer.device must be auto, cpu, cuda or cuda:<index>; got {spec!r}")
    return torch.device(spec)


def cell_device(cfg: dict[str, Any], local_rank: int = 0) -> torch.device:
    """The device every stage of the cell `cfg` runs on (rank `local_rank` of its node)."""
    return resolve_device((cfg.get("trainer") or {}).get("device", "auto"), local_rank)

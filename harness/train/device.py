"""The cell's one device: resolved once from `trainer.device`, handed to every stage.

Training, checkpoint loading, evaluation, integrity probes, neuron sensitivity, analyses and
backdoor metrics of a cell all run on the device this returns (`cuda:<local rank>` or `cpu`),
so a GPU cell never evaluates on the CPU behind the trainer's back. It also names devices for
the result rows and checks the precision settings against what the device can do.
"""
from __future__ import annotations

from typing import Any

import torch

PRECISIONS = ("fp32", "bf16")


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


def check_precision(precision: str, device: torch.device, setting: str = "trainer.precision") -> None:
    """Fail with the fix named when `precision` is unknown or `device` cannot compute in it."""
    if precision not in PRECISIONS:
        raise ValueError(f"{setting} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{setting}=bf16 but {device_name(device)} has no bf16 support; set {setting}=fp32")
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"{setting}=bf16 is supported on cuda and cpu only, not {device.type}; set {setting}=fp32")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on `device` when `precision` is bf16 (CPU included), a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def device_name(device: torch.device | str) -> str:
    """A human name for result rows: the GPU's product name, or the CPU's model string."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock time measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

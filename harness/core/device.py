"""What a device can do: bf16 support, autocast, its name for result rows, waiting for its work.

Lives in the lowest layer so that training (harness/train) and evaluation (harness/eval) share
it; which device a cell uses is decided once, in harness/train/device.py.
"""
from __future__ import annotations

import platform

import torch

PRECISIONS = ("fp32", "bf16")


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

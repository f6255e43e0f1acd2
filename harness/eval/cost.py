"""What a result cost: FLOPs, device-hours, peak memory, MFU and per-stage seconds.

Every result row carries these columns (harness/store/results.py), so the leaderboard can put a
robust accuracy beside the compute that bought it:

    device_name, device_count, train_seconds, eval_seconds, eval_stage_seconds (JSON),
    flops_per_image (forward, counted by torch.utils.flop_counter.FlopCounterMode),
    train_flops (estimated), device_hours (GPU-hours; CPU core-hours on a CPU),
    peak_memory_bytes, mfu (GPU only, else null)

The eval loop times its stages with `StageClock` and builds the columns with `cost_columns`.
Peak FLOP/s come from the vendors' datasheets (dense tensor-core rates, no sparsity).
"""
from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from harness.core.device import device_name, synchronize

# Dense peak FLOP/s by device-name fragment: bf16 tensor cores, and fp32 as TF32 tensor cores
# (what fp32 matmuls/convs use when TF32 is allowed; the plain-fp32 rate where a GPU has no TF32).
# Longest matching fragment wins, so "H100 PCIe" is not read as the SXM part.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250e12, "fp32": 1100e12},
    "H200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "H100": {"bf16": 989.4e12, "fp32": 494.7e12},  # SXM
    "H100 PCIe": {"bf16": 756.5e12, "fp32": 378e12},
    "H100 NVL": {"bf16": 835.5e12, "fp32": 417.5e12},
    "GH200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "A10": {"bf16": 125e12, "fp32": 62.5e12},
    "V100": {"fp32": 15.7e12},
    "T4": {"fp32": 8.1e12},
}


def peak_flops(name: str, precision: str = "bf16") -> float | None:
    """The datasheet peak FLOP/s of the device called `name` in `precision`; None if unknown."""
    matches = [k for k in PEAK_FLOPS if k.lower() in name.lower() and precision in PEAK_FLOPS[k]]
    return PEAK_FLOPS[max(matches, key=len)][precision] if matches else None


class _OpFlops(TorchDispatchMode):
    """Sums torch's own per-op FLOP formulas (those FlopCounterMode uses) over every dispatched op.

    FlopCounterMode also tracks the module hierarchy with backward hooks, which
    `torch.autograd.grad` on an input (every attack) refuses; this counts the same FLOPs without it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn()` runs (matmuls and convolutions, forward and backward, input
    gradients included), by torch.utils.flop_counter's formulas."""
    counter = _OpFlops()
    with counter:
        fn()
    return counter.total


def flops_per_image(model: nn.Module, image_shape: tuple[int, ...], device: torch.device | str = "cpu") -> float:
    """Forward FLOPs of `model` per image of shape (C, H, W), counted in eval mode on `device`."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((2, *image_shape), device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return counter.get_total_flops() / 2
    finally:
        model.train(was_training)


def mfu(flops: float | None, seconds: float, device: torch.device | str, precision: str = "bf16",
        device_count: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of `device_count` devices; None on a
    CPU, for an unknown GPU, or without a FLOP count."""
    device = torch.device(device)
    if device.type != "cuda" or not flops or seconds <= 0:
        return None
    peak = peak_flops(device_name(device), precision)
    return flops / seconds / (peak * device_count) if peak else None


def device_hours(seconds: float, device: torch.device | str, device_count: int = 1, cpu_threads: int = 1) -> float:
    """GPU-hours on a GPU; CPU core-hours (threads used x wall time) on a CPU."""
    units = device_count if torch.device(device).type == "cuda" else device_count * max(1, cpu_threads)
    return seconds * units / 3600.0


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window on a GPU (a CPU's peak is the process's high-water mark)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory: allocated GPU memory since the last reset on a GPU, the process's peak RSS on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class StageClock:
    """Wall seconds per named stage (device work waited for), e.g. {"attacks": 12.3, "ace": 40.1}."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def json(self) -> str:
        return json.dumps({k: round(v, 6) for k, v in self.seconds.items()}, sort_keys=True)


def cost_columns(*, device: torch.device | str, device_count: int, train_seconds: float,
                 clock: StageClock, flops_per_image: float | None, train_flops: float | None,
                 cpu_threads: int = 1, precision: str = "fp32", train_peak_memory: int | None = None) -> dict[str, Any]:
    """The cost columns of a cell's result rows (names as in RESULT_SCHEMA).

    `device_count`: devices the cell trained on (DDP ranks); `clock`: the eval stages' seconds;
    `train_flops`: the training's FLOPs (TrainSummary.train_flops); mfu is the training's.
    `train_peak_memory`: the training ranks' peak (TrainSummary.peak_memory_bytes), when they ran
    in other processes; the row keeps the larger of it and this process's peak.
    """
    device = torch.device(device)
    eval_seconds = clock.total
    hours = device_hours(train_seconds, device, device_count, cpu_threads) + device_hours(eval_seconds, device, 1,
                                                                                          cpu_threads)
    return {
        "device_name": device_name(device),
        "device_count": int(device_count),
        "train_seconds": float(train_seconds),
        "eval_seconds": float(eval_seconds),
        "eval_stage_seconds": clock.json(),
        "flops_per_image": flops_per_image,
        "train_flops": train_flops,
        "device_hours": hours,
        "peak_memory_bytes": max(peak_memory_bytes(device), int(train_peak_memory or 0)),
        "mfu": mfu(train_flops, train_seconds, device, precision, device_count),
    }

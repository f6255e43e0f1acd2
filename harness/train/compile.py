"""`trainer.compile`: torch.compile of the classifier, checked before training starts.

`trainer.compile` is false (eager), true (the default backend, inductor) or a backend name
(`torch.compiler.list_backends()`, e.g. aot_eager for a quick check of the graph capture).
The classifier is compiled in place (`nn.Module.compile`), so the training step and the
train-time attacks (which run on the unwrapped classifier) both use the compiled forward and
the checkpoint's parameter names do not change. A compile that cannot work fails here, with
the fix named, instead of an hour into a grid.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

FIX = "set trainer.compile=false to train without torch.compile"


def compile_backend(setting: Any) -> str | None:
    """The backend `trainer.compile` asks for; None for eager. Unknown names are an error."""
    if setting in (None, False, "false", "False", 0):
        return None
    backend = "inductor" if setting in (True, "true", "True", 1) else str(setting)
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"trainer.compile={setting!r}: unknown torch.compile backend. Known: {', '.join(known)}; "
                         f"or {FIX}")
    return backend


class _Probe(nn.Module):
    """Conv, BatchNorm, ReLU, pooling, linear: the ops of every classifier here, in a few weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def check_compile(backend: str, device: torch.device) -> None:
    """Compile and run a tiny conv net forward and backward on `device` with `backend`.

    Catches what most often breaks compile (no C++ compiler for inductor on a CPU, no Triton for
    a GPU, an unsupported device) before the cell builds its model and data.
    """
    probe = _Probe().to(device)
    try:
        probe.compile(backend=backend)
        x = torch.rand(2, 3, 8, 8, device=device, requires_grad=True)
        torch.autograd.grad(probe(x).sum(), x)
    except Exception as err:  # any failure of the compiler stack means: not here
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise RuntimeError(f"torch.compile (backend {backend}) does not work on {device}: "
                           f"{type(err).__name__}: {first_line}; {FIX}") from err


def compile_classifier(classifier: nn.Module, backend: str | None) -> nn.Module:
    """Compile `classifier`'s forward in place (a no-op for eager); returns it."""
    if backend is not None:
        classifier.compile(backend=backend)
    return classifier

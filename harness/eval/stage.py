"""Evaluation analyses: plugins that add columns or files to an evaluated cell's rows.

An eval node (harness/run/nodes.py) evaluates the model (clean + attacks, harness/eval/evaluate.py)
and then runs every analysis that applies to the cell, in `order`:

    integrity (10)          flags + evidence on each attack row (always)
    samples (20)            per-sample results file, for survivors-resume (always)
    neuron_sensitivity (30) columns neuron_sensitivity* (unless eval.neuron_sensitivity.enabled=false)
    backdoor_metrics (40)   ASR / RA columns (cells trained on poison)
    ace, ... (100)          selected in the cell's `analysis` group; summaries in `analysis_json`

A plugin registers under a name in ANALYSES (harness/core/registry.py; external packages through
the `robustgrid.analyses` entry point). `always = True` plugins decide with `applies(cfg)`; the
others run once per label of the cell's `analysis` config block that names them. An analysis may
declare `artifacts(cfg)`: things it needs built first (ACE's DDPM and helper classifiers). Those
are artifact nodes of the plan, built once per key by their own task, never behind a lock.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from harness.core.artifact import Artifact  # noqa: F401  (declared by analyses; re-exported)
from harness.core.plugin_config import selectable_analyses
from harness.core.registry import ANALYSES


@dataclass
class EvalContext:
    """What an analysis sees of the evaluated cell, and where it puts what it adds."""

    cfg: dict[str, Any]
    model: nn.Module
    device: torch.device
    manifest: dict[str, Any]
    result: Any  # harness.eval.evaluate.EvalResult
    columns: dict[str, Any] = field(default_factory=dict)  # added to every row of the cell
    summaries: dict[str, Any] = field(default_factory=dict)  # {label: summary} -> analysis_json
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)


class Analysis:
    """Base class of an evaluation analysis; `run` adds to `ctx.columns`, the attack results or files."""

    always: ClassVar[bool] = False  # runs on every cell it `applies` to, without being selected
    order: ClassVar[int] = 100
    detector: ClassVar[bool] = False  # a backdoor detector (`robustgrid list analyses` says so)

    def __init__(self, label: str, settings: dict[str, Any]) -> None:
        self.label, self.settings = label, settings  # label: the registry name, or the analysis block's

    def applies(self, cfg: dict[str, Any]) -> bool:
        return True

    def check(self, cfg: dict[str, Any]) -> None:
        """Raise ValueError naming the problem and the fix, before any work starts."""

    def artifacts(self, cfg: dict[str, Any]) -> list[Artifact]:
        return []

    def run(self, ctx: EvalContext) -> None:
        raise NotImplementedError


def cell_analyses(cfg: dict[str, Any]) -> list[Analysis]:
    """The analyses one cell runs, in order: every `always` plugin that applies, then the ones its
    `analysis` block selects (a bad name raises ValueError listing the known ones)."""
    out: list[Analysis] = []
    for name, cls in ANALYSES.items():
        if cls.always:
            analysis = cls(name, {})
            if analysis.applies(cfg):
                out.append(analysis)
    selectable = sorted(selectable_analyses())
    for label, settings in (cfg.get("analysis") or {}).items():
        name = (settings or {}).get("name")
        if name not in selectable:
            raise ValueError(f"analysis '{label}': unknown analysis '{name}'. Known: {', '.join(selectable)}. "
                             f"Fix: analysis=[<one of these>]")
        out.append(ANALYSES.get(name)(label, dict(settings)))
    return sorted(out, key=lambda a: a.order)


def check_analyses(cfg: dict[str, Any]) -> None:
    """Every analysis of the cell checks its settings before any work."""
    for analysis in cell_analyses(cfg):
        analysis.check(cfg)


def analysis_artifacts(cfg: dict[str, Any]) -> list[Artifact]:
    return [artifact for analysis in cell_analyses(cfg) for artifact in analysis.artifacts(cfg)]

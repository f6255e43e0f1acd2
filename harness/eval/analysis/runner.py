"""Analyses that run on a trained, evaluated cell (ACE so far): checked before training, run after eval.

A cell's `analysis` config block maps labels to settings with a `name` (configs/analysis/*.yaml).
Analyses are eval-only: they are left out of the train key (harness.core.config.EVAL_ONLY_KEYS), so
adding one to a trained cell re-uses its checkpoint. Each writes its artifacts under
`<results_dir>/analysis/<cell key>/<label>/` and returns a summary dict stored in the cell's
`analysis_json` result column.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

KNOWN = ("ace",)


def analysis_dir(cfg: dict[str, Any], label: str) -> Path:
    return Path(cfg["results_dir"]) / "analysis" / cfg["key"] / label


def check_analyses(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the problem for any bad analysis block, before any work starts."""
    from harness.eval.analysis.run_ace import check_settings

    for label, acfg in (cfg.get("analysis") or {}).items():
        name = (acfg or {}).get("name")
        if name not in KNOWN:
            raise ValueError(f"analysis '{label}': unknown analysis '{name}'. Known: {', '.join(KNOWN)}. "
                             f"Fix: analysis=[<one of configs/analysis/*.yaml>]")
        check_settings(acfg)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_analyses(cfg: dict[str, Any], model: torch.nn.Module, log: Callable[[str], None] = _stderr,
                 device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Run every configured analysis on the cell's eval model, on the cell's `device`; returns {label: summary}.
    Progress (DDPM training can take many minutes on a CPU) goes to `log`, stderr by default."""
    from harness.eval.analysis.run_ace import run_ace

    out: dict[str, dict[str, Any]] = {}
    for label, acfg in (cfg.get("analysis") or {}).items():
        log(f"analysis {label}: {cfg.get('label', cfg['key'])}")
        out[label] = run_ace(model, Path(cfg["data"]["dir"]), Path(cfg["results_dir"]),
                             analysis_dir(cfg, label), acfg, log=log, img_size=cfg["data"].get("img_size"),
                             device=device)
    return out

"""Side-by-side checks of each method and poison against its authors' official code.

One module per official repository; each holds `REPOSITORY` ("owner/name") and
`CHECKS = {plugin name: check function}`, where a check is
`check(reference: Path) -> list[Compared]` (common.py): it imports the official code's own
functions from the checkout at `reference`, runs them and ours on the same tiny weights and batch,
and returns the largest difference of each compared quantity. `benchmarks/conformance.py` is the
entry point; docs/conformance.md holds the measured rows.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

SHARED = {"__init__", "common"}  # this package's modules that are not one repository's checks


def modules() -> list[ModuleType]:
    """Every check module of this folder (one per official repository), by file name."""
    names = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in SHARED)
    return [importlib.import_module(f"conformance_checks.{name}") for name in names]


def check_for(plugin: str) -> tuple[ModuleType, object]:
    """(module, check function) of a plugin; ValueError naming the checked plugins."""
    for module in modules():
        if plugin in module.CHECKS:
            return module, module.CHECKS[plugin]
    known = sorted(name for module in modules() for name in module.CHECKS)
    raise ValueError(f"no conformance check for '{plugin}'. Checked: {', '.join(known)}")

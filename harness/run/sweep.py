"""Hydra's sweep syntax as a grid: `-m method=erm,pgd_at seed=0,1,2` -> 6 cells.

Hydra users expect `key=a,b,c` (and `range(...)`, `choice(...)`) under `-m` to mean "one run per
value, all combinations". We parse the overrides with Hydra's own override parser, take the
Cartesian product of the sweep overrides, and compose each combination exactly as a grid's axes
are composed (harness.run.grid.expand_grid): with `grid=<name>` every combination is expanded
over that grid's axes too; without one, each combination is one cell. Cells are keyed by what
they compute, so duplicate combinations collapse into one cell.
"""
from __future__ import annotations

import itertools
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from harness.core.config import ConfigError, compose_config, finalize


def split_sweeps(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """(plain overrides, one list of `key=value` choices per sweep override), order kept."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra's OverrideParseException and friends
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None
    plain: list[str] = []
    sweeps: list[list[str]] = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            key = override.get_key_element()
            sweeps.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            plain.append(text)
    return plain, sweeps


def has_sweep(overrides: list[str]) -> bool:
    """True when some override is a Hydra sweep (`a=1,2`, `range(..)`, `choice(..)`, ...)."""
    return bool(split_sweeps(overrides)[1])


def expand_sweep(overrides: list[str]) -> list[dict[str, Any]]:
    """Finalized cell configs for every combination of the sweep overrides (x the grid's axes
    when `grid=<name>` is given), first occurrence of each cell key kept."""
    from harness.run.grid import expand_grid

    plain, sweeps = split_sweeps(overrides)
    with_grid = any(o.split("=", 1)[0] == "grid" for o in plain)
    cells: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*sweeps) if sweeps else [()]:
        chosen = _last_wins(plain + list(combo))
        expanded = expand_grid(chosen) if with_grid else [finalize(compose_config(chosen))]
        for cfg in expanded:
            cells.setdefault(cfg["key"], cfg)
    return list(cells.values())


def _last_wins(overrides: list[str]) -> list[str]:
    """Later overrides of one key replace earlier ones (a sweep value beats a plain default)."""
    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    return list(by_key.values())

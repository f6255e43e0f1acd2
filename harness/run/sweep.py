"""Hydra's sweep syntax as a grid: `-m method=erm,pgd_at seed=0,1,2` -> 6 cells.

Hydra users expect `key=a,b,c` (and `range(...)`, `choice(...)`) under `-m` to mean "one run per
value, all combinations". We parse the overrides with Hydra's own override parser and take the
Cartesian product of the sweep overrides. As a grid's axes are (harness/run/expand.py), a sweep
is composed once per combination of the sweeps that pick config files or that an interpolation
reads; the values of the others (seed, trainer.lr, method.beta, ...) are set on that composed
config, and checked as compose would check them. With `grid=<name>` every combination is
expanded over that grid's axes too. Cells are keyed by what they compute, so duplicate
combinations collapse into one cell.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from harness.core.config import ConfigError, check_values_set, compose_config, finalize
from harness.run.expand import (MAX_CELLS, expand_grid, grid_max_cells, last_wins, refuse_too_many, settable_value,
                                with_values)


@dataclass(frozen=True)
class Sweep:
    key: str
    texts: list[str]  # `key=value`, one per value, as Hydra writes them
    values: list[Any]  # the same values as Hydra parsed them


def split_sweeps(overrides: list[str]) -> tuple[list[str], list[Sweep]]:
    """(plain overrides, the sweep overrides), order kept."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra's OverrideParseException and friends
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None
    plain: list[str] = []
    sweeps: list[Sweep] = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            key = override.get_key_element()
            sweeps.append(Sweep(key, [f"{key}={v}" for v in override.sweep_string_iterator()],
                                list(override.sweep_iterator())))
        else:
            plain.append(text)
    return plain, sweeps


def has_sweep(overrides: list[str]) -> bool:
    """True when some override is a Hydra sweep (`a=1,2`, `range(..)`, `choice(..)`, ...)."""
    return bool(split_sweeps(overrides)[1])


def expand_sweep(overrides: list[str]) -> list[dict[str, Any]]:
    """Finalized cell configs for every combination of the sweep overrides (x the grid's axes
    when `grid=<name>` is given), first occurrence of each cell key kept."""
    plain, sweeps = split_sweeps(overrides)
    combinations = math.prod(len(s.texts) for s in sweeps)
    if any(o.split("=", 1)[0] == "grid" for o in plain):
        return _expand_over_grid(plain, sweeps, combinations)
    refuse_too_many(combinations, MAX_CELLS, "the sweep")
    value_sweeps = [s for s in sweeps if _settable(s)]
    group_sweeps = [s for s in sweeps if s not in value_sweeps]
    cells: dict[str, dict[str, Any]] = {}
    for group_combo in itertools.product(*(s.texts for s in group_sweeps)):
        # composed with each value sweep's first value, so Hydra names a key the config lacks
        chosen = last_wins(plain + list(group_combo) + [s.texts[0] for s in value_sweeps])
        composed = compose_config(chosen)
        for values in itertools.product(*(s.values for s in value_sweeps)):
            cfg = with_values(composed, [s.key for s in value_sweeps], values)
            if value_sweeps:
                check_values_set(cfg, chosen)
            cfg = finalize(cfg)
            cells.setdefault(cfg["key"], cfg)
    return list(cells.values())


def _expand_over_grid(plain: list[str], sweeps: list[Sweep], combinations: int) -> list[dict[str, Any]]:
    first = compose_config(last_wins(plain + [s.texts[0] for s in sweeps])).get("grid") or {}
    per_grid = math.prod(len(v) for v in (first.get("axes") or {}).values())
    refuse_too_many(combinations * per_grid, grid_max_cells(first), "the sweep over the grid")
    cells: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(s.texts for s in sweeps)):
        for cfg in expand_grid(last_wins(plain + list(combo))):
            cells.setdefault(cfg["key"], cfg)
    return list(cells.values())


def _settable(sweep: Sweep) -> bool:
    """A sweep whose values can be set on a composed config: a settable key, and plain values
    (numbers, booleans, null, strings without interpolation; lists and dicts go through Hydra)."""
    return settable_value(sweep.key) and all(
        v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and "${" not in v) for v in sweep.values)

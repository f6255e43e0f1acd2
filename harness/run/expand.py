"""Overrides -> cells: a grid's axes and Hydra's `-m` sweeps, composed as few times as they can be.

A grid config (configs/grid/*.yaml) names its axes, e.g. {arch: [...], method: [...], seed: [...]};
a sweep is `-m method=erm,pgd_at seed=0,1,2` (harness/run/sweep.py parses it). Both mean every
combination. Hydra composes once per combination of the values that pick config files (method,
arch, ...) or that a `${...}` interpolation reads; a plain value (seed, trainer.epochs, ...) is set
on the composed config: 10,000 cells over 10 seeds compose 1,000 times, not 10,000. Each cell is
finalized (absolute paths, key, label) and keyed by what it computes, so duplicates collapse.
Nothing here imports torch: `status` and `compare` expand grids too.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import re
from importlib import resources
from typing import Any

from harness.core.config import ConfigError, compose_config, finalize
from harness.run.labels import distinguish_labels

MAX_CELLS = 100_000  # grid.max_cells' default: a typo like seed=range(0,100000) is refused, not composed


def expand_grid(overrides: list[str]) -> list[dict[str, Any]]:
    """All cells of the grid the overrides select (`grid=<name>`), as finalized configs."""
    base = compose_config(overrides)
    grid = base.get("grid")
    if not grid:
        raise ConfigError("no grid selected: pass grid=<name> (see configs/grid/)")
    axes: dict[str, list[Any]] = grid.get("axes") or {}
    if not axes or not all(axes.values()):
        raise ConfigError(f"grid '{grid.get('name')}' has no axes or an empty one: give each axis values, "
                          f"e.g. grid.axes.model=[timm:resnet18] for grid=eval")
    refuse_too_many(math.prod(len(v) for v in axes.values()), grid_max_cells(grid), f"grid '{grid.get('name')}'")
    fixed = list(grid.get("overrides") or [])
    user = [o for o in overrides if not o.startswith("grid=")]
    user_keys = {o.split("=", 1)[0].lstrip("+~") for o in user}
    # Hydra composes once per combination of the axes that pick config files (method, arch, ...);
    # plain values (seed, trainer.epochs, ...) that no ${...} interpolation reads are set on the
    # composed config: 10,000 cells over 10 seeds compose 1,000 times, not 10,000.
    value_axes = [n for n in axes if plain_value_axis(n) and n not in user_keys]
    group_axes = [n for n in axes if n not in value_axes]
    cells: dict[str, dict[str, Any]] = {}
    for group_values in itertools.product(*(axes[n] for n in group_axes)):
        axis_overrides = [f"{n}={_override_value(v, n)}" for n, v in zip(group_axes, group_values)]
        # grid's fixed settings first, then the axis values, then the user's own overrides
        composed = compose_config(last_wins(fixed + axis_overrides + user + [f"grid={grid['name']}"]))
        for values in itertools.product(*(axes[n] for n in value_axes)):
            cfg = finalize(with_values(composed, value_axes, values))
            cells.setdefault(cfg["key"], cfg)
    return distinguish_labels(list(cells.values()))  # cells differing only in e.g. lr get distinct labels


def grid_max_cells(grid: dict[str, Any] | None) -> int:
    """The selected grid's `max_cells` (the default without a grid or without the key)."""
    value = (grid or {}).get("max_cells", MAX_CELLS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"grid.max_cells must be a whole number >= 1, got {value!r}. Fix: grid.max_cells=<N>")
    return value


def refuse_too_many(count: int, limit: int, what: str) -> None:
    """Refuse a grid of more combinations than the limit before anything is composed or planned."""
    if count > limit:
        raise ConfigError(f"{what} has {count:,} combinations, more than grid.max_cells={limit:,}. Fix: check the "
                          f"axes and sweeps for a typo, split the grid, or raise the limit (grid.max_cells={count})")


@functools.lru_cache(maxsize=1)
def _interpolated_keys() -> frozenset[str]:
    """Keys some config reads through `${...}` (their value must go through Hydra)."""
    folder = resources.files("configs")
    found: set[str] = set()
    for path in _yaml_files(folder):
        found |= set(re.findall(r"\$\{([A-Za-z0-9_.]+)\}", path.read_text()))
    return frozenset(found)


def _yaml_files(folder: Any) -> list[Any]:
    out = []
    for entry in folder.iterdir():
        if entry.is_dir():
            out += _yaml_files(entry)
        elif entry.name.endswith(".yaml"):
            out.append(entry)
    return out


def plain_value_axis(name: str) -> bool:
    """A grid axis that sets one value (not in a config group, not read by an interpolation)."""
    return not (resources.files("configs") / name.split(".")[0]).is_dir() and settable_value(name)


def settable_value(name: str) -> bool:
    """A key whose value may be set on a composed config instead of through Hydra: it selects no
    config file (`method=`, `method/base=`), adds or deletes nothing (`+`, `~`), is not rewritten
    before composing (`model=`, `attack.torchattacks.*`) and no `${...}` interpolation reads it."""
    if name.startswith(("+", "~", "attack.torchattacks.")) or "/" in name:
        return False
    if "." not in name and (resources.files("configs") / name).is_dir():
        return False
    return not any(k == name or k.startswith(name + ".") or name.startswith(k + ".") for k in _interpolated_keys())


def with_values(composed: dict[str, Any], keys: list[str], values: tuple[Any, ...]) -> dict[str, Any]:
    """A copy of a composed config with these keys set to these values (Hydra's `key=value`)."""
    cfg = json.loads(json.dumps(composed))
    for key, value in zip(keys, values):
        set_value(cfg, key, value)
    return cfg


def set_value(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set an existing key (Hydra's `key=value`); a key the config lacks is refused, as Hydra would."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        raise ConfigError(f"'{dotted}': no such key in the config. Fix: name an existing key, or "
                          f"'+{dotted}' to add one")
    node[leaf] = copy.deepcopy(value)


def last_wins(overrides: list[str]) -> list[str]:
    """Drop earlier overrides of the same key (Hydra rejects two values for one group)."""
    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    return list(by_key.values())


def _override_value(value: Any, name: str = "") -> str:
    """An axis value as Hydra override text: null, true/false, numbers, lists and dicts in Hydra's
    grammar ({per_class:1000}), strings quoted when they hold characters the grammar reserves.
    A model axis entry {id, checkpoint, ...} stays JSON (harness.core.config.model_overrides reads it)."""
    if isinstance(value, dict) and name == "model":
        return json.dumps(value, sort_keys=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:@+-]*", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

"""The exact `robustgrid run ...` command that reproduces a cell, from its recorded config.

A cell stores its resolved config (config_json). We pick the same config groups (data, arch,
method, backdoor, attack list, analysis list), compose Hydra's defaults for them, and write one
override per value that differs: `key=value`, `+key=value` for a key the defaults lack, `~key`
for one they have and the cell does not. Where a cell runs (results_dir, ray, resources, data
paths, trainer device/workers/progress) is left to the reader, and none of it enters the cell key,
so the command recomposes a config with the same key (tests/test_leaderboard_pages.py checks it).
"""
from __future__ import annotations

import json
import re
import shlex
from functools import lru_cache
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from harness.core.config import NON_SEMANTIC_DATA_KEYS, NON_SEMANTIC_KEYS, NON_SEMANTIC_TRAINER_KEYS, compose_config

_BARE_CHARS = re.compile(r"[A-Za-z0-9_./-]+")
SKIP = ({*NON_SEMANTIC_KEYS} | {f"data.{k}" for k in NON_SEMANTIC_DATA_KEYS}
        | {f"trainer.{k}" for k in NON_SEMANTIC_TRAINER_KEYS})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


@lru_cache(maxsize=4096)
def _bare_ok(text: str) -> bool:
    """Whether Hydra reads `text`, unquoted, back as this very string."""
    try:
        return OverridesParser.create().parse_override(f"k={text}").value() == text
    except Exception:
        return False


def literal(value: Any) -> str:
    """A value in Hydra's override grammar, bare where Hydra reads it back as the same string."""
    if isinstance(value, str):
        if _BARE_CHARS.fullmatch(value) and _bare_ok(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


@lru_cache(maxsize=65536)
def _skipped(path: str) -> bool:  # cached: every cell of a grid has the same paths
    return any(path == s or path.startswith(s + ".") for s in SKIP)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON text (1 and 1.0 differ: the override must recompose the very value)."""
    if type(a) is type(b) and isinstance(a, (str, int, bool)) or a is None or b is None:
        return a == b
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


@lru_cache(maxsize=256)
def _defaults(groups: tuple[str, ...]) -> dict[str, Any]:
    return _flatten(compose_config(list(groups)))


def reproduce_overrides(cfg: dict[str, Any]) -> list[str]:
    """Hydra overrides that recompose `cfg` (a cell's resolved config)."""
    groups = [f"{g}={cfg[g]['name']}" for g in ("data", "arch", "method", "backdoor")
              if isinstance(cfg.get(g), dict) and cfg[g].get("name")]
    for g in ("attack", "analysis"):
        if isinstance(cfg.get(g), dict):
            groups.append(f"{g}=[{','.join(cfg[g])}]")
    defaults = _defaults(tuple(groups))
    mine = {p: v for p, v in _flatten({k: v for k, v in cfg.items()}).items() if not _skipped(p)}
    out = list(groups)
    for path, value in mine.items():
        if path not in defaults:
            out.append(f"+{path}={literal(value)}")
        elif not _same(defaults[path], value):
            out.append(f"{path}={literal(value)}")
    out += [f"~{path}" for path in defaults if path not in mine and not _skipped(path)
            and not any(p.startswith(path + ".") for p in mine)]
    return out


def reproduce_command(config_json: str | None) -> str | None:
    """`robustgrid run ...` for a cell, shell-quoted; None without a readable config."""
    try:
        cfg = json.loads(config_json or "")
        overrides = reproduce_overrides(cfg)
    except Exception:  # an old or foreign row: the page says the command is unknown
        return None
    return "robustgrid run " + " ".join(shlex.quote(o) for o in overrides)

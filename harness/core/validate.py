"""Check every numeric setting of a cell before any training or Ray start.

A NaN eps, a negative lr or `seed=abc` used to surface late (after training, or as a torch error
naming no key). `validate_numbers` walks the resolved cell config once: every number anywhere must
be finite, and the settings below must also be of the right kind and in range. Each error names
the key, the value and the fix, so the user can correct the override they typed.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterator

from harness.core.config import ConfigError

# key path -> (kind, lowest allowed, whether the lowest is allowed, whether null is allowed)
# kinds: "int" (whole number), "float" (any finite number, '8/255' strings too)
RULES: dict[str, tuple[str, float, bool, bool]] = {
    "seed": ("int", 0, True, False),
    "trainer.epochs": ("int", 1, True, False),
    "trainer.batch_size": ("int", 1, True, False),
    "trainer.world_size": ("int", 1, True, False),
    "trainer.num_workers": ("int", 0, True, False),
    "trainer.threads_per_rank": ("int", 1, True, False),
    "trainer.optimizer.lr": ("float", 0, False, False),
    "trainer.optimizer.weight_decay": ("float", 0, True, True),
    "trainer.optimizer.momentum": ("float", 0, True, True),
    "trainer.schedule.warmup_epochs": ("float", 0, True, True),
    "trainer.validation.fraction": ("float", 0, True, True),
    "trainer.validation.max": ("int", 0, True, True),
    "trainer.probe_every": ("int", 1, True, False),
    "trainer.probe_budget": ("float", 0, True, False),
    **{f"trainer.flags.{name}": ("float", 0, True, False) for name in (
        "catastrophic_drop", "robust_overfit_gap", "collapse_share", "chance_margin", "weak_attack_gap", "z")},
    "trainer.flags.min_images": ("int", 0, True, False),
    "data.eps": ("float", 0, True, True),
    "data.eps_l2": ("float", 0, True, True),
    "data.train_limit": ("int", 1, True, True),
    "data.img_size": ("int", 1, True, True),
    "eval.batch_size": ("int", 1, True, False),
    "eval.limit": ("int", 1, True, True),
    "eval.integrity_points": ("int", 0, True, True),
    "eval.neuron_sensitivity.limit": ("int", 1, True, True),
    "eval.neuron_sensitivity.steps": ("int", 1, True, True),
    "eval.neuron_sensitivity.batch_size": ("int", 1, True, True),
    "resources.cpus": ("float", 0, False, False),
    "resources.gpus": ("float", 0, True, True),
    "resources.memory_gb": ("float", 0, False, True),
    "resources.max_retries": ("int", -1, True, True),
    "resources.train_max_failures": ("int", -1, True, True),
    "ray.num_cpus": ("int", 1, True, True),
}
# settings of every eval attack (attack.<label>.<name>) and of a method's train-time attack
ATTACK_RULES: dict[str, tuple[str, float, bool, bool]] = {
    "eps": ("float", 0, True, True),
    "step_size": ("float", 0, False, True),
    "steps": ("int", 1, True, True),
    "n_iter": ("int", 1, True, True),
    "n_restarts": ("int", 1, True, True),
    "n_queries": ("int", 1, True, True),
    "seed": ("int", 0, True, True),
}


def validate_numbers(cfg: dict[str, Any], train_size: int | None = None) -> None:
    """Raise ConfigError naming the key for the first bad number in the cell config `cfg`.

    `train_size`: images in the cell's training split (after data.train_limit), when the dataset is
    prepared; a global batch larger than it would silently train one full-batch step per epoch.
    """
    for path, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value} is not a finite number; set {path} to a finite value")
    for path, rule in RULES.items():
        _check(cfg, path, rule)
    for label, attack in (cfg.get("attack") or {}).items():
        for name, rule in ATTACK_RULES.items():
            _check(cfg, f"attack.{label}.{name}", rule)
    method_attack = (cfg.get("method") or {}).get("attack")
    if isinstance(method_attack, dict):
        for name, rule in ATTACK_RULES.items():
            _check(cfg, f"method.attack.{name}", rule)
    batch = int(_get(cfg, "trainer.batch_size"))
    if train_size is not None and batch > train_size:
        limit = _get(cfg, "data.train_limit")
        held = _get(cfg, "trainer.validation")
        split = f"{train_size} images" + (f" with data.train_limit={limit}" if limit is not None else "") + (
            ", after trainer.validation holds out its share" if isinstance(held, dict) and held.get("fraction") else "")
        raise ConfigError(f"trainer.batch_size={batch} is larger than the training split of "
                          f"data={_get(cfg, 'data.name')} ({split}); each epoch would be one full-batch step. "
                          f"Set trainer.batch_size to at most {train_size}")


def _check(cfg: dict[str, Any], path: str, rule: tuple[str, float, bool, bool]) -> None:
    kind, low, low_ok, nullable = rule
    found, value = _lookup(cfg, path)
    if not found:
        return
    if value is None:
        if not nullable:
            raise ConfigError(f"{path} must be set (got null); pass {path}=<value>")
        return
    number = _as_number(value)
    if number is None or (kind == "int" and not float(number).is_integer()):
        what = "a whole number" if kind == "int" else "a number (e.g. 0.1 or 8/255)"
        raise ConfigError(f"{path}={value!r} is not {what}; fix the override {path}=...")
    if not math.isfinite(number):
        raise ConfigError(f"{path}={value} is not a finite number; set {path} to a finite value")
    if number < low or (number == low and not low_ok):
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        raise ConfigError(f"{path}={value} is out of range: it must be {bound}; fix the override {path}=...")


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
            return float(text)
        try:
            return float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _lookup(cfg: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _get(cfg: dict[str, Any], path: str) -> Any:
    return _lookup(cfg, path)[1]


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, node

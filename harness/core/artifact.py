"""The artifact node's description: something built once per key before the cells that need it.

Declared by analyses (ACE's DDPM), by a cell's training data (the generated set and its generator)
and by learned poisons (a clean surrogate, then the trigger); the plan (harness/run/plan.py) makes
each one node. It lives here, at the bottom layer, because all three declare it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Artifact:
    """Something analyses (or a cell's training data) need built first, once per `key` however many
    cells need it."""

    key: str  # identity and dedup key, e.g. "ddpm/<hash>"
    label: str  # shown in logs and the plan
    build: Callable[..., Any]  # build(device=...) builds and caches it (picklable: a function or partial)
    inputs: tuple[str, ...] = ()  # keys of artifacts built before this one (a generated set: its generator)
    options: dict[str, Any] | None = None  # Ray options replacing one rank's (a generated set's node only
    #                                        orchestrates: no GPU, its shard tasks hold the GPUs)

"""A learned poison's artifact nodes for the plan: its clean surrogate, then its trigger arrays.

`poison_artifacts(cfg)` is [] for every other poison. Both nodes are keyed by content (harness/
backdoor/learned.py and surrogate.py), so a grid of many seeds and defenses over one poison builds
each once; LF and LC on one dataset and architecture share one surrogate.
"""
from __future__ import annotations

import functools
from typing import Any

from harness.backdoor.learned import ensure_poison_artifact, learned_poison, poison_artifact_key, progress
from harness.backdoor.surrogate import ensure_surrogate, surrogate_key
from harness.core.artifact import Artifact


def poison_artifacts(cfg: dict[str, Any]) -> list[Artifact]:
    """The artifacts the cell's poison needs, in build order (the trigger's is last)."""
    poison = learned_poison(cfg)
    if poison is None:
        return []
    data_dir, results_dir, arch = str(cfg["data"]["dir"]), str(cfg["results_dir"]), cfg["arch"]
    out: list[Artifact] = []
    if poison.needs_surrogate:
        skey = surrogate_key(data_dir, arch, poison.surrogate)
        out.append(Artifact(f"clean_model/{skey}", f"clean surrogate ({arch.get('name')}, "
                                                   f"{poison.surrogate.epochs} epochs)",
                            functools.partial(ensure_surrogate, data_dir, results_dir, arch, poison.surrogate,
                                              log=progress)))
    bcfg = {k: v for k, v in cfg["backdoor"].items() if k != "clean_train"}
    key = poison_artifact_key(poison, data_dir, arch)
    out.append(Artifact(f"poison/{key}", f"{poison.name} trigger",
                        functools.partial(ensure_poison_artifact, bcfg, data_dir, results_dir, arch, log=progress),
                        inputs=tuple(a.key for a in out)))
    return out

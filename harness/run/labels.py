"""What the grid log says about a cell: a label that tells it apart, and why it failed.

A cell's label is `arch/method/s<seed>` (harness.core.config.finalize). Cells that differ in
anything else (lr, beta, eps, epochs) used to share that label, so the grid log and the status
list could not tell them apart. `distinguish_labels` appends, within each group of cells sharing
a label, the settings whose values differ inside the group, e.g.
`test_resnet/erm/s0 trainer.optimizer.lr=0.01`. Computed once per grid, linear in cells.
A failed cell's log line ends with the first line of its error (`first_line`), so the reason is
on screen without opening the results.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Iterator

# where/how a cell runs, or stamps derived from the config: never what sets cells apart
IGNORED = ("key", "train_key", "cell_id", "label", "code_version", "grid", "results_dir", "leaderboard_dir", "ray", "resources",
           "data.dir", "data.root")


def distinguish_labels(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells with each label extended by the overrides that set it apart (in place; returned)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cfg in cells:
        groups[cfg["label"]].append(cfg)
    for group in groups.values():
        if len(group) < 2:
            continue
        leaves = [dict(_leaves(cfg)) for cfg in group]
        paths = sorted(set().union(*leaves))
        differing = [p for p in paths if len({_text(leaf.get(p)) for leaf in leaves}) > 1]
        for cfg, leaf in zip(group, leaves):
            extra = " ".join(f"{p}={_text(leaf.get(p))}" for p in differing)
            if extra:
                cfg["label"] = f"{cfg['label']} {extra}"
    return cells


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if prefix in IGNORED:
        return
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def first_line(error: str | None) -> str:
    """': <first non-empty line of error>' for a log line, '' when there is no error."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return f": {lines[0]}" if lines else ""

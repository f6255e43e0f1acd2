"""Keep models trained differently apart: a leaderboard row is one (arch, method) *and one training
setup*, never an average over runs that differ in more than the seed.

Without this, `grid=demo` (8x8, trainer=demo) and `grid=ace` (16x16 upsampling) would both put an
ERM test_resnet into the digits L-inf table, and the site would average them as two "seeds". The
training setup of a result row is its resolved config (`config_json`) reduced to what shapes the
trained model, the same reduction as the train key (harness.core.config), minus the seed and the code
version. When one (dataset, arch, method) has several setups, each gets a label naming only the
config values that differ between them (rows trained on different poisons are apart already),
e.g. `erm [data.img_size=16, trainer.epochs=10]`, and that label is part of the row's method name
on every table. One setup: the name is unchanged.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pyarrow as pa

from harness.core.config import training_setup

MAX_LABEL_PARTS = 4  # more differing values than this are summarised as "+N more"


_UNSET = object()  # a setup that lacks the value


def _differing(values: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """[(path, {setup id: value there, or unset})] of the config values that differ between setups.
    Where every setup that has the value holds a dict the comparison goes inside it; where one holds
    a dict and another a scalar (`data.generated`: null in one arm, {per_class: 1000} in another)
    the whole value is one difference, named once."""
    present = [v for v in values.values() if v is not _UNSET]
    if present and all(isinstance(v, dict) for v in present):  # a setup without the dict: unset inside it
        keys = sorted({k for v in present for k in v})
        return [d for k in keys for d in _differing(
            {sid: _UNSET if v is _UNSET else v.get(k, _UNSET) for sid, v in values.items()}, f"{prefix}{k}.")]
    if len({json.dumps(v, sort_keys=True, default=str) if v is not _UNSET else "<unset>"
            for v in values.values()}) > 1:
        return [(prefix[:-1], values)]
    return []


def _show(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)


def setup_labels(setups: dict[str, dict[str, Any]]) -> dict[str, str]:
    """For setups of one (dataset, arch, method): id -> label of the values that set it apart."""
    differing = _differing(dict(setups))
    labels = {}
    for sid in setups:
        parts = [f"{path}={_show(values[sid])}" for path, values in differing]
        if len(parts) > MAX_LABEL_PARTS:
            parts = parts[:MAX_LABEL_PARTS] + [f"+{len(parts) - MAX_LABEL_PARTS} more"]
        labels[sid] = ", ".join(parts) or sid
    return labels


def label_setups(results: pa.Table) -> pa.Table:
    """`results` with `method` suffixed ` [label]` on rows whose (dataset, arch, method) was
    trained in more than one setup. Rows without a config (older files) count as one setup."""
    if results.num_rows == 0 or "config_json" not in results.column_names:
        return results
    configs = results.column("config_json").to_pylist()
    datasets = results.column("dataset").to_pylist()
    archs = results.column("arch").to_pylist()
    methods = results.column("method").to_pylist()
    # rows trained on different poisons are told apart by the tables already (lp_view, backdoor)
    poisons = (results.column("backdoor").to_pylist() if "backdoor" in results.column_names
               else [None] * results.num_rows)
    setup_of_row: list[str | None] = []
    setups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    cache: dict[str, tuple[str, dict[str, Any]]] = {}
    groups = list(zip(datasets, archs, methods, poisons))
    for text, group in zip(configs, groups):
        if not text:
            setup_of_row.append(None)
            continue
        if text not in cache:
            cache[text] = training_setup(json.loads(text))
        sid, setup = cache[text]
        setups[group][sid] = setup
        setup_of_row.append(sid)
    labels = {group: setup_labels(s) for group, s in setups.items() if len(s) > 1}
    if not labels:
        return results
    renamed = [
        f"{group[2]} [{labels[group][sid]}]" if sid is not None and group in labels else group[2]
        for group, sid in zip(groups, setup_of_row)
    ]
    index = results.column_names.index("method")
    return results.set_column(index, "method", pa.array(renamed, type=pa.string()))

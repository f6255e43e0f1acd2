"""Per-sample evaluation results: which attack first broke each test point, and resuming from
the survivors.

Each evaluated cell writes `<results_dir>/samples/<key>.parquet` beside its result file (the
`samples/` folder keeps it out of the result readers' `*.parquet` glob): one row per
(eval attack, test point) with the point's index in the test split, its label, whether the clean
image was classified correctly, whether it is robust, and `broken_by`: 'clean' (misclassified
before any attack), the attack that fooled it (for AutoAttack: the first component that did,
e.g. 'apgd_t'), 'previous:<attack>' (broken in the evaluation resumed from), or null (robust).

`eval.survivors_from=<cell key or path to a samples file>` makes a later, stronger evaluation
attack only the points that survived *every* attack of that earlier evaluation: the others are
counted as broken, so the new robust accuracy is that of the union of both evaluations' attacks
(the AutoAttack reference's resume semantics). The earlier file must come from the same trained
model (same train key) and cover exactly the points evaluated now; anything else is an error
raised before any attack runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from harness.attacks.base import Attack
from harness.store.storage import open_store, parquet_from_bytes
from harness.core.registry import ANALYSES
from harness.eval.stage import Analysis, EvalContext

CLEAN = "clean"
PREVIOUS = "previous:"

SAMPLES_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("train_key", pa.string()),
    pa.field("attack", pa.string(), nullable=False),  # the eval attack's name
    pa.field("index", pa.int64(), nullable=False),  # position in the (limited) test split
    pa.field("label", pa.int64()),
    pa.field("clean_correct", pa.bool_()),
    pa.field("robust", pa.bool_()),
    pa.field("broken_by", pa.string()),
])


@dataclass
class Survivors:
    """The points an earlier evaluation left robust under all of its attacks."""

    source: str
    n_eval: int
    robust: torch.Tensor  # bool (n_eval,), by test index
    broken_by: list[str | None]  # the earlier evaluation's first breaking attack, per point


def samples_path(results_dir: str | os.PathLike, key: str) -> Path:
    return Path(results_dir) / "samples" / f"{key}.parquet"


def run_attack(attack: Attack, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
    """x_adv and, per point, the attack (or AutoAttack component) that fooled it, else None."""
    if hasattr(attack, "perturb_with_log"):
        x_adv, broken_by = attack.perturb_with_log(model, x, y)
        return x_adv, [None if b == CLEAN else b for b in broken_by]
    x_adv = attack(model, x, y)
    with torch.no_grad():
        fooled = (model(x_adv).argmax(1) != y).tolist()
    return x_adv, [attack.name if f else None for f in fooled]


def samples_table(key: str, train_key: str | None, per_attack: dict[str, list[str | None]],
                  labels: torch.Tensor, clean_ok: torch.Tensor) -> pa.Table:
    """One row per (attack, point); per_attack[name][i] is point i's broken_by."""
    cols: dict[str, list[Any]] = {name: [] for name in SAMPLES_SCHEMA.names}
    n = len(labels)
    for attack, broken_by in per_attack.items():
        cols["key"] += [key] * n
        cols["train_key"] += [train_key] * n
        cols["attack"] += [attack] * n
        cols["index"] += list(range(n))
        cols["label"] += labels.tolist()
        cols["clean_correct"] += clean_ok.tolist()
        cols["robust"] += [b is None for b in broken_by]
        cols["broken_by"] += broken_by
    return pa.table(cols, schema=SAMPLES_SCHEMA)


def write_samples(results_dir: str | os.PathLike, key: str, table: pa.Table) -> str:
    """Atomic write through the results store (temp name, then moved into place; local folder or
    URI), beside the cell's result file. Returns the file's location."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    store = open_store(results_dir)
    store.write_bytes(f"samples/{key}.parquet", buf.getvalue().to_pybytes())
    return store.uri("samples", f"{key}.parquet")


def _read_source(results_dir: str | os.PathLike, source: str) -> tuple[str, pa.Table]:
    """A path to a samples file, or a cell key in results_dir (a local folder or a URI)."""
    path = Path(source).expanduser()
    if path.suffix == ".parquet" or os.sep in source:
        if path.is_file():
            return str(path), pq.read_table(path)
        where = str(path)
    else:
        store = open_store(results_dir)
        data = store.read_bytes(f"samples/{source}.parquet")
        where = store.uri("samples", f"{source}.parquet")
        if data is not None:
            return where, parquet_from_bytes(data)
    raise FileNotFoundError(
        f"eval.survivors_from={source!r}: no per-sample file at {where}. Fix: give the key "
        f"of a cell evaluated in {results_dir} (its samples/<key>.parquet) or the path of a "
        f"samples parquet file")


def load_survivors(results_dir: str | os.PathLike, source: str, *, train_key: str | None,
                   n_eval: int) -> Survivors:
    """Read an earlier evaluation's per-sample file and check it fits the evaluation now."""
    path, table = _read_source(results_dir, source)
    missing = [n for n in ("index", "robust", "broken_by", "attack") if n not in table.column_names]
    if missing:
        raise ValueError(f"eval.survivors_from: {path} is not a per-sample file (no {missing})")
    keys = set(table.column("train_key").to_pylist()) if "train_key" in table.column_names else set()
    if train_key is not None and keys and keys != {train_key}:
        raise ValueError(f"eval.survivors_from: {path} was evaluated on another trained model "
                         f"(train key {sorted(keys)}, now {train_key}); resume only from an "
                         f"evaluation of the same checkpoint")
    index = torch.tensor(table.column("index").to_pylist(), dtype=torch.long)
    n_prev = int(index.max()) + 1 if len(index) else 0
    if n_prev != n_eval:
        raise ValueError(f"eval.survivors_from: {path} covers {n_prev} test points, this evaluation "
                         f"{n_eval}; use the same eval.limit as the evaluation resumed from")
    robust = torch.ones(n_eval, dtype=torch.bool)
    broken_by: list[str | None] = [None] * n_eval
    for i, ok, by, attack in zip(index.tolist(), table.column("robust").to_pylist(),
                                 table.column("broken_by").to_pylist(), table.column("attack").to_pylist()):
        if not ok:
            robust[i] = False
            if broken_by[i] is None:
                broken_by[i] = CLEAN if by == CLEAN else f"{PREVIOUS}{by or attack}"
    return Survivors(str(path), n_eval, robust, broken_by)


@ANALYSES.register("samples")
class PerSampleResults(Analysis):
    """Per-sample outcomes of every attack, `samples/<key>.parquet` beside the cell's result: what
    `eval.survivors_from` resumes from, and what a reader audits one image at a time."""

    always = True
    order = 20

    def run(self, ctx: EvalContext) -> None:
        cfg, result = ctx.cfg, ctx.result
        table = samples_table(cfg["key"], cfg.get("train_key"), {r.attack.name: r.broken_by for r in result.attacks},
                              result.labels, result.clean_ok)
        write_samples(cfg["results_dir"], cfg["key"], table)

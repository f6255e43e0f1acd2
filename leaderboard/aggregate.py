"""Leaderboard aggregation in DuckDB: attack -> cell -> (arch, method) row, per setting.

Why this order: the worst case must be taken inside one trained model (one checkpoint = one
seed; cells sharing a checkpoint, which differ only in eval attacks or analyses, are pooled),
so a model's worst-case robust accuracy is min(robust_acc) over its eval attacks, and only then
are models averaged over seeds. Taking min over per-attack means would overstate robustness.

A setting is one table: for the Lp track, one (dataset, norm, eps). A cell evaluated under
attacks of several threat models (e.g. PGD-Linf and PGD-L2) appears in each of those settings,
and its worst case is taken only over the attacks of that setting. Its headline is the attack
named "autoattack" when every row was evaluated with it, else the worst case over attacks.
Rows are ranked by headline, numerically (floats from Parquet to the sort), with every row that
carries an integrity flag ranked after all unflagged rows. Failed cells (any row with
status != 'ok') are kept apart and never ranked. std is the sample std over seeds; None for
one seed. Cost = (train_seconds + eval_seconds) * world_size / 3600 hours per cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from leaderboard.backdoor import backdoor_tables, lp_view
from leaderboard.cells import Cell, group_cells
from leaderboard.format import cost_unit, setting_file
from leaderboard.setups import label_setups

HEADLINE_ATTACK = "autoattack"
LP_TRACK = "lp"
TRACK_TITLES = {LP_TRACK: "Lp robustness"}  # a backdoor track adds its id and title here

# Only the columns the aggregation reads (timestamps/maps stay out of DuckDB's conversions).
_COLUMNS = [
    "key", "grid", "status", "error", "dataset", "arch", "method", "seed",
    "attack", "norm", "eps", "clean_acc", "robust_acc", "flags",
    "train_seconds", "eval_seconds", "world_size", "device", "images_per_second", "checkpoint_sha256",
    "neuron_sensitivity", "model_id",
]

_PRELUDE = """
WITH
cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key),
-- One trained model = one checkpoint: cells that share it (differing only in eval attacks or
-- post-eval analyses) are one model, one seed, their attacks pooled. An eval-only row (robustgrid
-- eval) is apart by its model_id: the same weights under another id/normalisation are another model.
ok_rows AS (SELECT r.*, coalesce(r.checkpoint_sha256, r.key) || coalesce(' ' || r.model_id, '') AS model
            FROM results r JOIN cell_status s USING (key) WHERE s.ok),
cells AS (
    SELECT model, norm, eps, min(key) AS key, list_sort(list_distinct(list(key))) AS model_keys,
           any_value(dataset) AS dataset,
           any_value(arch) AS arch, any_value(method) AS method, any_value(seed) AS seed,
           avg(clean_acc) AS clean,
           list_sort(list_distinct(flatten(coalesce(list(flags) FILTER (WHERE flags IS NOT NULL), [])))) AS flags,
           CASE WHEN max(train_seconds) IS NULL AND max(eval_seconds) IS NULL THEN NULL
                ELSE (coalesce(max(train_seconds), 0) + coalesce(max(eval_seconds), 0))
                     * coalesce(max(world_size), 1) / 3600.0 END AS hours,
           any_value(device) AS device, avg(images_per_second) AS ips,
           avg(neuron_sensitivity) AS ns
    FROM ok_rows GROUP BY model, norm, eps
),
cell_attack AS (
    SELECT model, norm, eps, attack, avg(robust_acc) AS robust
    FROM ok_rows WHERE attack IS NOT NULL AND robust_acc IS NOT NULL
    GROUP BY model, norm, eps, attack
),
cell_worst AS (SELECT model, norm, eps, min(robust) AS worst FROM cell_attack GROUP BY model, norm, eps)
"""

_ROWS_SQL = _PRELUDE + """
SELECT c.dataset, c.norm, c.eps, c.arch, c.method,
       count(*) AS n_seeds,
       list(c.key ORDER BY c.seed, c.key) AS keys,
       list(c.flags ORDER BY c.seed, c.key) AS flags,
       flatten(list(c.model_keys ORDER BY c.seed, c.key)) AS all_keys,
       avg(c.clean) AS clean_mean, stddev_samp(c.clean) AS clean_std,
       avg(w.worst) AS worst_mean, stddev_samp(w.worst) AS worst_std,
       avg(c.hours) AS hours_mean, stddev_samp(c.hours) AS hours_std, sum(c.hours) AS hours_total,
       list_sort(list_distinct(list(c.device) FILTER (WHERE c.device IS NOT NULL))) AS devices,
       avg(c.ips) AS ips_mean, stddev_samp(c.ips) AS ips_std,
       avg(c.ns) AS ns_mean, stddev_samp(c.ns) AS ns_std
FROM cells c LEFT JOIN cell_worst w
  ON w.model = c.model AND w.norm IS NOT DISTINCT FROM c.norm AND w.eps IS NOT DISTINCT FROM c.eps
GROUP BY c.dataset, c.norm, c.eps, c.arch, c.method
ORDER BY c.dataset NULLS LAST, c.norm NULLS LAST, c.eps NULLS LAST, c.arch, c.method
"""

_ATTACKS_SQL = _PRELUDE + """
SELECT c.dataset, c.norm, c.eps, c.arch, c.method, a.attack,
       avg(a.robust) AS mean, stddev_samp(a.robust) AS std, count(*) AS n
FROM cell_attack a JOIN cells c
  ON a.model = c.model AND a.norm IS NOT DISTINCT FROM c.norm AND a.eps IS NOT DISTINCT FROM c.eps
GROUP BY c.dataset, c.norm, c.eps, c.arch, c.method, a.attack
ORDER BY a.attack
"""

_FAILED_SQL = """
WITH cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key)
SELECT r.key, any_value(grid), any_value(dataset), any_value(arch), any_value(method),
       any_value(seed), any_value(norm), any_value(eps),
       string_agg(DISTINCT error, chr(10)) FILTER (WHERE error IS NOT NULL)
FROM results r JOIN cell_status s USING (key) WHERE NOT s.ok
GROUP BY r.key
ORDER BY any_value(dataset) NULLS LAST, any_value(arch) NULLS LAST,
         any_value(method) NULLS LAST, any_value(seed) NULLS LAST, r.key
"""


@dataclass
class Leaderboard:
    """Everything the site shows; `tables`/`failed` are already in data.json shape."""

    tables: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    cells: dict[str, Cell] = field(default_factory=dict)
    backdoor_tables: list[dict[str, Any]] = field(default_factory=list)  # leaderboard/backdoor.py
    n_cells: int = 0
    n_ok_cells: int = 0
    n_result_rows: int = 0

    @property
    def n_failed_cells(self) -> int:
        return len(self.failed)

    @property
    def n_leaderboard_rows(self) -> int:
        return sum(len(t["rows"]) for t in self.tables)

    @property
    def n_flagged_rows(self) -> int:
        return sum(1 for t in self.tables for r in t["rows"] if r["flagged"])


def _num(value: Any) -> float | None:
    """A finite float or None (NaN/inf would make data.json invalid JSON)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def first_line(text: str | None) -> str:
    """First non-empty line of an error message ('' when there is none)."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _headline(table: dict[str, Any]) -> dict[str, Any]:
    """Pick the setting's headline: AutoAttack when every row has it for every seed, else worst case."""
    rows = table["rows"]
    has_aa = HEADLINE_ATTACK in table["attacks"]
    if has_aa and all(r["robust"].get(HEADLINE_ATTACK, {}).get("n") == r["n_seeds"] for r in rows):
        return {"kind": "autoattack", "attack": HEADLINE_ATTACK, "label": "AutoAttack robust",
                "note": "Headline: robust accuracy under AutoAttack."}
    note = ("Headline: worst-case robust accuracy = per cell the minimum over its eval attacks ("
            + ", ".join(table["attacks"] or ["none"]) + "), then mean ± std over seeds.")
    if has_aa:
        note += " AutoAttack was not run on every cell here, so it is not the headline."
    return {"kind": "worst_case", "attack": None, "label": "worst-case robust", "note": note}


def _rank(table: dict[str, Any]) -> None:
    """Set each row's headline and sort: unflagged before flagged, then headline desc (missing last)."""
    headline = table["headline"]
    for row in table["rows"]:
        if headline["kind"] == "autoattack":
            stats = row["robust"][HEADLINE_ATTACK]
            row["headline_mean"], row["headline_std"] = stats["mean"], stats["std"]
        else:
            row["headline_mean"], row["headline_std"] = row["worst_robust_mean"], row["worst_robust_std"]
    table["rows"].sort(key=lambda r: (
        r["flagged"], r["headline_mean"] is None, -(r["headline_mean"] or 0.0), str(r["arch"]), str(r["method"]),
    ))
    for rank, row in enumerate(table["rows"], start=1):
        row["rank"] = rank


def newest_code_only(results: pa.Table) -> pa.Table:
    """Rows of the newest result of each cell: a cell recomputed after a code change keeps its
    older result in the store (status shows it stale), which must not count as another seed."""
    if "cell_id" not in results.column_names or results.num_rows == 0:
        return results
    con = duckdb.connect()
    try:
        con.register("r", results.select(["key", "cell_id", "finished_at"]))
        newest = [k for (k,) in con.execute(
            "SELECT arg_max(key, finished_at) FROM r WHERE cell_id IS NOT NULL GROUP BY cell_id").fetchall()]
    finally:
        con.close()
    keep = pc.or_(pc.is_null(results["cell_id"]), pc.is_in(results["key"], pa.array(newest, pa.string())))
    return results.filter(keep)


def aggregate(results: pa.Table) -> Leaderboard:
    """Aggregate a RESULT_SCHEMA table (from harness.store.results.read_results) into a Leaderboard."""
    results = label_setups(newest_code_only(results))  # once, for the Lp and the backdoor tables
    con = duckdb.connect()
    try:
        con.register("results", lp_view(results).select(_COLUMNS))
        row_records = con.execute(_ROWS_SQL).fetchall()
        attack_records = con.execute(_ATTACKS_SQL).fetchall()
        failed_records = con.execute(_FAILED_SQL).fetchall()
        n_cells = con.execute("SELECT count(DISTINCT key) FROM results").fetchone()[0]
    finally:
        con.close()

    robust: dict[tuple, dict[str, dict[str, Any]]] = {}
    for dataset, norm, eps, arch, method, attack, mean, std, n in attack_records:
        robust.setdefault((dataset, norm, eps, arch, method), {})[attack] = {
            "mean": _num(mean), "std": _num(std), "n": int(n),
        }

    tables: dict[tuple, dict[str, Any]] = {}  # insertion order = SQL order (dataset, norm, eps)
    for (dataset, norm, eps, arch, method, n_seeds, keys, flags, all_keys, clean_mean, clean_std,
         worst_mean, worst_std, hours_mean, hours_std, hours_total, devices, ips_mean, ips_std,
         ns_mean, ns_std) in row_records:
        table = tables.get((dataset, norm, eps))
        if table is None:
            table = tables[(dataset, norm, eps)] = {
                "track": LP_TRACK, "dataset": dataset, "norm": norm, "eps": _num(eps),
                "page": setting_file(LP_TRACK, dataset, norm, _num(eps)),
                "attacks": [], "headline": {}, "rows": [], "failed_keys": [],
            }
        cell_flags = {k: list(f) for k, f in zip(keys, flags) if f}
        devices = list(devices or [])
        units = sorted({cost_unit(d) for d in devices})
        table["rows"].append({
            "arch": arch,
            "method": method,
            "n_seeds": int(n_seeds),
            "keys": list(all_keys),  # every cell of these models (several cells may share one checkpoint)
            "clean_acc_mean": _num(clean_mean),
            "clean_acc_std": _num(clean_std),
            "robust": robust.get((dataset, norm, eps, arch, method), {}),
            "worst_robust_mean": _num(worst_mean),
            "worst_robust_std": _num(worst_std),
            "flags": sorted({f for fs in cell_flags.values() for f in fs}),
            "flagged": bool(cell_flags),
            "cell_flags": cell_flags,
            "cost_hours_mean": _num(hours_mean),
            "cost_hours_std": _num(hours_std),
            "cost_hours_total": _num(hours_total),
            "cost_unit": units[0] if len(units) == 1 else ("h (mixed devices)" if units else "h"),
            "devices": list(devices),
            "images_per_second_mean": _num(ips_mean),
            "images_per_second_std": _num(ips_std),
            # mean per-layer neuron sensitivity (harness/eval/neuron_sensitivity.py): lower = more stable
            "neuron_sensitivity_mean": _num(ns_mean),
            "neuron_sensitivity_std": _num(ns_std),
        })
    for table in tables.values():
        table["attacks"] = sorted({a for row in table["rows"] for a in row["robust"]})
        table["headline"] = _headline(table)
        table["has_neuron_sensitivity"] = any(r["neuron_sensitivity_mean"] is not None for r in table["rows"])
        _rank(table)

    failed = [
        {
            "key": key, "grid": grid, "dataset": dataset, "arch": arch, "method": method,
            "seed": seed, "norm": norm, "eps": _num(eps),
            "error": error, "error_first_line": first_line(error),
        }
        for key, grid, dataset, arch, method, seed, norm, eps, error in failed_records
    ]
    for cell in failed:
        table = tables.get((cell["dataset"], cell["norm"], cell["eps"]))
        if table is not None:
            table["failed_keys"].append(cell["key"])
    return Leaderboard(
        tables=list(tables.values()),
        failed=failed,
        cells=group_cells(results),
        backdoor_tables=backdoor_tables(results),
        n_cells=int(n_cells),
        n_ok_cells=int(n_cells) - len(failed),
        n_result_rows=results.num_rows,
    )

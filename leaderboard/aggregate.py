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
carries an integrity flag, evaluation or training (harness/train/health.py: a row's cell whose
training collapsed, overfitted or diverged), ranked after all unflagged rows. Failed cells (any row with
status != 'ok') are kept apart and never ranked. std is the sample std over seeds; None for
one seed. Cost = (train_seconds + eval_seconds) * world_size / 3600 hours per cell.

Uncertainty from the test-set size: every accuracy also gets a Wilson 95% interval over the
images behind it (n_eval summed over seeds: the pooled proportion). Rows whose headline intervals
overlap are marked tied (`tied_with`: the ranks they cannot be told apart from). Accuracies are
snapped to count / n_eval in float64 before anything else (a float32 mean on the GPU stores
0.9777777791023254 for 44/45), and NaN/inf read as missing, so one odd row never breaks a table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from leaderboard.backdoor import backdoor_tables, lp_view
from leaderboard.cells import Cell, group_cells
from leaderboard.format import cost_unit, finite, setting_file, wilson
from leaderboard.health import health
from leaderboard.setups import label_setups

HEADLINE_ATTACK = "autoattack"
LP_TRACK = "lp"
TRACK_TITLES = {LP_TRACK: "Lp robustness"}  # a backdoor track adds its id and title here

# Only the columns the aggregation reads (timestamps/maps stay out of DuckDB's conversions).
_COLUMNS = [
    "key", "grid", "status", "error", "dataset", "arch", "method", "seed",
    "attack", "norm", "eps", "clean_acc", "robust_acc", "flags",
    "train_seconds", "eval_seconds", "world_size", "device", "images_per_second", "checkpoint_sha256",
    "neuron_sensitivity", "n_eval", "model_id",
]
# Training-health columns (issue 25) and cost columns written by the GPU path (issue 15); whichever
# a store lacks read as null.
HEALTH_COLUMNS: dict[str, pa.DataType] = {
    "train_flags": pa.list_(pa.string()), "selection": pa.string(), "validation_n": pa.int64(),
}
COST_COLUMNS: dict[str, pa.DataType] = {
    "device_name": pa.string(), "device_count": pa.int64(), "flops_per_image": pa.float64(),
    "train_flops": pa.float64(), "device_hours": pa.float64(), "peak_memory_bytes": pa.float64(),
    "mfu": pa.float64(),
}

# float64 accuracy = count / n_eval; NaN/inf -> NULL (DuckDB would otherwise rank NaN highest).
# Snapped only when the value is count / n_eval up to float32 rounding (|x*n - k| <= n * 2^-23).
_ACC = ("CASE WHEN NOT isfinite({c}) THEN NULL "
        "WHEN n_eval > 0 AND abs({c} * n_eval - round({c} * n_eval)) <= greatest(n_eval * 1.2e-7, 1e-9) "
        "THEN round({c} * n_eval) / n_eval ELSE {c} END AS {c}")
_FINITE = "CASE WHEN isfinite({c}) THEN {c} END AS {c}"

_PRELUDE = """
WITH
cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key),
-- One trained model = one checkpoint: cells that share it (differing only in eval attacks or
-- post-eval analyses) are one model, one seed, their attacks pooled. An eval-only row (robustgrid
-- eval) is apart by its model_id: the same weights under another id/normalisation are another model.
ok_rows AS (SELECT r.* REPLACE (""" + ", ".join([_ACC.format(c="clean_acc"), _ACC.format(c="robust_acc")]
                                         + [_FINITE.format(c=c) for c in ("train_seconds", "eval_seconds",
                                            "images_per_second", "neuron_sensitivity", "flops_per_image",
                                            "train_flops", "device_hours", "peak_memory_bytes", "mfu")]) + """),
                   coalesce(r.checkpoint_sha256, r.key) || coalesce(' ' || r.model_id, '') AS model
            FROM results r JOIN cell_status s USING (key) WHERE s.ok),
cells AS (
    SELECT model, norm, eps, min(key) AS key, list_sort(list_distinct(list(key))) AS model_keys,
           any_value(dataset) AS dataset,
           any_value(arch) AS arch, any_value(method) AS method, any_value(seed) AS seed,
           avg(clean_acc) AS clean,
           list_sort(list_distinct(flatten(coalesce(list(flags) FILTER (WHERE flags IS NOT NULL), [])))) AS flags,
           list_sort(list_distinct(flatten(coalesce(list(train_flags) FILTER (WHERE train_flags IS NOT NULL), []))))
               AS train_flags,
           any_value(selection) AS selection, max(validation_n) AS validation_n,
           CASE WHEN max(train_seconds) IS NULL AND max(eval_seconds) IS NULL THEN NULL
                ELSE (coalesce(max(train_seconds), 0) + coalesce(max(eval_seconds), 0))
                     * coalesce(max(world_size), 1) / 3600.0 END AS hours,
           any_value(device) AS device, avg(images_per_second) AS ips,
           avg(neuron_sensitivity) AS ns, max(n_eval) AS n,
           max(train_seconds) AS train_s, max(eval_seconds) AS eval_s,
           list_sort(list_distinct(list(device_name) FILTER (WHERE device_name IS NOT NULL))) AS device_names,
           max(device_count) AS device_count, max(flops_per_image) AS flops_per_image,
           max(train_flops) AS train_flops, max(device_hours) AS device_hours,
           max(peak_memory_bytes) AS peak_memory_bytes, max(mfu) AS mfu
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
       list(c.train_flags ORDER BY c.seed, c.key) AS train_flags,
       list(c.validation_n ORDER BY c.seed, c.key) AS validation_ns,
       list_sort(list_distinct(list(c.selection) FILTER (WHERE c.selection IS NOT NULL))) AS selections,
       flatten(list(c.model_keys ORDER BY c.seed, c.key)) AS all_keys,
       avg(c.clean) AS clean_mean, stddev_samp(c.clean) AS clean_std,
       avg(w.worst) AS worst_mean, stddev_samp(w.worst) AS worst_std,
       avg(c.hours) AS hours_mean, stddev_samp(c.hours) AS hours_std, sum(c.hours) AS hours_total,
       list_sort(list_distinct(list(c.device) FILTER (WHERE c.device IS NOT NULL))) AS devices,
       avg(c.ips) AS ips_mean, stddev_samp(c.ips) AS ips_std,
       avg(c.ns) AS ns_mean, stddev_samp(c.ns) AS ns_std,
       sum(c.n) AS n_eval_total, sum(c.clean * c.n) / sum(c.n) AS clean_pooled,
       sum(w.worst * c.n) / sum(c.n) FILTER (WHERE w.worst IS NOT NULL) AS worst_pooled,
       avg(c.train_s) AS train_seconds_mean, avg(c.eval_s) AS eval_seconds_mean,
       flatten(list(c.device_names)) AS device_names, max(c.device_count) AS device_count,
       avg(c.flops_per_image) AS flops_per_image, avg(c.train_flops) AS train_flops_mean,
       avg(c.device_hours) AS device_hours_mean, max(c.peak_memory_bytes) AS peak_memory_bytes_max,
       avg(c.mfu) AS mfu_mean
FROM cells c LEFT JOIN cell_worst w
  ON w.model = c.model AND w.norm IS NOT DISTINCT FROM c.norm AND w.eps IS NOT DISTINCT FROM c.eps
GROUP BY c.dataset, c.norm, c.eps, c.arch, c.method
ORDER BY c.dataset NULLS LAST, c.norm NULLS LAST, c.eps NULLS LAST, c.arch, c.method
"""

_ATTACKS_SQL = _PRELUDE + """
SELECT c.dataset, c.norm, c.eps, c.arch, c.method, a.attack,
       avg(a.robust) AS mean, stddev_samp(a.robust) AS std, count(*) AS n,
       sum(c.n) AS n_eval_total, sum(a.robust * c.n) / sum(c.n) AS pooled
FROM cell_attack a JOIN cells c
  ON a.model = c.model AND a.norm IS NOT DISTINCT FROM c.norm AND a.eps IS NOT DISTINCT FROM c.eps
GROUP BY c.dataset, c.norm, c.eps, c.arch, c.method, a.attack
ORDER BY a.attack
"""

_FAILED_SQL = """
WITH cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key)
SELECT r.key, any_value(grid), any_value(dataset), any_value(arch), any_value(method),
       any_value(seed), any_value(norm), any_value(eps),
       string_agg(DISTINCT error, chr(10)) FILTER (WHERE error IS NOT NULL),
       list_sort(list_distinct(flatten(coalesce(list(train_flags) FILTER (WHERE train_flags IS NOT NULL), []))))
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
    return finite(value)


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
    """Set each row's headline and sort: unflagged before flagged, then headline desc (missing
    last); then mark ties: rows of one group (flagged or not) whose headline intervals overlap."""
    headline = table["headline"]
    for row in table["rows"]:
        if headline["kind"] == "autoattack":
            stats = row["robust"][HEADLINE_ATTACK]
            row["headline_mean"], row["headline_std"], row["headline_ci"] = stats["mean"], stats["std"], stats["ci"]
        else:
            row["headline_mean"], row["headline_std"] = row["worst_robust_mean"], row["worst_robust_std"]
            row["headline_ci"] = row["worst_robust_ci"]
    table["rows"].sort(key=lambda r: (
        r["flagged"], r["headline_mean"] is None, -(r["headline_mean"] or 0.0), str(r["arch"]), str(r["method"]),
    ))
    for rank, row in enumerate(table["rows"], start=1):
        row["rank"] = rank
    for row in table["rows"]:
        row["tied_with"] = [other["rank"] for other in table["rows"] if other is not row
                            and other["flagged"] == row["flagged"] and overlaps(row["headline_ci"], other["headline_ci"])]


def overlaps(a: list[float] | None, b: list[float] | None) -> bool:
    """Whether two [lo, hi] intervals overlap (False when either is unknown)."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def _records(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, values)) for values in cursor.fetchall()]


def _with_cost_columns(results: pa.Table) -> pa.Table:
    """Add the issue-15 cost and issue-25 health columns a store does not have yet, as nulls."""
    for name, kind in {**HEALTH_COLUMNS, **COST_COLUMNS}.items():
        if name not in results.column_names:
            results = results.append_column(pa.field(name, kind), pa.nulls(results.num_rows, kind))
    return results


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
    """Aggregate a RESULT_SCHEMA table (from harness.store.index.read_results) into a Leaderboard."""
    results = label_setups(newest_code_only(results))  # once, for the Lp and the backdoor tables
    con = duckdb.connect()
    try:
        con.register("results", _with_cost_columns(lp_view(results)).select(_COLUMNS + list(HEALTH_COLUMNS)
                                                                            + list(COST_COLUMNS)))
        row_records = _records(con, _ROWS_SQL)
        attack_records = _records(con, _ATTACKS_SQL)
        failed_records = con.execute(_FAILED_SQL).fetchall()
        n_cells = con.execute("SELECT count(DISTINCT key) FROM results").fetchone()[0]
    finally:
        con.close()

    robust: dict[tuple, dict[str, dict[str, Any]]] = {}
    for a in attack_records:
        robust.setdefault((a["dataset"], a["norm"], a["eps"], a["arch"], a["method"]), {})[a["attack"]] = {
            "mean": _num(a["mean"]), "std": _num(a["std"]), "n": int(a["n"]),
            "ci": wilson(_num(a["pooled"]), a["n_eval_total"]),
        }

    tables: dict[tuple, dict[str, Any]] = {}  # insertion order = SQL order (dataset, norm, eps)
    for r in row_records:
        dataset, norm, eps = r["dataset"], r["norm"], r["eps"]
        table = tables.get((dataset, norm, eps))
        if table is None:
            table = tables[(dataset, norm, eps)] = {
                "track": LP_TRACK, "dataset": dataset, "norm": norm, "eps": _num(eps),
                "page": setting_file(LP_TRACK, dataset, norm, _num(eps)),
                "attacks": [], "headline": {}, "rows": [], "failed_keys": [],
            }
        cell_flags = {k: list(f) for k, f in zip(r["keys"], r["flags"]) if f}
        cell_train_flags = {k: list(f) for k, f in zip(r["keys"], r["train_flags"]) if f}
        devices = list(r["devices"] or [])
        units = sorted({cost_unit(d) for d in devices})
        table["rows"].append({
            "arch": r["arch"],
            "method": r["method"],
            "n_seeds": int(r["n_seeds"]),
            "keys": list(r["all_keys"]),  # every cell of these models (several cells may share one checkpoint)
            "n_eval_total": None if r["n_eval_total"] is None else int(r["n_eval_total"]),
            "clean_acc_mean": _num(r["clean_mean"]),
            "clean_acc_std": _num(r["clean_std"]),
            "clean_acc_ci": wilson(_num(r["clean_pooled"]), r["n_eval_total"]),
            "robust": robust.get((dataset, norm, eps, r["arch"], r["method"]), {}),
            "worst_robust_mean": _num(r["worst_mean"]),
            "worst_robust_std": _num(r["worst_std"]),
            "worst_robust_ci": wilson(_num(r["worst_pooled"]), r["n_eval_total"]),
            "flags": sorted({f for fs in cell_flags.values() for f in fs}),
            "flagged": bool(cell_flags or cell_train_flags),  # evaluation or training flags: ranked last
            "cell_flags": cell_flags,
            "train_flags": sorted({f for fs in cell_train_flags.values() for f in fs}),
            "cell_train_flags": cell_train_flags,
            "health": health(cell_train_flags, list(r["validation_ns"] or [])),
            "selections": [s for s in (r["selections"] or []) if s != "last"],  # best-epoch selection used (labelled)
            "cost_hours_mean": _num(r["hours_mean"]),
            "cost_hours_std": _num(r["hours_std"]),
            "cost_hours_total": _num(r["hours_total"]),
            "cost_unit": units[0] if len(units) == 1 else ("h (mixed devices)" if units else "h"),
            "devices": list(devices),
            "images_per_second_mean": _num(r["ips_mean"]),
            "images_per_second_std": _num(r["ips_std"]),
            # mean per-layer neuron sensitivity (harness/eval/neuron_sensitivity.py): lower = more stable
            "neuron_sensitivity_mean": _num(r["ns_mean"]),
            "neuron_sensitivity_std": _num(r["ns_std"]),
            # cost columns of the GPU path (issue 15); None where the store has none
            "train_seconds_mean": _num(r["train_seconds_mean"]),
            "eval_seconds_mean": _num(r["eval_seconds_mean"]),
            "device_names": sorted(set(r["device_names"] or [])),
            "device_count": None if r["device_count"] is None else int(r["device_count"]),
            "flops_per_image": _num(r["flops_per_image"]),
            "train_flops_mean": _num(r["train_flops_mean"]),
            "device_hours_mean": _num(r["device_hours_mean"]),
            "peak_memory_bytes_max": _num(r["peak_memory_bytes_max"]),
            "mfu_mean": _num(r["mfu_mean"]),
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
            "error": error, "error_first_line": first_line(error), "train_flags": list(train_flags or []),
        }
        for key, grid, dataset, arch, method, seed, norm, eps, error, train_flags in failed_records
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

"""Leaderboard aggregation in DuckDB: attack -> cell -> (arch, method) row, per threat model.

Why this order: the worst case must be taken inside one trained model (a cell = one seed),
so a cell's worst-case robust accuracy is min(robust_acc) over its eval attacks, and only then
are cells averaged over seeds. Taking min over per-attack means would overstate robustness.

Numbers stay floats from Parquet to the sort (ORDER BY on DOUBLE), so ranking is numeric and
never depends on formatted text. Failed cells (any row with status != 'ok') are kept apart
and never enter the ranking. std is the sample std over seeds; None when there is one seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

# Only the columns the leaderboard reads (keeps timestamps/maps out of DuckDB's conversions).
_COLUMNS = [
    "key", "grid", "status", "error", "dataset", "arch", "method", "seed",
    "attack", "norm", "eps", "clean_acc", "robust_acc",
]

_PRELUDE = """
WITH
cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key),
ok_rows AS (SELECT r.* FROM results r JOIN cell_status s USING (key) WHERE s.ok),
cells AS (
    SELECT key, any_value(dataset) AS dataset, any_value(norm) AS norm, any_value(eps) AS eps,
           any_value(arch) AS arch, any_value(method) AS method, any_value(seed) AS seed,
           avg(clean_acc) AS clean
    FROM ok_rows GROUP BY key
),
cell_attack AS (
    SELECT key, attack, avg(robust_acc) AS robust
    FROM ok_rows WHERE attack IS NOT NULL AND robust_acc IS NOT NULL
    GROUP BY key, attack
),
cell_worst AS (SELECT key, min(robust) AS worst FROM cell_attack GROUP BY key)
"""

_ROWS_SQL = _PRELUDE + """
SELECT c.dataset, c.norm, c.eps, c.arch, c.method,
       count(*) AS n_seeds,
       list(c.key ORDER BY c.seed, c.key) AS keys,
       avg(c.clean) AS clean_mean, stddev_samp(c.clean) AS clean_std,
       avg(w.worst) AS worst_mean, stddev_samp(w.worst) AS worst_std
FROM cells c LEFT JOIN cell_worst w USING (key)
GROUP BY c.dataset, c.norm, c.eps, c.arch, c.method
ORDER BY c.dataset NULLS LAST, c.norm NULLS LAST, c.eps NULLS LAST,
         worst_mean DESC NULLS LAST, c.arch, c.method
"""

_ATTACKS_SQL = _PRELUDE + """
SELECT c.dataset, c.norm, c.eps, c.arch, c.method, a.attack,
       avg(a.robust) AS mean, stddev_samp(a.robust) AS std, count(*) AS n
FROM cell_attack a JOIN cells c USING (key)
GROUP BY c.dataset, c.norm, c.eps, c.arch, c.method, a.attack
ORDER BY a.attack
"""

_FAILED_SQL = """
WITH cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key)
SELECT r.key, any_value(grid), any_value(dataset), any_value(arch), any_value(method),
       any_value(seed), any_value(norm), any_value(eps), any_value(error)
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
    n_cells: int = 0
    n_ok_cells: int = 0
    n_result_rows: int = 0

    @property
    def n_failed_cells(self) -> int:
        return len(self.failed)

    @property
    def n_leaderboard_rows(self) -> int:
        return sum(len(t["rows"]) for t in self.tables)


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


def aggregate(results: pa.Table) -> Leaderboard:
    """Aggregate a RESULT_SCHEMA table (from harness.results.read_results) into a Leaderboard."""
    table = results.select(_COLUMNS)
    con = duckdb.connect()
    try:
        con.register("results", table)
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

    tables: dict[tuple, dict[str, Any]] = {}  # insertion order = SQL order
    for (dataset, norm, eps, arch, method, n_seeds, keys,
         clean_mean, clean_std, worst_mean, worst_std) in row_records:
        table_key = (dataset, norm, eps)
        out = tables.setdefault(
            table_key, {"dataset": dataset, "norm": norm, "eps": _num(eps), "attacks": [], "rows": []}
        )
        row_robust = robust.get((dataset, norm, eps, arch, method), {})
        out["rows"].append({
            "arch": arch,
            "method": method,
            "n_seeds": int(n_seeds),
            "keys": list(keys),
            "clean_acc_mean": _num(clean_mean),
            "clean_acc_std": _num(clean_std),
            "robust": row_robust,
            "worst_robust_mean": _num(worst_mean),
            "worst_robust_std": _num(worst_std),
        })
    for out in tables.values():
        out["attacks"] = sorted({a for row in out["rows"] for a in row["robust"]})

    failed = [
        {
            "key": key, "grid": grid, "dataset": dataset, "arch": arch, "method": method,
            "seed": seed, "norm": norm, "eps": _num(eps),
            "error": error, "error_first_line": first_line(error),
        }
        for key, grid, dataset, arch, method, seed, norm, eps, error in failed_records
    ]
    return Leaderboard(
        tables=list(tables.values()),
        failed=failed,
        n_cells=int(n_cells),
        n_ok_cells=int(n_cells) - len(failed),
        n_result_rows=results.num_rows,
    )

"""The backdoor track's tables: clean accuracy (CA), attack success rate (ASR) and robust accuracy
under the trigger (RA), mean ± sample std over seeds, one table per (dataset, poisoning attack,
poison rate, target), rows ranked by ASR (lowest first), then by CA (highest first).

A cell's metrics are the same on each of its rows (one per eval attack), so the cell value is
their average; cells are averaged over seeds only after that. Failed cells are never ranked.
Lp tables show cells trained on poisoned data as their own rows, `method @attack`
(see `lp_view`), so a backdoored ERM is never averaged with a clean one.
"""
from __future__ import annotations

import math
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

_COLUMNS = ["key", "status", "dataset", "arch", "method", "seed", "clean_acc", "backdoor",
            "poison_rate", "target_class", "asr", "backdoor_robust_acc", "n_poisoned", "n_triggered"]

_SQL = """
WITH
cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key),
cells AS (
    SELECT r.key, any_value(dataset) AS dataset, any_value(arch) AS arch, any_value(method) AS method,
           any_value(seed) AS seed, any_value(backdoor) AS backdoor, any_value(poison_rate) AS rate,
           any_value(target_class) AS target, avg(clean_acc) AS ca, avg(asr) AS asr,
           avg(backdoor_robust_acc) AS ra, any_value(n_poisoned) AS n_poisoned,
           any_value(n_triggered) AS n_triggered
    FROM results r JOIN cell_status s USING (key)
    WHERE s.ok AND r.backdoor IS NOT NULL AND r.backdoor <> 'none'
    GROUP BY r.key
)
SELECT dataset, backdoor, rate, target, arch, method, count(*) AS n_seeds,
       list(key ORDER BY seed, key) AS keys,
       avg(ca), stddev_samp(ca), avg(asr), stddev_samp(asr), avg(ra), stddev_samp(ra),
       avg(n_poisoned), avg(n_triggered)
FROM cells
GROUP BY dataset, backdoor, rate, target, arch, method
ORDER BY dataset, backdoor, rate, target
"""


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def backdoor_tables(results: pa.Table) -> list[dict[str, Any]]:
    """The backdoor tables (data.json shape) from a RESULT_SCHEMA table whose methods already
    carry their setup labels (leaderboard.setups.label_setups, applied by aggregate)."""
    if "backdoor" not in results.column_names:
        return []
    con = duckdb.connect()
    try:
        con.register("results", results.select(_COLUMNS))
        records = con.execute(_SQL).fetchall()
    finally:
        con.close()
    tables: dict[tuple, dict[str, Any]] = {}
    for (dataset, backdoor, rate, target, arch, method, n_seeds, keys, ca, ca_sd, asr, asr_sd,
         ra, ra_sd, n_poisoned, n_triggered) in records:
        table = tables.setdefault((dataset, backdoor, rate, target), {
            "track": "backdoor", "dataset": dataset, "backdoor": backdoor, "poison_rate": _num(rate),
            "target_class": target, "rows": [],
        })
        table["rows"].append({
            "arch": arch, "method": method, "n_seeds": int(n_seeds), "keys": list(keys),
            "clean_acc_mean": _num(ca), "clean_acc_std": _num(ca_sd),
            "asr_mean": _num(asr), "asr_std": _num(asr_sd),
            "ra_mean": _num(ra), "ra_std": _num(ra_sd),
            "n_poisoned": _num(n_poisoned), "n_triggered": _num(n_triggered),
        })
    for table in tables.values():
        table["rows"].sort(key=lambda r: (r["asr_mean"] is None, r["asr_mean"] or 0.0,
                                          -(r["clean_acc_mean"] or 0.0), str(r["arch"]), str(r["method"])))
        for rank, row in enumerate(table["rows"], start=1):
            row["rank"] = rank
    return list(tables.values())


def lp_view(results: pa.Table) -> pa.Table:
    """Results with `method` renamed `method @attack` on rows trained on poisoned data."""
    if "backdoor" not in results.column_names or results.num_rows == 0:
        return results
    backdoor = results.column("backdoor")
    poisoned = pc.and_(pc.is_valid(backdoor), pc.not_equal(pc.fill_null(backdoor, "none"), "none"))
    renamed = pc.if_else(poisoned, pc.binary_join_element_wise(results.column("method"), backdoor, " @"),
                         results.column("method"))
    return results.set_column(results.column_names.index("method"), "method", renamed)

"""The backdoor track's tables: clean accuracy (CA), attack success rate (ASR) and robust accuracy
under the trigger (RA), mean ± sample std over seeds, one table per (dataset, poisoning attack,
poison rate, target), rows ranked by ASR (lowest first), then by CA (highest first), every row with a
training flag (leaderboard/health.py) after the unflagged ones.

BackdoorBench's defense effectiveness rating, per seed against the undefended cell of the same
attack and seed (the ERM cell whose config is this cell's with `method: erm`, so the same data,
poison, architecture and trainer: the model FT/FP/NAD start from):
    DER = [max(0, dASR) - max(0, dCA) + 1] / 2,   d = undefended - defended,
then averaged over the seeds that have their undefended cell (BackdoorBench's non-simplified
helper adds the dCA term by mistake; this is the paper's formula). Undefended rows have none.

A cell's metrics are the same on each of its rows (one per eval attack), so the cell value is
their average; cells are averaged over seeds only after that. Failed cells are never ranked.
Lp tables show cells trained on poisoned data as their own rows, `method @attack`
(see `lp_view`), so a backdoored ERM is never averaged with a clean one.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from harness.core.config import cell_identity
from leaderboard.format import base_method
from leaderboard.health import health

UNDEFENDED = "erm"

_COLUMNS = ["key", "status", "dataset", "arch", "method", "seed", "clean_acc", "backdoor",
            "poison_rate", "target_class", "asr", "backdoor_robust_acc", "n_poisoned", "n_triggered"]
_OPTIONAL = {"train_flags": pa.list_(pa.string()), "validation_n": pa.int64(),  # issue 25: null where absent
             "train_seconds": pa.float64(), "detectors_json": pa.string()}
_CELL_SQL = """
WITH cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key)
SELECT r.key, any_value(method), any_value(config_json), avg(clean_acc), avg(asr)
FROM results r JOIN cell_status s USING (key)
WHERE s.ok AND r.backdoor IS NOT NULL AND r.backdoor <> 'none'
GROUP BY r.key
"""

_SQL = """
WITH
cell_status AS (SELECT key, bool_and(status = 'ok') AS ok FROM results GROUP BY key),
cells AS (
    SELECT r.key, any_value(dataset) AS dataset, any_value(arch) AS arch, any_value(method) AS method,
           any_value(seed) AS seed, any_value(backdoor) AS backdoor, any_value(poison_rate) AS rate,
           any_value(target_class) AS target, avg(clean_acc) AS ca, avg(asr) AS asr,
           avg(backdoor_robust_acc) AS ra, any_value(n_poisoned) AS n_poisoned,
           any_value(n_triggered) AS n_triggered,
           list_sort(list_distinct(flatten(coalesce(list(train_flags) FILTER (WHERE train_flags IS NOT NULL), []))))
               AS train_flags,
           max(validation_n) AS validation_n, avg(train_seconds) AS train_seconds,
           any_value(detectors_json) AS detectors_json
    FROM results r JOIN cell_status s USING (key)
    WHERE s.ok AND r.backdoor IS NOT NULL AND r.backdoor <> 'none'
    GROUP BY r.key
)
SELECT dataset, backdoor, rate, target, arch, method, count(*) AS n_seeds,
       list(key ORDER BY seed, key) AS keys,
       avg(ca), stddev_samp(ca), avg(asr), stddev_samp(asr), avg(ra), stddev_samp(ra),
       avg(n_poisoned), avg(n_triggered),
       list(train_flags ORDER BY seed, key), list(validation_n ORDER BY seed, key), avg(train_seconds),
       list(detectors_json ORDER BY seed, key)
FROM cells
GROUP BY dataset, backdoor, rate, target, arch, method
ORDER BY dataset, backdoor, rate, target
"""


def detector_aurocs(blobs: list[str | None]) -> dict[str, float]:
    """{detector: mean AUROC over the cells} from the cells' `detectors_json` (harness/eval/analysis/
    detectors writes `det_<name>_auroc` there); a detector without a finite AUROC in any cell is left out."""
    found: dict[str, list[float]] = defaultdict(list)
    for blob in blobs:
        try:
            values = json.loads(blob) if blob else {}
        except ValueError:
            continue
        for column, value in values.items() if isinstance(values, dict) else ():
            if column.startswith("det_") and column.endswith("_auroc") and _num(value) is not None:
                found[column[len("det_"):-len("_auroc")]].append(float(value))
    return {name: sum(v) / len(v) for name, v in sorted(found.items())}


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
        for name, kind in _OPTIONAL.items():
            if name not in results.column_names:
                results = results.append_column(pa.field(name, kind), pa.nulls(results.num_rows, kind))
        columns = _COLUMNS + list(_OPTIONAL) + (["config_json"] if "config_json" in results.column_names else [])
        con.register("results", results.select(columns))
        records = con.execute(_SQL).fetchall()
        der = cell_ders(con.execute(_CELL_SQL).fetchall()) if "config_json" in columns else {}
    finally:
        con.close()
    tables: dict[tuple, dict[str, Any]] = {}
    for (dataset, backdoor, rate, target, arch, method, n_seeds, keys, ca, ca_sd, asr, asr_sd,
         ra, ra_sd, n_poisoned, n_triggered, train_flags, validation_ns, train_seconds, detector_blobs) in records:
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
            "train_seconds_mean": _num(train_seconds),  # the cell's own training (a defense's, not its upstream ERM's)
            **_health(list(keys), list(train_flags), list(validation_ns)),
            **_mean_std("der", [der[k] for k in keys if k in der]),
            "der_values": [der[k] for k in keys if k in der],
            "detectors": detector_aurocs(detector_blobs),
        })
    for table in tables.values():
        table["rows"].sort(key=lambda r: (r["flagged"], r["asr_mean"] is None, r["asr_mean"] or 0.0,
                                          -(r["clean_acc_mean"] or 0.0), str(r["arch"]), str(r["method"])))
        for rank, row in enumerate(table["rows"], start=1):
            row["rank"] = rank
    return list(tables.values())


def _health(keys: list[str], train_flags: list[Any], validation_ns: list[Any]) -> dict[str, Any]:
    """A row's training flags (per cell and together) and health word; flagged rows rank last."""
    cell_train_flags = {k: list(f) for k, f in zip(keys, train_flags) if f}
    return {"train_flags": sorted({f for fs in cell_train_flags.values() for f in fs}),
            "cell_train_flags": cell_train_flags, "flagged": bool(cell_train_flags),
            "health": health(cell_train_flags, validation_ns)}


def der(undefended: tuple[float, float], defended: tuple[float, float]) -> float:
    """BackdoorBench's DER from (CA, ASR) before and after a defense: [max(0, dASR) - max(0, dCA) + 1] / 2."""
    (ca0, asr0), (ca1, asr1) = undefended, defended
    return (max(0.0, asr0 - asr1) - max(0.0, ca0 - ca1) + 1.0) / 2.0


def cell_ders(cells: list[tuple[str, str, str | None, float, float]]) -> dict[str, float]:
    """{defended cell key: DER} for every defended cell whose undefended cell is among `cells`
    ((key, method, config_json, CA, ASR) per ok backdoor cell).

    The undefended cell is the ERM cell whose config is the defended one's with `method: erm`
    (same data, poison, architecture, trainer, seed, evaluation); failing that, the one ERM cell
    that differs in the trainer too (under `recipe=paper` a training-time defense such as CBD
    runs its own recipe's trainer, while the attacked model keeps the attack's)."""
    exact: dict[str, tuple[float, float]] = {}
    loose: dict[str, list[tuple[float, float]]] = defaultdict(list)
    defended: list[tuple[str, dict[str, Any], tuple[float, float]]] = []
    for key, method, config_json, ca, asr in cells:
        try:
            cfg = json.loads(config_json) if config_json and ca is not None and asr is not None else None
        except ValueError:
            cfg = None
        if not isinstance(cfg, dict):  # a row without a readable config has no twin to compare with
            continue
        values = (float(ca), float(asr))
        if base_method(method) == UNDEFENDED:
            exact[cell_identity(cfg)] = values
            loose[cell_identity(_without_trainer(cfg))].append(values)
        else:
            defended.append((key, {**cfg, "method": {"name": UNDEFENDED}}, values))
    out: dict[str, float] = {}
    for key, twin_cfg, values in defended:
        twin = exact.get(cell_identity(twin_cfg))
        if twin is None:
            candidates = loose.get(cell_identity(_without_trainer(twin_cfg)), [])
            twin = candidates[0] if len(candidates) == 1 else None
        if twin is not None:
            out[key] = der(twin, values)
    return out


def _without_trainer(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "trainer"}


def _mean_std(name: str, values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values) if values else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {f"{name}_mean": mean, f"{name}_std": std, f"n_{name}": len(values)}


def lp_view(results: pa.Table) -> pa.Table:
    """Results with `method` renamed `method @attack` on rows trained on poisoned data."""
    if "backdoor" not in results.column_names or results.num_rows == 0:
        return results
    backdoor = results.column("backdoor")
    poisoned = pc.and_(pc.is_valid(backdoor), pc.not_equal(pc.fill_null(backdoor, "none"), "none"))
    renamed = pc.if_else(poisoned, pc.binary_join_element_wise(results.column("method"), backdoor, " @"),
                         results.column("method"))
    return results.set_column(results.column_names.index("method"), "method", renamed)

"""Machine-readable exports beside the pages: data.json (one record per leaderboard row, so
`pd.read_json("data.json")` is a DataFrame), site.json (everything, nested: summary, tables,
backdoor tables, failed cells, build problems) and data.csv (long form: one line per attack).

Floats stay JSON numbers / plain CSV numbers as fractions in [0, 1] (hours for cost), float64,
never the formatted text, so downstream tools rank and plot from the same numbers the pages show.
"""
from __future__ import annotations

import csv
import io
import json

from leaderboard.aggregate import Leaderboard
from leaderboard.format import cell_file


TABLE_FIELDS = ("track", "dataset", "norm", "eps")


def to_records(board: Leaderboard) -> str:
    """data.json: a JSON array with one object per leaderboard row, its setting's fields first
    (track, dataset, norm, eps, headline kind, page); `robust` stays a nested object per attack."""
    records = [
        {**{k: table[k] for k in TABLE_FIELDS}, "headline_kind": table["headline"]["kind"],
         "setting_page": table["page"], **row, "cell_pages": [cell_file(k) for k in row["keys"]]}
        for table in board.tables for row in table["rows"]
    ]
    return json.dumps(records, indent=1, allow_nan=False, ensure_ascii=False) + "\n"


def to_json(board: Leaderboard, generated_at: str, problems: list[dict[str, str]] | None = None) -> str:
    """site.json: summary, tables (with headline, flags, cost, page links), failed cells, problems."""
    tables = [
        {**table, "rows": [{**row, "cell_pages": [cell_file(k) for k in row["keys"]]} for row in table["rows"]]}
        for table in board.tables
    ]
    payload = {
        "generated_at": generated_at,
        "summary": {
            "n_cells": board.n_cells,
            "n_ok_cells": board.n_ok_cells,
            "n_failed_cells": board.n_failed_cells,
            "n_result_rows": board.n_result_rows,
            "n_leaderboard_rows": board.n_leaderboard_rows,
            "n_flagged_rows": board.n_flagged_rows,
        },
        "tables": tables,
        "backdoor_tables": board.backdoor_tables,
        "failed": [{**f, "cell_page": cell_file(f["key"])} for f in board.failed],
        "problems": list(problems or []),
    }
    return json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


CSV_COLUMNS = [
    "track", "dataset", "norm", "eps", "rank", "arch", "method", "n_seeds", "keys",
    "clean_acc_mean", "clean_acc_std", "attack", "robust_mean", "robust_std", "robust_n",
    "worst_robust_mean", "worst_robust_std", "headline_kind", "headline_mean", "headline_std",
    "flags", "train_flags", "health", "cost_hours_mean", "cost_hours_std", "cost_unit",
    "images_per_second_mean", "images_per_second_std",
    "neuron_sensitivity_mean", "neuron_sensitivity_std",
]


def to_csv(board: Leaderboard) -> str:
    """data.csv in long form: one line per (table, row, attack); keys and (training) flags are ';'-joined."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for table in board.tables:
        for row in table["rows"]:
            base = {
                "track": table["track"], "dataset": table["dataset"], "norm": table["norm"],
                "eps": table["eps"], "headline_kind": table["headline"]["kind"],
                **{k: row[k] for k in CSV_COLUMNS if k in row and k not in ("keys", "flags", "train_flags")},
                "keys": ";".join(row["keys"]), "flags": ";".join(row["flags"]),
                "train_flags": ";".join(row.get("train_flags", [])),
            }
            attacks = row["robust"] or {None: {"mean": None, "std": None, "n": 0}}
            for attack, stats in attacks.items():
                writer.writerow({
                    **base, "attack": attack, "robust_mean": stats["mean"],
                    "robust_std": stats["std"], "robust_n": stats["n"],
                })
    return buf.getvalue()

"""Machine-readable exports beside the pages: data.json (nested) and data.csv (long form).

Floats stay JSON numbers / plain CSV numbers as fractions in [0, 1] (hours for cost), never the
formatted text, so downstream tools rank and plot from the same numbers the pages show.
"""
from __future__ import annotations

import csv
import io
import json

from leaderboard.aggregate import Leaderboard
from leaderboard.format import cell_file


def to_json(board: Leaderboard, generated_at: str) -> str:
    """data.json: summary, tables (with headline, flags, cost, page links) and failed cells."""
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
    }
    return json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


CSV_COLUMNS = [
    "track", "dataset", "norm", "eps", "rank", "arch", "method", "n_seeds", "keys",
    "clean_acc_mean", "clean_acc_std", "attack", "robust_mean", "robust_std", "robust_n",
    "worst_robust_mean", "worst_robust_std", "headline_kind", "headline_mean", "headline_std",
    "flags", "cost_hours_mean", "cost_hours_std", "cost_unit",
    "images_per_second_mean", "images_per_second_std",
    "neuron_sensitivity_mean", "neuron_sensitivity_std",
]


def to_csv(board: Leaderboard) -> str:
    """data.csv in long form: one line per (table, row, attack); keys and flags are ';'-joined."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for table in board.tables:
        for row in table["rows"]:
            base = {
                "track": table["track"], "dataset": table["dataset"], "norm": table["norm"],
                "eps": table["eps"], "headline_kind": table["headline"]["kind"],
                **{k: row[k] for k in CSV_COLUMNS if k in row and k not in ("keys", "flags")},
                "keys": ";".join(row["keys"]), "flags": ";".join(row["flags"]),
            }
            attacks = row["robust"] or {None: {"mean": None, "std": None, "n": 0}}
            for attack, stats in attacks.items():
                writer.writerow({
                    **base, "attack": attack, "robust_mean": stats["mean"],
                    "robust_std": stats["std"], "robust_n": stats["n"],
                })
    return buf.getvalue()

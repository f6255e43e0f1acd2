"""Build the static leaderboard site: index.html, data.json and data.csv in one folder.

The page is rendered with Jinja2 with autoescape ON, so every string that comes from results
(dataset/arch/method/attack names, error text) is HTML-escaped. The page needs no JavaScript.
Display convention: accuracies in %, 2 decimals, "mean ± std" over seeds (sample std);
with one seed the std is undefined and shows as "—" (null in data.json/data.csv).
"""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from harness.results import read_results
from leaderboard.aggregate import Leaderboard, aggregate

TEMPLATES_DIR = Path(__file__).parent / "templates"
DASH = "—"


def pct(value: float | None) -> str:
    """A fraction as a percentage with 2 decimals; '—' when missing."""
    return DASH if value is None else f"{100.0 * value:.2f}"


def mean_std(mean: float | None, std: float | None) -> str:
    """'mean ± std' in %; std of a single seed (None) shows as '—'."""
    if mean is None:
        return DASH
    return f"{pct(mean)} ± {pct(std)}"


def eps_label(norm: str | None, eps: float | None) -> str:
    """Threat model text, e.g. 'L∞, ε = 0.1000 (25.5/255)' or 'L2, ε = 0.5000'."""
    name = {"linf": "L∞", "l2": "L2"}.get(norm or "", str(norm))
    if eps is None:
        return f"{name}, ε = ?"
    text = f"{name}, ε = {eps:.4f}"
    if norm == "linf":
        over255 = f"{eps * 255:.2f}".rstrip("0").rstrip(".")
        text += f" ({over255}/255)"
    return text


def table_heading(table: dict[str, Any]) -> str:
    """'<dataset> — <threat model>' for one leaderboard table."""
    return f"{table['dataset']} {DASH} {eps_label(table['norm'], table['eps'])}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # the template ends in .j2, so select_autoescape would not match it
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=pct, mean_std=mean_std)
    env.globals.update(eps_label=eps_label, table_heading=table_heading)
    return env


def render_html(board: Leaderboard, generated_at: str) -> str:
    """The index page as a string."""
    return _environment().get_template("index.html.j2").render(board=board, generated_at=generated_at)


def to_json(board: Leaderboard, generated_at: str) -> str:
    """data.json: tables and failed cells with floats as JSON numbers (fractions in [0, 1])."""
    payload = {
        "generated_at": generated_at,
        "summary": {
            "n_cells": board.n_cells,
            "n_ok_cells": board.n_ok_cells,
            "n_failed_cells": board.n_failed_cells,
            "n_result_rows": board.n_result_rows,
            "n_leaderboard_rows": board.n_leaderboard_rows,
        },
        "tables": board.tables,
        "failed": board.failed,
    }
    return json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


CSV_COLUMNS = [
    "dataset", "norm", "eps", "arch", "method", "n_seeds", "keys",
    "clean_acc_mean", "clean_acc_std", "attack", "robust_mean", "robust_std", "robust_n",
    "worst_robust_mean", "worst_robust_std",
]


def to_csv(board: Leaderboard) -> str:
    """data.csv in long form: one line per (table, row, attack); keys are ';'-joined."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for table in board.tables:
        for row in table["rows"]:
            base = {
                "dataset": table["dataset"], "norm": table["norm"], "eps": table["eps"],
                "arch": row["arch"], "method": row["method"], "n_seeds": row["n_seeds"],
                "keys": ";".join(row["keys"]),
                "clean_acc_mean": row["clean_acc_mean"], "clean_acc_std": row["clean_acc_std"],
                "worst_robust_mean": row["worst_robust_mean"],
                "worst_robust_std": row["worst_robust_std"],
            }
            attacks = row["robust"] or {None: {"mean": None, "std": None, "n": 0}}
            for attack, stats in attacks.items():
                writer.writerow({
                    **base, "attack": attack, "robust_mean": stats["mean"],
                    "robust_std": stats["std"], "robust_n": stats["n"],
                })
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename, so a served site never shows a half-written file."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_site(results_dir: str | Path, out_dir: str | Path) -> Path:
    """Read results, aggregate, write index.html + data.json + data.csv; return index.html's path."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder not found: {results_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    board = aggregate(read_results(results_dir))
    generated_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    _write_atomic(out_dir / "data.json", to_json(board, generated_at))
    _write_atomic(out_dir / "data.csv", to_csv(board))
    index = out_dir / "index.html"
    _write_atomic(index, render_html(board, generated_at))
    return index

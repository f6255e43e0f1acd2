"""`robustgrid report --format markdown|latex`: the leaderboard as a paper table.

One table per setting (dataset, threat model), rows in leaderboard order: rank (= for ties),
architecture, method (with the paper's venue and year), clean accuracy, each eval attack, the
headline with its Wilson 95% interval. Accuracies in %, mean ± std over seeds. Flagged rows are
marked † and explained under the table. Numbers come from the same aggregation as the site.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.store.index import read_results
from leaderboard.aggregate import aggregate
from leaderboard.format import ci_text, mean_std
from leaderboard.pages import method_paper, table_heading

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: object) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def _method_text(method: str) -> str:
    paper = method_paper(method)
    cite = ", ".join(v for v in ((paper or {}).get("venue"), (paper or {}).get("year")) if v)
    return f"{method} ({cite})" if cite else str(method)


def _rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells (plain text, '±' and '–' as Unicode) of one setting."""
    header = ["#", "arch", "method", "clean", *table["attacks"], table["headline"]["label"], "95% CI"]
    body = []
    for r in table["rows"]:
        attacks = [mean_std((r["robust"].get(a) or {}).get("mean"), (r["robust"].get(a) or {}).get("std"))
                   for a in table["attacks"]]
        body.append([f"{r['rank']}{'=' if r['tied_with'] else ''}", str(r["arch"]),
                     _method_text(r["method"]) + (" †" if r["flagged"] else ""),
                     mean_std(r["clean_acc_mean"], r["clean_acc_std"]), *attacks,
                     mean_std(r["headline_mean"], r["headline_std"]), ci_text(r["headline_ci"]) or "—"])
    return header, body


def _footnote(table: dict[str, Any]) -> str:
    note = table["headline"]["note"] + " Accuracies in %; 95% CI: Wilson interval over the test images, seeds pooled; = marks ranks whose intervals overlap."
    if any(r["flagged"] for r in table["rows"]):
        note += (" † integrity flag (the evaluation is untrustworthy) or training flag (the training is: "
                 "docs/training_health.md); ranked last.")
    return note


def markdown(tables: list[dict[str, Any]]) -> str:
    out = []
    for table in tables:
        header, body = _rows(table)
        out.append(f"### {table_heading(table)}\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---:" if i == 0 or i >= 3 else "---" for i in range(len(header))) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        out.append(f"\n{_footnote(table)}\n")
    return "\n".join(out) + ("\n" if out else "No results.\n")


def latex(tables: list[dict[str, Any]]) -> str:
    """booktabs tables (\\usepackage{booktabs}), one table environment per setting."""
    out = []
    for table in tables:
        header, body = _rows(table)
        cols = "rll" + "r" * (len(header) - 3)
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                rf"\caption{{{latex_escape(table_heading(table))}. {latex_escape(_footnote(table))}}}",
                rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
                " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
        for cells in body:
            text = [latex_escape(c).replace("±", r"$\pm$").replace("–", "--").replace("†", r"$^\dagger$")
                    .replace("ε", r"$\varepsilon$").replace("∞", r"$\infty$") for c in cells]
            out.append(" & ".join(text) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    text = "\n".join(out)
    return (text.replace("ε", r"$\varepsilon$").replace("∞", r"$\infty$").replace("—", "--").replace("±", r"$\pm$")
            if out else "% no results\n")


def report(results_dir: str | Path, fmt: str) -> str:
    """The paper table of every Lp setting in a results folder, as Markdown or LaTeX."""
    board = aggregate(read_results(results_dir))
    if fmt == "markdown":
        return markdown(board.tables)
    if fmt == "latex":
        return latex(board.tables)
    raise ValueError(f"unknown report format {fmt!r}: use markdown or latex")

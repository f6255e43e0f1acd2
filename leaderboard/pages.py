"""Render the site's HTML pages with Jinja2 (autoescape on): index, one per setting, per cell, per
method, and the flagged rows.

Every string from results (names, errors, configs, flags) is escaped by Jinja; plots arrive as
Markup built by leaderboard.svg, which escapes its own text. `root` is the relative path from a
page back to the site root, so the site works from any folder or static host (no absolute URLs).
A figure that cannot be drawn is recorded in `Renderer.problems` with its reason and left out.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jinja2

from leaderboard.aggregate import TRACK_TITLES, Leaderboard
from leaderboard.cells import COST_FIELDS, PROVENANCE, Cell
from leaderboard.figures import cell_figures, robust_vs_clean, robust_vs_eps, setting_figures
from leaderboard.format import (
    DASH,
    base_method,
    cell_file,
    ci_text,
    cost_unit,
    display,
    eps_label,
    mean_std,
    method_file,
    pct,
    raw,
    si,
    sig,
)
from leaderboard.health import explain
from leaderboard.reproduce import reproduce_command

TEMPLATES_DIR = Path(__file__).parent / "templates"


def table_heading(table: dict[str, Any]) -> str:
    """'<dataset> — <threat model>' for one Lp setting."""
    return f"{table['dataset']} {DASH} {eps_label(table['norm'], table['eps'])}"


def method_paper(method: str | None) -> dict[str, str] | None:
    """The `paper` metadata (title, venue, year) of a registered method class; None if unknown."""
    from harness.core.registry import METHODS

    try:
        paper = getattr(METHODS.get(base_method(method)), "paper", None)
    except Exception:  # not registered here (a foreign store): no paper to name
        return None
    return paper if isinstance(paper, dict) else None


def paper_title(method: str | None) -> str:
    paper = method_paper(method)
    if not paper:
        return ""
    where = ", ".join(v for v in (paper.get("venue"), paper.get("year")) if v)
    return paper.get("title", "") + (f" ({where})" if where else "")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # templates end in .j2, so select_autoescape would not match them
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=pct, mean_std=mean_std, sig=sig, raw=raw, ci_text=ci_text, display=display, si=si)
    env.globals.update(eps_label=eps_label, table_heading=table_heading, cell_file=cell_file,
                       method_file=method_file, paper_title=paper_title, method_paper=method_paper,
                       cost_unit=cost_unit, track_titles=TRACK_TITLES, ace_keys=frozenset(),
                       explain_train_flag=explain)
    return env


class Renderer:
    """Holds one Jinja environment and the build time for all pages of a build."""

    def __init__(self, board: Leaderboard, generated_at: str, results_dir: Path | None = None,
                 out_dir: Path | None = None) -> None:
        self.env = _environment()
        self.board = board
        self.generated_at = generated_at
        self.results_dir, self.out_dir = results_dir, out_dir
        self.table_of_key = {k: t for t in board.tables for r in t["rows"] for k in r["keys"]}
        self.problems: list[dict[str, str]] = []

    def _render(self, template: str, root: str, **context: Any) -> str:
        return self.env.get_template(template).render(root=root, generated_at=self.generated_at, **context)

    def index(self) -> str:
        tracks: dict[str, list[dict[str, Any]]] = {}
        for table in self.board.tables:
            tracks.setdefault(table["track"], []).append(table)
        scatters = {}
        for table in self.board.tables:
            try:
                scatters[table["page"]] = robust_vs_clean(table, self.board.cells)
            except Exception as err:  # a setting whose plot cannot be drawn keeps its table
                self.problems.append({"subject": table["page"], "what": "index scatter",
                                      "reason": f"{type(err).__name__}: {err}"})
        try:
            eps_figures = robust_vs_eps(self.board.tables)
        except Exception as err:
            eps_figures = []
            self.problems.append({"subject": "index", "what": "robust vs eps", "reason": f"{type(err).__name__}: {err}"})
        return self._render("index.html.j2", "", board=self.board, tracks=list(tracks.items()),
                            scatters=scatters, eps_figures=eps_figures, problems=self.problems,
                            methods=self.method_names())

    def setting(self, table: dict[str, Any]) -> str:
        failed = [f for f in self.board.failed if f["key"] in set(table["failed_keys"])]
        return self._render("setting.html.j2", "../", table=table, failed=failed,
                            figures=setting_figures(table, self.board.cells, self.problems))

    def ace(self, explained: list[Any]) -> str:
        """The ACE gallery page (leaderboard.ace_gallery)."""
        from leaderboard.ace_gallery import METRICS

        return self._render("ace.html.j2", "", explained=explained, metrics=METRICS)

    def cell(self, cell: Cell, artifacts: list[tuple[str, str, bool]] | None = None) -> str:
        return self._render("cell.html.j2", "../", cell=cell, table=self.table_of_key.get(cell.key),
                            figures=cell_figures(cell, self.problems), provenance=PROVENANCE,
                            cost_fields=COST_FIELDS, command=reproduce_command(cell.first("config_json")),
                            artifacts=self.artifacts(cell) if artifacts is None else artifacts)

    def cell_fallback(self, cell: Cell, reason: str) -> str:
        """A minimal page for a cell whose full page could not be rendered, naming the reason."""
        return self._render("cell_fallback.html.j2", "../", cell=cell, reason=reason)

    def method_names(self) -> list[str]:
        return sorted({base_method(r["method"]) for t in self.board.tables for r in t["rows"]}
                      | {base_method(t_row["method"]) for t in self.board.backdoor_tables for t_row in t.get("rows", [])})

    def method(self, name: str) -> str:
        entries = [(t, r) for t in self.board.tables for r in t["rows"] if base_method(r["method"]) == name]
        return self._render("method.html.j2", "../", name=name, paper=method_paper(name), entries=entries)

    def backdoor_matrix(self) -> str:
        """The attack x defense matrix page (leaderboard.backdoor_matrix)."""
        from leaderboard.backdoor_matrix import backdoor_matrices

        return self._render("backdoor.html.j2", "", matrices=backdoor_matrices(self.board.backdoor_tables))

    def flagged(self) -> str:
        entries = [(t, r) for t in self.board.tables for r in t["rows"] if r["flagged"]]
        return self._render("flagged.html.j2", "", entries=entries, cells=self.board.cells)

    def artifacts(self, cell: Cell) -> list[tuple[str, str, bool]]:
        """(label, href, exists) for the cell's per-sample results and checkpoint, relative to
        the cell page, when the results folder is local."""
        if self.results_dir is None or self.out_dir is None:
            return []
        prefix, listed = self._artifact_folders
        out = [("per-sample results (Parquet)", f"{prefix}/samples/{cell.key}.parquet",
                f"{cell.key}.parquet" in listed["samples"]),
               ("result rows (Parquet)", f"{prefix}/{cell.key}.parquet", f"{cell.key}.parquet" in listed[""])]
        train_key = cell.train_key
        if train_key:
            out.append(("checkpoint folder", f"{prefix}/checkpoints/{train_key}", train_key in listed["checkpoints"]))
        return out

    @functools.cached_property
    def _artifact_folders(self) -> tuple[str, dict[str, set[str]]]:
        """The results folder relative to the cell pages, and what its folders hold (listed once,
        not a stat per cell: a 10,000-cell site asks 30,000 times)."""
        assert self.results_dir is not None and self.out_dir is not None
        results = self.results_dir.resolve()
        prefix = Path(os.path.relpath(results, (self.out_dir / cell_file("x")).parent.resolve())).as_posix()

        def names(folder: Path, kind: str) -> set[str]:
            try:
                return {e.name for e in os.scandir(folder) if (e.is_dir() if kind == "dir" else e.is_file())}
            except OSError:
                return set()
        return prefix, {"": names(results, "file"), "samples": names(results / "samples", "file"),
                        "checkpoints": names(results / "checkpoints", "dir")}

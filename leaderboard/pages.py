"""Render the site's HTML pages with Jinja2 (autoescape on): index, one per setting, one per cell.

Every string from results (names, errors, configs, flags) is escaped by Jinja; plots arrive as
Markup built by leaderboard.svg, which escapes its own text. `root` is the relative path from a
page back to the site root, so the site works from any folder or static host (no absolute URLs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from leaderboard.aggregate import TRACK_TITLES, Leaderboard
from leaderboard.cells import PROVENANCE, Cell
from leaderboard.figures import cell_figures, setting_figures
from leaderboard.format import (
    DASH,
    cell_file,
    cost_unit,
    eps_label,
    mean_std,
    pct,
    raw,
    sig,
)

TEMPLATES_DIR = Path(__file__).parent / "templates"


def table_heading(table: dict[str, Any]) -> str:
    """'<dataset> — <threat model>' for one Lp setting."""
    return f"{table['dataset']} {DASH} {eps_label(table['norm'], table['eps'])}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # templates end in .j2, so select_autoescape would not match them
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=pct, mean_std=mean_std, sig=sig, raw=raw)
    env.globals.update(eps_label=eps_label, table_heading=table_heading, cell_file=cell_file,
                       cost_unit=cost_unit, track_titles=TRACK_TITLES, ace_keys=frozenset())
    return env


class Renderer:
    """Holds one Jinja environment and the build time for all pages of a build."""

    def __init__(self, board: Leaderboard, generated_at: str) -> None:
        self.env = _environment()
        self.board = board
        self.generated_at = generated_at
        self.table_of_key = {k: t for t in board.tables for r in t["rows"] for k in r["keys"]}

    def _render(self, template: str, root: str, **context: Any) -> str:
        return self.env.get_template(template).render(root=root, generated_at=self.generated_at, **context)

    def index(self) -> str:
        tracks: dict[str, list[dict[str, Any]]] = {}
        for table in self.board.tables:
            tracks.setdefault(table["track"], []).append(table)
        return self._render("index.html.j2", "", board=self.board, tracks=list(tracks.items()))

    def setting(self, table: dict[str, Any]) -> str:
        failed = [f for f in self.board.failed if f["key"] in set(table["failed_keys"])]
        return self._render("setting.html.j2", "../", table=table, failed=failed,
                            figures=setting_figures(table, self.board.cells))

    def ace(self, explained: list[Any]) -> str:
        """The ACE gallery page (leaderboard.ace_gallery)."""
        from leaderboard.ace_gallery import METRICS

        return self._render("ace.html.j2", "", explained=explained, metrics=METRICS)

    def cell(self, cell: Cell) -> str:
        return self._render("cell.html.j2", "../", cell=cell, table=self.table_of_key.get(cell.key),
                            figures=cell_figures(cell), provenance=PROVENANCE)

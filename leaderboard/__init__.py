"""Static leaderboard site for robustgrid results, generated from the Parquet results alone.

`build_site(results_dir, out_dir)` reads the committed per-cell Parquet files
(harness.store.index.read_results), aggregates them in DuckDB (leaderboard.aggregate) and writes
index.html, a page per setting and per cell (leaderboard.pages, Jinja2, autoescaped; inline SVG
plots from leaderboard.svg), data.json and data.csv (leaderboard.exports). Pages read fully
without JavaScript; a small inline script adds column sorting and row filtering.
"""
from leaderboard.build import build_site

__all__ = ["build_site"]

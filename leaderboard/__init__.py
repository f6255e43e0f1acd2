"""Static leaderboard site for robustgrid results: one ranked table per (dataset, threat model).

`build_site(results_dir, out_dir)` reads the committed per-cell Parquet files
(harness.results.read_results), aggregates them in DuckDB (leaderboard.aggregate) and writes
index.html (Jinja2, autoescaped, no JavaScript needed), data.json and data.csv.
"""
from leaderboard.build import build_site

__all__ = ["build_site"]

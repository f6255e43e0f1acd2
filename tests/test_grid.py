"""The grid under Ray: expansion, keys, commit + skip, failures isolated, leaderboard at the end."""
from __future__ import annotations

import os

import pytest

from harness.config import ConfigError
from harness.grid import expand_grid, run_grid
from harness.results import read_results


def test_grid_expands_demo_axes(tiny) -> None:
    cells = expand_grid(["grid=demo"] + tiny)
    assert len(cells) == 6
    assert {(c["arch"]["name"], c["method"]["name"]) for c in cells} == {
        (a, m) for a in ("test_resnet", "test_vit") for m in ("erm", "pgd_at", "trades")}
    assert len({c["key"] for c in cells}) == 6
    assert all(set(c["attack"]) == {"fgsm", "pgd"} for c in cells)
    # keys are stable, and ignore where results go
    assert {c["key"] for c in expand_grid(["grid=demo"] + tiny)} == {c["key"] for c in cells}


def test_grid_needs_a_grid() -> None:
    with pytest.raises(ConfigError, match="grid=<name>"):
        expand_grid([])


def test_grid_runs_commits_and_skips_on_rerun(tiny, ray_session) -> None:
    overrides = ["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm,pgd_at]"] + tiny
    cells = expand_grid(overrides)
    assert len(cells) == 2
    report = run_grid(cells)
    assert [o.status for o in report.outcomes] == ["ok", "ok"], [o.error for o in report.outcomes]
    results_dir = cells[0]["results_dir"]
    table = read_results(results_dir)
    assert table.num_rows == 4  # 2 cells x 2 attacks
    mtimes = {p: os.stat(p).st_mtime_ns for p in (o.result_path for o in report.outcomes)}

    again = run_grid(expand_grid(overrides))
    assert again.outcomes == [] and sorted(again.skipped) == sorted(c["key"] for c in cells)
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes, "committed results must not be rewritten"
    assert read_results(results_dir).num_rows == 4

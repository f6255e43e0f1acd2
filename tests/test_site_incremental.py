"""A rebuild into the same site folder renders only the cell pages whose inputs changed
(leaderboard/incremental.py), and is the same site a fresh build writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import leaderboard.build as build
from harness.store.results import write_cell_result
from leaderboard import build_site
from leaderboard.format import cell_file
from leaderboard.incremental import MANIFEST


def _row(key: str, method: str, robust: float, status: str = "ok") -> dict:
    return {"key": key, "grid": "t", "status": status, "dataset": "digits", "arch": "cnn", "method": method,
            "seed": 0, "attack": "pgd" if status == "ok" else None, "norm": "linf", "eps": 0.1, "clean_acc": 0.9,
            "robust_acc": robust if status == "ok" else None, "n_eval": 400,
            "error": None if status == "ok" else "boom"}


@pytest.fixture()
def rendered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys of the cell pages rendered (not kept) by each build."""
    keys: list[str] = []
    original = build.Renderer.cell

    def counting(self, cell, artifacts=None):
        keys.append(cell.key)
        return original(self, cell, artifacts)
    monkeypatch.setattr(build.Renderer, "cell", counting)
    return keys


def _pages(site: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (site / "cells").glob("*.html")}


def test_a_rebuild_renders_only_new_changed_or_missing_cell_pages(tmp_path: Path, rendered: list[str]) -> None:
    results, site = tmp_path / "results", tmp_path / "site"
    for key, method, robust in (("a0", "erm", 0.1), ("b0", "pgd_at", 0.5), ("c0", "trades", 0.4)):
        write_cell_result(results, key, [_row(key, method, robust)])
    write_cell_result(results, "d0", [_row("d0", "mart", 0, status="failed")])
    build_site(results, site)
    assert sorted(rendered) == ["a0", "b0", "c0", "d0"]
    first = _pages(site)

    rendered.clear()
    build_site(results, site)
    assert rendered == [] and _pages(site) == first  # nothing changed: every page kept as it was

    write_cell_result(results, "e0", [_row("e0", "awp", 0.45)])  # a new cell
    write_cell_result(results, "d0", [_row("d0", "mart", 0.3)])  # the failed cell, now ok
    (site / cell_file("a0")).unlink()  # a page deleted by hand
    rendered.clear()
    build_site(results, site)
    assert sorted(rendered) == ["a0", "d0", "e0"]
    assert "0.3" in (site / cell_file("d0")).read_text() or "30" in (site / cell_file("d0")).read_text()

    fresh = tmp_path / "fresh"
    build_site(results, fresh)
    strip = lambda text: text.split("<footer>")[0]  # the footer names the build time
    assert {k: strip(v) for k, v in _pages(site).items()} == {k: strip(v) for k, v in _pages(fresh).items()}


def test_a_broken_manifest_or_other_code_re_renders_everything(tmp_path: Path, rendered: list[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    results, site = tmp_path / "results", tmp_path / "site"
    for key in ("a0", "b0"):
        write_cell_result(results, key, [_row(key, "erm", 0.1)])
    build_site(results, site)
    (site / MANIFEST).write_text("{not json")
    rendered.clear()
    build_site(results, site)
    assert sorted(rendered) == ["a0", "b0"]
    assert set(json.loads((site / MANIFEST).read_text())) == {cell_file("a0"), cell_file("b0")}

    import leaderboard.incremental as incremental

    monkeypatch.setattr(incremental, "render_version", lambda: "other code")
    rendered.clear()
    build_site(results, site)
    assert sorted(rendered) == ["a0", "b0"]


def test_a_kept_page_still_reports_its_problems_on_the_index(tmp_path: Path, rendered: list[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import leaderboard.figures as figures

    def broken(cell):
        raise ValueError(f"cannot draw {cell.key}")
    monkeypatch.setattr(figures, "CELL_FIGURES", [*figures.CELL_FIGURES, broken])
    results, site = tmp_path / "results", tmp_path / "site"
    write_cell_result(results, "a0", [_row("a0", "erm", 0.1)])
    build_site(results, site)
    first = json.loads((site / "site.json").read_text())["problems"]
    assert [p["reason"] for p in first] == ["ValueError: cannot draw a0"]
    rendered.clear()
    build_site(results, site)
    assert rendered == [] and json.loads((site / "site.json").read_text())["problems"] == first
    assert "cannot draw a0" in (site / "index.html").read_text()


def test_a_cell_page_links_the_artifacts_its_results_folder_holds(tmp_path: Path) -> None:
    """The per-sample file, the result file and the checkpoint folder are linked relative to the
    cell page when they exist (the folders are listed once per build, not stat'ed per cell)."""
    import re

    results, site = tmp_path / "results", tmp_path / "site"
    for key in ("a0", "b0"):
        row = {**_row(key, "erm", 0.1), "config_json": json.dumps({"train_key": f"t{key}"})}
        write_cell_result(results, key, [row])
    (results / "samples").mkdir()
    (results / "samples" / "a0.parquet").write_bytes(b"x")
    (results / "checkpoints" / "ta0").mkdir(parents=True)
    build_site(results, site)
    for key, expected in (("a0", 3), ("b0", 1)):
        page = site / cell_file(key)
        hrefs = re.findall(r'<li><a href="([^"]+)">', page.read_text().split('id="artifacts"')[1].split("</ul>")[0])
        assert len(hrefs) == expected, hrefs
        assert all((page.parent / href).resolve().exists() for href in hrefs)
    assert "not in this results folder" in (site / cell_file("b0")).read_text()

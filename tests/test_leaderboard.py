"""Leaderboard site: numeric ranking, headline choice, flagged rows last, hand-checked mean ± std,
cost, failed cells, page per setting and per cell, escaping, data files. Browser checks live in
tests/test_site_browser.py."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.store.results import write_cell_result
from leaderboard import build_site
from leaderboard.format import cell_file, eps_label, setting_file

REPO = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"
ATTACKS = ["fgsm", "pgd"]
FLAG = "gradient_masking<b>"
# (dataset, norm, eps) -> {(arch, method): target worst-case robust mean}. Values are picked so
# that sorting the formatted text ("9.50" > "85.00", "5.00" > "10.00") differs from numeric order.
WORST = {
    ("digits", "linf", 0.1): {
        ("mlp", "erm"): 0.095, ("mlp", "pgd_at"): 0.85, ("mlp", XSS): 0.5,
        ("cnn", "erm"): 0.05, ("cnn", "pgd_at"): 0.9, ("cnn", XSS): 0.1,
    },
    ("fashion", "l2", 0.5): {
        ("mlp", "erm"): 0.85, ("mlp", "pgd_at"): 0.095, ("mlp", XSS): 0.05,
        ("cnn", "erm"): 0.9, ("cnn", "pgd_at"): 0.1, ("cnn", XSS): 0.5,
    },
}
FLAGGED = ("digits", "cnn", "pgd_at", 1)  # (dataset, arch, method, seed) of the one flagged cell
# A setting evaluated with AutoAttack, where AutoAttack's order differs from the worst case's.
AA_SETTING = ("digits", "l2", 1.0)
AA_CELLS = {("mlp", "erm"): {"autoattack": 0.3, "fgsm": 0.2}, ("cnn", "erm"): {"autoattack": 0.25, "fgsm": 0.4}}
HEADINGS = ["digits — L2, ε = 1.0000", "digits — L∞, ε = 0.1000 (25.5/255)", "fashion — L2, ε = 0.5000"]
FAILED_ERROR = "RuntimeError: CUDA out of memory <img src=x onerror=alert(2)>\n  File \"train.py\", line 3"


def make_key(*parts: object) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def robust_values(w: float, seed: int) -> dict[str, float]:
    """Per-cell attack results; the min is pgd for seed 0 and fgsm for seed 1 (worst mean = w),
    so min over per-attack means (w + 0.015) would differ from the per-cell worst case."""
    if seed == 0:
        return {"fgsm": w + 0.03, "pgd": w - 0.01}
    return {"fgsm": w + 0.01, "pgd": w + 0.04}


def cost_fields(dataset: str, seed: int) -> dict:
    """digits cells ran on 2 GPUs, fashion cells on one CPU (world_size left null)."""
    if dataset == "digits":
        return {"train_seconds": 1800.0, "eval_seconds": 180.0 * (seed + 1), "world_size": 2,
                "device": "cuda", "images_per_second": 1000.0 + 100 * seed}
    return {"train_seconds": 360.0, "eval_seconds": 0.0, "device": "cpu", "images_per_second": 50.0}


def cell_rows(key: str, dataset: str, norm: str, eps: float, arch: str, method: str,
              seed: int, robust: dict[str, float], clean: float) -> list[dict]:
    flagged = (dataset, arch, method, seed) == FLAGGED
    return [
        {
            "key": key, "grid": "test", "status": "ok", "dataset": dataset, "arch": arch,
            "method": method, "seed": seed, "attack": attack, "norm": norm, "eps": eps,
            "clean_acc": clean, "robust_acc": acc, "per_class_robust_acc": [acc, acc / 2],
            "per_class_clean_acc": [clean, clean], "class_names": ["a", XSS], "n_eval": 100, "epochs": 2,
            "flags": [FLAG] if flagged and attack == "pgd" else [],
            "flag_details": json.dumps({FLAG: "square 10.0% < white-box 40.0% <i>"}) if flagged and attack == "pgd" else None,
            "train_curve": json.dumps([{"epoch": 0, "lr": 0.1, "loss": 2.0}, {"epoch": 1, "lr": 0.05, "loss": 1.5}]),
            "config_json": json.dumps({"method": {"name": method}, "seed": seed}),
            "git_commit": "abc123", "package_versions": {"torch": "2.0"},
            **cost_fields(dataset, seed),
        }
        for attack, acc in robust.items()
    ]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for (dataset, norm, eps), rows in WORST.items():
        for (arch, method), w in rows.items():
            for seed in (0, 1):
                key = make_key(dataset, norm, eps, arch, method, seed)
                clean = 0.5 + w / 2 + 0.01 * seed
                write_cell_result(root, key, cell_rows(key, dataset, norm, eps, arch, method, seed,
                                                       robust_values(w, seed), clean))
    # A single-seed row: its std is undefined and must show as "—" / null.
    key = make_key("fashion", "vit", "erm", 0)
    write_cell_result(root, key, cell_rows(key, "fashion", "l2", 0.5, "vit", "erm", 0, robust_values(0.3, 0), 0.65))
    for (arch, method), robust in AA_CELLS.items():
        key = make_key(*AA_SETTING, arch, method)
        write_cell_result(root, key, cell_rows(key, *AA_SETTING, arch, method, 0, robust, 0.9))
    # A failed cell for an (arch, method) that also has ok cells.
    failed_key = make_key("failed")
    write_cell_result(root, failed_key, [{
        "key": failed_key, "grid": "test", "status": "failed", "error": FAILED_ERROR,
        "dataset": "digits", "arch": "cnn", "method": "pgd_at", "seed": 2,
        "norm": "linf", "eps": 0.1,
    }])
    # Foreign files that must be skipped.
    (root / "notes.txt").write_text("not a result\n")
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), root / "random.parquet")
    inflight = make_key("inflight")
    pq.write_table(
        pa.table({"key": [inflight], "status": ["ok"], "dataset": ["digits"]}),
        root / f".tmp-{inflight}-abc.parquet",
    )
    return root


@pytest.fixture(scope="module")
def site(results_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_site(results_dir, tmp_path_factory.mktemp("site"))


class Page(HTMLParser):
    """Collects ranking tables (heading, header, rows as text, links) and failed-cells rows.
    A cell's Wilson interval (<small class="ci">) is kept apart, in row["_ci"][column]."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.failed: list[list[str]] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self._kind: str | None = None
        self._heading: list[str] | None = None
        self._row: list[str] | None = None
        self._row_links: list[str] = []
        self._row_class = ""
        self._cell: list[str] | None = None
        self._ci: list[str] | None = None
        self._row_ci: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag in ("h1", "h3"):
            self._heading = []
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
            if self._row is not None:
                self._row_links.append(attrs["href"])
        elif tag == "table":
            classes = (attrs.get("class") or "").split()
            self._kind = "ranking" if "ranking" in classes else ("failed" if "failed" in classes else None)
            if self._kind == "ranking":
                self.tables.append({"heading": self.headings[-1] if self.headings else "", "header": [], "rows": []})
        elif tag == "tr":
            self._row, self._row_links, self._row_class = [], [], attrs.get("class") or ""
            self._row_ci = []
        elif tag in ("td", "th"):
            self._cell = []
            self._row_ci.append("")
        elif tag == "small" and "ci" in (attrs.get("class") or "").split():
            self._ci = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "small" and self._ci is not None:
            self._row_ci[-1] = "".join(self._ci).strip()
            self._ci = None
        elif tag in ("h1", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._kind == "ranking":
                table = self.tables[-1]
                if not table["header"]:
                    table["header"] = self._row
                else:
                    row = dict(zip(table["header"], self._row))
                    row["_links"], row["_flagged"] = self._row_links, "flagged" in self._row_class
                    row["_ci"] = dict(zip(table["header"], self._row_ci))
                    table["rows"].append(row)
            elif self._kind == "failed":
                self.failed.append(self._row + self._row_links)
            self._row = None
        elif tag == "table":
            self._kind = None

    def handle_data(self, data: str) -> None:
        if self._ci is not None:
            self._ci.append(data)
            return
        if self._heading is not None:
            self._heading.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def setting_page(site: Path, dataset: str, norm: str, eps: float) -> Path:
    return site.parent / setting_file("lp", dataset, norm, eps)


def expected_rows(results_dir: Path) -> dict[tuple, dict]:
    """Recompute every leaderboard row by hand from the ok Parquet files (plain Python stats)."""
    cells: dict[tuple, list[dict]] = {}
    for path in results_dir.glob("*.parquet"):
        if path.name.startswith(".") or path.name == "random.parquet":
            continue
        rows = pq.read_table(path).to_pylist()
        if any(r["status"] != "ok" for r in rows):
            continue
        r0 = rows[0]
        cells.setdefault((r0["dataset"], r0["norm"], r0["eps"], r0["arch"], r0["method"]), []).append(
            {
                "key": r0["key"], "seed": r0["seed"], "clean": r0["clean_acc"],
                "robust": {r["attack"]: r["robust_acc"] for r in rows},
                "worst": min(r["robust_acc"] for r in rows),
                "hours": (r0["train_seconds"] + r0["eval_seconds"]) * (r0["world_size"] or 1) / 3600,
                "flags": sorted({f for r in rows for f in r["flags"]}),
            }
        )

    def stats(values: list[float]) -> tuple[float, float | None]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)

    out = {}
    for group, group_cells in cells.items():
        group_cells.sort(key=lambda c: (c["seed"], c["key"]))
        attacks = sorted(group_cells[0]["robust"])
        out[group] = {
            "n_seeds": len(group_cells),
            "keys": [c["key"] for c in group_cells],
            "clean": stats([c["clean"] for c in group_cells]),
            "worst": stats([c["worst"] for c in group_cells]),
            "hours": stats([c["hours"] for c in group_cells]),
            "robust": {a: stats([c["robust"][a] for c in group_cells]) for a in attacks},
            "flags": sorted({f for c in group_cells for f in c["flags"]}),
        }
    return out


def fmt(mean_std: tuple[float, float | None]) -> str:
    mean, std = mean_std
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def test_files_written(site: Path) -> None:
    out = site.parent
    assert site.name == "index.html" and site.is_file()
    assert (out / "site.json").is_file() and (out / "data.csv").is_file()
    assert len(list((out / "settings").glob("*.html"))) == 3
    assert len(list((out / "cells").glob("*.html"))) == 28  # 27 ok + 1 failed; no foreign/in-flight
    assert not list(out.rglob(".tmp-*"))


def test_index_lists_every_setting_and_links_every_cell(site: Path, results_dir: Path) -> None:
    page = parse(site)
    assert [t["heading"] for t in page.tables] == HEADINGS
    for table, (dataset, norm, eps) in zip(page.tables, [AA_SETTING, *WORST]):
        assert setting_file("lp", dataset, norm, eps) in page.links
    keys = {p.stem for p in results_dir.glob("*.parquet") if len(p.stem) == 40}
    assert len(keys) == 28
    assert {cell_file(k) for k in keys} <= set(page.links)  # one click from the index
    for link in page.links:  # no dead links
        if not link.startswith(("http", "#")):
            assert (site.parent / link).is_file(), link


def test_setting_tables_and_headings(site: Path) -> None:
    for (dataset, norm, eps), heading in zip([AA_SETTING, *WORST], HEADINGS):
        (table,) = parse(setting_page(site, dataset, norm, eps)).tables
        assert table["heading"] == heading
        assert table["header"][:5] == ["#", "arch", "method", "seeds", "clean"]
        assert table["header"][-5:] == ["cost / seed", "images/s", "integrity", "training health", "cells"]
    digits = parse(setting_page(site, "digits", "linf", 0.1)).tables[0]
    assert digits["header"][5:8] == ["fgsm", "pgd", "worst-case robust headline"]
    assert len(digits["rows"]) == 6
    assert len(parse(setting_page(site, "fashion", "l2", 0.5)).tables[0]["rows"]) == 7


def test_rows_sorted_numerically_flagged_last(site: Path) -> None:
    for path in (site, setting_page(site, "digits", "linf", 0.1)):
        digits = next(t for t in parse(path).tables if t["heading"] == HEADINGS[1])["rows"]
        # cnn/pgd_at has the best worst case (90%) but one of its cells is flagged: ranked last.
        assert [(r["arch"], r["method"]) for r in digits] == [
            ("mlp", "pgd_at"), ("mlp", XSS), ("cnn", XSS), ("mlp", "erm"), ("cnn", "erm"), ("cnn", "pgd_at"),
        ]
        assert [r["_flagged"] for r in digits] == [False] * 5 + [True]
        assert digits[-1]["integrity"] == f"⚠ {FLAG}"
        assert all(r["integrity"] == "✓ no flags" for r in digits[:-1])
    fashion = parse(setting_page(site, "fashion", "l2", 0.5)).tables[0]["rows"]
    worst = [float(r["worst-case robust headline"].split(" ± ")[0]) for r in fashion]
    assert worst == sorted(worst, reverse=True)
    as_text = [r["worst-case robust headline"] for r in fashion]
    assert as_text != sorted(as_text, reverse=True), "fixture must make text sort differ"
    assert [r["#"].rstrip("=") for r in fashion] == [str(i) for i in range(1, 8)]  # "=": tied


def test_autoattack_is_the_headline_when_present(site: Path) -> None:
    (table,) = parse(setting_page(site, *AA_SETTING)).tables
    assert table["header"][5:8] == ["autoattack headline", "fgsm", "worst-case robust"]
    # Ranked by AutoAttack (30 > 25), although the worst case would rank cnn first (25 > 20).
    assert [(r["arch"], r["autoattack headline"], r["worst-case robust"]) for r in table["rows"]] == [
        ("mlp", "30.00", "20.00"), ("cnn", "25.00", "25.00"),
    ]
    index_table = parse(site).tables[0]
    assert "autoattack headline" in index_table["header"]  # the index shows every attack too
    assert "Headline: robust accuracy under AutoAttack." in setting_page(site, *AA_SETTING).read_text()


def test_numbers_match_hand_computation(site: Path, results_dir: Path) -> None:
    expected = expected_rows(results_dir)
    seen = 0
    for dataset, norm, eps in [AA_SETTING, *WORST]:
        (table,) = parse(setting_page(site, dataset, norm, eps)).tables
        for row in table["rows"]:
            exp = expected[(dataset, norm, eps, row["arch"], row["method"])]
            assert row["seeds"] == str(exp["n_seeds"])
            assert row["clean"] == fmt(exp["clean"])
            assert row["worst-case robust" if "worst-case robust" in row else "worst-case robust headline"] == fmt(exp["worst"])
            for attack, stats in exp["robust"].items():
                assert row.get(attack, row.get(f"{attack} headline")) == fmt(stats)
            assert row["cells"].split() == [k[:10] for k in exp["keys"]]
            assert [link for link in row["_links"] if "/cells/" in link] == [f"../{cell_file(k)}" for k in exp["keys"]]
            unit = "GPU-h" if dataset == "digits" else "CPU-h"
            assert row["cost / seed"] == f"{exp['hours'][0]:.3g} {unit}"
            seen += 1
    assert seen == 15
    # Spot checks against literal numbers: worst = mean of per-cell minima, not min of means.
    rows = parse(setting_page(site, "digits", "linf", 0.1)).tables[0]["rows"]
    (top,) = [r for r in rows if (r["arch"], r["method"]) == ("cnn", "pgd_at")]
    assert top["worst-case robust headline"] == "90.00 ± 1.41"
    assert top["fgsm"] == "92.00 ± 1.41" and top["pgd"] == "91.50 ± 3.54"
    assert top["cost / seed"] == "1.15 GPU-h" and top["images/s"] == "1,050"
    (single,) = [r for r in parse(setting_page(site, "fashion", "l2", 0.5)).tables[0]["rows"] if r["arch"] == "vit"]
    assert single["seeds"] == "1" and single["worst-case robust headline"] == "29.00"
    assert single["cost / seed"] == "0.1 CPU-h"


def test_failed_cells_listed_apart_with_pages(site: Path) -> None:
    page = parse(site)
    failed_key = make_key("failed")
    assert page.failed[0] == ["key", "dataset", "arch", "method", "seed", "error"]
    assert page.failed[1:] == [[
        failed_key[:10], "digits", "cnn", "pgd_at", "2",
        "RuntimeError: CUDA out of memory <img src=x onerror=alert(2)>", cell_file(failed_key),
    ]]
    for table in page.tables:
        for row in table["rows"]:
            assert failed_key[:10] not in row["cells"]
    assert "train.py" not in site.read_text(encoding="utf-8")  # only the error's first line
    assert make_key("inflight")[:10] not in site.read_text(encoding="utf-8")
    cell = (site.parent / cell_file(failed_key)).read_text(encoding="utf-8")
    assert '<pre class="error">RuntimeError: CUDA out of memory &lt;img src=x onerror=alert(2)&gt;\n' in cell
    assert "train.py&#34;, line 3</pre>" in cell or "train.py&quot;, line 3</pre>" in cell
    setting = setting_page(site, "digits", "linf", 0.1).read_text(encoding="utf-8")
    assert f"../{cell_file(failed_key)}" in setting


def test_cell_page_shows_rows_provenance_config_curves(site: Path, results_dir: Path) -> None:
    key = make_key("digits", "linf", 0.1, "cnn", "pgd_at", 1)
    html = (site.parent / cell_file(key)).read_text(encoding="utf-8")
    rows = pq.read_table(results_dir / f"{key}.parquet").to_pylist()
    for row in rows:
        assert f'title="{row["robust_acc"]!r}">{100 * row["robust_acc"]:.2f}</td>' in html
    assert f"⚠ {FLAG.replace('<', '&lt;').replace('>', '&gt;')}" in html
    # the flag's evidence (flag_details) is listed, escaped
    assert "<li>gradient_masking&lt;b&gt;: square 10.0% &lt; white-box 40.0% &lt;i&gt;</li>" in html
    assert "abc123" in html and "torch==2.0" in html and "<td>1.2 GPU-h</td>" in html  # (1800 + 360) s × 2 ranks
    assert '"name": "pgd_at"' in html.replace("&#34;", '"')  # pretty JSON config
    assert html.count("<svg") == 3  # loss, lr, per-class heatmap
    assert "../" + setting_file("lp", "digits", "linf", 0.1) in html


def test_setting_page_plots(site: Path) -> None:
    html = setting_page(site, "digits", "linf", 0.1).read_text(encoding="utf-8")
    assert html.count("<svg") == 3
    assert 'id="robust-vs-clean"' in html and 'id="per-class-robust"' in html and 'id="robust-vs-compute"' in html
    assert "clean accuracy (%)" in html and "worst-case robust accuracy (%)" in html
    assert "flagged (untrustworthy)" in html  # legend entry for the flagged point
    assert html.count('class="point"') == 12  # 6 rows in each of the two scatters


def test_strings_are_escaped(site: Path) -> None:
    for path in [site, *site.parent.glob("settings/*.html"), *site.parent.glob("cells/*.html")]:
        html = path.read_text(encoding="utf-8")
        assert html.lower().count("<script") == 1, path  # only the site's own inline script
        assert "<img" not in html and "<b>" not in html, path
    html = setting_page(site, "digits", "linf", 0.1).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    methods = {r["method"] for t in parse(site).tables for r in t["rows"]}
    assert XSS in methods  # rendered as text


def test_data_json_matches_parquet(site: Path, results_dir: Path) -> None:
    data = json.loads((site.parent / "site.json").read_text(encoding="utf-8"))
    assert set(data) >= {"generated_at", "summary", "tables", "failed"}
    assert [(t["dataset"], t["norm"], t["eps"]) for t in data["tables"]] == [AA_SETTING, *WORST]
    assert [t["headline"]["kind"] for t in data["tables"]] == ["autoattack", "worst_case", "worst_case"]
    expected = expected_rows(results_dir)
    n = 0
    for table in data["tables"]:
        assert (site.parent / table["page"]).is_file()
        ranked = [(r["flagged"], -r["headline_mean"]) for r in table["rows"]]
        assert ranked == sorted(ranked)
        for row in table["rows"]:
            exp = expected[(table["dataset"], table["norm"], table["eps"], row["arch"], row["method"])]
            assert row["n_seeds"] == exp["n_seeds"] and row["keys"] == exp["keys"]
            assert row["cell_pages"] == [cell_file(k) for k in exp["keys"]]
            assert row["flags"] == exp["flags"] and row["flagged"] == bool(exp["flags"])
            assert isinstance(row["worst_robust_mean"], float)
            assert row["clean_acc_mean"] == pytest.approx(exp["clean"][0])
            assert row["worst_robust_mean"] == pytest.approx(exp["worst"][0])
            assert row["cost_hours_mean"] == pytest.approx(exp["hours"][0])
            for attack, stats in exp["robust"].items():
                assert row["robust"][attack]["mean"] == pytest.approx(stats[0])
            headline = exp["robust"]["autoattack"] if table["headline"]["kind"] == "autoattack" else exp["worst"]
            assert row["headline_mean"] == pytest.approx(headline[0])
            for got, (_, std) in [(row["clean_acc_std"], exp["clean"]), (row["worst_robust_std"], exp["worst"])]:
                assert got is None if std is None else got == pytest.approx(std)
            n += 1
    assert n == len(expected) == 15
    assert data["summary"]["n_flagged_rows"] == 1
    assert [f["key"] for f in data["failed"]] == [make_key("failed")]
    assert data["failed"][0]["error"] == FAILED_ERROR


def test_data_csv_long_form(site: Path) -> None:
    with open(site.parent / "data.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 15 * 2
    top = [r for r in rows if (r["dataset"], r["norm"], r["arch"], r["method"]) == ("digits", "linf", "cnn", "pgd_at")]
    assert {r["attack"]: float(r["robust_mean"]) for r in top} == pytest.approx({"fgsm": 0.92, "pgd": 0.915})
    assert all(float(r["worst_robust_mean"]) == pytest.approx(0.9) for r in top)
    assert all(r["flags"] == FLAG and r["rank"] == "6" and r["cost_unit"] == "GPU-h" for r in top)
    assert any(r["method"] == XSS for r in rows)


def test_footer_counts(site: Path) -> None:
    html = site.read_text(encoding="utf-8")
    assert "28 cells (27 ok, 1 failed)" in html
    assert "55 result rows" in html and "15 leaderboard rows" in html
    assert "Generated 20" in html


def test_rebuild_removes_stale_pages(results_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "gone.html").write_text("old")
    build_site(results_dir, out)
    assert not (out / "cells" / "gone.html").exists()


def test_empty_results(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    index = build_site(tmp_path / "results", tmp_path / "site")
    html = index.read_text(encoding="utf-8")
    assert "No results found" in html and "<table" not in html
    data = json.loads((tmp_path / "site" / "site.json").read_text())
    assert data["tables"] == [] and data["failed"] == []


def test_only_failed_results(tmp_path: Path) -> None:
    write_cell_result(tmp_path / "r", "k1", [{"key": "k1", "status": "failed", "error": "boom"}])
    html = build_site(tmp_path / "r", tmp_path / "s").read_text(encoding="utf-8")
    assert "No successful results" in html and "boom" in html
    assert "boom" in (tmp_path / "s" / "cells" / "k1.html").read_text()


def test_odd_keys_get_safe_file_names() -> None:
    assert cell_file("0123abcd") == "cells/0123abcd.html"
    for key in ["../../etc/passwd", "<b>x</b>", "a/b", ".hidden"]:
        name = cell_file(key)
        assert re.fullmatch(r"cells/[A-Za-z0-9_-]+\.html", name), name
    assert cell_file("a/b") != cell_file("a-b")
    assert setting_file("lp", "digits", "linf", 0.1) == "settings/lp-digits-linf-0.1.html"
    assert re.fullmatch(r"settings/[A-Za-z0-9_.-]+\.html", setting_file("lp", XSS, "l2", 0.5))


def test_missing_results_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_site(tmp_path / "nope", tmp_path / "site")


def test_eps_label() -> None:
    assert eps_label("linf", 8 / 255) == "L∞, ε = 0.0314 (8/255)"
    assert eps_label("linf", 0.1) == "L∞, ε = 0.1000 (25.5/255)"
    assert eps_label("l2", 0.5) == "L2, ε = 0.5000"


def test_module_cli(results_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-site"
    proc = subprocess.run(
        [sys.executable, "-m", "leaderboard", "--results", str(results_dir), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert proc.stdout.strip() == str(out / "index.html")
    assert (out / "index.html").is_file()


def test_cell_with_two_threat_models_is_ranked_in_each(tmp_path: Path) -> None:
    """A cell evaluated under PGD-Linf and PGD-L2 appears in both settings; each worst case uses
    only that setting's attacks (an L2 number must never be the worst case of an Linf table)."""
    rows = [
        {"key": "k2", "status": "ok", "dataset": "digits", "arch": "cnn", "method": "erm", "seed": 0,
         "attack": attack, "norm": norm, "eps": eps, "clean_acc": 0.9, "robust_acc": acc}
        for attack, norm, eps, acc in [("fgsm", "linf", 0.1, 0.4), ("pgd", "linf", 0.1, 0.3),
                                       ("pgd_l2", "l2", 1.0, 0.6)]
    ]
    write_cell_result(tmp_path / "r", "k2", rows)
    build_site(tmp_path / "r", tmp_path / "s")
    tables = {(t["norm"], t["eps"]): t for t in json.loads((tmp_path / "s" / "site.json").read_text())["tables"]}
    assert set(tables) == {("linf", 0.1), ("l2", 1.0)}
    linf_row, = tables[("linf", 0.1)]["rows"]
    l2_row, = tables[("l2", 1.0)]["rows"]
    assert linf_row["worst_robust_mean"] == pytest.approx(0.3) and set(linf_row["robust"]) == {"fgsm", "pgd"}
    assert l2_row["worst_robust_mean"] == pytest.approx(0.6) and set(l2_row["robust"]) == {"pgd_l2"}
    assert linf_row["keys"] == l2_row["keys"] == ["k2"]


def test_cells_sharing_a_checkpoint_are_one_model_one_seed(tmp_path: Path) -> None:
    """Cells that differ only in eval attacks or analyses share one checkpoint: one model, one
    seed, attacks pooled (worst case over both), both cells linked. A second seed stays a seed."""
    def rows(key: str, seed: int, sha: str, attack: str, acc: float) -> list[dict]:
        return [{"key": key, "status": "ok", "dataset": "digits", "arch": "cnn", "method": "erm", "seed": seed,
                 "attack": attack, "norm": "linf", "eps": 0.1, "clean_acc": 0.9, "robust_acc": acc,
                 "checkpoint_sha256": sha}]
    write_cell_result(tmp_path / "r", "a", rows("a", 0, "sha0", "fgsm", 0.4))
    write_cell_result(tmp_path / "r", "b", rows("b", 0, "sha0", "pgd", 0.3))
    write_cell_result(tmp_path / "r", "c", rows("c", 1, "sha1", "pgd", 0.5))
    build_site(tmp_path / "r", tmp_path / "s")
    (table,) = json.loads((tmp_path / "s" / "site.json").read_text())["tables"]
    (row,) = table["rows"]
    assert row["n_seeds"] == 2
    assert sorted(row["keys"]) == ["a", "b", "c"]
    assert row["worst_robust_mean"] == pytest.approx((0.3 + 0.5) / 2)  # seed 0's worst case pools fgsm and pgd
    assert row["robust"]["pgd"]["n"] == 2 and row["robust"]["fgsm"]["n"] == 1

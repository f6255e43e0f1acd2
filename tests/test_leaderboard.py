"""Leaderboard site: numeric ranking, hand-checked mean ± std, failed cells, escaping, data files."""
from __future__ import annotations

import csv
import hashlib
import json
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.results import write_cell_result
from leaderboard import build_site
from leaderboard.build import eps_label

REPO = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"
ATTACKS = ["fgsm", "pgd"]
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
HEADINGS = ["digits — L∞, ε = 0.1000 (25.5/255)", "fashion — L2, ε = 0.5000"]
FAILED_ERROR = "RuntimeError: CUDA out of memory <img src=x onerror=alert(2)>\n  File \"train.py\", line 3"


def make_key(*parts: object) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def robust_values(w: float, seed: int) -> dict[str, float]:
    """Per-cell attack results; the min is pgd for seed 0 and fgsm for seed 1 (worst mean = w),
    so min over per-attack means (w + 0.015) would differ from the per-cell worst case."""
    if seed == 0:
        return {"fgsm": w + 0.03, "pgd": w - 0.01}
    return {"fgsm": w + 0.01, "pgd": w + 0.04}


def cell_rows(key: str, dataset: str, norm: str, eps: float, arch: str, method: str,
              seed: int, w: float) -> list[dict]:
    clean = 0.5 + w / 2 + 0.01 * seed
    return [
        {
            "key": key, "grid": "test", "status": "ok", "dataset": dataset, "arch": arch,
            "method": method, "seed": seed, "attack": attack, "norm": norm, "eps": eps,
            "clean_acc": clean, "robust_acc": acc, "per_class_robust_acc": [acc, acc],
            "class_names": ["a", "b"], "n_eval": 100, "epochs": 1,
        }
        for attack, acc in robust_values(w, seed).items()
    ]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for (dataset, norm, eps), rows in WORST.items():
        for (arch, method), w in rows.items():
            for seed in (0, 1):
                key = make_key(dataset, norm, eps, arch, method, seed)
                write_cell_result(root, key, cell_rows(key, dataset, norm, eps, arch, method, seed, w))
    # A single-seed row: its std is undefined and must show as "—" / null.
    key = make_key("fashion", "vit", "erm", 0)
    write_cell_result(root, key, cell_rows(key, "fashion", "l2", 0.5, "vit", "erm", 0, 0.3))
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
    """Collects ranking tables (heading, header, rows) and the failed-cells table as cell text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.failed: list[list[str]] = []
        self._kind: str | None = None
        self._h2: list[str] | None = None
        self._heading = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "h2":
            self._h2 = []
        elif tag == "table":
            self._kind = attrs.get("class")
            if self._kind == "ranking":
                self.tables.append({"heading": self._heading, "header": [], "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2" and self._h2 is not None:
            self._heading = "".join(self._h2).strip()
            self._h2 = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._kind == "ranking":
                table = self.tables[-1]
                if not table["header"]:
                    table["header"] = self._row
                else:
                    table["rows"].append(dict(zip(table["header"], self._row)))
            elif self._kind == "failed":
                self.failed.append(self._row)
            self._row = None
        elif tag == "table":
            self._kind = None

    def handle_data(self, data: str) -> None:
        if self._h2 is not None:
            self._h2.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(index: Path) -> Page:
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


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
            }
        )

    def stats(values: list[float]) -> tuple[float, float | None]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)

    out = {}
    for group, group_cells in cells.items():
        group_cells.sort(key=lambda c: (c["seed"], c["key"]))
        out[group] = {
            "n_seeds": len(group_cells),
            "keys": [c["key"] for c in group_cells],
            "clean": stats([c["clean"] for c in group_cells]),
            "worst": stats([c["worst"] for c in group_cells]),
            "robust": {a: stats([c["robust"][a] for c in group_cells]) for a in ATTACKS},
        }
    return out


def fmt(mean_std: tuple[float, float | None]) -> str:
    mean, std = mean_std
    return f"{100 * mean:.2f} ± " + ("—" if std is None else f"{100 * std:.2f}")


def test_files_written(site: Path) -> None:
    assert site.name == "index.html" and site.is_file()
    assert (site.parent / "data.json").is_file()
    assert (site.parent / "data.csv").is_file()


def test_tables_and_headings(site: Path) -> None:
    page = parse(site)
    assert [t["heading"] for t in page.tables] == HEADINGS
    for table in page.tables:
        assert table["header"][:5] == ["#", "arch", "method", "n seeds", "clean"]
        assert table["header"][5:] == ["fgsm", "pgd", "worst-case robust", "cells"]
    assert [len(t["rows"]) for t in page.tables] == [6, 7]


def test_rows_sorted_numerically_by_worst_case(site: Path) -> None:
    page = parse(site)
    digits = page.tables[0]["rows"]
    assert [(r["arch"], r["method"]) for r in digits] == [
        ("cnn", "pgd_at"), ("mlp", "pgd_at"), ("mlp", XSS), ("cnn", XSS), ("mlp", "erm"), ("cnn", "erm"),
    ]
    for table in page.tables:
        worst = [float(r["worst-case robust"].split(" ± ")[0]) for r in table["rows"]]
        assert worst == sorted(worst, reverse=True)
        as_text = [r["worst-case robust"] for r in table["rows"]]
        assert as_text != sorted(as_text, reverse=True), "fixture must make text sort differ"
        assert [r["#"] for r in table["rows"]] == [str(i) for i in range(1, len(table["rows"]) + 1)]


def test_numbers_match_hand_computation(site: Path, results_dir: Path) -> None:
    page = parse(site)
    expected = expected_rows(results_dir)
    tables = {(d, n, e): t for (d, n, e), t in zip(WORST, page.tables)}
    seen = 0
    for (dataset, norm, eps, arch, method), exp in expected.items():
        table = tables[(dataset, norm, eps)]
        (row,) = [r for r in table["rows"] if (r["arch"], r["method"]) == (arch, method)]
        assert row["n seeds"] == str(exp["n_seeds"])
        assert row["clean"] == fmt(exp["clean"])
        assert row["worst-case robust"] == fmt(exp["worst"])
        for attack in ATTACKS:
            assert row[attack] == fmt(exp["robust"][attack])
        assert row["cells"].split() == [k[:10] for k in exp["keys"]]
        seen += 1
    assert seen == 13
    # Spot checks against literal numbers: worst = mean of per-cell minima, not min of means.
    (top,) = [r for r in page.tables[0]["rows"] if (r["arch"], r["method"]) == ("cnn", "pgd_at")]
    assert top["worst-case robust"] == "90.00 ± 1.41"
    assert top["fgsm"] == "92.00 ± 1.41" and top["pgd"] == "91.50 ± 3.54"
    (single,) = [r for r in page.tables[1]["rows"] if r["arch"] == "vit"]
    assert single["n seeds"] == "1" and single["worst-case robust"] == "29.00 ± —"


def test_failed_cells_listed_apart(site: Path) -> None:
    page = parse(site)
    failed_key = make_key("failed")
    assert page.failed[0] == ["key", "dataset", "arch", "method", "seed", "error"]
    assert page.failed[1:] == [[
        failed_key[:10], "digits", "cnn", "pgd_at", "2",
        "RuntimeError: CUDA out of memory <img src=x onerror=alert(2)>",
    ]]
    for table in page.tables:
        for row in table["rows"]:
            assert failed_key[:10] not in row["cells"]
    html = site.read_text(encoding="utf-8")
    assert "train.py" not in html  # only the error's first line is shown
    assert make_key("inflight")[:10] not in html  # in-flight temp files are not results


def test_strings_are_escaped(site: Path) -> None:
    html = site.read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    methods = {r["method"] for t in parse(site).tables for r in t["rows"]}
    assert XSS in methods  # rendered as text


def test_data_json_matches_parquet(site: Path, results_dir: Path) -> None:
    data = json.loads((site.parent / "data.json").read_text(encoding="utf-8"))
    assert set(data) >= {"generated_at", "tables", "failed"}
    assert [(t["dataset"], t["norm"], t["eps"]) for t in data["tables"]] == list(WORST)
    expected = expected_rows(results_dir)
    n = 0
    for table in data["tables"]:
        assert table["attacks"] == ATTACKS
        worst = [r["worst_robust_mean"] for r in table["rows"]]
        assert worst == sorted(worst, reverse=True)
        for row in table["rows"]:
            exp = expected[(table["dataset"], table["norm"], table["eps"], row["arch"], row["method"])]
            assert row["n_seeds"] == exp["n_seeds"] and row["keys"] == exp["keys"]
            assert isinstance(row["worst_robust_mean"], float)
            assert row["clean_acc_mean"] == pytest.approx(exp["clean"][0])
            assert row["worst_robust_mean"] == pytest.approx(exp["worst"][0])
            for attack in ATTACKS:
                assert row["robust"][attack]["mean"] == pytest.approx(exp["robust"][attack][0])
            for got, (_, std) in [
                (row["clean_acc_std"], exp["clean"]), (row["worst_robust_std"], exp["worst"]),
                *[(row["robust"][a]["std"], exp["robust"][a]) for a in ATTACKS],
            ]:
                assert got is None if std is None else got == pytest.approx(std)
            n += 1
    assert n == len(expected) == 13
    assert [f["key"] for f in data["failed"]] == [make_key("failed")]
    assert data["failed"][0]["error"] == FAILED_ERROR


def test_data_csv_long_form(site: Path) -> None:
    with open(site.parent / "data.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 13 * len(ATTACKS)
    top = [r for r in rows if (r["dataset"], r["arch"], r["method"]) == ("digits", "cnn", "pgd_at")]
    assert {r["attack"]: float(r["robust_mean"]) for r in top} == pytest.approx({"fgsm": 0.92, "pgd": 0.915})
    assert all(float(r["worst_robust_mean"]) == pytest.approx(0.9) for r in top)
    assert any(r["method"] == XSS for r in rows)


def test_footer_counts(site: Path) -> None:
    html = site.read_text(encoding="utf-8")
    assert "26 cells (25 ok, 1 failed)" in html
    assert "51 result rows" in html and "13 leaderboard rows" in html
    assert "Generated 20" in html


def test_empty_results(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    index = build_site(tmp_path / "results", tmp_path / "site")
    html = index.read_text(encoding="utf-8")
    assert "No results found" in html and "<table" not in html
    data = json.loads((tmp_path / "site" / "data.json").read_text())
    assert data["tables"] == [] and data["failed"] == []


def test_only_failed_results(tmp_path: Path) -> None:
    write_cell_result(tmp_path / "r", "k1", [{"key": "k1", "status": "failed", "error": "boom"}])
    html = build_site(tmp_path / "r", tmp_path / "s").read_text(encoding="utf-8")
    assert "No successful results" in html and "boom" in html


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

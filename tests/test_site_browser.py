"""The leaderboard site in a real browser (headless Debian Chromium driven by Playwright):
sorting by clicking a header, the filter box, following a row to its cell page, two-click
reachability, a script-tag method name shown as text with no dialog, and reading the tables with
JavaScript disabled. Skipped without /usr/bin/chromium, unless CI is set (CI installs it)."""
from __future__ import annotations

import json
import re
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.store.index import read_results

from harness.store.results import write_cell_result
from leaderboard import build_site
from leaderboard.format import cell_file, setting_file

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<script>alert(1)</script>"
ERROR = "ValueError: bad <script>alert(3)</script>\n  at line 7"
# (arch, method) -> per seed (clean, {attack: robust}, flags)
CELLS = {
    ("resnet", "erm"): [(0.95, {"fgsm": 0.2, "pgd": 0.05}, []), (0.97, {"fgsm": 0.25, "pgd": 0.03}, [])],
    ("resnet", "pgd_at"): [(0.85, {"fgsm": 0.6, "pgd": 0.5}, []), (0.83, {"fgsm": 0.62, "pgd": 0.52}, [])],
    ("vit", XSS): [(0.091, {"fgsm": 0.45, "pgd": 0.4}, [])],
    ("vit", "trades"): [(0.9, {"fgsm": 0.85, "pgd": 0.8}, ["grad_masking"])],  # best, but flagged
}
SETTING = setting_file("lp", "digits", "linf", 0.1)


def key_of(arch: str, method: str, seed: int) -> str:
    return f"{arch}-{len(method)}-{method.isalnum()}-s{seed}".replace("_", "")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder: 4 rows (one flagged, one named with a script tag), a failed cell, foreign files."""
    root = tmp_path_factory.mktemp("results")
    for (arch, method), seeds in CELLS.items():
        for seed, (clean, robust, flags) in enumerate(seeds):
            key = key_of(arch, method, seed)
            write_cell_result(root, key, [
                {"key": key, "grid": "t", "status": "ok", "dataset": "digits", "arch": arch, "method": method,
                 "seed": seed, "attack": attack, "norm": "linf", "eps": 0.1, "clean_acc": clean,
                 "robust_acc": acc, "flags": flags if attack == "pgd" else [], "n_eval": 100,
                 "per_class_robust_acc": [acc, acc], "class_names": ["cat", "dog"],
                 "train_seconds": 60.0, "eval_seconds": 6.0, "world_size": 1, "device": "cpu",
                 "images_per_second": 500.0, "train_curve": '[{"epoch": 0, "lr": 0.1, "loss": 1.0}]',
                 "config_json": json.dumps({"seed": seed}), "git_commit": "deadbeef"}
                for attack, acc in robust.items()
            ])
    write_cell_result(root, "failedcell", [{"key": "failedcell", "status": "failed", "error": ERROR,
                                            "dataset": "digits", "arch": "vit", "method": "erm", "seed": 3,
                                            "norm": "linf", "eps": 0.1}])
    pq.write_table(pa.table({"a": [1]}), root / "foreign.parquet")
    (root / "README.txt").write_text("not a result")
    return root


@pytest.fixture(scope="module")
def site(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build_site(results, out)
    return out


@pytest.fixture(scope="module")
def parquet_rows(results: Path) -> list[dict]:
    return read_results(results).to_pylist()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not CHROMIUM.exists() or sync_playwright is None:
        message = f"{CHROMIUM} is missing (apt-get install chromium)" if sync_playwright else "playwright is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


class Tab:
    """A page that records dialogs and script errors, so a test can assert none happened."""

    def __init__(self, browser, js: bool = True) -> None:
        self.context = browser.new_context(java_script_enabled=js)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def goto(self, path: Path):
        self.page.goto(path.as_uri())
        return self.page

    def column(self, name: str, attr: str = "data-value") -> list[str | None]:
        """One column of #ranking's body rows, in display order (visible or not)."""
        return self.page.eval_on_selector_all(
            "#ranking tbody tr",
            """(rows, [name, attr]) => {
                 const i = [...document.querySelectorAll('#ranking thead th')].findIndex(th => th.dataset.col === name);
                 return rows.map(r => attr === 'text' ? r.cells[i].innerText : r.cells[i].getAttribute(attr));
               }""",
            [name, attr],
        )

    def close(self) -> None:
        assert self.dialogs == [], f"a dialog fired: {self.dialogs}"
        assert self.errors == [], f"script errors: {self.errors}"
        self.context.close()


@pytest.fixture()
def tab(browser) -> Iterator[Tab]:
    t = Tab(browser)
    yield t
    t.close()


def test_every_cell_within_two_clicks_and_no_dialog(tab: Tab, site: Path, parquet_rows: list[dict]) -> None:
    page = tab.goto(site / "index.html")
    level1 = set(page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"))
    reached = set(level1)
    for url in sorted(u for u in level1 if "/settings/" in u):
        page.goto(url)
        reached |= set(page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"))
    keys = {r["key"] for r in parquet_rows}
    assert len(keys) == 7
    assert {(site / cell_file(k)).as_uri() for k in keys} <= reached
    for key in keys:  # every cell page renders, with no dialog (checked on close) and the key shown
        tab.goto(site / cell_file(key))
        assert key in page.locator("h1").inner_text()
    tab.goto(site / SETTING)
    assert XSS in page.locator("#ranking td.method").all_inner_texts()
    assert XSS in page.locator("#per-class-robust svg").text_content()  # heatmap row label


def test_click_header_sorts_numerically_flagged_last(tab: Tab, site: Path) -> None:
    page = tab.goto(site / SETTING)
    assert tab.column("method", "text")[-1] == "trades"  # server order: the flagged row is last
    page.click('#ranking th[data-col="clean"]')
    assert page.get_attribute('#ranking th[data-col="clean"]', "aria-sort") == "descending"
    methods = tab.column("method", "text")
    clean = [float(v) for v in tab.column("clean")]
    assert methods[-1] == "trades"  # still last although its clean accuracy (90%) beats XSS's
    assert clean[:-1] == sorted(clean[:-1], reverse=True)
    assert methods[:3] == ["erm", "pgd_at", XSS]  # 96 > 84 > 9.1: numeric, not text ("9.10" > "84")
    page.click('#ranking th[data-col="clean"]')
    assert [float(v) for v in tab.column("clean")][:-1] == sorted(clean[:-1])
    page.click('#ranking th[data-col="method"]')  # text column: ascending first
    assert tab.column("method", "text")[:3] == sorted(["erm", "pgd_at", XSS])
    flagged = page.eval_on_selector_all("#ranking tbody tr", "rows => rows.map(r => r.classList.contains('flagged'))")
    assert flagged == [False] * 3 + [True]


def test_follow_row_to_cell_page_shows_parquet_numbers(tab: Tab, site: Path, parquet_rows: list[dict]) -> None:
    page = tab.goto(site / SETTING)
    row = page.locator("#ranking tbody tr", has=page.locator("td.method", has_text=XSS))
    key = key_of("vit", XSS, 0)
    row.locator("td.keys a").first.click()
    page.wait_for_load_state()
    assert page.url == (site / cell_file(key)).as_uri()
    expected = sorted((r for r in parquet_rows if r["key"] == key), key=lambda r: r["attack"])
    shown = page.eval_on_selector_all(
        "#rows tbody tr", "rows => rows.map(r => [...r.cells].slice(0, 4).map(c => [c.innerText, c.title]))")
    assert [[a[0] for a in r] for r in shown] == [
        [r["attack"], "ok", f"{100 * r['clean_acc']:.2f}", f"{100 * r['robust_acc']:.2f}"] for r in expected
    ]
    assert [r[3][1] for r in shown] == [repr(r["robust_acc"]) for r in expected]  # exact stored float
    provenance = page.locator("#provenance").inner_text()
    assert "deadbeef" in provenance and f"method\t{XSS}" in provenance
    assert page.locator("#training-curves svg").count() == 2
    page.go_back()
    assert page.url == (site / SETTING).as_uri()


def test_filter_box_hides_rows(tab: Tab, site: Path) -> None:
    page = tab.goto(site / SETTING)
    box = page.locator("input.filter[data-table=ranking]")
    assert box.is_visible()
    rows = page.locator("#ranking tbody tr")
    box.fill("pgd_at")
    assert [rows.nth(i).is_visible() for i in range(4)].count(True) == 1
    assert page.locator("#ranking tbody tr:visible td.method").all_inner_texts() == ["pgd_at"]
    box.fill("grad_masking")
    assert page.locator("#ranking tbody tr:visible td.method").all_inner_texts() == ["trades"]
    box.fill("flag")  # the box's own example: only flagged rows, never the "no flags" badges
    assert page.locator("#ranking tbody tr:visible td.method").all_inner_texts() == ["trades"]
    box.fill("no such row")
    assert page.locator("#ranking tbody tr:visible").count() == 0
    box.fill("")
    assert page.locator("#ranking tbody tr:visible").count() == 4


def test_failed_cell_page_shows_error_as_text(tab: Tab, site: Path) -> None:
    page = tab.goto(site / "index.html")
    page.locator("table.failed a").first.click()
    page.wait_for_load_state()
    assert page.url == (site / cell_file("failedcell")).as_uri()
    assert page.locator("pre.error").inner_text().strip() == ERROR.strip()


def test_readable_and_server_sorted_without_javascript(browser, site: Path) -> None:
    tab = Tab(browser, js=False)
    try:
        page = tab.goto(site / SETTING)
        assert page.locator("input.filter").first.is_hidden()
        assert tab.column("method", "text") == ["pgd_at", XSS, "erm", "trades"]  # headline desc, flagged last
        worst = [text.split("[")[0].strip() for text in tab.column("worst", "text")]  # "[lo–hi]": Wilson interval
        assert worst == ["51.00 ± 1.41", "40.00", "4.00 ± 1.41", "80.00"]
        assert tab.column("flags", "text")[-1] == "⚠ grad_masking"
        assert page.locator("#ranking tbody tr.flagged").count() == 1
        page = tab.goto(site / "index.html")
        assert page.locator("table.ranking tbody tr").count() == 4
        assert XSS in page.locator("table.ranking td.method").all_inner_texts()
    finally:
        tab.close()


def test_interval_and_tie_shown_beside_each_accuracy(tab: Tab, site: Path) -> None:
    """Each accuracy shows its Wilson interval; with 100 test images, pgd_at (51%) and the XSS
    method (40%) overlap, so both carry the tie mark with a tooltip naming the other's rank."""
    page = tab.goto(site / SETTING)
    ci = page.locator("#ranking tbody tr").first.locator("td.headline small.ci")
    assert ci.is_visible() and re.fullmatch(r"\[\d+\.\d–\d+\.\d\]", ci.inner_text())
    assert "Wilson 95% interval over 200 test images" in ci.get_attribute("title")
    tie = page.locator("#ranking tbody tr").first.locator("abbr.tie")
    assert tie.is_visible() and "#2" in tie.get_attribute("title")


def test_index_scatter_draws_y_equals_x_and_pareto(tab: Tab, site: Path) -> None:
    page = tab.goto(site / "index.html")
    scatter = page.locator("figure.index-scatter svg").first
    assert scatter.is_visible()
    line = scatter.locator("line.diagonal").bounding_box()
    assert line and line["width"] > 100 and line["width"] == pytest.approx(line["height"], abs=2)
    assert scatter.locator("polyline.pareto").count() == 1
    assert scatter.locator("g.point").count() == 4 and scatter.locator("text.label").count() == 4
    # header sorting works on the index's per-attack columns too
    page.locator("table.ranking th[data-col='attack:pgd']").first.click()
    values = page.eval_on_selector_all("table.ranking tbody tr:not(.flagged)", "rows => rows.map(r => r.cells[6].dataset.value)")
    assert [float(v) for v in values] == sorted((float(v) for v in values), reverse=True)  # numbers: best first


def test_method_and_flagged_pages_reachable(tab: Tab, site: Path) -> None:
    page = tab.goto(site / "index.html")
    page.locator("#flagged-link").click()
    page.wait_for_load_state()
    assert page.url == (site / "flagged.html").as_uri()
    assert "trades" in page.locator("section.flagged-row h3").inner_text()
    page = tab.goto(site / SETTING)
    page.locator("#ranking td.method a", has_text="pgd_at").click()
    page.wait_for_load_state()
    assert "Towards Deep Learning Models Resistant to Adversarial Attacks" in page.locator("#paper").inner_text()

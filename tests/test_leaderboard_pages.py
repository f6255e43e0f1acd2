"""The RobustBench-grade pages: Wilson intervals and ties, float64 numbers, data.json for pandas,
method pages with papers, flagged page, reproduce commands, plots (0-100 axes, y = x, Pareto
front, unique colour + shape pairs, robust vs eps, vs compute) and cost columns."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.core.config import compose_config, finalize
from harness.store.results import write_cell_result
from leaderboard import build_site
from leaderboard.format import cell_file, method_file, setting_file, wilson
from leaderboard.reproduce import reproduce_command
from leaderboard.svg import PALETTE, SHAPES, unique_styles

N_EVAL = 400


def row(key: str, method: str, clean: float, robust: float, *, eps: float = 0.1, arch: str = "cnn",
        flags: list[str] | None = None, n_eval: int = N_EVAL, **extra) -> dict:
    return {"key": key, "grid": "t", "status": "ok", "dataset": "digits", "arch": arch, "method": method,
            "seed": 0, "attack": "pgd", "norm": "linf", "eps": eps, "clean_acc": clean, "robust_acc": robust,
            "n_eval": n_eval, "flags": flags or [], "train_seconds": 100.0, "eval_seconds": 10.0,
            "device": "cpu", **extra}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("results")
    cells = [
        row("a0", "pgd_at", 0.80, 0.50),           # 200/400
        row("b0", "trades", 0.78, 0.49),           # 196/400: interval overlaps a0 -> tied
        row("c0", "erm", float(np.float32(391 / 400)), 0.0),  # float32 noise (0.9775000214...); far below: not tied
        row("d0", "mart", 0.7, 0.6, flags=["grad_masking"],
            flag_details=json.dumps({"grad_masking": "square 10% < pgd 60%"})),
        row("e0", "pgd_at", 0.75, 0.40, eps=0.2),  # a second eps: robust-vs-eps plot
        row("f0", "erm", 0.95, 0.01, eps=0.2),
    ]
    for r in cells:
        write_cell_result(results, r["key"], [r])
    out = tmp_path_factory.mktemp("site")
    build_site(results, out)
    return out


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson(0.0, 50)[0] == 0.0 and 0.0 < wilson(0.0, 50)[1] < 0.08  # honest at 0
    assert wilson(1.0, 50)[1] == 1.0
    assert wilson(float("nan"), 10) is None and wilson(0.5, None) is None and wilson(0.5, 0) is None


def test_data_json_loads_with_pandas_float64(site: Path) -> None:
    df = pd.read_json(site / "data.json")
    assert len(df) == 6 and {"dataset", "eps", "arch", "method", "rank", "clean_acc_mean", "headline_ci"} <= set(df)
    assert df["clean_acc_mean"].dtype == np.float64
    erm = df[(df.method == "erm") & (df.eps == 0.1)].iloc[0]
    assert erm["clean_acc_mean"] == 391 / 400  # float32 noise snapped back to count / n_eval
    assert json.loads((site / "site.json").read_text())["summary"]["n_leaderboard_rows"] == 6


def test_intervals_shown_and_ties_marked(site: Path) -> None:
    records = {(r["method"], r["eps"]): r for r in json.loads((site / "data.json").read_text())}
    a, b, c = records[("pgd_at", 0.1)], records[("trades", 0.1)], records[("erm", 0.1)]
    assert a["headline_ci"] == pytest.approx(wilson(0.5, N_EVAL))
    assert a["tied_with"] == [b["rank"]] and b["tied_with"] == [a["rank"]] and c["tied_with"] == []
    html = (site / setting_file("lp", "digits", "linf", 0.1)).read_text()
    lo, hi = wilson(0.5, N_EVAL)
    assert f"[{100 * lo:.1f}–{100 * hi:.1f}]" in html
    assert html.count('class="tie"') == 2 + 1  # two tied rows + the legend in the note
    assert "50.00 ±" not in html  # one seed: no "± —"


def test_index_has_attack_columns_scatter_and_eps_plot(site: Path) -> None:
    html = (site / "index.html").read_text()
    assert 'data-col="attack:pgd"' in html
    svg = re.search(r'<figure class="index-scatter".*?</figure>', html, re.S).group(0)
    diagonal = re.search(r'<line class="diagonal" x1="([\d.]+)" y1="([\d.]+)" x2="([\d.]+)" y2="([\d.]+)"', svg)
    assert diagonal, "y = x is always drawn"
    x1, y1, x2, y2 = map(float, diagonal.groups())
    assert x2 - x1 == pytest.approx(y1 - y2)  # corner to corner of a square 0-100 frame
    assert ">0</text>" in svg and ">100</text>" in svg  # axes from 0 to 100
    assert 'class="pareto"' in svg and 'class="label"' in svg
    assert "Robust accuracy vs ε" in html
    assert 'href="flagged.html"' in html and 'href="methods/pgd_at.html"' in html


def test_unique_colour_shape_pairs_for_many_methods() -> None:
    groups = [(f"method{i:02d}", arch) for i in range(14) for arch in ("resnet", "vit")]
    styles = unique_styles(groups)
    assert len(set(styles.values())) == len(groups) == 28
    big = [(f"m{i}", "a") for i in range(len(PALETTE) * len(SHAPES))]
    assert len(set(unique_styles(big).values())) == len(big)


def test_method_page_names_the_paper(site: Path) -> None:
    html = (site / method_file("pgd_at")).read_text()
    assert "Towards Deep Learning Models Resistant to Adversarial Attacks" in html and "ICLR" in html and "2018" in html
    assert html.count("<tr") == 3  # header + both settings


def test_flagged_page_lists_evidence(site: Path) -> None:
    html = (site / "flagged.html").read_text()
    assert "mart" in html and "square 10% &lt; pgd 60%" in html and cell_file("d0") in html
    assert "pgd_at" not in html.split("<h1>")[1]


def test_filter_search_text_excludes_no_flags_badge(site: Path) -> None:
    html = (site / setting_file("lp", "digits", "linf", 0.1)).read_text()
    searches = re.findall(r'data-search="([^"]*)"', html)
    assert len(searches) == 4 and sum("flag" in s for s in searches) == 1  # only the flagged row


def test_cost_columns_dash_when_absent_and_compute_plot(site: Path) -> None:
    html = (site / setting_file("lp", "digits", "linf", 0.1)).read_text()
    cost = re.search(r'<table class="cost.*?</table>', html, re.S).group(0)
    assert cost.count("—") >= 4 * 5  # no FLOPs / device-hours / memory / MFU / count recorded
    assert 'id="robust-vs-compute"' in html  # falls back to (train + eval) hours


def test_reproduce_command_recomposes_the_cell(tmp_path: Path) -> None:
    cfg = finalize(compose_config(["method=trades", "trainer.epochs=3", "attack=[pgd]", "attack.pgd.steps=7",
                                   "seed=4", f"results_dir={tmp_path / 'r'}"]))
    command = reproduce_command(json.dumps(cfg))
    assert command.startswith("robustgrid run ") and "attack.pgd.steps=7" in command
    again = finalize(compose_config(shlex.split(command)[2:]))
    assert again["key"] == cfg["key"]
    write_cell_result(tmp_path / "r", cfg["key"], [row(cfg["key"], "trades", 0.9, 0.5, config_json=json.dumps(cfg))])
    (tmp_path / "r" / "samples").mkdir()
    (tmp_path / "r" / "samples" / f"{cfg['key']}.parquet").write_bytes(b"")
    build_site(tmp_path / "r", tmp_path / "s")
    page = (tmp_path / "s" / cell_file(cfg["key"])).read_text()
    assert command.replace("'", "&#39;") in page
    assert f'href="../../r/samples/{cfg["key"]}.parquet"' in page
    assert f"checkpoints/{cfg['train_key']}" in page


def test_accuracies_are_float64_counts_at_the_source() -> None:
    import torch

    from harness.eval.evaluate import per_class

    correct = torch.tensor([True] * 44 + [False])
    assert per_class(correct, torch.zeros(45, dtype=torch.long), 1) == [44 / 45]

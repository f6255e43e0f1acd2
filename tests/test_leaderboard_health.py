"""Training health on the site (issue 25 item 5): the 'training health' column and its filter, a
training-flagged row ranked after unflagged rows even when its number is higher, the selection
badge, the cell page's validation curves with the flag marked at its epoch, the flagged page
listing training flags beside evaluation flags, and `diverged` on the failed table."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.store.results import write_cell_result
from leaderboard import build_site
from leaderboard.format import cell_file, setting_file


def _curve(robust: list[float]) -> str:
    return json.dumps([{"epoch": e, "loss": 1.0, "lr": 0.1, "val_n": 300, "val_robust_n": 300,
                        "val_clean_acc": 0.9, "val_robust_acc": r, "train_robust_acc": 0.5 + 0.05 * e}
                       for e, r in enumerate(robust)])


def _row(key: str, method: str, robust: float, **extra) -> dict:
    return {"key": key, "grid": "t", "status": "ok", "dataset": "digits", "arch": "cnn", "method": method,
            "seed": 0, "attack": "pgd", "norm": "linf", "eps": 0.1, "clean_acc": 0.9, "robust_acc": robust,
            "n_eval": 400, "flags": [], "train_seconds": 10.0, "eval_seconds": 1.0, "device": "cpu",
            "validation_n": 300, "selection": "last", **extra}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("results")
    co = {"catastrophic_overfitting": {"epoch": 3, "val_robust_before": 0.45, "val_robust_after": 0.02}}
    rows = [
        _row("healthy0", "pgd_at", 0.40, train_flags=[], train_curve=_curve([0.2, 0.3, 0.4, 0.42])),
        _row("co0", "fgsm_rs", 0.60, train_flags=["catastrophic_overfitting"], train_flag_details=json.dumps(co),
             train_curve=_curve([0.3, 0.4, 0.45, 0.02])),
        _row("sel0", "trades", 0.35, train_flags=[], selection="best_val_robust", selected_epoch=2,
             train_curve=_curve([0.2, 0.3, 0.38, 0.33])),
        _row("old0", "erm", 0.01, train_flags=None, validation_n=None, selection=None),  # before probes
        {**_row("nan0", "mart", 0.0), "status": "failed", "train_flags": ["diverged"],
         "train_flag_details": json.dumps({"diverged": {"epoch": 2, "step": 5, "loss": "nan"}}),
         "error": "NonFiniteLossError: mart: loss is nan at epoch 2, step 5 or before"},
    ]
    for r in rows:
        write_cell_result(results, r["key"], [r])
    out = tmp_path_factory.mktemp("site")
    build_site(results, out)
    return out


def _table(site: Path) -> str:
    return (site / setting_file("lp", "digits", "linf", 0.1)).read_text()


def test_a_training_flag_ranks_the_row_last_and_shows_in_the_health_column(site: Path) -> None:
    html = _table(site)
    body = html[html.index("<tbody"):]
    order = re.findall(r'data-search="(\w+)', body)
    methods = [re.search(r'data-search="\S+ (\w+)', line).group(1)
               for line in body.splitlines() if "data-search=" in line]
    assert methods[-1] == "fgsm_rs", methods  # 60% robust, the highest, but flagged: last
    assert 'data-health="flagged"' in html and 'data-health="healthy"' in html and 'data-health="unprobed"' in html
    assert "⚠ catastrophic_overfitting" in html and "✓ healthy" in html and "not probed" in html
    assert 'class="filter-health"' in html and '<option value="flagged">' in html
    assert "best epoch: val robust" in html  # the row that used trainer.select is labelled
    assert order  # rows carry their search text


def test_the_cell_page_plots_validation_curves_with_the_flag_at_its_epoch(site: Path) -> None:
    html = (site / cell_file("co0")).read_text()
    assert "Validation probes" in html and "catastrophic_overfitting at epoch 3" in html
    assert '<g class="event"><title>catastrophic_overfitting at epoch 3</title>' in html
    selected = (site / cell_file("sel0")).read_text()
    assert "selected (best_val_robust) at epoch 2" in selected


def test_the_flagged_page_lists_training_flags_with_their_evidence(site: Path) -> None:
    html = (site / "flagged.html").read_text()
    assert "catastrophic_overfitting" in html and cell_file("co0") in html
    assert "val_robust_after" in html  # the cell's evidence, not only the flag's name


def test_a_diverged_cell_is_on_the_failed_table_with_its_flag(site: Path) -> None:
    html = _table(site)
    failed = html[html.index("failed"):]
    assert "⚠ diverged" in failed and "loss is nan at epoch 2" in failed

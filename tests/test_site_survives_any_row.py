"""Issue 19 item 3: the site survives any row. Random valid rows with NaN/inf, missing values,
empty or ragged lists and extreme numbers must build a full site (hypothesis property test), and
the NaN per-class accuracy of an `eval.limit=5` cell shows as "—"."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.store.results import write_cell_result
from leaderboard import build_site
from leaderboard.format import cell_file

odd_float = st.one_of(st.none(), st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                      st.floats(0, 1), st.floats(-1e300, 1e300), st.just(0.0), st.just(1e-300))
acc_list = st.one_of(st.none(), st.just([]), st.lists(odd_float, max_size=5))
names = st.sampled_from(["erm", "pgd_at", "<b>x</b>", "ümlaut", "a" * 120])
row = st.fixed_dictionaries({
    "method": names, "arch": st.sampled_from(["cnn", "vit"]), "seed": st.integers(0, 3),
    "attack": st.one_of(st.none(), st.sampled_from(["fgsm", "pgd", "autoattack"])),
    "norm": st.sampled_from(["linf", "l2", None]), "eps": odd_float,
    "clean_acc": odd_float, "robust_acc": odd_float, "n_eval": st.one_of(st.none(), st.integers(0, 10**7)),
    "per_class_robust_acc": acc_list, "per_class_clean_acc": acc_list,
    "train_seconds": odd_float, "eval_seconds": odd_float, "images_per_second": odd_float,
    "world_size": st.one_of(st.none(), st.integers(1, 64)), "flags": st.one_of(st.just([]), st.just(["grad_masking"])),
    "train_curve": st.sampled_from([None, "", "not json", '[{"epoch": 0, "loss": NaN}]', '[{"epoch": 1e308, "lr": -1}]']),
    "neuron_sensitivity": odd_float, "status": st.sampled_from(["ok", "ok", "failed"]),
    "class_names": st.one_of(st.none(), st.just([]), st.just(["a", "b"])),
})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells=st.lists(st.lists(row, min_size=1, max_size=3), min_size=1, max_size=4))
def test_any_rows_build_a_site(cells: list[list[dict]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results, out = Path(tmp) / "r", Path(tmp) / "s"
        for i, rows in enumerate(cells):
            key = f"cell{i:02d}"
            write_cell_result(results, key, [{**r, "key": key, "dataset": "digits", "grid": "g"} for r in rows])
        index = build_site(results, out)
        assert index.is_file()
        json.loads((out / "site.json").read_text())  # valid JSON: no NaN leaked
        for i in range(len(cells)):
            page = (out / cell_file(f"cell{i:02d}")).read_text()
            assert ">nan<" not in page.lower() and ">inf<" not in page.lower()


def test_nan_per_class_accuracy_renders_as_dash(tmp_path: Path) -> None:
    """An eval.limit=5 cell that misses classes: NaN per-class accuracy used to kill the site."""
    write_cell_result(tmp_path / "r", "limited", [{
        "key": "limited", "status": "ok", "dataset": "digits", "arch": "cnn", "method": "erm", "seed": 0,
        "attack": "pgd", "norm": "linf", "eps": 0.1, "clean_acc": 0.8, "robust_acc": 0.2, "n_eval": 5,
        "per_class_robust_acc": [0.5, math.nan, 0.0], "per_class_clean_acc": [1.0, math.nan, 0.5],
        "class_names": ["a", "b", "c"]}])
    build_site(tmp_path / "r", tmp_path / "s")
    page = (tmp_path / "s" / cell_file("limited")).read_text()
    assert "b: no value" in page and "—" in page
    assert "Could not be drawn" not in (tmp_path / "s" / "index.html").read_text()


def test_undrawable_figure_is_listed_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A figure that raises is left out and named on the index with its reason."""
    import leaderboard.figures as figures

    def broken(cell):  # stands in for any plot a future row breaks
        raise ValueError("cannot draw this curve")

    monkeypatch.setattr(figures, "CELL_FIGURES", [broken, *figures.CELL_FIGURES])
    write_cell_result(tmp_path / "r", "k1", [{"key": "k1", "status": "ok", "dataset": "digits", "arch": "cnn",
                                             "method": "erm", "seed": 0, "attack": "pgd", "norm": "linf",
                                             "eps": 0.1, "clean_acc": 0.9, "robust_acc": 0.1, "n_eval": 10}])
    build_site(tmp_path / "r", tmp_path / "s")
    index = (tmp_path / "s" / "index.html").read_text()
    assert "Could not be drawn (1)" in index and "cannot draw this curve" in index and "figure broken" in index
    assert (tmp_path / "s" / cell_file("k1")).is_file()
    problems = json.loads((tmp_path / "s" / "site.json").read_text())["problems"]
    assert problems == [{"subject": "k1", "what": "figure broken", "reason": "ValueError: cannot draw this curve"}]

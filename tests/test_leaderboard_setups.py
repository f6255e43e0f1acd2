"""A leaderboard row is one training setup: seeds of one setup are averaged, different setups
(e.g. the demo's 8x8 ERM and the ACE grid's 16x16 ERM) are never averaged together."""
from __future__ import annotations

import json
from pathlib import Path

from harness.store.index import read_results

from harness.store.results import write_cell_result
from leaderboard.aggregate import aggregate
from harness.core.config import training_setup
from leaderboard.setups import setup_labels


def _config(seed: int, img_size: int | None, epochs: int = 10) -> dict:
    return {"seed": seed, "method": {"name": "erm"}, "arch": {"name": "test_resnet"},
            "data": {"name": "digits", "img_size": img_size, "root": f"/somewhere/{seed}"},
            "trainer": {"epochs": epochs, "progress": seed == 0},  # progress is not semantic
            "attack": [{"name": "pgd"}], "results_dir": f"/r{seed}", "code_version": f"v{seed}"}


def _rows(key: str, cfg: dict, robust: float) -> list[dict]:
    return [{"key": key, "grid": "g", "status": "ok", "dataset": "digits", "arch": "test_resnet",
             "method": "erm", "seed": cfg["seed"], "attack": "pgd", "norm": "linf", "eps": 0.15,
             "clean_acc": 0.9, "robust_acc": robust, "config_json": json.dumps(cfg)}]


def test_setups_are_separate_rows_and_seeds_of_one_setup_pool(tmp_path: Path) -> None:
    # 8x8: two seeds (differing also in non-training keys: paths, progress, code version)
    write_cell_result(tmp_path, "a0", _rows("a0", _config(0, None), 0.10))
    write_cell_result(tmp_path, "a1", _rows("a1", _config(1, None), 0.20))
    # 16x16: one seed, much more robust; averaging it in would misreport both setups
    write_cell_result(tmp_path, "b0", _rows("b0", _config(0, 16), 0.70))
    (table,) = aggregate(read_results(tmp_path)).tables
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"erm [data.img_size=null]", "erm [data.img_size=16]"}
    assert rows["erm [data.img_size=null]"]["n_seeds"] == 2
    assert abs(rows["erm [data.img_size=null]"]["worst_robust_mean"] - 0.15) < 1e-9
    assert rows["erm [data.img_size=16]"]["n_seeds"] == 1
    assert rows["erm [data.img_size=16]"]["worst_robust_mean"] == 0.70


def test_one_setup_keeps_the_plain_method_name(tmp_path: Path) -> None:
    write_cell_result(tmp_path, "a0", _rows("a0", _config(0, None), 0.10))
    write_cell_result(tmp_path, "a1", _rows("a1", _config(1, None), 0.20))
    (table,) = aggregate(read_results(tmp_path)).tables
    assert [r["method"] for r in table["rows"]] == ["erm"]


def test_labels_name_only_the_differing_values_and_stay_short() -> None:
    base = {"data": {"img_size": None}, "trainer": {"epochs": 10, "lr": 0.1}}
    other = {"data": {"img_size": 16}, "trainer": {"epochs": 40, "lr": 0.1}, "extra": {"a": 1}}
    labels = setup_labels({"x": base, "y": other})
    assert labels == {"x": "data.img_size=null, extra.a=unset, trainer.epochs=10",
                      "y": "data.img_size=16, extra.a=1, trainer.epochs=40"}
    # a value that is a dict in one setup and null in another is one difference, not one per leaf,
    # and a location (the generated set's folder) is not how the model was trained
    arms = {"none": {"data": {"generated": None}},
            "10k": {"data": {"generated": {"per_class": 1000}, "generated_dir": "/r/artifacts/generated/k1"}},
            "50k": {"data": {"generated": {"per_class": 5000}, "generated_dir": "/r/artifacts/generated/k2"}}}
    assert setup_labels({k: training_setup({**v, "trainer": {}, "method": {"name": "erm"}})[1]
                         for k, v in arms.items()}) == {"none": "data.generated=null",
                                                        "10k": 'data.generated={"per_class":1000}',
                                                        "50k": 'data.generated={"per_class":5000}'}
    many = {str(i): {f"k{j}": i for j in range(6)} for i in range(2)}
    assert setup_labels(many)["1"] == "k0=1, k1=1, k2=1, k3=1, +2 more"


def test_neuron_sensitivity_column_is_averaged_over_seeds(tmp_path: Path) -> None:
    for seed, ns in ((0, 0.2), (1, 0.3)):
        rows = _rows(f"a{seed}", _config(seed, None), 0.1)
        rows[0]["neuron_sensitivity"] = ns
        write_cell_result(tmp_path, f"a{seed}", rows)
    (table,) = aggregate(read_results(tmp_path)).tables
    (row,) = table["rows"]
    assert table["has_neuron_sensitivity"]
    assert abs(row["neuron_sensitivity_mean"] - 0.25) < 1e-9
    assert abs(row["neuron_sensitivity_std"] - 0.0707107) < 1e-6
    from leaderboard import build_site

    site = tmp_path / "site"
    build_site(tmp_path, site)
    (page,) = (site / "settings").glob("*.html")
    html = page.read_text()
    assert ">neuron sensitivity</th>" in html and "0.25 ± 0.071" in html


def test_a_cell_page_shows_what_the_method_decided(tmp_path: Path) -> None:
    """The row's method_summary (Method.summary) is a table on the cell page; a malformed or empty
    one shows none and never breaks the page."""
    from leaderboard import build_site

    rows = _rows("a0", _config(0, None), 0.1)
    rows[0]["method_summary"] = json.dumps({"pruned_channels": 5, "channels": 1008,
                                            "pruned_per_layer": {"body.bn1": 5}})
    write_cell_result(tmp_path, "a0", rows)
    for key, text in (("a1", "{}"), ("a2", "not json")):
        bad = _rows(key, _config(1 if key == "a1" else 2, None), 0.1)
        bad[0]["method_summary"] = text
        write_cell_result(tmp_path, key, bad)
    site = tmp_path / "site"
    build_site(tmp_path, site)
    pages = {p.name: p.read_text() for p in (site / "cells").glob("*.html")}
    shown = [html for html in pages.values() if 'id="method-summary"' in html]
    assert len(pages) == 3 and len(shown) == 1
    assert ">pruned_channels</th><td><code>5</code>" in shown[0]
    assert "<code>{&#34;body.bn1&#34;: 5}</code>" in shown[0] or '<code>{"body.bn1": 5}</code>' in shown[0]

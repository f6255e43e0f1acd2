"""The grid under Ray: expansion, keys, commit + skip, failures isolated, leaderboard at the end."""
from __future__ import annotations

import json
import os

import pytest

from harness.core.config import ConfigError
from harness.run.grid import expand_grid, run_grid
from harness.store.index import read_results


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


def test_cells_differing_only_in_eval_attacks_train_once(tiny, ray_session) -> None:
    overrides = ["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]",
                 "+grid.axes.attack=[[fgsm],[pgd]]"] + [o for o in tiny if not o.startswith("attack.pgd")]
    cells = expand_grid(overrides)
    assert len(cells) == 2 and len({c["key"] for c in cells}) == 2
    assert len({c["train_key"] for c in cells}) == 1
    report = run_grid(cells)
    assert [o.status for o in report.outcomes] == ["ok", "ok"]
    rows = read_results(cells[0]["results_dir"]).to_pylist()
    assert sorted(r["attack"] for r in rows) == ["fgsm", "pgd"]
    assert len({r["checkpoint_sha256"] for r in rows}) == 1
    assert len({r["train_seconds"] for r in rows}) == 1, "the second cell must reuse the first's training"


@pytest.mark.parametrize("override,message", [
    ("trainer.optimizer.name=lion", "unknown optimizer 'lion'"),
    ("trainer.schedule.name=exp", "unknown schedule 'exp'"),
    ("trainer.world_size=0", "must be >= 1"),
    ("+trainer.optimizer.momentum=0.9", "bad settings for optimizer 'adamw'"),
    ("method=pgd_at", None),
])
def test_bad_trainer_settings_fail_before_any_work(tiny, override, message) -> None:
    from harness.core.config import compose_config, finalize
    from harness.run.grid import validate_cell

    cfg = finalize(compose_config(tiny + [override]))
    if message is None:
        validate_cell(cfg)
        return
    with pytest.raises(ValueError, match=message):
        validate_cell(cfg)


def test_value_axes_give_the_cells_a_compose_per_cell_would(tiny) -> None:
    """Seeds (plain values) are set on one composition per method; the cells are exactly those a
    full Hydra composition of every combination gives (keys, labels, configs)."""
    from harness.core.config import compose_config, finalize
    from harness.run import expand as grid_module

    overrides = ["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm,trades]",
                 "grid.axes.seed=[0,1,2]"] + tiny
    calls = []
    real = grid_module.compose_config
    grid_module.compose_config = lambda o: calls.append(o) or real(o)
    try:
        cells = expand_grid(overrides)
    finally:
        grid_module.compose_config = real
    assert len(cells) == 6 and len(calls) == 1 + 2, "one composition per method (plus the grid's own)"
    fixed = ["data=digits", "trainer=demo", "attack=[fgsm,pgd]"]
    for cfg in cells:
        axis = ["arch=test_resnet", f"method={cfg['method']['name']}", f"seed={cfg['seed']}"]
        user = [o for o in overrides if not o.startswith("grid=")]
        full = finalize(compose_config(grid_module.last_wins(fixed + axis + user + ["grid=demo"])))
        assert full["key"] == cfg["key"] and full == cfg


def test_axis_values_become_hydra_override_text() -> None:
    """Grid axis values reach Hydra in its grammar: null (not the string 'None'), dicts without
    JSON's quoted keys, nested lists, and strings quoted only when the grammar reserves a character."""
    from harness.run.expand import _override_value

    assert _override_value(None) == "null" and _override_value(True) == "true" and _override_value(0.5) == "0.5"
    assert _override_value({"per_class": 1000, "generator": {"channels": [16, 32]}}) == \
        "{per_class:1000,generator:{channels:[16,32]}}"
    assert _override_value(["fgsm", "pgd"]) == "[fgsm,pgd]" and _override_value("timm:resnet18") == "timm:resnet18"
    assert _override_value("a b,c") == "'a b,c'"
    assert _override_value({"id": "timm:resnet18"}, "model") == '{"id": "timm:resnet18"}'  # the model axis reads JSON


def test_a_dotted_dict_axis_gives_the_cells_of_direct_overrides(data_root, tmp_path) -> None:
    """grid=generated has `data.generated` as an axis of settings dicts (and null): each cell equals
    the cell composed with that value given directly on the command line (issue 28's table)."""
    from harness.core.config import compose_config, finalize

    common = [f"data.root={data_root}", f"results_dir={tmp_path / 'results'}", "trainer=tiny"]
    cells = expand_grid(["grid=generated", "grid.axes.seed=[0]", "grid.axes.method=[pgd_at]"] + common)
    by_value = {json.dumps(c["data"].get("generated"), sort_keys=True): c for c in cells}
    assert set(by_value) == {"null", '{"per_class": 1000}', '{"per_class": 5000}'}
    fixed = ["data=digits", "arch=test_resnet", "trainer=demo", "trainer.ema=0.995", "attack=[autoattack]"]
    for text, value in (("null", "null"), ('{"per_class": 1000}', "{per_class:1000}")):
        direct = finalize(compose_config(fixed + ["method=pgd_at", f"data.generated={value}", "seed=0"] + common
                                         + ["grid=generated"]))
        assert direct["key"] == by_value[text]["key"]

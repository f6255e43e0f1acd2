"""The Hydra-native CLI: --help lists config groups, --cfg job, -m sweeps as grids, --dry-run
with states and measured cost estimates, flags and overrides in any order."""
from __future__ import annotations

import json

import pytest

from harness.core.config import ConfigError
from harness.cli import config_groups_help, main
from harness.run.grid import expand_grid
from harness.run.sweep import expand_sweep, split_sweeps
from harness.store.results import write_cell_result


def test_help_lists_config_groups_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for group, option in [("method", "pgd_at"), ("arch", "test_vit"), ("attack", "autoattack"), ("grid", "demo")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(group + " "))
        assert option in line
    assert "--cfg" in out and "--multirun" in out
    assert "trainer" in config_groups_help()


def test_cfg_job_prints_the_resolved_cell(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["run", "--cfg", "job", "method=trades", f"results_dir={tmp_path}", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "name: trades" in out and "seed: 3" in out and "beta: 6.0" in out and "# cell " in out
    assert not any(tmp_path.iterdir()), "--cfg job must not run anything"


def test_sweep_expands_like_grid_axes(tmp_path) -> None:
    plain, sweeps = split_sweeps(["method=erm,pgd_at", "seed=0,1,2", "attack=[fgsm,pgd]"])
    assert plain == ["attack=[fgsm,pgd]"] and [len(s.texts) for s in sweeps] == [2, 3]
    common = [f"results_dir={tmp_path}", "data=digits", "trainer=demo", "attack=[fgsm,pgd]"]
    swept = expand_sweep(["arch=test_resnet,test_vit", "method=erm,pgd_at,trades", "seed=0", *common])
    grid = expand_grid(["grid=demo", f"results_dir={tmp_path}"])
    assert len(swept) == 6
    assert sorted(c["key"] for c in swept) == sorted(c["key"] for c in grid)
    # a sweep on top of a grid multiplies its axes
    assert len(expand_sweep(["grid=demo", "seed=0,1", f"results_dir={tmp_path}"])) == 12


def test_a_sweep_composes_once_per_config_choice_and_its_cells_equal_one_compose_each(tmp_path, monkeypatch) -> None:
    """Value sweeps (seed, a trainer number, a method setting, a null) are set on one composed
    config per combination of the group sweeps: every cell equals composing it alone (issue 29)."""
    from harness.core.config import compose_config, finalize
    from harness.run import sweep as sweep_module
    from harness.run.expand import last_wins

    overrides = ["method=erm,trades", "seed=0,1,2", "trainer.optimizer.lr=0.05,0.1", "eval.limit=null,64",
                 f"results_dir={tmp_path}", "trainer=tiny", "attack=[fgsm]"]
    calls: list[list[str]] = []
    real = sweep_module.compose_config
    monkeypatch.setattr(sweep_module, "compose_config", lambda o: calls.append(o) or real(o))
    cells = expand_sweep(overrides)
    assert len(cells) == 2 * 3 * 2 * 2 and len(calls) == 2, "one composition per method"
    plain, sweeps = split_sweeps(overrides)
    by_key = {c["key"]: c for c in cells}
    import itertools

    for combo in itertools.product(*(s.texts for s in sweeps)):
        alone = finalize(compose_config(last_wins(plain + list(combo))))
        assert by_key[alone["key"]] == alone
    # a method setting swept over one method: set too, and refused with compose's words when mistyped
    betas = expand_sweep(["method=trades", "method.beta=1.0,6.0", f"results_dir={tmp_path}"])
    assert sorted(c["method"]["beta"] for c in betas) == [1.0, 6.0]
    with pytest.raises(ConfigError, match="seed must be a number"):
        expand_sweep(["seed=0,abc", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="method.beta must be"):
        expand_sweep(["method=trades", "method.beta=1.0,abc", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="trainer.nosuch"):
        expand_sweep(["trainer.nosuch=1,2", f"results_dir={tmp_path}"])


def test_too_many_combinations_are_refused_before_composing(tmp_path, monkeypatch) -> None:
    from harness.run import expand as expand_module
    from harness.run import sweep as sweep_module

    monkeypatch.setattr(sweep_module, "compose_config", lambda o: pytest.fail("composed before the count"))
    with pytest.raises(ConfigError, match=r"200,000 combinations, more than grid.max_cells=100,000"):
        expand_sweep(["seed=range(0,200000)", f"results_dir={tmp_path}"])
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"grid 'demo' has 6 combinations, more than grid.max_cells=5"):
        expand_grid(["grid=demo", "grid.max_cells=5", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"12 combinations, more than grid.max_cells=10"):
        expand_sweep(["grid=demo", "grid.max_cells=10", "seed=0,1", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="grid.max_cells must be a whole number"):
        expand_grid(["grid=demo", "grid.max_cells=0", f"results_dir={tmp_path}"])
    assert expand_module.MAX_CELLS == 100_000


def test_sweep_without_m_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["run", "seed=0,1", f"results_dir={tmp_path}"]) == 2
    assert "-m" in capsys.readouterr().err


def test_dry_run_states_and_measured_estimate(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """One committed seed of a setup gives the estimate for the other seeds of that setup."""
    overrides = ["-m", "method=erm,pgd_at", "seed=0,1", f"results_dir={tmp_path}", "--dry-run"]
    cells = expand_sweep([o for o in overrides if o not in ("-m", "--dry-run")])
    done = next(c for c in cells if c["method"]["name"] == "erm" and c["seed"] == 0)
    ips, n_train, eval_s = 200.0, 1000, 7.0
    write_cell_result(tmp_path, done["key"], [{
        "key": done["key"], "status": "ok", "dataset": "digits", "arch": "test_resnet", "method": "erm",
        "seed": 0, "attack": "pgd", "norm": "linf", "eps": 0.1, "clean_acc": 0.9, "robust_acc": 0.1,
        "images_per_second": ips, "n_train": n_train, "eval_seconds": eval_s, "train_seconds": 30.0,
        "config_json": json.dumps(done)}])
    # flags after, before and between the overrides
    assert main(["grid", overrides[-1], *overrides[:-1]]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 4}
    assert len(lines) == 4
    assert "done" in lines[done["key"]]
    twin = next(c for c in cells if c["method"]["name"] == "erm" and c["seed"] == 1)
    expected = done["trainer"]["epochs"] * n_train / ips + eval_s
    assert "pending" in lines[twin["key"]] and f"{expected:.0f}s" in lines[twin["key"]]
    other = [line for key, line in lines.items() if "pgd_at" in line]
    assert len(other) == 2 and all("no committed cell" in line for line in other)
    assert "1 done" in out and "3 to run" in out


def test_status_flag_between_overrides(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["status", "grid=demo", "--list", f"results_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("pending ") for line in out.splitlines()) == 6


@pytest.mark.parametrize("bad,named", [
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.optimizer.lr=-1", "lr"),
    ("results_dir=/proc/robustgrid-results", "results_dir=/proc/robustgrid-results"),
    ("leaderboard_dir=/proc/robustgrid-site", "leaderboard_dir=/proc/robustgrid-site"),
])
def test_dry_run_makes_every_check_a_run_makes(bad: str, named: str, capsys: pytest.CaptureFixture[str],
                                               tmp_path) -> None:
    """A dry run fails as the run would, before showing any plan (issue 24, item 7)."""
    args = ["grid", "--dry-run", "method=erm", f"results_dir={tmp_path / 'r'}", f"leaderboard_dir={tmp_path / 's'}", bad]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert named in err and "dry run" not in err

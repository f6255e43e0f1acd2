"""`recipe=paper` is each method's published recipe, and docs/conformance.md's recipe table is what
the code runs: every row (method, stage) is recomputed from the composed config and its plan, so
an edit to a recipe, a method's stage settings or the schedule code cannot drift silently."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from harness.core.config import ConfigError, compose_config, finalize
from harness.core.plugin_config import recipe_methods
from harness.run.plan import build_plan, planned_trainer
from harness.train.batches import epoch_steps
from harness.train.schedule import lr_at_epochs

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
COLUMNS = ("method", "stage", "epochs", "batch", "optimizer", "lr at each epoch's start",
           "train samples (CIFAR-10)", "steps/epoch")


def recipe_rows() -> list[dict[str, str]]:
    """The rows of the doc's "Recipes" table."""
    text = DOC.read_text()
    section = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert tuple(header) == COLUMNS, f"docs/conformance.md recipe table columns: {header}"
    return [dict(zip(header, (c.strip().strip("`") for c in line.strip("|").split("|")))) for line in lines[2:]]


def describe_optimizer(tcfg: dict[str, Any]) -> str:
    """An optimiser as the table writes it, e.g. `sgd momentum 0.9 wd 0.0005 nesterov`."""
    o, schedule = tcfg["optimizer"], tcfg["schedule"]
    text = f"{o['name']} momentum {o.get('momentum', 0):g} wd {o.get('weight_decay', 0):g}"
    if o.get("nesterov"):
        text += " nesterov"
    if schedule.get("cycle_momentum"):
        text += f" (momentum cycled {schedule.get('max_momentum', 0.9):g} <-> {schedule.get('base_momentum', 0.8):g})"
    return text


def describe_lrs(lrs: list[float]) -> str:
    """Run-length lr list, e.g. `0.1 x74, 0.01 x2` (6 significant digits)."""
    runs: list[list[Any]] = []
    for lr in lrs:
        text = f"{lr:.6g}"
        if runs and runs[-1][0] == text:
            runs[-1][1] += 1
        else:
            runs.append([text, 1])
    return ", ".join(v if n == 1 else f"{v} x{n}" for v, n in runs)


def stage_trainers(method: str) -> dict[str, dict[str, Any]]:
    """Every train node of a `recipe=paper` cell on CIFAR-10, by its method: the trainer it runs."""
    cfg = finalize(compose_config([f"method={method}", "recipe=paper", "data=cifar10", "arch=resnet18"]))
    return {n.cfg["method"]["name"]: planned_trainer(n.cfg) for n in build_plan([cfg]) if n.kind == "train"}


@pytest.mark.parametrize("row", recipe_rows(), ids=lambda r: f"{r['method']}/{r['stage']}")
def test_the_recipe_table_is_what_runs(row: dict[str, str]) -> None:
    stages = stage_trainers(row["method"])
    assert row["stage"] in stages, f"{row['method']}: no train node '{row['stage']}' (nodes: {sorted(stages)})"
    tcfg = stages[row["stage"]]
    assert int(tcfg["epochs"]) == int(row["epochs"])
    assert int(tcfg["batch_size"]) == int(row["batch"])
    assert describe_optimizer(tcfg) == row["optimizer"]
    assert describe_lrs(lr_at_epochs(tcfg)) == row["lr at each epoch's start"].replace("×", "x")
    n = int(row["train samples (CIFAR-10)"].replace(",", ""))
    assert epoch_steps([n], int(tcfg["batch_size"]), bool(tcfg.get("drop_last")))[0] == int(row["steps/epoch"])


def test_every_paper_recipe_has_rows_and_every_row_a_recipe() -> None:
    documented = {row["method"] for row in recipe_rows()}
    assert documented == set(recipe_methods("paper"))


def test_a_method_without_the_recipe_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"method 'erm' has no 'paper' recipe\. Methods with one: .*trades"):
        compose_config(["method=erm", "recipe=paper"])


def test_command_line_overrides_win_over_the_recipe() -> None:
    cfg = compose_config(["method=trades", "recipe=paper", "trainer.epochs=3"])
    assert cfg["trainer"]["epochs"] == 3 and cfg["trainer"]["optimizer"]["weight_decay"] == 2e-4
    assert re.fullmatch(r"[0-9a-f]{20}", finalize(cfg)["key"])
    grid = finalize(compose_config(["method=trades"]))
    assert grid["recipe"] == {"name": "grid"} and grid["key"] != finalize(compose_config(["method=trades", "recipe=paper"]))["key"]


def test_the_dm_at_recipe_is_wang_et_al_2023s_trades() -> None:
    """`recipe=dm_at`: DM-Improves-AT's README command and train-wa.py defaults for CIFAR-10, and the
    lr / momentum at every epoch's start equal to torch's OneCycleLR stepped per epoch (its 'cosinew')."""
    import torch

    from harness.train.schedule import momentum_at

    cfg = finalize(compose_config(["recipe=dm_at", "method=trades", "data=cifar10"]))
    t, m, d = cfg["trainer"], cfg["method"], cfg["data"]
    assert (t["epochs"], t["batch_size"], t["ema"]) == (400, 512, 0.995)
    assert t["optimizer"] == {**t["optimizer"], "name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4,
                              "nesterov": True}
    assert (m["beta"], m["label_smoothing"], m["attack"]["steps"]) == (5.0, 0.1, 10)
    from fractions import Fraction

    assert Fraction(str(m["attack"]["step_size"])) == Fraction(2, 255) and Fraction(str(d["eps"])) == Fraction(8, 255)
    assert (d["generated"]["per_class"] * 10, d["generated_ratio"]) == (1_000_000, 0.7)
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.2, momentum=0.9, nesterov=True)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=0.025, total_steps=400)
    for epoch, lr in enumerate(lr_at_epochs(t)):
        assert abs(lr - opt.param_groups[0]["lr"]) < 1e-12
        assert abs(momentum_at(t["schedule"], float(epoch), 400) - opt.param_groups[0]["momentum"]) < 1e-12
        opt.step()
        ref.step()
    with pytest.raises(ConfigError, match="has no 'dm_at' recipe"):
        finalize(compose_config(["recipe=dm_at", "method=pgd_at"]))

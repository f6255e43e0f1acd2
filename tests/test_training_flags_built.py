"""The training-integrity flags on failures built on purpose by real trainings on digits, through
the whole cell (train node, probes, eval node, committed rows): each flag lands on the cell's rows
with its evidence, and the healthy counterpart carries none (docs/training_health.md).

Built here: `collapsed` (FGSM at eps 0.25 drives the small ViT to one class), `diverged` (an
absurd learning rate: the cell fails, its failed row names the epoch) and `weak_train_attack`
(PGD-AT attacking at eps 0.03 while the threat model is 0.15). `catastrophic_overfitting` and
`robust_overfitting` are checked on hand-written curves (tests/test_health_rules.py): no setting we
tried on digits' small models (FGSM-RS at steps 1.25 to 4 eps, eps 0.15 to 0.3, AdamW and SGD 0.05
to 0.2, test_resnet, test_vit and resnet18, 8 to 25 epochs) made PGD accuracy rise then collapse,
and the robust-overfitting gap on digits stays inside what a few hundred probed images can tell
from noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.config import compose_config, finalize
from harness.run.cell import run_cell
from harness.store.results import read_cell_result, result_path

PROBED = ["trainer=demo", "trainer.validation.fraction=0.1", "trainer.probe_budget=1.0",
          "trainer.schedule.name=constant", "trainer.schedule.warmup_epochs=0", "eval.limit=64",
          "attack=[pgd]", "attack.pgd.steps=3"]


def _cell(data_root: Path, tmp_path: Path, *extra: str) -> dict:
    return finalize(compose_config([f"data.root={data_root}", f"results_dir={tmp_path / 'results'}",
                                    "trainer.progress=false", *PROBED, *extra]))


def _rows(cfg: dict) -> list[dict]:
    return read_cell_result(result_path(cfg["results_dir"], cfg["key"])).to_pylist()


def test_a_model_collapsed_to_one_class_is_flagged_collapsed(data_root: Path, tmp_path: Path) -> None:
    cfg = _cell(data_root, tmp_path, "arch=test_vit", "method=fgsm_rs", "method.guard=false",
                "method.attack.step_ratio=2.0", "data.eps=0.25", "trainer.epochs=2")
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    for row in _rows(cfg):
        assert "collapsed" in row["train_flags"], row["train_flags"]
        evidence = json.loads(row["train_flag_details"])["collapsed"]
        assert evidence["top_class_share"] > 0.5 and evidence["epoch"] == 1
        assert row["validation_n"] == 144 and row["selection"] == "last"


def test_a_diverged_training_fails_and_its_row_names_the_epoch(data_root: Path, tmp_path: Path) -> None:
    cfg = _cell(data_root, tmp_path, "method=erm", "trainer.optimizer.name=sgd", "trainer.optimizer.lr=1e30",
                "trainer.epochs=2")
    outcome = run_cell(cfg)
    assert outcome.status == "failed" and "NonFiniteLossError" in (outcome.error or "")
    rows = _rows(cfg)
    assert rows and all(r["status"] == "failed" and r["train_flags"] == ["diverged"] for r in rows)
    assert json.loads(rows[0]["train_flag_details"])["diverged"]["epoch"] == 0


@pytest.mark.slow  # ~1 min: CI runs it after the default suite
@pytest.mark.parametrize("attack_eps, fires", [(0.03, True), (0.15, False)])
def test_a_training_attack_weaker_than_pgd10_is_flagged_and_pgd_at_is_not(data_root: Path, tmp_path: Path,
                                                                          attack_eps: float, fires: bool) -> None:
    """PGD-AT at a fifth of the threat model's eps: its own attack's accuracy climbs to ~95% while
    PGD-10 at eps 0.15 on the same trained images stays near 20%. At eps 0.15 (PGD-AT as published)
    the two agree within a few points, and no flag fires."""
    cfg = _cell(data_root, tmp_path, "method=pgd_at", f"method.attack.eps={attack_eps}", "trainer.epochs=4")
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    rows = _rows(cfg)
    if fires:
        assert all("weak_train_attack" in r["train_flags"] for r in rows)
        evidence = json.loads(rows[0]["train_flag_details"])["weak_train_attack"]
        assert evidence["train_robust_last"] - evidence["train_pgd_last"] > 0.3
    else:
        assert all(r["train_flags"] == [] for r in rows), rows[0]["train_flag_details"]

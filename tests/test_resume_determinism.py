"""A fault changes nothing: a training killed after an epoch and resumed from that epoch's
checkpoint ends with bitwise the same weights as the uninterrupted run, for every registered
method (world size 1) and for a 2-rank cell. Every random draw of an epoch comes from generators
seeded from (seed, rank, epoch) (harness/train/trainer.py `seed_epoch`), the data order and
augmentation are pure functions of (seed, epoch, rank), and the rest is in the checkpoint.

The cells hold out a validation split and select their best probed epoch (issue 25): the resumed
run's probe history (the curve, in the checkpoint) equals the uninterrupted one's, and so does the
selected epoch, whose weights come from the best checkpoint the killed run wrote."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harness.train.trainer as trainer
from harness.core.registry import METHODS
from harness.store.audit import audit_store
from harness.store.checkpoint_sync import local_work_dir
from helpers import killed_run, method_cell

EPOCHS, KILLED_AFTER = 4, 1
# The default suite resumes one method of each trainer path: no train-time attack (erm), an attack
# (trades), a pre-pass (cbd), a selected subset (abl), an upstream checkpoint (adml), a single-step
# attack with a guard (fgsm_rs). Every other method, and the 2-rank cells, run with `-m slow` (CI runs them).
DEFAULT_METHODS = ("erm", "trades", "cbd", "abl", "adml_trades", "fgsm_rs")
PROBED = ("trainer.validation.fraction=0.1", "trainer.select=best_val_clean", "trainer.probe_budget=1.0")
TIMINGS = ("seconds", "probe_seconds")


@pytest.fixture(scope="module")
def upstream_erm(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg = method_cell("erm", data_root, tmp_path_factory.mktemp("upstream"), None)
    trainer.train(cfg, local_work_dir(cfg))
    return str(local_work_dir(cfg) / trainer.CHECKPOINT)


def _weights(work_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(work_dir / trainer.CHECKPOINT, weights_only=False)["model"]


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: resumed weights differ from the uninterrupted run's in {differ[:5]}"


def _probes(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in TIMINGS} for entry in curve]


def _killed_then_resumed(cfg: dict, work_dir: Path, world_size: int) -> trainer.TrainSummary:
    killed_run(cfg, work_dir, world_size, KILLED_AFTER)
    saved = torch.load(work_dir / trainer.CHECKPOINT, weights_only=False)
    assert saved["epoch"] == KILLED_AFTER, "the kill must come right after that epoch's checkpoint"
    left = list(work_dir.glob("rg-ranks-*"))  # the killed group's rendezvous folder stays behind ...
    assert len(left) == 1 and any(left[0].name in m for m in audit_store(cfg["results_dir"]))
    summary = trainer.train(cfg, work_dir)  # the retry: resumes at epoch KILLED_AFTER + 1
    assert [c["epoch"] for c in summary.curve] == list(range(EPOCHS))
    assert not list(work_dir.glob("rg-ranks-*"))  # ... until the retry removes it
    return summary


@pytest.mark.parametrize("name", [n if n in DEFAULT_METHODS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in METHODS.names()])
def test_a_resumed_training_equals_the_uninterrupted_one(name: str, data_root: Path, tmp_path: Path,
                                                         upstream_erm: str) -> None:
    whole = method_cell(name, data_root, tmp_path / "whole", upstream_erm, epochs=EPOCHS, extra=PROBED)
    uninterrupted = trainer.train(whole, local_work_dir(whole))
    cut = method_cell(name, data_root, tmp_path / "cut", upstream_erm, epochs=EPOCHS, extra=PROBED)
    work = local_work_dir(cut)
    work.mkdir(parents=True)
    resumed = _killed_then_resumed(cut, work, 1)
    _assert_bitwise_equal(_weights(local_work_dir(whole)), _weights(work), name)
    assert "val_clean_acc" in uninterrupted.curve[0]
    assert _probes(resumed.curve) == _probes(uninterrupted.curve), f"{name}: the probe history differs"
    assert resumed.selection == uninterrupted.selection


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trades", "cbd"])
def test_a_resumed_two_rank_training_equals_the_uninterrupted_one(name: str, data_root: Path, tmp_path: Path,
                                                                  upstream_erm: str) -> None:
    extra = ("trainer.world_size=2", *PROBED)
    whole = method_cell(name, data_root, tmp_path / "whole", upstream_erm, epochs=EPOCHS, extra=extra)
    trainer.train(whole, local_work_dir(whole))
    cut = method_cell(name, data_root, tmp_path / "cut", upstream_erm, epochs=EPOCHS, extra=extra)
    work = local_work_dir(cut)
    work.mkdir(parents=True)
    resumed = _killed_then_resumed(cut, work, 2)
    _assert_bitwise_equal(_weights(local_work_dir(whole)), _weights(work), f"{name} on 2 ranks")
    assert _probes(resumed.curve) == _probes(trainer.train(whole, local_work_dir(whole)).curve)

"""A fault changes nothing: a training killed after an epoch and resumed from that epoch's
checkpoint ends with bitwise the same weights as the uninterrupted run, for every registered
method (world size 1) and for a 2-rank cell. Every random draw of an epoch comes from generators
seeded from (seed, rank, epoch) (harness/train/trainer.py `seed_epoch`), the data order and
augmentation are pure functions of (seed, epoch, rank), and the rest is in the checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harness.train.trainer as trainer
from harness.core.registry import METHODS
from harness.store.checkpoint_sync import local_work_dir
from helpers import killed_run, method_cell

EPOCHS, KILLED_AFTER = 4, 1


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


def _killed_then_resumed(cfg: dict, work_dir: Path, world_size: int) -> None:
    killed_run(cfg, work_dir, world_size, KILLED_AFTER)
    saved = torch.load(work_dir / trainer.CHECKPOINT, weights_only=False)
    assert saved["epoch"] == KILLED_AFTER, "the kill must come right after that epoch's checkpoint"
    summary = trainer.train(cfg, work_dir)  # the retry: resumes at epoch KILLED_AFTER + 1
    assert [c["epoch"] for c in summary.curve] == list(range(EPOCHS))


@pytest.mark.parametrize("name", METHODS.names())
def test_a_resumed_training_equals_the_uninterrupted_one(name: str, data_root: Path, tmp_path: Path,
                                                         upstream_erm: str) -> None:
    whole = method_cell(name, data_root, tmp_path / "whole", upstream_erm, epochs=EPOCHS)
    trainer.train(whole, local_work_dir(whole))
    cut = method_cell(name, data_root, tmp_path / "cut", upstream_erm, epochs=EPOCHS)
    work = local_work_dir(cut)
    work.mkdir(parents=True)
    _killed_then_resumed(cut, work, 1)
    _assert_bitwise_equal(_weights(local_work_dir(whole)), _weights(work), name)


@pytest.mark.parametrize("name", ["trades", "cbd"])
def test_a_resumed_two_rank_training_equals_the_uninterrupted_one(name: str, data_root: Path, tmp_path: Path,
                                                                  upstream_erm: str) -> None:
    extra = ("trainer.world_size=2",)
    whole = method_cell(name, data_root, tmp_path / "whole", upstream_erm, epochs=EPOCHS, extra=extra)
    trainer.train(whole, local_work_dir(whole))
    cut = method_cell(name, data_root, tmp_path / "cut", upstream_erm, epochs=EPOCHS, extra=extra)
    work = local_work_dir(cut)
    work.mkdir(parents=True)
    _killed_then_resumed(cut, work, 2)
    _assert_bitwise_equal(_weights(local_work_dir(whole)), _weights(work), f"{name} on 2 ranks")

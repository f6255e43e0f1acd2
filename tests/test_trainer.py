"""The DDP trainer: checkpoints and resume, multi-process sample accounting, failure handling."""
from __future__ import annotations

import json

import pytest
import torch

from harness.run.cell import run_cell
from harness.store.checkpoint_sync import local_work_dir as checkpoint_dir
from harness.core.config import compose_config, finalize
from harness.core.registry import METHODS
from harness.store.results import read_cell_result, result_path
from harness.train.trainer import CHECKPOINT, NonFiniteLossError, even_batches, train
from methods.base import Method


def _cfg(overrides: list[str]) -> dict:
    return finalize(compose_config(overrides))


def test_two_process_ddp_sees_each_sample_once_and_stays_in_sync(tiny) -> None:
    one = _cfg(tiny + ["trainer.epochs=1", "trainer.world_size=1"])
    two = _cfg(tiny + ["trainer.epochs=1", "trainer.world_size=2", "seed=0"])
    assert one["key"] != two["key"]
    s1 = train(one, checkpoint_dir(one))
    s2 = train(two, checkpoint_dir(two))
    assert s1.samples_per_epoch == [256] == s2.samples_per_epoch
    assert s2.world_size == 2 and s2.replicas_in_sync
    assert [c["samples"] for c in s2.curve] == [256]
    assert s2.n_train == 256


def test_checkpoint_each_epoch_and_resume_skips_finished_epochs(tiny) -> None:
    cfg = _cfg(tiny + ["trainer.epochs=1", "trainer.schedule.name=constant"])
    work = checkpoint_dir(cfg)
    first = train(cfg, work)
    state = torch.load(work / CHECKPOINT, weights_only=False)
    assert state["epoch"] == 0 and len(first.curve) == 1
    weights_after_1 = {k: v.clone() for k, v in state["model"].items()}

    cfg2 = dict(cfg, trainer=dict(cfg["trainer"], epochs=2))  # same work dir: continue to epoch 2
    second = train(cfg2, work)
    assert [c["epoch"] for c in second.curve] == [0, 1]
    assert second.curve[0] == first.curve[0], "epoch 0 must come from the checkpoint, not be retrained"
    assert torch.load(work / CHECKPOINT, weights_only=False)["epoch"] == 1
    assert any(not torch.equal(v, weights_after_1[k]) for k, v in
               torch.load(work / CHECKPOINT, weights_only=False)["model"].items())

    third = train(cfg2, work)  # nothing left to do
    assert third.curve == second.curve and third.train_seconds == pytest.approx(second.train_seconds)


class _NaNMethod(Method):
    name = "nan_for_tests"

    def training_step(self, module, x, y, ctx):
        return {"loss": module(x).sum() * float("nan")}


def test_nan_loss_makes_a_failed_cell_row(tiny) -> None:
    METHODS.add("nan_for_tests", _NaNMethod)
    cfg = _cfg(tiny + ["method=nan_for_tests"])
    outcome = run_cell(cfg)
    assert outcome.status == "failed" and "NonFiniteLossError" in outcome.error
    rows = read_cell_result(result_path(cfg["results_dir"], cfg["key"])).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "failed" and rows[0]["clean_acc"] is None
    assert "loss is nan" in rows[0]["error"]
    assert NonFiniteLossError.__name__ in rows[0]["error"]


def test_run_cell_writes_one_row_per_attack_with_provenance(tiny) -> None:
    cfg = _cfg(tiny + ["method=pgd_at", "trainer.epochs=1"])
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    rows = read_cell_result(result_path(cfg["results_dir"], cfg["key"])).to_pylist()
    assert sorted(r["attack"] for r in rows) == ["fgsm", "pgd"]
    for row in rows:
        assert row["key"] == cfg["key"] and row["method"] == "pgd_at" and row["n_eval"] == 64
        assert 0 <= row["robust_acc"] <= row["clean_acc"] <= 1
        assert len(row["per_class_robust_acc"]) == 10 and row["class_names"][3] == "3"
        assert row["eps"] == pytest.approx(0.15) and row["norm"] == "linf"  # digits default
        assert row["train_seconds"] > 0 and row["images_per_second"] > 0
        assert len(row["checkpoint_sha256"]) == 64 and len(row["data_sha256"]) == 64
        assert json.loads(row["config_json"])["key"] == cfg["key"]
        assert dict(row["package_versions"])["torch"] == torch.__version__
        assert row["git_commit"]


def test_even_batches_cuts_exactly() -> None:
    stream = [(torch.arange(i, i + 5).float(), torch.arange(i, i + 5)) for i in range(0, 23, 5)]
    stream[-1] = (stream[-1][0][:3], stream[-1][1][:3])  # 23 samples in batches of 5,5,5,5,3
    batches = list(even_batches(stream, 23, 4))
    assert [len(b[1]) for b in batches] == [6, 6, 6, 5]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(23))


def test_drop_last_takes_full_batches_and_leaves_the_rest_out(tiny) -> None:
    """trainer.drop_last (CausalAdv's and ADML's official loaders): floor(n / batch) full batches per
    epoch, on every rank the same count, the remainder of each rank's shuffled epoch left out."""
    from harness.train.batches import epoch_steps

    assert epoch_steps([50_000], 128) == (391, [50_000])
    assert epoch_steps([50_000], 128, drop_last=True) == (390, [49_920])
    assert epoch_steps([130, 126], 64, drop_last=True) == (1, [64, 64])
    with pytest.raises(ValueError, match="drop_last"):
        epoch_steps([30], 64, drop_last=True)
    stream = [(torch.arange(i, i + 5).float(), torch.arange(i, i + 5)) for i in range(0, 23, 5)]
    stream[-1] = (stream[-1][0][:3], stream[-1][1][:3])
    assert [len(b[1]) for b in even_batches(stream, 20, 4, drop=3)] == [5, 5, 5, 5]
    for world_size in (1, 2):
        cfg = _cfg(tiny + ["trainer.epochs=1", "trainer.batch_size=48", "trainer.drop_last=true",
                           f"trainer.world_size={world_size}"])
        summary = train(cfg, checkpoint_dir(cfg))
        per_rank = 48 // world_size
        assert summary.samples_per_epoch == [256 // 48 * 48 if world_size == 1 else 2 * per_rank * (128 // per_rank)]


def test_images_per_second_leaves_out_the_first_step() -> None:
    """The first step alone counts FLOPs and pays warm-up (compilation on a GPU): images/s is the
    steady state after it, and all steps when there is only one."""
    from harness.train.trainer import steady_images_per_second

    assert steady_images_per_second(400, 10.0, 4.0, 100) == 300 / 6.0
    assert steady_images_per_second(100, 4.0, 4.0, 100) == 25.0
    assert steady_images_per_second(0, 0.0, 0.0, 0) == 0.0


def test_images_per_second_leaves_out_the_wait_for_the_first_batch(tiny, monkeypatch) -> None:
    """The loader's start and shuffle-buffer fill (here a 1.5 s sleep before the first batch) is
    warm-up, as the first step is: the steady-state seconds behind images/s do not hold it."""
    import time

    import harness.train.trainer as trainer_module

    real = trainer_module.make_loader

    def slow_start(*args, **kwargs):
        def batches():
            time.sleep(1.5)
            yield from real(*args, **kwargs)
        return batches()

    monkeypatch.setattr(trainer_module, "make_loader", slow_start)
    cfg = _cfg(tiny + ["trainer.epochs=1", "trainer.batch_size=64", "trainer.validation.fraction=0"])
    summary = train(cfg, checkpoint_dir(cfg))
    assert summary.train_seconds > 1.5
    steady_seconds = (summary.samples_per_epoch[0] - 64) / summary.images_per_second
    assert steady_seconds < summary.train_seconds - 1.5

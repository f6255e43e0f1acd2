"""Weight EMA (harness/train/ema.py, issue 28 item 4): the papers' decay schedule, the average
recomputed by hand, the trainer delivering, probing and checkpointing the average, a resumed run
continuing it bitwise, and bad settings refused before work."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import harness.train.trainer as trainer
from harness.store.checkpoint_sync import local_work_dir
from harness.train.ema import EmaSettings, WeightAverage, ema_decay, ema_settings
from harness.train.optimizers import check_trainer_config
from helpers import killed_run, method_cell


def test_the_decay_schedule_is_the_dm_at_papers_one() -> None:
    dynamic = EmaSettings(0.995, warmup=0.0, dynamic=True)
    assert [round(ema_decay(dynamic, s, 1000), 6) for s in (1, 2, 10, 100)] == [
        round(2 / 11, 6), round(3 / 12, 6), round(11 / 20, 6), round(101 / 110, 6)]
    assert ema_decay(dynamic, 10_000, 20_000) == 0.995  # capped at trainer.ema
    warm = EmaSettings(0.9, warmup=0.025, dynamic=True)  # 2.5% of 200 steps: 5
    assert ema_decay(warm, 4, 200) == 0.0 and ema_decay(warm, 5, 200) == pytest.approx(1 / 10)
    assert ema_decay(warm, 5, 180) == pytest.approx(1.5 / 10.5)  # a fractional warm-up (4.5 steps), as theirs
    assert ema_decay(EmaSettings(0.9, 0.0, False), 1, 10) == 0.9


def test_the_average_is_the_formula_and_batchnorm_statistics_are_the_model_s() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    settings = EmaSettings(0.9, warmup=0.2, dynamic=True)  # 1 of 5 steps
    average = WeightAverage(model, settings, 5, torch.device("cpu"))
    expected = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 6):
        model.train()
        optimizer.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()
        average.update(model, step)
        decay = ema_decay(settings, step, 5)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(average.module.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(average.module[1].running_mean, model[1].running_mean)
    assert not torch.equal(next(average.module.parameters()), next(model.parameters()))
    assert average.describe() == {"decay": 0.9, "warmup": 0.2, "warmup_steps": 1.0, "dynamic": True, "updates": 5}


@pytest.mark.parametrize("settings, message", [
    ({"ema": 1.5}, "trainer.ema is the average's decay"),
    ({"ema": "yes"}, "trainer.ema is the average's decay"),
    ({"ema": 0.99, "ema_warmup": 1.5}, "trainer.ema_warmup"),
    ({"ema": 0.99, "ema_dynamic": "no"}, "trainer.ema_dynamic"),
    ({"ema": 0.99, "compile": True}, "trainer.compile"),
])
def test_bad_ema_settings_are_refused_before_work(settings: dict, message: str, tmp_path: Path,
                                                  data_root: Path) -> None:
    cfg = method_cell("erm", data_root, tmp_path, None)
    with pytest.raises(ValueError, match=message):
        check_trainer_config({**cfg["trainer"], **settings})
    assert ema_settings(cfg["trainer"]) is None  # off by default: every method's recipe unchanged


def test_the_trainer_delivers_probes_and_resumes_the_average(data_root: Path, tmp_path: Path) -> None:
    extra = ("trainer.ema=0.9", "trainer.validation.fraction=0.1", "trainer.probe_budget=1.0",
             "trainer.select=best_val_clean")
    whole = method_cell("erm", data_root, tmp_path / "whole", None, epochs=3, extra=extra)
    summary = trainer.train(whole, local_work_dir(whole))
    steps = sum(math.ceil(n / 64) for n in summary.samples_per_epoch)  # one update per optimiser step
    assert summary.ema is not None and summary.ema["decay"] == 0.9 and summary.ema["updates"] == steps == 6
    saved = torch.load(local_work_dir(whole) / trainer.CHECKPOINT, weights_only=False)
    best = torch.load(local_work_dir(whole) / "checkpoint_best.pt", weights_only=False)
    # the delivered model is the average of the selected epoch (its best checkpoint holds the average)
    for key, value in saved["model"].items():
        assert torch.equal(value, best["model"][key]), key
    if summary.selection["epoch"] == 2:
        for key, value in saved["ema"]["weights"].items():
            assert torch.equal(value, saved["model"][key]), key
    assert "val_clean_acc" in summary.curve[0]

    plain = method_cell("erm", data_root, tmp_path / "plain", None, epochs=3, extra=extra[1:])
    trainer.train(plain, local_work_dir(plain))
    other = torch.load(local_work_dir(plain) / trainer.CHECKPOINT, weights_only=False)["model"]
    assert any(not torch.equal(other[k], saved["model"][k]) for k in other), "EMA changed nothing"

    cut = method_cell("erm", data_root, tmp_path / "cut", None, epochs=3, extra=extra)
    work = local_work_dir(cut)
    work.mkdir(parents=True)
    killed_run(cut, work, 1, 0)
    assert torch.load(work / trainer.CHECKPOINT, weights_only=False)["ema"]["updates"] > 0
    resumed = trainer.train(cut, work)
    after = torch.load(work / trainer.CHECKPOINT, weights_only=False)
    for key, value in saved["model"].items():
        assert torch.equal(value, after["model"][key]), f"resumed average differs in {key}"
    assert resumed.ema == summary.ema and resumed.selection == summary.selection
    assert after["ema"]["updates"] == steps


def test_trades_label_smoothing_is_the_dm_at_recipe_s_smoothed_natural_ce() -> None:
    """TRADES' natural CE with label smoothing s: (1 - s) NLL + s mean(-log p) per sample (the
    DM-AT code's SmoothCrossEntropyLoss), the KL term untouched; 0 (TRADES) by default."""
    from methods.trades import TRADES, trades_loss

    gen = torch.Generator().manual_seed(0)
    clean, adv, y = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen), torch.arange(8) % 10
    logp = torch.log_softmax(clean, 1)
    by_hand = (0.9 * -logp.gather(1, y[:, None]).squeeze(1) + 0.1 * -logp.mean(1)).mean()
    total, natural, robust = trades_loss(clean, adv, y, 6.0, label_smoothing=0.1)
    torch.testing.assert_close(natural, by_hand)
    assert torch.equal(robust, trades_loss(clean, adv, y, 6.0)[2])
    torch.testing.assert_close(total, natural + 6.0 * robust)
    assert TRADES({"eps": 0.1}).label_smoothing == 0.0
    with pytest.raises(ValueError, match="method.label_smoothing"):
        TRADES({"eps": 0.1}, label_smoothing=1.0)

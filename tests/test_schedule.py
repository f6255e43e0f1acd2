"""LR schedules are pure functions of the fractional epoch (so resume continues them exactly)."""
from __future__ import annotations

import pytest

from harness.train.schedule import lr_factor, momentum_at


def test_multistep_matches_the_pgd_at_recipe() -> None:
    cfg = {"name": "multistep", "milestones": [100, 105], "gamma": 0.1}
    assert lr_factor(cfg, 99.9, 110) == 1.0
    assert lr_factor(cfg, 100.0, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 106.0, 110) == pytest.approx(0.01)


def test_cosine_with_warmup_and_cyclic() -> None:
    cos = {"name": "cosine", "warmup_epochs": 1}
    assert lr_factor(cos, 0.5, 10) == pytest.approx(0.5, abs=1e-6)
    assert lr_factor(cos, 1.0, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 5.5, 10) == pytest.approx(0.5)
    cyc = {"name": "cyclic", "peak_epoch": 4}
    assert lr_factor(cyc, 0.0, 10) == 0.0
    assert lr_factor(cyc, 4.0, 10) == pytest.approx(1.0)
    assert lr_factor(cyc, 7.0, 10) == pytest.approx(0.5)


def test_unknown_schedule_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Known schedules: constant, cosine, cyclic, multistep"):
        lr_factor({"name": "exp", "warmup_epochs": 1}, 0.0, 10)


@pytest.mark.parametrize("epochs,steps_per_epoch,peak", [(15, 7, None), (10, 5, 2)])
def test_cyclic_with_momentum_equals_torch_cyclic_lr_at_every_step(epochs, steps_per_epoch, peak) -> None:
    """The schedule fast AT (peak at half the run) and ADML (peak at round(epochs / 5)) take from
    torch's CyclicLR, stepped per batch with its default momentum cycling 0.9 <-> 0.8."""
    import torch

    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.2, momentum=0.9)
    total = epochs * steps_per_epoch
    up = total / 2 if peak is None else peak * steps_per_epoch
    torch_sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.2, step_size_up=up,
                                                    step_size_down=total - up)
    cfg = {"name": "cyclic", "cycle_momentum": True, **({} if peak is None else {"peak_epoch": peak})}
    for step in range(total):
        epoch = step / steps_per_epoch
        group = opt.param_groups[0]
        assert 0.2 * lr_factor(cfg, epoch, epochs) == pytest.approx(group["lr"], abs=1e-12), step
        assert momentum_at(cfg, epoch, epochs) == pytest.approx(group["momentum"], abs=1e-12), step
        opt.step()
        torch_sched.step()
    assert momentum_at({"name": "cyclic"}, 1.0, 10) is None  # momentum left alone unless asked


def test_epoch_granularity_holds_the_lr_through_each_epoch() -> None:
    """A scheduler stepped once per epoch (BackdoorBench's CosineAnnealingLR(T_max=epochs))."""
    import math

    cos = {"name": "cosine", "granularity": "epoch"}
    for epoch in range(10):
        expected = 0.5 * (1 + math.cos(math.pi * epoch / 10))
        assert lr_factor(cos, epoch, 10) == pytest.approx(expected)
        assert lr_factor(cos, epoch + 0.99, 10) == pytest.approx(expected)
    with pytest.raises(ValueError, match="granularity"):
        lr_factor({"name": "cosine", "granularity": "batch"}, 0.0, 10)
    with pytest.raises(ValueError, match="peak"):
        lr_factor({"name": "cyclic", "peak_epoch": 12}, 0.0, 10)


def test_the_trainer_sets_the_cycled_momentum(data_root, tmp_path) -> None:
    """The trainer applies momentum_at before every step: the optimiser's last momentum is the
    schedule's at the last step."""
    import torch

    import harness.train.trainer as trainer
    from harness.core.config import compose_config, finalize
    from harness.store.checkpoint_sync import local_work_dir

    cfg = finalize(compose_config([f"data.root={data_root}", f"results_dir={tmp_path}", "trainer=tiny",
                                   "data.train_limit=128", "trainer.optimizer.name=sgd", "~trainer.optimizer.weight_decay",
                                   "+trainer.optimizer.momentum=0.9", "trainer.schedule.name=cyclic",
                                   "+trainer.schedule.cycle_momentum=true"]))
    trainer.train(cfg, local_work_dir(cfg))
    group = torch.load(local_work_dir(cfg) / trainer.CHECKPOINT, weights_only=False)["optimizer"]["param_groups"][0]
    last = 2 - 1 / 2  # 2 epochs of 2 steps: the last step starts at epoch 1.5
    assert group["momentum"] == pytest.approx(momentum_at(cfg["trainer"]["schedule"], last, 2))
    assert group["momentum"] != pytest.approx(0.9)
    assert group["lr"] == pytest.approx(cfg["trainer"]["optimizer"]["lr"] * lr_factor(cfg["trainer"]["schedule"], last, 2))

    cfg["trainer"]["schedule"]["step_lr_at"] = "end"  # the same run, each step's lr taken at its end
    cfg["results_dir"] = str(tmp_path / "end")
    trainer.train(cfg, local_work_dir(cfg))
    group = torch.load(local_work_dir(cfg) / trainer.CHECKPOINT, weights_only=False)["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.0)  # the cyclic schedule's value at the run's end


def test_step_lr_at_end_sets_each_step_where_it_ends() -> None:
    """Scripts computing step i's lr from epoch + (i + 1) / steps (bag-of-tricks PGD-AT, AT-AWP):
    the last step before a milestone already runs at the lower lr; every other step agrees."""
    from harness.train.schedule import schedule_position

    cfg = {"name": "multistep", "milestones": [2], "gamma": 0.1}
    at_start = [lr_factor(cfg, schedule_position(cfg, e, i, 4), 3) for e in range(3) for i in range(4)]
    at_end = [lr_factor(cfg, schedule_position({**cfg, "step_lr_at": "end"}, e, i, 4), 3) for e in range(3) for i in range(4)]
    assert [k for k, (a, b) in enumerate(zip(at_start, at_end)) if a != b] == [7]  # epoch 1's last step
    with pytest.raises(ValueError, match="step_lr_at"):
        schedule_position({"step_lr_at": "middle"}, 0, 0, 4)


@pytest.mark.parametrize("epochs,pct", [(400, 0.025), (12, 0.3), (7, 0.5)])
def test_onecycle_equals_torch_one_cycle_lr_stepped_per_epoch(epochs: int, pct: float) -> None:
    """DM-Improves-AT's `cosinew`: torch's OneCycleLR(max_lr, pct_start, total_steps=epochs) stepped once
    per epoch, momentum cycled (its default): lr and momentum equal at every step of every epoch."""
    import torch

    from harness.train.schedule import lr_factor, momentum_at

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=pct, total_steps=epochs)
    scfg = {"name": "onecycle", "granularity": "epoch", "pct_start": pct}
    for epoch in range(epochs):
        for frac in (0.0, 0.5, 0.99):  # every step of the epoch sees the epoch's values
            assert abs(opt.param_groups[0]["lr"] - 0.2 * lr_factor(scfg, epoch + frac, epochs)) < 1e-12
            assert abs(opt.param_groups[0]["momentum"] - momentum_at(scfg, epoch + frac, epochs)) < 1e-12
        opt.step()
        ref.step()


def test_onecycle_needs_epoch_granularity_and_sane_settings() -> None:
    from harness.train.schedule import check_schedule

    with pytest.raises(ValueError, match="granularity=epoch"):
        check_schedule({"name": "onecycle"}, 10)
    with pytest.raises(ValueError, match="pct_start must be in"):
        check_schedule({"name": "onecycle", "granularity": "epoch", "pct_start": 1.5}, 10)

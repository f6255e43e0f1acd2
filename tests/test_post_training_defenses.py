"""FT, NAD and FP as their official code runs them: each stage's own optimiser and lr per epoch
whatever the grid's trainer, NAD's attention map, and FP's ranking and stop rule over the whole
clean split, decided by the trainer's `select_train_samples` call before the first epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness.train.trainer as trainer
from harness.core.config import compose_config, finalize
from harness.data.loader import make_loader
from harness.run.plan import build_plan, planned_data, planned_trainer, train_node_id
from harness.store.checkpoint_sync import local_work_dir
from harness.store.checkpoints import save_checkpoint
from harness.train.schedule import lr_at_epochs


def _trainer_of(method: str, *extra: str) -> dict[str, Any]:
    return planned_trainer(finalize(compose_config([f"method={method}", "trainer=demo", *extra])))


def test_each_stage_runs_its_official_optimiser_and_lr_whatever_the_grid_trainer() -> None:
    ft, nad, fp = _trainer_of("ft"), _trainer_of("nad"), _trainer_of("fp")
    nesterov = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    assert ft["optimizer"] == nesterov and nad["optimizer"] == nesterov  # the grid's demo preset is AdamW
    assert (ft["batch_size"], nad["batch_size"]) == (64, 64)
    assert lr_at_epochs(ft) == pytest.approx([0.1] * 2 + [0.01] * 8)  # bboylyg/NAD adjust_learning_rate
    assert lr_at_epochs(nad) == pytest.approx([0.1] * 2 + [0.01] * 18)
    assert fp["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}
    assert fp["batch_size"] == 256 and fp["epochs"] == 100
    lrs = lr_at_epochs(fp)  # BackdoorBench's CosineAnnealingLR(T_max 100), stepped per epoch
    assert lrs[0] == 0.01 and lrs[50] == pytest.approx(0.005) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert _trainer_of("ft", "method.lr_schedule=constant", "method.lr=0.01")["schedule"]["name"] == "constant"
    # FT and NAD train with the preset's crop + flip and bboylyg/NAD's Cutout(1, 3); FP as BackdoorBench
    for method in ("ft", "nad"):
        augment = planned_data(finalize(compose_config([f"method={method}", "data=cifar10"])))["augment"]
        assert augment["cutout"] == {"holes": 1, "length": 3} and augment["crop_padding"] == 4 and augment["hflip"]
    assert "cutout" not in planned_data(finalize(compose_config(["method=fp", "data=cifar10"])))["augment"]
    assert planned_data(finalize(compose_config(["method=nad", "data=cifar10", "method.cutout_length=0"]))) \
        == finalize(compose_config(["method=nad", "data=cifar10"]))["data"]
    with pytest.raises(ValueError, match="lr_schedule"):
        _trainer_of("ft", "method.lr_schedule=step")


def test_nads_teacher_is_the_ft_cell_unless_its_settings_differ(tiny) -> None:
    base = [o for o in tiny if not o.startswith("attack.")] + ["backdoor=badnets", "attack=[fgsm]"]
    ft, nad = (finalize(compose_config(base + [f"method={m}"])) for m in ("ft", "nad"))
    assert train_node_id(ft) in build_plan([nad]).nodes[train_node_id(nad)].inputs
    short = finalize(compose_config(base + ["method=nad", "method.teacher.epochs=5"]))
    plan = build_plan([short])
    (teacher,) = [plan.nodes[i] for i in plan.nodes[train_node_id(short)].inputs
                  if plan.nodes[i].cfg["method"]["name"] == "ft"]
    assert teacher.id != train_node_id(ft) and planned_trainer(teacher.cfg)["epochs"] == 5
    assert planned_trainer(teacher.cfg)["optimizer"]["lr"] == 0.1  # the rest: FT's defaults


def test_attention_map_sums_powers_over_channels_and_divides_by_norm_plus_eps() -> None:
    from methods.nad import at_loss, attention_map

    gen = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 6, 5, 5, generator=gen), torch.randn(4, 6, 5, 5, generator=gen)
    s = (fs.abs() ** 2).sum(1).flatten(1)
    assert torch.allclose(attention_map(fs), s / (s.norm(dim=1, keepdim=True) + 1e-6))
    assert torch.allclose(attention_map(fs * 3), attention_map(fs), atol=1e-7)  # scale cancels
    expected = ((attention_map(fs) - attention_map(ft)) ** 2).mean()
    assert at_loss(fs, ft).item() == pytest.approx(expected.item()) and at_loss(fs, fs).item() == 0


def test_prune_count_keeps_the_last_count_within_the_tolerance() -> None:
    from methods.fp import prune_count

    accuracy = [0.90, 0.90, 0.85, 0.82, 0.80, 0.95, 0.10]  # relative drop: 0, 0, .056, .089, .111
    order = np.arange(6)
    assert prune_count(accuracy.__getitem__, order, 0.1, 1.0) == (3, accuracy[:5])
    assert prune_count(accuracy.__getitem__, order, 0.1, 0.34)[0] == 2  # at most 34% of 6 channels
    assert prune_count(accuracy.__getitem__, order, 0.0, 1.0)[0] == 0


class _Samples:
    """The clean split in memory, scored as harness/train/selection.py's TrainSamples does."""

    poisoned = np.zeros(0, dtype=np.int64)

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.passes = x, y, 0

    def score(self, fn):
        self.passes += 1
        with torch.no_grad():
            out = [fn(self.x[i:i + 50], self.y[i:i + 50]).double().numpy() for i in range(0, len(self.y), 50)]
        return np.arange(len(self.y)), np.concatenate(out)


def _clean(digits_dir: Path, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader(digits_dir, "train", n)))


def test_fp_stop_rule_from_channel_means_equals_one_forward_pass_per_count(erm_model, digits_dir, monkeypatch) -> None:
    """The shortcut for a pooling + linear head (one pass) decides what a pass per count decides."""
    import copy

    import methods.fp as fp

    x, y = _clean(digits_dir)
    fast, slow = fp.FinePruning(), fp.FinePruning()
    fast_module = fast.build(copy.deepcopy(erm_model)).eval()
    samples = _Samples(x, y)
    fast.select_train_samples(samples)
    assert samples.passes == 1
    monkeypatch.setattr(fp, "HEAD_TOLERANCE", -1.0)  # no sample agrees: the head is treated as unknown
    slow_module = slow.build(copy.deepcopy(erm_model)).eval()
    samples = _Samples(x, y)
    slow.select_train_samples(samples)
    assert samples.passes == 1 + len(slow.report["accuracies"])
    assert fast.report["order"].tolist() == slow.report["order"].tolist()
    assert fast.report["pruned"] == slow.report["pruned"] > 0
    np.testing.assert_allclose(fast.report["accuracies"], slow.report["accuracies"])
    assert torch.equal(fast_module.mask, slow_module.mask)
    with torch.no_grad():  # the kept model's accuracy is the one the rule saw, within the tolerance
        acc = float((fast_module(x).argmax(1) == y).float().mean())
    base = fast.report["accuracies"][0]
    assert acc == pytest.approx(fast.report["accuracies"][fast.report["pruned"]])
    assert base - acc < 0.1 * base <= base - fast.report["accuracies"][-1]


def test_the_trainer_has_fp_prune_on_the_whole_clean_split_once(erm_model, data_root, tmp_path, monkeypatch) -> None:
    """select_train_samples (called by the trainer before the first epoch) ranks the last stage's
    channels over every clean training sample, not a batch; a resumed run keeps the saved mask."""
    save_checkpoint(tmp_path / "erm.pt", {"model": erm_model.state_dict()})
    cfg = finalize(compose_config([f"data.root={data_root}", f"results_dir={tmp_path / 'results'}", "trainer=tiny",
                                   "trainer.epochs=1", "data.train_limit=128", "method=fp"]))
    cfg["method"]["backdoored_checkpoint"] = str(tmp_path / "erm.pt")
    built: list[Any] = []
    build = trainer.build_method
    monkeypatch.setattr(trainer, "build_method", lambda c: built.append(build(c)) or built[-1])
    work = local_work_dir(cfg)
    trainer.train(cfg, work)
    report = built[0].report

    x, y = _clean(Path(cfg["data"]["dir"]), 128)  # the 128 training samples, as stored
    assert len(y) == 128
    probe = {}
    handle = erm_model.body.layer4.register_forward_hook(lambda m, i, o: probe.update(out=o))
    with torch.no_grad():
        base = float((erm_model(x).argmax(1) == y).float().mean())
    handle.remove()
    means = probe["out"].mean(dim=(2, 3)).double().mean(0).numpy()
    assert report["accuracies"][0] == pytest.approx(base)
    assert report["order"].tolist() == np.argsort(means, kind="stable").tolist()
    saved = torch.load(work / trainer.CHECKPOINT, weights_only=False)["model"]
    assert int((saved["mask"] == 0).sum()) == report["pruned"] and bool(saved["pruned"])
    pruned = set(report["order"][: report["pruned"]].tolist())
    assert {int(c) for c in torch.nonzero(saved["mask"] == 0)} == pruned

    cfg["trainer"]["epochs"] = 2  # resume: the mask comes back with the checkpoint, nothing is re-ranked
    trainer.train(cfg, work)
    assert built[1].report == {}
    assert torch.equal(torch.load(work / trainer.CHECKPOINT, weights_only=False)["model"]["mask"], saved["mask"])


def test_fp_logs_the_pruned_fraction(erm_model, digits_dir) -> None:
    import copy

    from methods.base import TrainContext
    from methods.fp import FinePruning

    method = FinePruning()
    module = method.build(copy.deepcopy(erm_model)).eval()
    x, y = _clean(digits_dir)
    method.select_train_samples(_Samples(x, y))
    module.train()
    ctx = TrainContext(0, 1, 0, 1, torch.device("cpu"), 0, 1, module)
    logs = method.training_step(module, x[:32], y[:32], ctx)
    assert float(logs["pruned_fraction"]) == pytest.approx(method.report["pruned"] / module.mask.numel())
    assert torch.isclose(logs["loss"], F.cross_entropy(module(x[:32]), y[:32]))

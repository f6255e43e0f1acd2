"""A stage's own settings reach the trainer: its data settings (`Method.runtime_data`, applied by
the plan's run_config: ABL's isolation and unlearning train without augmentation, its
fine-tuning with Cutout) and `trainer.init_optimizer` (a stage that continues its upstream's
optimiser, as ABL's unlearning continues its fine-tuning's SGD)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import harness.train.trainer as trainer
from harness.core.config import compose_config, finalize
from harness.data.loader import make_loader
from harness.run.plan import build_plan, run_config
from harness.store.checkpoint_sync import local_work_dir
from methods.base import Method
from methods.erm import ERM


def _cfg(data_root: Path, results: Path, *extra: str) -> dict[str, Any]:
    return finalize(compose_config([f"data.root={data_root}", f"results_dir={results}", "trainer=tiny",
                                    "data.train_limit=128", *extra]))


def test_run_config_applies_each_stage_data_settings(data_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_root, tmp_path, "method=abl", "backdoor=badnets", "data.augment.crop_padding=1")
    nodes = {n.cfg["method"]["name"]: n for n in build_plan([cfg]) if n.kind == "train"}
    assert set(nodes) == {"abl_lga", "abl_finetune", "abl"}
    data = {name: run_config(node.cfg, {})["data"] for name, node in nodes.items()}
    assert data["abl_lga"]["augment"] == {} and data["abl_lga"]["shuffle"] is False
    assert data["abl_finetune"]["augment"] == {"crop_padding": 1, "hflip": False, "cutout": {"holes": 1, "length": 3}}
    assert data["abl"]["augment"] == {} and data["abl"].get("shuffle", True) is True
    assert cfg["data"]["augment"] == {"crop_padding": 1, "hflip": False}  # the cell (and its evaluation) keep theirs


class RecordingERM(ERM):
    """ERM that keeps every batch's labels and the optimiser state before its first step."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[torch.Tensor] = []

    def training_step(self, module, x, y, ctx):
        self.labels.append(y.clone())
        return super().training_step(module, x, y, ctx)


def _train(cfg: dict[str, Any], monkeypatch) -> RecordingERM:
    built: list[RecordingERM] = []
    monkeypatch.setattr(trainer, "build_method", lambda method_cfg: built.append(RecordingERM()) or built[-1])
    trainer.train(cfg, local_work_dir(cfg))
    return built[0]


def test_shuffle_false_streams_the_split_in_order_every_epoch(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg(data_root, tmp_path, "trainer.epochs=2")
    cfg["data"]["shuffle"] = False
    method = _train(cfg, monkeypatch)
    per_epoch = len(method.labels) // 2
    first, second = torch.cat(method.labels[:per_epoch]), torch.cat(method.labels[per_epoch:])
    in_order = torch.cat([y for _, y in make_loader(Path(cfg["data"]["dir"]), "train", 128, limit=128)])
    assert torch.equal(first, in_order) and torch.equal(second, in_order)
    shuffled = _train(_cfg(data_root, tmp_path / "shuffled", "trainer.epochs=1"), monkeypatch)
    assert not torch.equal(torch.cat(shuffled.labels), in_order)  # the default shuffles


def test_init_optimizer_continues_the_upstream_momentum(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    first = _cfg(data_root, tmp_path / "first", "trainer.epochs=1", "trainer.optimizer.name=sgd",
                 "trainer.optimizer.lr=0.05", "+trainer.optimizer.momentum=0.9")
    trainer.train(first, local_work_dir(first))
    saved = torch.load(local_work_dir(first) / trainer.CHECKPOINT, weights_only=False)["optimizer"]["state"]
    assert len(saved) > 0 and all("momentum_buffer" in s for s in saved.values())

    seen: list[dict[int, Any]] = []
    step = trainer._step

    def first_step_state(method: Method, ddp, optimizer, *args):
        if not seen:
            seen.append({i: {k: v.clone() for k, v in optimizer.state[p].items()}
                         for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])})
        return step(method, ddp, optimizer, *args)

    monkeypatch.setattr(trainer, "_step", first_step_state)
    for carry in (True, False):
        seen.clear()
        second = _cfg(data_root, tmp_path / f"second-{carry}", "trainer.epochs=1", "trainer.optimizer.name=sgd",
                      "trainer.optimizer.lr=5e-4", "+trainer.optimizer.momentum=0.9")
        second["trainer"].update(init_from=str(local_work_dir(first) / trainer.CHECKPOINT), init_optimizer=carry)
        trainer.train(second, local_work_dir(second))
        if carry:  # the upstream's momentum buffers, at this run's lr
            assert all(torch.equal(seen[0][i]["momentum_buffer"], saved[i]["momentum_buffer"]) for i in saved)
        else:  # a fresh optimiser
            assert all(not state for state in seen[0].values())

"""The method contract is kept: the trainer calls every hook methods/base.py documents, in the
documented order, for every registered method (2 epochs x 2 steps, world size 1)."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

import harness.train.trainer as trainer
from harness.core.config import compose_config, finalize
from harness.core.registry import METHODS
from harness.store.checkpoint_sync import local_work_dir as checkpoint_dir
from methods.base import Method

HOOKS = ("build", "param_groups", "extra_optimizers", "select_train_samples", "on_epoch_start", "training_step", "after_step",
         "on_epoch_end", "eval_model", "state_dict", "load_state_dict")
UPSTREAM_CHECKPOINTS = ("backdoored_checkpoint", "teacher_checkpoint", "isolation_checkpoint")  # FT, FP, NAD, CBD, ABL
EPOCHS, STEPS = 2, 2
SELECTING = {"abl": 6, "abl_finetune": 122}  # 5% of 128 under the isolation model, and the rest


def _recording(method: Method, calls: list[str]) -> Method:
    """The same instance, its class swapped for a subclass that notes each hook before running it."""
    def note(hook: str):
        def hooked(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(hook)
            return getattr(super(recorder, self), hook)(*args, **kwargs)
        return hooked

    recorder = type(f"Recording{type(method).__name__}", (type(method),), {h: note(h) for h in HOOKS})
    method.__class__ = recorder
    return method


def _cfg(name: str, data_root: Path, results: Path, upstream: str | None) -> dict[str, Any]:
    cfg = finalize(compose_config([f"data.root={data_root}", f"results_dir={results}", "trainer=tiny",
                                   f"trainer.epochs={EPOCHS}", "data.train_limit=128", f"method={name}"]))
    assert cfg["trainer"]["batch_size"] * STEPS == 128
    for part in (cfg["method"], cfg["method"].get("base") or {}):  # fewer attack steps: seconds, not minutes
        if "steps" in (part.get("attack") or {}):
            part["attack"]["steps"] = 2
    if name in SELECTING:  # 1% would isolate one sample: too few for BatchNorm in train mode
        cfg["method"]["isolation_ratio"] = 0.05
    if upstream is not None:  # a method that starts from an upstream model gets the tiny ERM
        accepted = inspect.signature(METHODS.get(name).__init__).parameters
        for arg in UPSTREAM_CHECKPOINTS:
            if arg in accepted:
                cfg["method"][arg] = upstream
        if name.startswith("adml_"):
            cfg["trainer"]["init_from"] = upstream
    return cfg


@pytest.fixture(scope="module")
def upstream_erm(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg = _cfg("erm", data_root, tmp_path_factory.mktemp("upstream"), None)
    trainer.train(cfg, checkpoint_dir(cfg))
    return str(checkpoint_dir(cfg) / trainer.CHECKPOINT)


def _expected(steps: int = STEPS) -> list[str]:
    """methods/base.py's order; the trainer takes `eval_model` once, as train-time attacks' target."""
    epoch = ["on_epoch_start"] + ["training_step", "after_step"] * steps + ["on_epoch_end", "state_dict"]
    return ["build", "param_groups", "extra_optimizers", "eval_model", "select_train_samples"] + epoch * EPOCHS


@pytest.mark.parametrize("name", METHODS.names())
def test_trainer_calls_every_hook_in_the_documented_order(name, data_root, tmp_path, upstream_erm,
                                                          monkeypatch) -> None:
    calls: list[str] = []
    built: list[Method] = []

    def build_recording_method(method_cfg: dict[str, Any]) -> Method:
        built.append(_recording(trainer_build_method(method_cfg), calls))
        return built[-1]

    trainer_build_method = trainer.build_method
    monkeypatch.setattr(trainer, "build_method", build_recording_method)
    cfg = _cfg(name, data_root, tmp_path / "results", upstream_erm)
    work = checkpoint_dir(cfg)
    summary = trainer.train(cfg, work)

    selected = summary.n_train  # a method selecting part of the split (ABL's stages) trains on it
    assert summary.samples_per_epoch == [selected] * EPOCHS
    assert selected == SELECTING.get(name, 128), f"{name} trained on {selected} of 128 samples"
    assert len(built) == 1
    steps = -(-selected // cfg["trainer"]["batch_size"])
    assert calls == _expected(steps), f"{name}: hooks called as {calls}"

    calls.clear()  # a resumed run restores the method's state after the optimisers', and trains nothing
    trainer.train(cfg, work)
    assert calls == ["build", "param_groups", "extra_optimizers", "eval_model", "load_state_dict",
                     "select_train_samples"]

    calls.clear()  # evaluation rebuilds the method and asks it for the classifier to attack
    trainer.load_trained_classifier(cfg, work)
    assert calls == ["build", "eval_model"]


def test_extra_optimizers_are_checkpointed_and_restored(data_root, tmp_path, upstream_erm) -> None:
    """CausalAdv's g optimiser (trainer-stepped) and CBD's critic (method-stepped) live in the
    trainer's checkpoint under their names, and a resumed run continues from their saved state."""
    import torch

    for name, extra in (("causaladv_m", "g"), ("cbd", "critic")):
        cfg = _cfg(name, data_root, tmp_path / name, upstream_erm)
        cfg["trainer"]["epochs"] = 1
        work = checkpoint_dir(cfg)
        trainer.train(cfg, work)
        saved = torch.load(work / trainer.CHECKPOINT, weights_only=False)["extra_optimizers"]
        assert set(saved) == {extra} and len(saved[extra]["state"]) > 0, f"{name}: {extra}'s state is saved"
        cfg["trainer"]["epochs"] = 2
        summary = trainer.train(cfg, work)  # resumes at epoch 1
        assert [c["epoch"] for c in summary.curve] == [0, 1]
        resumed = torch.load(work / trainer.CHECKPOINT, weights_only=False)["extra_optimizers"][extra]
        if name == "cbd":  # Adam counts its steps: 2 per epoch, continued rather than restarted
            assert [float(s["step"]) for s in saved[extra]["state"].values()][0] == STEPS
            assert [float(s["step"]) for s in resumed["state"].values()][0] == 2 * STEPS
        assert resumed["param_groups"][0]["initial_lr"] == saved[extra]["param_groups"][0]["initial_lr"]

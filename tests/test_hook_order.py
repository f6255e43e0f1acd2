"""The method contract is kept: the trainer calls every hook methods/base.py documents, in the
documented order, for every registered method (2 epochs x 2 steps, world size 1)."""
from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import pytest

import harness.train.trainer as trainer
from harness.core.registry import METHODS
from harness.store.checkpoint_sync import local_work_dir as checkpoint_dir
from methods.base import Method
from helpers import method_cell

HOOKS = ("build", "param_groups", "extra_optimizers", "select_train_samples", "pre_pass_samples", "on_epoch_start",
         "pre_pass", "pre_pass_step", "training_step", "after_step", "on_epoch_end", "eval_model", "state_dict",
         "load_state_dict", "summary")
EPOCHS, STEPS = 2, 2
SELECTING = {"abl": 6, "abl_finetune": 122,  # 5% of 128 under the isolation model, and the rest
             "spectral": 107, "ac": 79,  # less the 15% top spectral scores of each class; less each class's smaller cluster
             "d_br": 27}  # FCT <= the 20% threshold in a second pass (its pre-pass unlearns the >= 95% ones)
SUMMARISING = {  # what a defense records of its decision (Method.summary -> the row's method_summary)
    "clp": ("pruned_channels", "channels", "pruned_per_layer", "max_bound"),
    "bnp": ("pruned_channels", "channels", "pruned_per_layer", "max_kl"),
    "anp": ("pruned_channels", "channels", "mask_min"), "rnp": ("pruned_channels", "channels", "mask_min"),
    "fp": ("pruned_channels", "channels", "layer"), "nc": ("anomaly_index", "flagged", "norms"),
    "d_br": ("gamma_c", "gamma_p", "clean_share", "poison_share")}
PRE_PASSING = {"i_bau", "d_br"}  # a pass of the method's own before each epoch's training (I-BAU's perturbation;
                                 # D-BR's unlearning of its suspected poisoned samples)


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
    cfg = method_cell(name, data_root, results, upstream, epochs=EPOCHS)
    assert cfg["trainer"]["batch_size"] * STEPS == 128
    return cfg


@pytest.fixture(scope="module")
def upstream_erm(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg = _cfg("erm", data_root, tmp_path_factory.mktemp("upstream"), None)
    trainer.train(cfg, checkpoint_dir(cfg))
    return str(checkpoint_dir(cfg) / trainer.CHECKPOINT)


def _expected(steps: int = STEPS, pre_pass: bool = False) -> list[str]:
    """methods/base.py's order; the trainer takes `eval_model` once, as train-time attacks' target."""
    epoch = (["on_epoch_start", "pre_pass"] + ["pre_pass_step"] * (steps if pre_pass else 0)
             + ["training_step", "after_step"] * steps + ["on_epoch_end", "state_dict"])
    return (["build", "param_groups", "extra_optimizers", "eval_model", "select_train_samples", "pre_pass_samples"]
            + epoch * EPOCHS + ["summary"])


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
    assert calls == _expected(steps, pre_pass=name in PRE_PASSING), f"{name}: hooks called as {calls}"
    json.dumps(summary.method_summary, allow_nan=False)  # JSON types only: it is stored as JSON text
    assert set(SUMMARISING.get(name, ())) <= summary.method_summary.keys(), f"{name}: {summary.method_summary}"

    calls.clear()  # a resumed run restores the method's state after the optimisers', and trains nothing
    resumed = trainer.train(cfg, work)
    assert calls == ["build", "param_groups", "extra_optimizers", "eval_model", "load_state_dict",
                     "select_train_samples", "pre_pass_samples", "summary"]
    assert resumed.method_summary.get("pruned_channels") == summary.method_summary.get("pruned_channels")

    calls.clear()  # evaluation rebuilds the method and asks it for the classifier to attack
    trainer.load_trained_classifier(cfg, work)
    assert calls == ["build", "eval_model"]


def test_the_trainer_runs_the_pre_pass_a_method_asks_for(data_root, tmp_path, upstream_erm, monkeypatch) -> None:
    """CBD with the MI term (official critic_pass: epoch): a full pass of pre_pass_step before each
    epoch's training steps, in another order of the same samples; the critic steps there only."""
    import torch

    calls: list[str] = []
    seen: dict[str, list[torch.Tensor]] = {"pre": [], "train": []}
    trainer_build_method = trainer.build_method

    def build_recording_method(method_cfg: dict[str, Any]) -> Method:
        method = _recording(trainer_build_method(method_cfg), calls)
        pre, step = method.pre_pass_step, method.training_step
        method.pre_pass_step = lambda m, x, y, ctx: seen["pre"].append(x.clone()) or pre(m, x, y, ctx)
        method.training_step = lambda m, x, y, ctx: seen["train"].append(x.clone()) or step(m, x, y, ctx)
        return method

    monkeypatch.setattr(trainer, "build_method", build_recording_method)
    cfg = _cfg("cbd", data_root, tmp_path / "results", upstream_erm)
    cfg["method"]["mi"] = True
    trainer.train(cfg, checkpoint_dir(cfg))
    assert calls == _expected(pre_pass=True)
    pre, train = torch.cat(seen["pre"][:STEPS]), torch.cat(seen["train"][:STEPS])
    assert not torch.equal(pre, train), "the pre-pass reads the epoch in another order"
    assert torch.allclose(pre.sum(), train.sum(), rtol=1e-4), "the same samples (no augmentation in tiny)"
    saved = torch.load(checkpoint_dir(cfg) / trainer.CHECKPOINT, weights_only=False)["extra_optimizers"]["critic"]
    assert [float(s["step"]) for s in saved["state"].values()][0] == STEPS * EPOCHS  # one step per pre-pass batch


def test_extra_optimizers_are_checkpointed_and_restored(data_root, tmp_path, upstream_erm) -> None:
    """CausalAdv's g optimiser and CBD's critic (both method-stepped, g on the trainer's schedule) live in the
    trainer's checkpoint under their names, and a resumed run continues from their saved state."""
    import torch

    for name, extra in (("causaladv_m", "g"), ("cbd", "critic")):
        cfg = _cfg(name, data_root, tmp_path / name, upstream_erm)
        cfg["trainer"]["epochs"] = 1
        if name == "cbd":
            cfg["method"]["mi"] = True  # the critic exists with the MI term only (official default: off)
        work = checkpoint_dir(cfg)
        trainer.train(cfg, work)
        saved = torch.load(work / trainer.CHECKPOINT, weights_only=False)["extra_optimizers"]
        assert set(saved) == {extra} and len(saved[extra]["state"]) > 0, f"{name}: {extra}'s state is saved"
        cfg["trainer"]["epochs"] = 2
        summary = trainer.train(cfg, work)  # resumes at epoch 1
        assert [c["epoch"] for c in summary.curve] == [0, 1]
        resumed = torch.load(work / trainer.CHECKPOINT, weights_only=False)["extra_optimizers"][extra]
        if name == "cbd":  # Adam counts its steps: 2 per epoch (its pre-pass), continued rather than restarted
            assert [float(s["step"]) for s in saved[extra]["state"].values()][0] == STEPS
            assert [float(s["step"]) for s in resumed["state"].values()][0] == 2 * STEPS
        assert resumed["param_groups"][0]["initial_lr"] == saved[extra]["param_groups"][0]["initial_lr"]


def test_a_trainer_stepped_extra_optimizer_steps_right_after_the_trainers_own() -> None:
    """ExtraOptimizer(stepped_by_trainer=True): the trainer steps it after its own optimiser, from
    the same backward, then clears its gradients. (No registered method uses it now: CausalAdv's g
    steps inside its training_step, before h's loss, as the official loop.)"""
    import torch

    from methods.base import ExtraOptimizer, TrainContext

    main, extra = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

    class Both(Method):
        name = "both_for_this_test"

        def training_step(self, module, x, y, ctx):
            return {"loss": (module(x) + extra(x)).pow(2).mean()}

    order: list[str] = []
    opt, extra_opt = torch.optim.SGD(main.parameters(), lr=0.1), torch.optim.SGD(extra.parameters(), lr=0.1)
    for name, o in (("trainer", opt), ("extra", extra_opt)):
        o.register_step_post_hook(lambda *_, name=name: order.append(name))
    before = [p.detach().clone() for p in extra.parameters()]
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    ctx = TrainContext(0, 1, 0, 1, torch.device("cpu"), 0, 1, main)
    trainer._step(Both(), main, opt, {"extra": ExtraOptimizer(extra_opt)}, x, y, ctx, torch.device("cpu"), "fp32")
    assert order == ["trainer", "extra"]
    assert all(not torch.equal(a, b) for a, b in zip(before, extra.parameters()))
    assert all(p.grad is None for p in extra.parameters())

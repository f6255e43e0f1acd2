"""One device per cell, the trainer's speed options and the cost columns, on the CPU.

A CPU-only machine has one device, so the cell device is pinned to `cpu:0` (a torch.device
distinct from every stage's default "cpu"): each stage must receive exactly that object, and a
forward pre-hook checks that every module only ever sees inputs on its parameters' device.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import harness.eval.neuron_sensitivity as ns_module
import harness.run.cell as cell_module
import harness.run.nodes as nodes_module
import harness.train.device as device_module
from harness.core.config import compose_config, finalize
from harness.core.device import check_precision
from harness.core.config import ConfigError
from harness.eval.evaluate import evaluate
from harness.run.grid import validate_cell
from harness.store.checkpoint_sync import local_work_dir
from harness.store.results import read_cell_result
from harness.train.trainer import CHECKPOINT, check_trainer_config, train

CELL_DEVICE = torch.device("cpu", 0)
STAGES = ((nodes_module, "load_trained_classifier"), (nodes_module, "evaluate_distributed"), (ns_module, "analyse_cell"))
ANALYSES = ("integrity", "samples", "neuron_sensitivity")  # the analyses a clean cell runs


def _cfg(overrides: list[str]) -> dict:
    return finalize(compose_config(overrides))


@pytest.fixture()
def device_log(monkeypatch):
    """Pins the cell device to cpu:0 and records the device every eval stage is handed and the
    (input device, parameter device) of every module call."""
    seen: dict[str, list] = {"stages": [], "calls": []}
    monkeypatch.setattr(device_module, "resolve_device", lambda spec="auto", local_rank=0: CELL_DEVICE)
    for module, name in STAGES:
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            given = kwargs.get("device", args[-1] if isinstance(args[-1], (torch.device, str)) else None)
            seen["stages"].append((_name, given))
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
    real_analyses = nodes_module.cell_analyses

    def analyses(cfg):  # every analysis records the device its context hands it
        out = real_analyses(cfg)
        for analysis in out:
            run = analysis.run
            analysis.run = lambda ctx, _run=run, _name=analysis.label: (
                seen["stages"].append((_name, ctx.device)), _run(ctx))[1]
        return out
    monkeypatch.setattr(nodes_module, "cell_analyses", analyses)

    def hook(module: nn.Module, args: tuple) -> None:
        param = next(module.parameters(recurse=False), None)
        if param is not None and args and isinstance(args[0], torch.Tensor):
            seen["calls"].append((args[0].device, param.device))
    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    yield seen
    handle.remove()


def test_every_stage_gets_the_cell_device_and_rows_carry_the_cost(tiny, device_log) -> None:
    cfg = _cfg(tiny + ["method=pgd_at", "method.attack.steps=2", "trainer.epochs=1", "data.train_limit=128",
                       "eval.neuron_sensitivity.limit=32"])
    outcome = cell_module.run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    assert sorted({name for name, _ in device_log["stages"]}) == sorted({n for _, n in STAGES} | set(ANALYSES))
    assert all(given == CELL_DEVICE for _, given in device_log["stages"]), device_log["stages"]
    assert device_log["calls"] and all(x == p for x, p in device_log["calls"])

    row = read_cell_result(outcome.result_path).to_pylist()[0]
    assert row["device_name"] and row["device_count"] == 1 and row["mfu"] is None  # mfu: GPUs only
    stages = json.loads(row["eval_stage_seconds"])
    assert set(stages) == {"load", "attacks", *ANALYSES}
    assert row["eval_seconds"] == pytest.approx(sum(stages.values()), abs=1e-4)
    assert row["peak_memory_bytes"] > 10 ** 7 and row["device_hours"] > 0
    # PGD-AT with 2 steps: 2 x (forward + input gradient) + forward + backward ~ 7 forwards per
    # image (a bit less: no gradient flows into the image in the update's backward), plus the
    # official loop's two clean train-mode forwards (one in the step, one in after_step): ~ 9
    ratio = row["train_flops"] / (row["n_train"] * row["flops_per_image"])
    assert 8.0 < ratio <= 9.0 + 1e-6, ratio


def _conv_records() -> tuple[list, object]:
    records: list = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d) and module.training:
            records.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)
                            and module.weight.is_contiguous(memory_format=torch.channels_last), out.is_contiguous()))
    return records, nn.modules.module.register_module_forward_hook(hook)


def test_bf16_and_channels_last_train_on_the_cpu(tiny) -> None:
    cfg = _cfg(tiny + ["trainer.epochs=1", "data.train_limit=64", "trainer.precision=bf16",
                       "trainer.channels_last=true", "data.img_size=16"])
    records, handle = _conv_records()
    try:
        summary = train(cfg, local_work_dir(cfg))
    finally:
        handle.remove()
    assert summary.precision == "bf16" and summary.final_train_loss == summary.final_train_loss
    assert records and all(dtype == torch.bfloat16 for dtype, _, _ in records)
    assert all(nhwc for _, nhwc, _ in records), "convolutions must hold and return channels_last tensors"
    assert not records[0][2], "the stem's output (16x16 maps) in NHWC is not also NCHW-contiguous"


def test_compile_trains_with_the_compiled_classifier(tiny) -> None:
    cfg = _cfg(tiny + ["trainer.epochs=1", "data.train_limit=64", "trainer.compile=aot_eager"])
    summary = train(cfg, local_work_dir(cfg))
    assert summary.compile == "aot_eager" and summary.samples_per_epoch == [64]
    state = torch.load(local_work_dir(cfg) / CHECKPOINT, weights_only=False)
    assert not any("_orig_mod" in k for k in state["model"]), "checkpoints keep the eager parameter names"


def test_a_compile_that_fails_stops_before_training_and_names_the_fix(tiny) -> None:
    # torch's own test backend that fails to compile any graph holding a ReLU
    cfg = _cfg(tiny + ["trainer.epochs=1", "data.train_limit=64", "trainer.compile=relu_compile_error_TESTING_ONLY"])
    with pytest.raises(RuntimeError, match="trainer.compile=false"):
        train(cfg, local_work_dir(cfg))
    assert not (local_work_dir(cfg) / CHECKPOINT).exists()
    with pytest.raises(ValueError, match="trainer.compile=false"):
        check_trainer_config(dict(cfg["trainer"], compile="no_such_backend"))


def test_bad_device_settings_fail_before_any_work(tiny) -> None:
    with pytest.raises(ConfigError, match="trainer.device=cpu"):
        validate_cell(_cfg(tiny + ["resources.gpus=1", "trainer.device=cpu"]))
    with pytest.raises(ValueError, match="eval.precision"):
        check_precision("fp16", torch.device("cpu"), "eval.precision")


def test_bf16_evaluation_is_flagged(erm_model, digits_dir) -> None:
    attacks = [{"name": "pgd", "eps": 0.1, "steps": 3}]
    fp32 = evaluate(erm_model, attacks, digits_dir, num_classes=10, limit=64, integrity_points=0)
    bf16 = evaluate(erm_model, attacks, digits_dir, num_classes=10, limit=64, integrity_points=0,
                    precision="bf16")
    assert fp32.attacks[0].flags == [] and bf16.attacks[0].flags == ["eval_precision_bf16"]
    assert abs(bf16.clean_acc - fp32.clean_acc) < 0.05


def test_peak_table_reads_the_longest_matching_device_name() -> None:
    from harness.eval.cost import mfu, peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert peak_flops("NVIDIA L4") == 121e12 and peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None and peak_flops("some new GPU") is None
    assert mfu(1e15, 1.0, "cpu") is None

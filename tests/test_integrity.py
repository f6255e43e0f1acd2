"""Integrity flags fire on deliberately masked models and stay quiet on an honest one; per-sample
results are written and a later evaluation resumes from the survivors."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from harness.attacks.base import Attack
from harness.run.cell import run_cell
from harness.core.config import compose_config, finalize
from harness.eval.evaluate import evaluate
from harness.eval.integrity import FLAGS, enforce_threat_model, flag_list, flag_result, probe_model, row_flags
from harness.store.results import read_cell_result, result_path
from harness.eval.samples import load_survivors, samples_path, samples_table, write_samples
from helpers import digits_batch

EPS = 0.1
PGD = {"name": "pgd", "eps": EPS, "steps": 10}


class SaturatingSoftmax(nn.Module):
    """Returns softmax(10 z): probabilities whose gradients vanish on confident points."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(10.0 * self.inner(x), dim=1)


class ScaledLogits(nn.Module):
    """Logits x 1e4: the softmax saturates to one-hot, so cross-entropy gradients underflow to 0."""

    def __init__(self, inner: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.inner(x)


class Randomized(nn.Module):
    """Adds fresh Gaussian noise to the input at every forward, in eval mode too."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.1 * torch.randn_like(x))


class Quantized(nn.Module):
    """Rounds the input to 4 grey levels first: the input gradient is exactly zero."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 3) / 3)


@pytest.fixture(scope="module")
def honest(digits_dir, erm_model):
    x, y = digits_batch(digits_dir, 64)
    return erm_model.eval(), x, y


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    return flag_list(probe_model(model, x, y, {("linf", EPS)}))


def test_flag_names_are_the_documented_ten() -> None:
    """The nine integrity checks plus the opt-in bf16 evaluation's flag, each in docs/attacks.md."""
    docs = (Path(__file__).parent.parent / "docs" / "attacks.md").read_text()
    assert len(FLAGS) == 10 and len(set(FLAGS)) == 10
    assert all(f"`{flag}`" in docs for flag in FLAGS)


def test_honest_model_raises_no_flag(honest, digits_dir) -> None:
    model, x, y = honest
    assert _probe(model, x, y) == []
    result = evaluate(model, [PGD, {"name": "fgsm", "eps": EPS}], digits_dir, num_classes=10, limit=64)
    flag_result(model, result, x, y)
    assert all(r.flags == [] and r.flag_details == {} for r in result.attacks)


@pytest.mark.parametrize("wrapper,expected", [
    (SaturatingSoftmax, "outputs_are_probabilities"),
    (Randomized, "randomized_outputs"),
    (Quantized, "zero_input_gradients"),
])
def test_masked_models_are_flagged(honest, wrapper, expected: str) -> None:
    model, x, y = honest
    flags = _probe(wrapper(model).eval(), x, y)
    assert expected in flags, flags


def test_saturated_logits_fire_saturated_softmax_and_honest_does_not(honest) -> None:
    from harness.eval.integrity import check_saturated_softmax

    model, x, y = honest
    found = check_saturated_softmax(ScaledLogits(model).eval(), x, y)
    assert found is not None and found["points_with_vanished_ce_gradient"] >= 0.1 * len(y), found
    assert "saturated_softmax" in _probe(ScaledLogits(model).eval(), x, y)
    assert check_saturated_softmax(model, x, y) is None
    assert check_saturated_softmax(ScaledLogits(model, 3.0).eval(), x, y) is None  # confident, not saturated


def test_zero_gradient_model_does_not_lose_accuracy_with_eps(honest) -> None:
    model, x, y = honest
    details = probe_model(Quantized(model).eval(), x, y, {("linf", 0.05)})
    assert "accuracy_not_falling_with_eps" in details, details


def test_flags_reach_the_result_rows(tiny, monkeypatch) -> None:
    """A cell whose model is masked carries the flags and their evidence in its rows."""
    import harness.run.nodes as cell

    # the wrapper hides the Classifier's layer names, which neuron sensitivity hooks: not probed here
    cfg = finalize(compose_config(tiny + ["trainer.epochs=1", "eval.neuron_sensitivity.enabled=false"]))
    original = cell.load_trained_classifier
    monkeypatch.setattr(cell, "load_trained_classifier",
                        lambda c, d, device="cpu": SaturatingSoftmax(original(c, d, device)).eval())
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    rows = read_cell_result(result_path(cfg["results_dir"], cfg["key"])).to_pylist()
    for row in rows:
        assert "outputs_are_probabilities" in row["flags"]
        assert "outputs_are_probabilities" in json.loads(row["flag_details"])
    samples = pq.read_table(samples_path(cfg["results_dir"], cfg["key"])).to_pylist()
    assert len(samples) == 64 * len(rows)


class _Overshoot(Attack):
    name = "overshoot_for_tests"

    def perturb(self, model, x, y):
        return x + 3 * self.eps


def test_out_of_bounds_output_is_projected_and_flagged(honest) -> None:
    _, x, _ = honest
    attack = _Overshoot(EPS)
    fixed, detail = enforce_threat_model(attack, x, attack(nn.Identity(), x, torch.zeros(len(x))))
    assert detail is not None and detail["max_size"] == pytest.approx(3 * EPS, abs=1e-5)
    assert (fixed - x).abs().max() <= EPS + 1e-6 and fixed.min() >= 0 and fixed.max() <= 1
    same, none = enforce_threat_model(attack, x, x.clone())
    assert none is None and torch.equal(same, x)
    rows = [{"name": attack.name, "norm": "linf", "eps": EPS, "config": {"name": attack.name},
             "robust_acc": 0.5, "broken_by": None, "out_of_bounds": detail}]
    assert flag_list(row_flags(0.9, rows, {})[0]) == ["perturbation_out_of_bounds"]


def test_row_checks() -> None:
    def row(name, acc, **cfg):
        return {"name": name, "norm": "linf", "eps": cfg.get("eps", EPS), "robust_acc": acc,
                "config": {"name": name, "eps": EPS, **cfg}, "broken_by": None, "out_of_bounds": None}

    # Square below every white-box row by more than 0.2 points
    flags = [flag_list(d) for d in row_flags(0.9, [row("pgd", 0.50), row("square", 0.40)], {})]
    assert flags == [[], ["square_beats_whitebox"]]
    assert flag_list(row_flags(0.9, [row("pgd", 0.50), row("square", 0.499)], {})[1]) == []
    # inside AutoAttack: Square broke 2 of 100 points the white-box components left robust
    aa = row("autoattack", 0.3)
    aa["broken_by"] = ["apgd_ce"] * 60 + ["square"] * 2 + [None] * 30 + ["clean"] * 8
    assert flag_list(row_flags(0.92, [aa], {})[0]) == ["square_beats_whitebox"]
    # robust above clean
    assert flag_list(row_flags(0.5, [row("pgd", 0.6)], {})[0]) == ["robust_above_clean"]
    # rows differing only in eps / steps: accuracy must not rise
    eps_rows = [row("pgd", 0.5, eps=0.1), row("pgd", 0.6, eps=0.2)]
    assert all("accuracy_not_falling_with_eps" in flag_list(d) for d in row_flags(0.9, eps_rows, {}))
    step_rows = [row("pgd", 0.5, steps=10), row("pgd", 0.4, steps=50)]
    assert all(flag_list(d) == [] for d in row_flags(0.9, step_rows, {}))
    step_rows[1]["robust_acc"] = 0.55
    assert all("accuracy_not_falling_with_steps" in flag_list(d) for d in row_flags(0.9, step_rows, {}))


def test_per_sample_results_and_resume_from_survivors(honest, digits_dir, tmp_path) -> None:
    model, _, _ = honest
    weak = evaluate(model, [{"name": "fgsm", "eps": EPS}], digits_dir, num_classes=10, limit=96)
    fgsm = weak.attacks[0]
    assert len(fgsm.broken_by) == 96
    assert sum(b is None for b in fgsm.broken_by) == round(fgsm.robust_acc * 96)
    assert sum(b == "clean" for b in fgsm.broken_by) == round((1 - weak.clean_acc) * 96)
    table = samples_table("weak", "tk", {"fgsm": fgsm.broken_by}, weak.labels, weak.clean_ok)
    write_samples(tmp_path, "weak", table)

    survivors = load_survivors(tmp_path, "weak", train_key="tk", n_eval=96)
    assert int(survivors.robust.sum()) == round(fgsm.robust_acc * 96)
    strong = evaluate(model, [PGD], digits_dir, num_classes=10, limit=96, survivors=survivors)
    by = strong.attacks[0].broken_by
    # the union of both evaluations: never above the earlier one, only its survivors attacked
    assert strong.attacks[0].robust_acc < fgsm.robust_acc
    assert all(s for b, s in zip(by, survivors.robust.tolist()) if b is None or b == "pgd")
    assert {b for b, s in zip(by, survivors.robust.tolist()) if not s} <= {"clean", "previous:fgsm"}
    assert "previous:fgsm" in by

    with pytest.raises(ValueError, match="same eval.limit"):
        load_survivors(tmp_path, "weak", train_key="tk", n_eval=64)
    with pytest.raises(ValueError, match="another trained model"):
        load_survivors(tmp_path, "weak", train_key="other", n_eval=96)
    with pytest.raises(FileNotFoundError, match="survivors_from='nosuch'"):
        load_survivors(tmp_path, "nosuch", train_key="tk", n_eval=96)

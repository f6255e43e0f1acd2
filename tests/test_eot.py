"""EOT (expectation over transformation) for randomized defenses: `eot_iter` on PGD and APGD, and
AutoAttack's "rand" version (APGD-CE + APGD-DLR, EOT 20), named by the randomized_outputs flag."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.apgd import APGDCE
from harness.attacks.autoattack import AutoAttackRand
from harness.attacks.base import build_attack, input_gradient
from harness.attacks.pgd import eot_gradient
from harness.core.config import compose_config
from harness.eval.integrity import probe_model


class NoisyInput(nn.Module):
    """A randomized defense: Gaussian noise on the input at every forward, in eval mode too."""

    def __init__(self, model: nn.Module, sigma: float = 0.1) -> None:
        super().__init__()
        self.model, self.sigma, self.forwards = model, sigma, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.model(x + self.sigma * torch.randn_like(x))


@pytest.fixture()
def batch(digits_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from helpers import digits_batch

    return digits_batch(digits_dir, 16)


def test_eot_gradient_estimates_the_expected_gradient_better(erm_model, batch) -> None:
    x, y = batch
    noisy = NoisyInput(erm_model).eval()
    torch.manual_seed(0)
    expected = eot_gradient(noisy, x, y, F.cross_entropy, 400)
    errors = {}
    for k in (1, 20):
        errors[k] = sum(float((eot_gradient(noisy, x, y, F.cross_entropy, k) - expected).norm()) for _ in range(5))
    assert errors[20] < 0.5 * errors[1]  # ~1/sqrt(20) of the single-draw error in expectation


def test_eot_on_a_deterministic_model_changes_nothing(erm_model, batch) -> None:
    x, y = batch
    grad, _ = input_gradient(erm_model, x, y, F.cross_entropy)
    assert torch.allclose(eot_gradient(erm_model, x, y, F.cross_entropy, 5), grad, atol=1e-7)
    outs = []
    for eot in (1, 4):
        torch.manual_seed(3)
        outs.append(build_attack({"name": "pgd", "eps": 0.1, "steps": 5, "eot_iter": eot})(erm_model, x, y))
    assert torch.equal(outs[0], outs[1])


def test_apgd_runs_eot_iter_forwards_per_gradient(erm_model, batch) -> None:
    x, y = batch
    counts = {}
    for eot in (1, 3):
        noisy = NoisyInput(erm_model).eval()
        x_adv = APGDCE(0.1, n_iter=4, eot_iter=eot)(noisy, x, y)
        counts[eot] = noisy.forwards
        assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    # 1 forward picks the points to attack, then (start + 4 iterations) gradients of eot_iter forwards each
    assert counts == {1: 1 + 5, 3: 1 + 5 * 3}


def test_autoattack_rand_is_the_reference_rand_version(erm_model, batch) -> None:
    cfg = compose_config(["attack=[autoattack_rand]"])["attack"]["autoattack_rand"]
    attack = build_attack(cfg)
    assert isinstance(attack, AutoAttackRand)
    assert attack.components == ["apgd_ce", "apgd_dlr"] and attack.eot_iter == 20 and attack.n_iter == 100
    built = attack.build_components()
    assert [(a.name, a.eot_iter, a.n_iter, a.n_restarts) for a in built] == [
        ("apgd_ce", 20, 100, 1), ("apgd_dlr", 20, 100, 1)]
    assert build_attack({"name": "autoattack", "eps": 0.1}).describe().get("eot_iter") is None  # standard: no EOT

    x, y = batch
    noisy = NoisyInput(erm_model, sigma=0.05).eval()
    small = AutoAttackRand(0.15, n_iter=5, eot_iter=2)
    torch.manual_seed(0)
    x_adv, broken_by = small.perturb_with_log(noisy, x, y)
    assert float((x_adv - x).abs().max()) <= 0.15 + 1e-6
    assert set(broken_by) <= {None, "clean", "apgd_ce", "apgd_dlr"} and "apgd_ce" in broken_by


def test_randomized_outputs_flag_names_the_rand_version(erm_model, batch) -> None:
    x, y = batch
    details = probe_model(NoisyInput(erm_model), x, y, [])
    assert details["randomized_outputs"]["run_instead"] == "autoattack_rand"
    assert "attack=[autoattack_rand]" in details["randomized_outputs"]["advice"]
    assert "randomized_outputs" not in probe_model(erm_model, x, y, [])


def test_autoattack_counts_a_point_broken_only_when_a_fresh_forward_misclassifies_it(erm_model, digits_dir,
                                                                                     monkeypatch) -> None:
    """As in the reference, a component's 'fooled' is re-checked with one more forward of what it
    returns: for a randomized model a point fooled by one lucky noise draw during the attack is
    not counted, nor its x_adv kept, unless a fresh draw misclassifies it too. Here the components
    claim every point without moving it, and the fresh forward refutes every claim."""
    from harness.attacks.apgd import APGDDLR
    from helpers import digits_batch

    def claims_all(self, model, x, y):
        return x.clone(), torch.ones(len(y), dtype=torch.bool)

    for component in (APGDCE, APGDDLR):
        monkeypatch.setattr(component, "perturb_with_mask", claims_all)
    x, y = digits_batch(digits_dir, 32)
    x_adv, broken_by = AutoAttackRand(0.1, n_iter=2).perturb_with_log(erm_model, x, y)
    with torch.no_grad():
        clean = (erm_model(x).argmax(1) == y).tolist()
    assert broken_by == [None if ok else "clean" for ok in clean]
    assert torch.equal(x_adv, x)

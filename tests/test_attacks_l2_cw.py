"""PGD-L2 and CW-L-inf: inside the threat model, effective, side-effect free, equal to torchattacks."""
from __future__ import annotations

import pytest
import torch

import harness.attacks.cw  # noqa: F401  (registers cw_linf until the registry lists it)
import harness.attacks.pgd_l2  # noqa: F401  (registers pgd_l2)
from harness.attacks.base import build_attack
from harness.attacks.cw import CWLinf, cw_margin_loss
from harness.attacks.pgd_l2 import PGDL2, project_l2
from helpers import accuracy, digits_batch

EPS_LINF = 0.1
EPS_L2 = 1.0  # 8x8 digits: 64 pixels, an L-inf 0.1 cube has L2 radius 0.8


@pytest.fixture(scope="module")
def trained(digits_dir, erm_model):
    model = erm_model.eval()
    x, y = digits_batch(digits_dir, 128)
    assert accuracy(model, x, y) > 0.85, "the fixture model should classify digits well"
    return model, x, y


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)


def test_registered_with_documented_signatures() -> None:
    a = build_attack({"name": "pgd_l2", "eps": "1/2"})
    assert isinstance(a, PGDL2) and a.norm == "l2"
    assert (a.eps, a.steps, a.step_size, a.random_start) == (0.5, 20, 0.125, True)
    c = build_attack({"name": "cw_linf", "eps": "8/255"})
    assert isinstance(c, CWLinf) and c.norm == "linf"
    assert c.eps == pytest.approx(8 / 255) and c.step_size == pytest.approx(2 / 255)
    assert (c.steps, c.kappa, c.random_start) == (30, 50.0, True)
    assert c.describe()["kappa"] == 50.0 and c.describe()["name"] == "cw_linf"
    with pytest.raises(ValueError, match="bad settings for attack 'pgd_l2'"):
        build_attack({"name": "pgd_l2", "eps": 1.0, "alpha": 0.2})
    with pytest.raises(ValueError, match="kappa"):
        build_attack({"name": "cw_linf", "eps": 0.1, "kappa": -1})


# The threat-model, effectiveness and side-effect checks for these attacks are the generic ones
# in test_attacks.py (every registered attack is in its table).


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_l2_equals_torchattacks(trained, random_start: bool) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    torch.manual_seed(123)
    ours = build_attack({"name": "pgd_l2", "eps": EPS_L2, "steps": 10, "step_size": 0.2 * EPS_L2,
                         "random_start": random_start})(model, x, y)
    torch.manual_seed(123)
    ref = torchattacks.PGDL2(model, eps=EPS_L2, alpha=0.2 * EPS_L2, steps=10,
                             random_start=random_start)(x, y)
    assert (ours - ref).abs().max() < 1e-5
    assert accuracy(model, ours, y) == pytest.approx(accuracy(model, ref, y), abs=1 / len(y))


def test_pgd_l2_random_start_is_seeded(trained) -> None:
    model, x, y = trained
    attack = build_attack({"name": "pgd_l2", "eps": EPS_L2, "steps": 1, "step_size": 0.0})
    torch.manual_seed(5)
    a = attack(model, x, y)
    torch.manual_seed(5)
    b = attack(model, x, y)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert _l2(a - x).max() <= EPS_L2 + 1e-5


def test_project_l2() -> None:
    x = torch.full((3, 1, 4, 4), 0.5)
    step = torch.zeros_like(x)
    step[0] = 0.01  # inside the ball (norm 0.04): unchanged
    step[1, 0, 0, 0] = 0.3  # outside (norm 0.3): scaled onto the sphere
    step[2] = -0.4  # outside, and the scaled point is still in [0,1]
    out = project_l2(x + step, x, eps=0.2)
    assert torch.allclose(out[0], x[0] + step[0])
    assert _l2(out[1:] - x[1:]) == pytest.approx([0.2, 0.2], abs=1e-6)
    assert torch.allclose(out[1, 0, 0, 0], torch.tensor(0.7))
    # The [0,1] clamp comes after the ball and only shrinks the perturbation.
    far = project_l2(torch.full_like(x, 5.0), torch.ones_like(x), eps=1.0)
    assert torch.equal(far, torch.ones_like(x))
    assert torch.equal(project_l2(x, x, eps=0.0), x)


def test_cw_margin_loss_matches_formula() -> None:
    logits = torch.tensor([
        [1.0, 5.0, 3.0],     # y=0: max_other 5 -> margin 4
        [10.0, 2.0, -1.0],   # y=0: max_other 2 -> margin -8 (correct, confident)
        [0.0, 0.0, 100.0],   # y=0: margin 100 -> capped at kappa
        [2.0, 7.0, 7.0],     # y=2: tie with the other class -> margin 0
        [-3.0, 60.0, 0.0],   # y=1: margin -60 (the clamp only caps the margin from above)
    ])
    y = torch.tensor([0, 0, 0, 2, 1])
    kappa = 50.0
    expected = []
    for z, t in zip(logits.tolist(), y.tolist()):
        other = max(v for i, v in enumerate(z) if i != t)
        expected.append(-max(z[t] - other, -kappa))  # -clamp(z_y - max_other, min=-kappa)
    assert expected == [4.0, -8.0, 50.0, 0.0, -60.0]
    per_sample = cw_margin_loss(logits, y, kappa, reduction="none")
    assert per_sample.tolist() == expected
    assert cw_margin_loss(logits, y, kappa).item() == pytest.approx(sum(expected) / len(expected))
    assert cw_margin_loss(logits, y, kappa, reduction="sum").item() == pytest.approx(sum(expected))
    assert cw_margin_loss(logits, y, 0.0, reduction="none").tolist() == [0.0, -8.0, 0.0, 0.0, -60.0]


def test_cw_margin_loss_gradient() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0], [0.0, 0.0, 100.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(cw_margin_loss(logits, torch.tensor([0, 0]), 50.0, "sum"), logits)
    # Sample 0: d(z_1 - z_0) -> (-1, +1, 0). Sample 1: capped at kappa -> no gradient.
    assert grad.tolist() == [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_cw_linf_without_random_start_is_deterministic(trained) -> None:
    model, x, y = trained
    attack = build_attack({"name": "cw_linf", "eps": EPS_LINF, "steps": 3, "random_start": False})
    assert torch.equal(attack(model, x, y), attack(model, x, y))


def test_cw_linf_at_least_as_strong_as_fgsm(trained) -> None:
    model, x, y = trained
    fgsm = build_attack({"name": "fgsm", "eps": EPS_LINF})(model, x, y)
    torch.manual_seed(0)
    cw = build_attack({"name": "cw_linf", "eps": EPS_LINF})(model, x, y)  # defaults: 30 steps
    assert accuracy(model, cw, y) <= accuracy(model, fgsm, y)

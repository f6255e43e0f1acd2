"""APGD-CE / APGD-T: threat model, effectiveness vs PGD, no side effects, schedule and DLR losses.

Agreement with the reference implementation (fra31/auto-attack) is checked by
benchmarks/compare_autoattack_reference.py, which needs a checkout of the reference.
"""
from __future__ import annotations

import math

import pytest
import torch

import harness.attacks.apgd  # noqa: F401  (registers apgd_ce / apgd_t until the registry lists it)
from harness.attacks.apgd import APGDCE, APGDT, dlr_loss, dlr_loss_targeted, step_checkpoints
from harness.attacks.base import build_attack
from harness.attacks.pgd import PGD
from harness.eval.evaluate import check_perturbation
from harness.core.registry import ATTACKS
from helpers import accuracy, digits_batch

EPS = {"linf": 0.15, "l2": 1.0}
N_ITER = 25
CASES = [(name, norm) for name in ("apgd_ce", "apgd_t") for norm in ("linf", "l2")]


@pytest.fixture(scope="module")
def trained(digits_dir, erm_model):
    model = erm_model.eval()
    x, y = digits_batch(digits_dir, 64)
    assert accuracy(model, x, y) > 0.85, "the fixture model should classify digits well"
    return model, x, y


def make(name: str, norm: str, **kw):
    return build_attack({"name": name, "eps": EPS[norm], "norm": norm, "n_iter": N_ITER, **kw})


def test_registered_with_reference_defaults() -> None:
    assert ATTACKS.get("apgd_ce") is APGDCE and ATTACKS.get("apgd_t") is APGDT
    ce, t = APGDCE(0.1), APGDT("8/255", norm="l2")
    assert ce.describe() == {"name": "apgd_ce", "norm": "linf", "eps": 0.1, "n_iter": 100,
                             "n_restarts": 1, "rho": 0.75, "seed": 0}
    assert t.describe()["n_target_classes"] == 9 and t.norm == "l2" and t.n_iter == 100
    with pytest.raises(ValueError):
        APGDCE(0.1, norm="l1")


@pytest.mark.parametrize("name,norm", CASES)
def test_stays_in_threat_model_and_beats_pgd(trained, name: str, norm: str) -> None:
    model, x, y = trained
    attack = make(name, norm)
    x_adv, fooled = attack.perturb_with_mask(model, x, y)
    check_perturbation(attack, x, x_adv)
    size = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert size.max() <= EPS[norm] + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    assert torch.equal(fooled, wrong), "the mask must say which returned points are misclassified"
    acc = accuracy(model, x_adv, y)
    assert acc < accuracy(model, x, y) - 0.3
    if norm == "linf":
        torch.manual_seed(0)
        pgd_acc = accuracy(model, PGD(EPS[norm], steps=N_ITER)(model, x, y), y)
        assert acc <= pgd_acc


@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t"])
def test_beats_pgd_where_it_is_not_saturated(trained, name: str) -> None:
    """At eps 0.15 every attack reaches 0%; at 0.1 PGD leaves ~20% robust, APGD fewer."""
    model, x, y = trained
    torch.manual_seed(0)
    pgd_acc = accuracy(model, PGD(0.1, steps=N_ITER)(model, x, y), y)
    assert 0 < accuracy(model, make(name, "linf", eps=0.1)(model, x, y), y) <= pgd_acc


@pytest.mark.parametrize("name,norm", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_leaves_model_untouched(trained, name: str, norm: str, mode: str) -> None:
    model, x, y = trained
    model.train(mode == "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = None
    attack = make(name, norm, n_iter=5)
    attack(model, x, y)
    attack.perturb_with_mask(model, x, y)
    assert model.training == (mode == "train")
    assert all(p.grad is None for p in model.parameters()), "attacks must take input gradients only"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"attack changed {k}"
    model.eval()


def test_seeded_and_unfooled_points_unchanged(trained) -> None:
    model, x, y = trained
    state = torch.get_rng_state()
    a = make("apgd_ce", "linf", eps=0.03, n_iter=10)
    out1, fooled = a.perturb_with_mask(model, x, y)
    assert torch.equal(torch.get_rng_state(), state), "the attack draws from its own generator"
    assert torch.equal(out1, a(model, x, y)), "same seed, same result"
    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
    kept = ~fooled | clean_wrong  # never fooled, or not attacked: returned as given
    assert torch.equal(out1[kept], x[kept]) and fooled[clean_wrong].all()


def test_checkpoints_are_the_published_schedule() -> None:
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = ceil(p_j * N)
    p = [0.0, 0.22]
    while True:
        nxt = round(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06), 2)
        if nxt > 1:
            break
        p.append(nxt)
    published = [math.ceil(round(pj * 100, 6)) for pj in p[1:]]
    assert published == [22, 41, 57, 70, 80, 87, 93, 99]
    assert step_checkpoints(100) == published
    # short budgets: lengths int(0.22 N), shrinking by max(int(0.03 N), 1) to max(int(0.06 N), 1)
    assert step_checkpoints(20) == [4, 7, 9, *range(10, 21)]


def test_dlr_losses_equal_the_formula() -> None:
    z = torch.tensor([[1.0, 5.0, 3.0, 2.0, 0.0],   # y=1 is the top class: max other is 3
                      [4.0, 1.0, 3.0, 2.5, 0.5],   # y=2 is not the top class: max other is 4
                      [0.0, 0.0, 7.0, 1.0, -2.0]])
    y = torch.tensor([1, 2, 0])
    # z_pi1 - z_pi3: 5-2, 4-2.5, 7-0
    expected = torch.tensor([-(5 - 3) / (5 - 2 + 1e-12), -(3 - 4) / (4 - 2.5 + 1e-12),
                             -(0 - 7) / (7 - 0 + 1e-12)])
    assert torch.allclose(dlr_loss(z, y), expected, atol=1e-6)
    t = torch.tensor([2, 0, 3])
    # z_pi1 - (z_pi3 + z_pi4)/2: 5-(2+1)/2, 4-(2.5+1)/2, 7-(0+0)/2
    expected_t = torch.tensor([-(5 - 3) / (5 - 1.5 + 1e-12), -(3 - 4) / (4 - 1.75 + 1e-12),
                               -(0 - 1) / (7 - 0 + 1e-12)])
    assert torch.allclose(dlr_loss_targeted(z, y, t), expected_t, atol=1e-6)
    # shift and scale invariance, the point of DLR
    assert torch.allclose(dlr_loss(3 * z + 7, y), expected, atol=1e-6)

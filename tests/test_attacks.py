"""Attacks: inside the threat model, effective, side-effect free, and equal to torchattacks."""
from __future__ import annotations

import pytest
import torch

from harness.attacks.base import build_attack, parse_number
from harness.eval.evaluate import check_perturbation
from harness.core.registry import ATTACKS
from helpers import accuracy, digits_batch

EPS = 0.1
EPS_L2 = 1.0
# Every registered attack with the settings the generic tests use; a new plugin must be added here.
ATTACK_SETTINGS = {
    "fgsm": {"eps": EPS},
    "pgd": {"eps": EPS, "steps": 10},
    "pgd_l2": {"eps": EPS_L2, "steps": 10},
    "cw_linf": {"eps": EPS, "steps": 10},
    "trades_kl": {"eps": EPS, "steps": 10},
    "apgd_ce": {"eps": EPS, "n_iter": 20},
    "apgd_t": {"eps": EPS, "n_iter": 10, "n_target_classes": 3},
    "fab_t": {"eps": EPS, "n_iter": 10, "n_target_classes": 3},
    "square": {"eps": 2 * EPS, "n_queries": 100},  # black-box: needs a larger ball to bite in 100 queries
    "autoattack": {"eps": EPS, "n_iter": 10, "n_queries": 100},
    "autoattack_fast": {"eps": EPS, "n_iter": 10},
    "apgd_dlr": {"eps": EPS, "n_iter": 10, "eot_iter": 2},
    "autoattack_rand": {"eps": EPS, "n_iter": 10, "eot_iter": 2},
    "torchattacks": {"eps": EPS, "class_name": "PGD", "kwargs": {"steps": 10}},  # every class: tests/test_torchattacks_adapter.py
}


def test_every_registered_attack_is_covered() -> None:
    assert set(ATTACKS.names()) == set(ATTACK_SETTINGS)


@pytest.fixture(scope="module")
def trained(digits_dir, erm_model):
    model = erm_model.eval()
    x, y = digits_batch(digits_dir, 128)
    assert accuracy(model, x, y) > 0.85, "the fixture model should classify digits well"
    return model, x, y


@pytest.mark.parametrize("name", sorted(ATTACK_SETTINGS))
def test_attack_stays_in_threat_model_and_lowers_accuracy(trained, name: str) -> None:
    model, x, y = trained
    attack = build_attack({"name": name, **ATTACK_SETTINGS[name]})
    x_adv = attack(model, x, y)
    check_perturbation(attack, x, x_adv)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
    assert size.max() <= attack.eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2


@pytest.mark.parametrize("name", sorted(ATTACK_SETTINGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attack_leaves_model_untouched(trained, name: str, mode: str) -> None:
    model, x, y = trained
    model.train(mode == "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats included
    for p in model.parameters():
        p.grad = None
    build_attack({"name": name, **ATTACK_SETTINGS[name]})(model, x, y)
    assert model.training == (mode == "train")
    assert all(p.grad is None for p in model.parameters()), "attacks must take input gradients only"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"attack changed {k}"
    model.eval()


def test_fgsm_equals_torchattacks(trained) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    ours = build_attack({"name": "fgsm", "eps": EPS})(model, x, y)
    ref = torchattacks.FGSM(model, eps=EPS)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_equals_torchattacks(trained, random_start: bool) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    torch.manual_seed(123)
    ours = build_attack({"name": "pgd", "eps": EPS, "steps": 10, "step_size": EPS / 4,
                         "random_start": random_start})(model, x, y)
    torch.manual_seed(123)
    ref = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=random_start)(x, y)
    # Same algorithm and the same random draws; projection order differs by float rounding only.
    assert (ours - ref).abs().max() < 1e-5
    assert accuracy(model, ours, y) == pytest.approx(accuracy(model, ref, y), abs=1 / len(y))


def test_pgd_stronger_than_fgsm(trained) -> None:
    model, x, y = trained
    fgsm = build_attack({"name": "fgsm", "eps": EPS})(model, x, y)
    pgd = build_attack({"name": "pgd", "eps": EPS, "steps": 20})(model, x, y)
    assert accuracy(model, pgd, y) <= accuracy(model, fgsm, y)


def test_eps_parsing_and_bad_settings() -> None:
    assert parse_number("8/255") == pytest.approx(8 / 255)
    assert parse_number(0.5) == 0.5
    with pytest.raises(ValueError, match="8/255"):
        parse_number("eight")
    with pytest.raises(ValueError, match="bad settings for attack 'pgd'"):
        build_attack({"name": "pgd", "eps": 0.1, "stpes": 3})
    with pytest.raises(KeyError, match="Known attacks: .*fgsm, pgd"):
        build_attack({"name": "nosuch", "eps": 0.1})


def test_check_perturbation_rejects_violations(trained) -> None:
    model, x, y = trained
    attack = build_attack({"name": "fgsm", "eps": EPS})
    with pytest.raises(RuntimeError, match="exceeded eps"):
        check_perturbation(attack, x, (x + 2 * EPS).clamp(0, 1))
    with pytest.raises(RuntimeError, match=r"left \[0,1\]"):
        check_perturbation(attack, x, x + 0.0 - 0.05 * (x == 0).float())

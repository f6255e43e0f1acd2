"""The torchattacks adapter over every attack class torchattacks exports that fits the contract.

Each class runs through the `torchattacks` plugin on a small CNN trained here on 3-channel 16x16
digits (TIFGSM's kernel and DIFGSM's resizing want RGB images of some size): the output is in
[0,1], within eps where the class has a threat model, accuracy does not rise, and the model's
mode, parameters and parameter gradients are as before.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchattacks = pytest.importorskip("torchattacks")

from harness.attacks.base import build_attack  # noqa: E402
from harness.attacks.torchattacks_adapter import NOT_ADAPTED, adapted_classes  # noqa: E402
from harness.core.config import compose_config  # noqa: E402
from harness.data.loader import make_loader  # noqa: E402

EPS = 0.1
# Small budgets so that every class runs in seconds on one CPU core (the defaults of the slow ones).
SMALL = {
    "APGD": {"steps": 5}, "APGDT": {"steps": 5}, "FAB": {"steps": 5}, "Square": {"n_queries": 50},
    "AutoAttack": {}, "CW": {"steps": 10}, "DeepFool": {"steps": 5}, "SparseFool": {"steps": 2},
    "OnePixel": {"steps": 2, "popsize": 4}, "Pixle": {"restarts": 2, "max_iterations": 2},
    "PGDRS": {"steps": 3, "noise_batch_size": 2}, "PGDRSL2": {"steps": 3, "noise_batch_size": 2, "eps": 1.0},
    "PGDL2": {"steps": 5, "eps": 1.0}, "VMIFGSM": {"steps": 3}, "VNIFGSM": {"steps": 3}, "SINIFGSM": {"steps": 3},
    "EOTPGD": {"steps": 3}, "TIFGSM": {"steps": 3, "len_kernel": 3}, "DIFGSM": {"steps": 3},
}


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.repeat(1, 3, 1, 1), size=16, mode="nearest")


@pytest.fixture(scope="module")
def trained(digits_dir: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in make_loader(digits_dir, "train", 64, shuffle=True, epoch=0):
        loss = F.cross_entropy(model(_rgb(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    model.eval()
    x, y = next(iter(make_loader(digits_dir, "test", 16)))
    return model, _rgb(x), y


def test_every_exported_attack_is_adapted_or_listed_with_a_reason() -> None:
    exported = set(torchattacks.__all__)
    assert set(adapted_classes()) | (set(NOT_ADAPTED) & exported) == exported
    assert set(adapted_classes()) >= {"PGD", "APGD", "CW", "DeepFool", "Square", "EOTPGD"}
    doc = (Path(__file__).parents[1] / "docs" / "attacks.md").read_text()
    assert all(name in doc for name in NOT_ADAPTED if name in exported)


@pytest.mark.parametrize("class_name", [pytest.param(n, marks=pytest.mark.slow) if n == "AutoAttack" else n
                                        for n in adapted_classes()])  # AutoAttack: ~60 s (Square 5000 queries)
def test_attack_contract(trained, class_name: str) -> None:
    model, x, y = trained
    kwargs = dict(SMALL.get(class_name, {}))
    attack = build_attack({"name": "torchattacks", "class_name": class_name, "eps": kwargs.pop("eps", EPS),
                           "kwargs": kwargs})
    before = [p.detach().clone() for p in model.parameters()]
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(0)
        x_adv = attack(model, x, y)
        assert model.training == (mode == "train")
    model.eval()
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    size = (x_adv - x).flatten(1)
    size = size.abs().amax(1) if attack.norm == "linf" else size.norm(dim=1)
    if math.isfinite(attack.eps):  # a threat model: within eps
        assert float(size.max()) <= attack.eps + 1e-5
    with torch.no_grad():
        clean, adv = model(x).argmax(1) == y, model(x_adv).argmax(1) == y
    assert clean.float().mean() > 0.5, "the fixture model should classify most points"
    assert adv.float().mean() <= clean.float().mean()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_config_and_bad_input() -> None:
    cfg = compose_config(["attack=[torchattacks]", "attack.torchattacks.name=MIFGSM", "attack.torchattacks.steps=3",
                          "attack.torchattacks.decay=0.5"])["attack"]["torchattacks"]
    attack = build_attack(cfg)
    assert attack.describe()["class_name"] == "MIFGSM" and attack.describe()["kwargs"] == {"steps": 3, "decay": 0.5}
    assert build_attack({"name": "torchattacks", "class_name": "CW", "eps": 0.1}).eps == math.inf
    assert build_attack({"name": "torchattacks", "class_name": "PGDL2", "eps": 0.5}).norm == "l2"
    with pytest.raises(ValueError, match="torchattacks has no attack 'Nope'"):
        build_attack({"name": "torchattacks", "class_name": "Nope", "eps": 0.1})
    with pytest.raises(ValueError, match="takes no \\['stepz'\\]"):
        build_attack({"name": "torchattacks", "class_name": "PGD", "eps": 0.1, "kwargs": {"stepz": 3}})
    with pytest.raises(ValueError, match="does not fit the attack contract"):
        build_attack({"name": "torchattacks", "class_name": "LGV", "eps": 0.1})


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'robustgrid\[torchattacks\]'"):
        build_attack({"name": "torchattacks", "class_name": "PGD", "eps": 0.1})

"""Attacks differentiate a BatchNorm-folded copy of the model (harness/eval/fold.py): the same
function, the same adversarial examples, the original model untouched and still the judge."""
from __future__ import annotations

import copy

import torch
from torch import nn

from harness.attacks.base import build_attack
from harness.eval.evaluate import evaluate
from harness.eval.fold import folded_for_attacks
from helpers import digits_batch, digits_classifier

PGD = {"name": "pgd", "eps": 0.1, "steps": 5}


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_folded_copy_computes_the_same_function_and_the_same_attack(erm_model, digits_dir) -> None:
    x, y = digits_batch(digits_dir, 64)
    before = copy.deepcopy(erm_model.state_dict())
    folded = folded_for_attacks(erm_model, x[:16])
    assert folded is not erm_model and _batch_norms(erm_model) and not _batch_norms(folded)
    assert not any(p.requires_grad for p in folded.parameters()), "attacks need input gradients only"
    with torch.no_grad():
        assert torch.allclose(folded(x), erm_model(x), rtol=1e-4, atol=1e-4)
    attack = build_attack(PGD)
    torch.manual_seed(0)
    plain = attack(erm_model, x, y)
    torch.manual_seed(0)
    on_folded = attack(folded, x, y)
    assert (on_folded - plain).abs().max() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in erm_model.state_dict().items()), "the model must be untouched"


class _Untraceable(nn.Module):
    """A BatchNorm model with Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if h.mean() > 0:
            h = h.relu()
        return self.fc(h.mean((2, 3)))


class _Noisy(_Untraceable):
    """A randomized defense: noise at inference; its folded copy can never agree with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x + 0.1 * torch.randn_like(x))).relu().mean((2, 3)))


def test_models_that_cannot_be_folded_are_attacked_as_they_are(digits_dir) -> None:
    x, _ = digits_batch(digits_dir, 16)
    vit = digits_classifier(digits_dir, arch="test_vit").eval()
    assert folded_for_attacks(vit, x) is vit, "no BatchNorm: nothing to fold, no copy"
    for model in (_Untraceable().eval(), _Noisy().eval()):
        assert folded_for_attacks(model, x) is model


def test_evaluate_attacks_the_folded_copy_and_judges_with_the_model(erm_model, digits_dir) -> None:
    """A hook on the model's first BatchNorm counts its forwards: with folding only the
    predictions (and the fold's probe) pass through it, and every result is unchanged."""
    bn = _batch_norms(erm_model)[0]
    calls = {"n": 0}
    handle = bn.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        settings = dict(num_classes=10, batch_size=32, limit=64, integrity_points=0)
        folded = evaluate(erm_model, [PGD], digits_dir, fold_bn=True, **settings)
        folded_calls, calls["n"] = calls["n"], 0
        plain = evaluate(erm_model, [PGD], digits_dir, fold_bn=False, **settings)
    finally:
        handle.remove()
    batches = 2
    assert folded_calls == 1 + batches * 2, "the probe, then per batch the clean and the adversarial predictions"
    assert calls["n"] > batches * PGD["steps"], "unfolded, the attack's own passes go through the model"
    assert folded.clean_acc == plain.clean_acc
    assert folded.attacks[0].robust_acc == plain.attacks[0].robust_acc
    assert folded.attacks[0].broken_by == plain.attacks[0].broken_by

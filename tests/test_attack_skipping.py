"""skip_fooled (APGD, FAB-T, AutoAttack): dropping fooled points from a run's batch changes the
work, never a point's outcome. Each attack runs with and without it on the same trained model and
inputs; the per-point outcomes (and AutoAttack's broken_by) must be identical, while the skipping
path pushes fewer rows through the model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.attacks.apgd import APGDCE, APGDT
from harness.attacks.autoattack import AutoAttack
from harness.attacks.fab import FABT
from helpers import digits_batch

EPS = 0.1  # on the shared digits model this leaves some points robust and breaks others


class RowCounter(nn.Module):
    """The model, counting the rows of every forward it runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.model(x)


@pytest.fixture(scope="module")
def trained(digits_dir, erm_model):
    x, y = digits_batch(digits_dir, 48)
    return erm_model.eval(), x, y


def _both(make, model, x, y):
    """(fooled, x_adv, rows) of the attack with skip_fooled True and False."""
    out = []
    for skip in (True, False):
        counted = RowCounter(model).eval()
        x_adv, fooled = make(skip).perturb_with_mask(counted, x, y)
        out.append((fooled, x_adv, counted.rows))
    return out


@pytest.mark.parametrize("make", [
    lambda skip: APGDCE(EPS, n_iter=20, skip_fooled=skip),
    lambda skip: APGDT(EPS, n_iter=10, n_target_classes=3, skip_fooled=skip),
    lambda skip: FABT(EPS, n_iter=10, n_target_classes=3, skip_fooled=skip),
], ids=["apgd_ce", "apgd_t", "fab_t"])
def test_skipping_keeps_every_outcome_and_saves_rows(trained, make) -> None:
    model, x, y = trained
    (fooled_s, adv_s, rows_s), (fooled_f, adv_f, rows_f) = _both(make, model, x, y)
    assert torch.equal(fooled_s, fooled_f), "skipping fooled points changed some point's outcome"
    assert 0 < int(fooled_f.sum()) < len(y), "the check needs both fooled and robust points"
    assert rows_s < rows_f, "skipping should push fewer rows through the model"
    with torch.no_grad():  # the returned points of the fooled are misclassified, within eps, in [0,1]
        for adv in (adv_s, adv_f):
            assert ((adv - x).abs().amax((1, 2, 3)) <= EPS + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
            assert (model(adv).max(1)[1] != y)[fooled_s].all()


def test_autoattack_broken_by_is_the_same_with_and_without_skipping(trained) -> None:
    model, x, y = trained
    logs = [AutoAttack(EPS, n_iter=10, n_queries=30, skip_fooled=skip).perturb_with_log(model, x, y)[1]
            for skip in (True, False)]
    assert logs[0] == logs[1]
    assert {"apgd_ce", None} <= set(logs[0]), "the chain should break some points and leave others"


def test_skip_fooled_is_recorded_only_when_off() -> None:
    assert "skip_fooled" not in APGDCE(EPS).describe() and "skip_fooled" not in AutoAttack(EPS).describe()
    assert FABT(EPS, skip_fooled=False).describe()["skip_fooled"] is False

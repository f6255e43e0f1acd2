"""FAB-T, Square, AutoAttack: the pieces (projection, schedule, chaining) and, when the reference
implementation is importable, agreement with it; CW-L-inf against torchattacks' CW loss.

The reference check is slow (marked `slow`); it looks for fra31/auto-attack on sys.path or in
the directory named by $AUTOATTACK_REF (e.g. /tmp/autoattack_ref). The full-strength comparison
is benchmarks/compare_autoattack_reference.py.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from harness.attacks.autoattack import AutoAttack, AutoAttackFast
from harness.attacks.base import build_attack, project_linf
from harness.attacks.cw import cw_margin_loss
from harness.attacks.fab import FABT, project_linf_box
from harness.attacks.square import Square, square_fraction
from helpers import accuracy, digits_batch

EPS = 0.1


@pytest.fixture(scope="module")
def trained(digits_dir, erm_model):
    x, y = digits_batch(digits_dir, 64)
    return erm_model.eval(), x, y


def test_linf_box_projection_is_minimal_and_on_the_hyperplane() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(200, 30, generator=gen)
    w = torch.randn(200, 30, generator=gen)
    w[:, :3] = 0  # coordinates the hyperplane does not involve never move
    b = (w * torch.rand(200, 30, generator=gen)).sum(1)  # a hyperplane through a box point
    d = project_linf_box(t, w, b)
    assert torch.allclose((w * (t + d)).sum(1), b, atol=1e-4)
    assert (t + d).min() >= -1e-6 and (t + d).max() <= 1 + 1e-6
    assert (d[:, :3] == 0).all()
    # minimality: every moved coordinate moves by the same lam unless it hit the box face
    size = d.abs().amax(1, keepdim=True)
    face = ((t + d) <= 1e-6) | ((t + d) >= 1 - 1e-6)
    assert ((d.abs() - size).abs() < 1e-5)[~face & (w != 0)].all()
    # unreachable hyperplane: the step goes to the box corner nearest to it
    far = project_linf_box(torch.full((1, 4), 0.5), torch.ones(1, 4), torch.tensor([100.0]))
    assert torch.allclose(far, torch.full((1, 4), 0.5))


def test_square_schedule_is_the_reference_one() -> None:
    assert square_fraction(0, 0.8, 5000, False) == 0.8 and square_fraction(10, 0.8, 5000, False) == 0.8
    assert square_fraction(11, 0.8, 5000, False) == 0.4
    assert square_fraction(4999, 0.8, 5000, False) == pytest.approx(0.8 / 128)
    assert square_fraction(1000, 0.8, 5000, True) == pytest.approx(0.8 / 32)  # rescaled: 2000 of 10k


def test_defaults_are_autoattack_standard() -> None:
    fab, sq, aa = FABT(0.1), Square(0.1), AutoAttack("8/255")
    assert (fab.n_iter, fab.n_target_classes, fab.n_restarts, fab.alpha_max, fab.eta, fab.beta) == \
        (100, 9, 1, 0.1, 1.05, 0.9)
    assert (sq.n_queries, sq.p_init, sq.n_restarts, sq.rescale_schedule) == (5000, 0.8, 1, False)
    assert [c.name for c in aa.build_components()] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert [c.name for c in AutoAttackFast(0.1).build_components()] == ["apgd_ce", "apgd_t"]
    assert all(getattr(c, "n_iter", 100) == 100 for c in aa.build_components())
    with pytest.raises(ValueError, match="autoattack_fast"):
        AutoAttack(0.5, norm="l2")
    with pytest.raises(ValueError, match="linf"):
        build_attack({"name": "fab_t", "eps": 0.5, "norm": "l2"})


def test_fab_finds_small_perturbations(trained) -> None:
    """FAB minimises the perturbation: the points it breaks at eps are broken well inside it."""
    model, x, y = trained
    x_adv, fooled = FABT(0.3, n_iter=20, n_target_classes=3).perturb_with_mask(model, x, y)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    sizes = (x_adv - x).flatten(1).abs().amax(1)[fooled & clean]
    assert fooled.float().mean() > 0.9 and sizes.median() < 0.15


def test_autoattack_log_says_who_broke_each_point(trained) -> None:
    model, x, y = trained
    aa = AutoAttack(EPS, n_iter=10, n_queries=50)
    x_adv, broken_by = aa.perturb_with_log(model, x, y)
    with torch.no_grad():
        wrong = (model(x_adv).argmax(1) != y).tolist()
    assert [b is not None for b in broken_by] == wrong
    assert set(broken_by) <= {None, "clean", "apgd_ce", "apgd_t", "fab_t", "square"}
    assert "apgd_ce" in broken_by
    # each component only ran on what the earlier ones left: APGD-CE alone breaks the same set
    ce = build_attack({"name": "apgd_ce", "eps": EPS, "n_iter": 10})
    _, fooled = ce.perturb_with_mask(model, x, y)
    assert [b in ("clean", "apgd_ce") for b in broken_by] == fooled.tolist()


def test_cw_linf_equals_pgd_on_torchattacks_cw_loss(trained) -> None:
    """torchattacks 3.3.0 has no CW-L-inf (its CW is the L2 Adam attack in tanh space, a different
    threat model, so robust accuracies are not comparable). What can be compared is the loss:
    our cw_linf must be PGD-L-inf ascending torchattacks' CW objective -f. Its f masks the true
    class with 0 instead of -inf, which equals the true margin only when some other logit is >= 0,
    so the logits are shifted up by a constant (our loss is shift-invariant)."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained

    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, v):
            z = self.inner(v)
            return z - z.min(1, keepdim=True)[0].detach() + 1.0

    shifted = Shifted().eval()
    ta_cw = torchattacks.CW(shifted, c=1.0, kappa=50.0)
    with torch.no_grad():
        z = shifted(x)
    assert torch.allclose(cw_margin_loss(z, y, 50.0, "none"), -ta_cw.f(z, y), atol=1e-5)

    steps, alpha = 5, EPS / 4
    torch.manual_seed(7)
    ours = build_attack({"name": "cw_linf", "eps": EPS, "steps": steps, "kappa": 50.0})(shifted, x, y)
    torch.manual_seed(7)
    ref = x + torch.empty_like(x).uniform_(-EPS, EPS)
    ref = project_linf(ref, x, EPS)
    for _ in range(steps):
        ref = ref.detach().requires_grad_(True)
        loss = -ta_cw.f(shifted(ref), y).mean()
        (g,) = torch.autograd.grad(loss, ref)
        ref = project_linf(ref.detach() + alpha * g.sign(), x, EPS)
    # Same iterates up to float rounding (tolerance 1e-5, a 1/10000 of eps).
    assert (ours - ref).abs().max() < 1e-5
    assert accuracy(model, ours, y) == pytest.approx(accuracy(model, ref, y), abs=1 / len(y))


def _reference():
    path = os.environ.get("AUTOATTACK_REF")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    return pytest.importorskip("autoattack", reason="reference fra31/auto-attack not importable "
                               "(set AUTOATTACK_REF to a checkout)")


@pytest.mark.slow
def test_matches_reference_implementation(trained) -> None:
    """Same model, points, settings and seed: the same robust accuracy (and the same points)."""
    _reference()
    from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from autoattack.fab_pt import FABAttack_PT
    from autoattack.square import SquareAttack

    model, x, y = trained
    eps = 0.05
    pairs = {
        "apgd_ce": (build_attack({"name": "apgd_ce", "eps": eps, "n_iter": 30}),
                    APGDAttack(model, n_iter=30, norm="Linf", eps=eps, seed=0, loss="ce", device="cpu")),
        "apgd_t": (build_attack({"name": "apgd_t", "eps": eps, "n_iter": 30, "n_target_classes": 3}),
                   APGDAttack_targeted(model, n_iter=30, norm="Linf", eps=eps, seed=0,
                                       n_target_classes=3, device="cpu")),
        "fab_t": (build_attack({"name": "fab_t", "eps": eps, "n_iter": 30, "n_target_classes": 3}),
                  FABAttack_PT(model, n_iter=30, eps=eps, seed=0, norm="Linf", targeted=True,
                               n_target_classes=3, device="cpu")),
        "square": (build_attack({"name": "square", "eps": eps, "n_queries": 500}),
                   SquareAttack(model, n_queries=500, eps=eps, p_init=0.8, seed=0, norm="Linf",
                                device="cpu", resc_schedule=False)),
    }
    for name, (ours, ref) in pairs.items():
        with torch.no_grad():
            ok_ours = model(ours(model, x, y)).argmax(1) == y
            ok_ref = model(ref.perturb(x.clone(), y.clone())).argmax(1) == y
        assert torch.equal(ok_ours, ok_ref), name

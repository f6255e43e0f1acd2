"""CausalAdv's invariants: the anchor, the spurious basis (official sequential removal and the
orthogonal option), the covariance estimator, g's own learning signal and its step before h's
loss (the official order), the alpha/r ramps, the T start, and g's class count."""
from __future__ import annotations

import pytest
import torch

from architectures.presets import build_classifier
from methods.base import TrainContext
from methods.causaladv import (CausalAdvAttack, CausalAdvM, CausalAdvT, CovarianceEstimator, random_anchor,
                               sequential_basis, spurious, spurious_basis)
from helpers import digits_batch, digits_classifier

ATTACK = {"eps": 0.1, "steps": 2}


def test_anchor_is_orthonormal() -> None:
    torch.manual_seed(0)
    a = random_anchor(16)
    assert torch.allclose(a @ a.t(), torch.eye(16), atol=1e-5)


def test_covariance_estimator_matches_the_batch_covariance_of_all_data_seen() -> None:
    torch.manual_seed(0)
    data = torch.randn(300, 6) * torch.arange(1, 7) + 2
    labels = torch.zeros(300, dtype=torch.long)
    est = CovarianceEstimator(6, 1)
    for chunk, lab in zip(data.split(64), labels.split(64)):
        est.update(chunk, lab)
    centred = data - data.mean(0)
    assert torch.allclose(est.mean[0], data.mean(0), atol=1e-4)
    assert torch.allclose(est.cov[0], centred.t() @ centred / 300, atol=1e-3)


def test_the_default_basis_removes_the_directions_one_after_the_other(digits_dir) -> None:
    """The official deco_ref: each Sigma-weighted direction removed in turn, rows renormalised
    after each; `basis=orthogonal` (ours) is exactly orthogonal to all of them, the official one
    stays slightly aligned with the earlier ones."""
    method = CausalAdvM(attack=ATTACK)
    module = method.build(digits_classifier(digits_dir))
    x, _ = digits_batch(digits_dir, 64)
    with torch.no_grad():
        features, _ = module.classifier.features(x)
    basis = module.update_basis(features)
    directions = module.feature_cov.cov[0] @ module.classifier.head.weight.t()  # D x C
    by_hand = module.anchor.clone()
    for r in directions.t():
        by_hand = by_hand - (by_hand * r).sum(1, keepdim=True) / (r ** 2).sum() * r
        by_hand = by_hand / by_hand.pow(2).sum(1, keepdim=True).sqrt()
    assert torch.allclose(basis, by_hand, atol=1e-6)
    assert torch.allclose(basis.norm(dim=1), torch.ones(basis.shape[0]), atol=1e-5)
    orthogonal = CausalAdvM(attack=ATTACK, basis="orthogonal").build(digits_classifier(digits_dir))
    orthogonal.load_state_dict(module.state_dict())
    exact = orthogonal.update_basis(features)
    assert (exact @ directions).abs().max() < 1e-4 * directions.norm()
    assert (basis @ directions).abs().max() > (exact @ directions).abs().max()
    with pytest.raises(ValueError, match="basis"):
        CausalAdvM(attack=ATTACK, basis="qr")


def test_spurious_basis_removes_a_span() -> None:
    torch.manual_seed(1)
    anchor, dirs = random_anchor(8), torch.randn(3, 8)
    assert (spurious_basis(anchor, dirs) @ dirs.t()).abs().max() < 1e-5
    assert (sequential_basis(anchor, dirs[:1]) @ dirs[:1].t()).abs().max() < 1e-5  # one direction: exact


def test_the_anchor_is_drawn_at_build_and_orthonormalised_once(digits_dir) -> None:
    """Drawn at build (before g, as the official order), orthonormalised at the first update only:
    a checkpoint's anchor (resume, evaluation) is used as loaded."""
    module = CausalAdvM(attack=ATTACK).build(digits_classifier(digits_dir))  # seeds, builds h, draws A
    digits_classifier(digits_dir)  # the same seed and draws again: the next draw is A's
    expected = random_anchor(module.classifier.embedding_dim)
    x, _ = digits_batch(digits_dir, 32)
    with torch.no_grad():
        module.update_basis(module.classifier.features(x)[0])
    first = module.anchor.clone()
    with torch.no_grad():
        module.update_basis(module.classifier.features(x)[0])
    assert torch.equal(module.anchor, first) and float(module.anchor_ready) == 1.0
    restored = CausalAdvM(attack=ATTACK).build(digits_classifier(digits_dir))
    restored.load_state_dict(module.state_dict())
    with torch.no_grad():
        restored.update_basis(restored.classifier.features(x)[0])
    assert torch.equal(restored.anchor, first)
    assert torch.equal(first, expected)


def _ctx(module, epoch: int, epochs: int = 10) -> TrainContext:
    return TrainContext(epoch, epochs, epoch, 1, torch.device("cpu"), 0, 1, module.classifier, lr_scale=0.5)


def test_g_steps_on_its_own_cross_entropy_before_h_s_loss(digits_dir) -> None:
    """The official order: g's SGD step on CE(g(s(x).detach()), y) inside the step, then the
    alignment term through the UPDATED g, whose parameters it does not move."""
    method = CausalAdvT(attack=ATTACK)
    module = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 32)
    g_before = [p.detach().clone() for p in method.g.parameters()]
    ctx = _ctx(module, 5)
    for extra in method.extra_optimizers(module).values():  # what the trainer does before the step
        extra.set_lr_scale(ctx.lr_scale)
    logs = method.training_step(module, x, y, ctx)
    assert method.g_optimizer.param_groups[0]["lr"] == 0.1 * 0.5
    assert any(not torch.equal(a, b) for a, b in zip(g_before, method.g.parameters())), "g stepped"
    g_after = [p.detach().clone() for p in method.g.parameters()]
    logs["loss"].backward()
    assert all(p.grad is None for p in method.g.parameters()), "h's loss leaves g's parameters alone"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.classifier.parameters())
    for extra in method.extra_optimizers(module).values():
        extra.trainer_step()  # method-stepped: the trainer's call is a no-op
    assert all(torch.equal(a, b) for a, b in zip(g_after, method.g.parameters()))
    assert method.extra_optimizers(module)["g"].optimizer is method.g_optimizer  # the trainer checkpoints it
    restored = CausalAdvT(attack=ATTACK)
    restored.build(digits_classifier(digits_dir))
    restored.load_state_dict(method.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.g.parameters(), method.g.parameters()))


def test_alpha_and_r_ramp_from_zero(digits_dir) -> None:
    method = CausalAdvM(attack=ATTACK, alpha=2.0)
    module = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 32)
    ramps = [method.training_step(module, x, y, _ctx(module, epoch)) for epoch in (0, 5)]
    assert [(float(r["alpha_t"]), float(r["ratio_t"])) for r in ramps] == [(0.0, 0.0), (1.0, 0.5)]


def test_the_t_attack_takes_its_first_gradient_at_the_unclipped_start(digits_dir) -> None:
    method = CausalAdvT(attack=ATTACK)
    module = method.build(digits_classifier(digits_dir))
    x, y = digits_batch(digits_dir, 16)
    basis = module.update_basis(module.classifier.features(x)[0].detach())
    attack = CausalAdvAttack(method.g, basis, "t", eps=0.1, steps=1)
    torch.manual_seed(0)
    start = attack.start(x)
    torch.manual_seed(0)
    assert torch.equal(start, x + 0.001 * torch.randn_like(x)) and (start.min() < 0 or start.max() > 1)
    x_adv = attack(module.classifier, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert spurious(module.classifier.features(x)[0], basis).shape == (16, basis.shape[0])


def test_g_class_count_follows_the_classifier(digits_dir) -> None:
    model = build_classifier({"name": "test_resnet", "kwargs": {}}, num_classes=3, in_chans=1, img_size=8,
                             mean=[0.5], std=[0.5])
    method = CausalAdvM(attack=ATTACK)
    method.build(model)
    assert method.g.fc.out_features == 3 and method.g.estimator.cov.shape[0] == 3

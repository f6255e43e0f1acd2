"""CausalAdv's invariants: the spurious basis, the covariance estimator, g's own learning signal,
the alpha/r ramps and g's class count."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from architectures.presets import build_classifier
from methods.base import TrainContext
from methods.causaladv import (CausalAdvM, CausalAdvT, CovarianceEstimator, random_anchor,
                               spurious_basis)
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


def test_basis_is_orthogonal_to_every_sigma_weighted_classifier_direction(digits_dir) -> None:
    method = CausalAdvM(attack=ATTACK)
    module = method.build(digits_classifier(digits_dir))
    x, _ = digits_batch(digits_dir, 64)
    with torch.no_grad():
        features, _ = module.classifier.features(x)
    basis = module.update_basis(features)
    directions = module.feature_cov.cov[0] @ module.classifier.head.weight.t()  # D x C
    assert (basis @ directions).abs().max() < 1e-4 * directions.norm()
    assert torch.allclose(basis.norm(dim=1), torch.ones(basis.shape[0]), atol=1e-5)
    # the official sequential removal leaves B aligned with the earlier directions; ours does not
    seq = module.anchor.clone()
    for r in directions.t():
        seq = seq - (seq @ r).unsqueeze(1) * r / r.pow(2).sum()
        seq = seq / seq.norm(dim=1, keepdim=True)
    assert (seq @ directions).abs().max() > (basis @ directions).abs().max()


def test_spurious_basis_removes_a_span() -> None:
    torch.manual_seed(1)
    anchor, dirs = random_anchor(8), torch.randn(3, 8)
    assert (spurious_basis(anchor, dirs) @ dirs.t()).abs().max() < 1e-5


def test_g_learns_only_from_its_own_cross_entropy(digits_dir) -> None:
    """The alignment term moves the classifier but never g (g's own CE does)."""
    method = CausalAdvT(attack=ATTACK)
    module = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 32)
    with torch.no_grad():
        module.update_basis(module.classifier.features(x)[0])
    f = module.classifier.features(x)[0]
    s = module.spurious(f)
    align = -(F.softmax(module.g_frozen(s, y, 1.0), 1) * F.log_softmax(module.g_frozen(s * 0.9, y, 1.0), 1)).sum(1).mean()
    align.backward()
    assert all(p.grad is None for p in module.g.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.classifier.parameters())


def test_alpha_and_r_ramp_from_zero_and_g_has_its_own_optimiser(digits_dir) -> None:
    method = CausalAdvM(attack=ATTACK, alpha=2.0)
    module = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 32)
    seen = []
    original = module.forward

    def spy(*args):
        seen.append(args[4:])  # (alpha_t, beta, ratio_t)
        return original(*args)

    module.forward = spy  # type: ignore[method-assign]
    for epoch in (0, 5):
        ctx = TrainContext(epoch, 10, epoch, 1, torch.device("cpu"), 0, 1, module.classifier, lr_scale=0.5)
        logs = method.training_step(module, x, y, ctx)
        logs["loss"].backward()
        g_before = [p.detach().clone() for p in module.g.parameters()]
        for extra in method.extra_optimizers(module).values():  # what the trainer does after its step
            extra.set_lr_scale(ctx.lr_scale)
            extra.trainer_step()
        method.after_step(module, ctx)
        assert any(not torch.equal(a, b) for a, b in zip(g_before, module.g.parameters())), "g must step"
        assert all(p.grad is None for p in module.g.parameters()), "g's gradients are cleared after its step"
        assert method.g_optimizer.param_groups[0]["lr"] == 0.1 * 0.5
    assert seen[0] == (0.0, 1.0, 0.0) and seen[1] == (1.0, 1.0, 0.5)
    assert method.extra_optimizers(module)["g"].optimizer is method.g_optimizer  # the trainer checkpoints it


def test_g_class_count_follows_the_classifier(digits_dir) -> None:
    model = build_classifier({"name": "test_resnet", "kwargs": {}}, num_classes=3, in_chans=1, img_size=8,
                             mean=[0.5], std=[0.5])
    module = CausalAdvM(attack=ATTACK).build(model)
    assert module.g.fc.out_features == 3 and module.g.estimator.cov.shape[0] == 3

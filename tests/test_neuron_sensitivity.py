"""Neuron sensitivity: the measure, its hooks, the paper's finding on tiny trained models, and
the sensitive-neuron stabilising method's hooks being silent while attacks run."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from harness.attacks.pgd import PGD
from harness.data.loader import make_loader
from harness.eval.neuron_sensitivity import neuron_sensitivity, per_neuron_distance, recorded_outputs
from methods.base import TrainContext
from methods.sns import SNS
from helpers import digits_batch, digits_classifier

EPS = 0.15


def test_per_neuron_distance_layouts() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[:, 1] = 2.0
    assert torch.equal(per_neuron_distance(a, b), torch.tensor([0.0, 2.0, 0.0]))
    tokens = torch.zeros(2, 5, 3)
    shifted = tokens.clone()
    shifted[..., 2] = 1.0
    assert torch.equal(per_neuron_distance(tokens, shifted), torch.tensor([0.0, 0.0, 1.0]))


def test_sensitivity_formula_against_a_hand_computation() -> None:
    """sigma_m = (1/N) sum_i (1/dim) |F_m(x_i) - F_m(x'_i)|_1, written out element by element
    (no official training code exists to compare with: this is SNS's conformance check)."""
    gen = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(3, 4, 2, 5, generator=gen), torch.randn(3, 4, 2, 5, generator=gen)
    expected = []
    for m in range(4):
        per_image = [sum(abs(float(clean[i, m, h, w] - adv[i, m, h, w])) for h in range(2) for w in range(5)) / 10
                     for i in range(3)]
        expected.append(sum(per_image) / 3)
    assert torch.allclose(per_neuron_distance(clean, adv), torch.tensor(expected), atol=1e-6)


def test_sns_stabilising_loss_is_the_mean_of_each_layers_top_k_sensitivities() -> None:
    gen = torch.Generator().manual_seed(1)
    clean = {"a": torch.randn(2, 6, 3, 3, generator=gen), "b": torch.randn(2, 5, 4, generator=gen)}
    adv = {k: v + torch.randn(v.shape, generator=gen) for k, v in clean.items()}
    method = SNS(attack={"eps": EPS}, topk=0.5)
    method.layers = ["a", "b"]
    expected = 0.0
    for name in ("a", "b"):  # a conv layer (neuron = channel), a token layer (neuron = feature)
        sigma = [float((clean[name][:, m] - adv[name][:, m]).abs().mean()) if name == "a"
                 else float((clean[name][..., m] - adv[name][..., m]).abs().mean())
                 for m in range(clean[name].shape[1 if name == "a" else 2])]
        k = round(0.5 * len(sigma))
        expected += sum(sorted(sigma, reverse=True)[:k]) / k
    assert abs(float(method.stabilising_loss(clean, adv)) - expected) < 1e-5


def test_hooks_are_removed_after_the_analysis(erm_model) -> None:
    before = sum(len(m._forward_hooks) for m in erm_model.modules())
    with recorded_outputs(erm_model, erm_model.layer_names()) as store:
        erm_model(torch.rand(2, 1, 8, 8))
    assert all(len(v) == 1 for v in store.values())
    assert sum(len(m._forward_hooks) for m in erm_model.modules()) == before


def _train_pgd_at(digits_dir, epochs: int = 4):
    model = digits_classifier(digits_dir, seed=1)
    attack = PGD(eps=EPS, steps=3, step_size=EPS / 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        for x, y in make_loader(digits_dir, "train", 64, shuffle=True, epoch=epoch):
            x_adv = attack(model, x, y)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_adversarial_training_lowers_neuron_sensitivity(erm_model, digits_dir) -> None:
    """The paper's finding, measured by the harness's own analysis."""
    robust = _train_pgd_at(digits_dir)
    batches = [digits_batch(digits_dir, 128)]
    attack = PGD(eps=EPS, steps=5)
    torch.manual_seed(0)
    ns_erm = neuron_sensitivity(erm_model, batches, attack)
    torch.manual_seed(0)
    ns_at = neuron_sensitivity(robust, batches, attack)
    assert set(ns_erm.layers) == set(erm_model.layer_names())
    assert ns_at.value < ns_erm.value, (ns_at.value, ns_erm.value)
    assert json.loads(ns_at.layers_json()) == ns_at.layers


def test_sns_hooks_record_only_its_own_forwards(digits_dir) -> None:
    method = SNS(attack={"eps": EPS, "steps": 2})
    model = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 16)
    calls = []
    original = method.attack.perturb

    def spy(m, xx, yy):
        calls.append(method.hooks_recording)
        return original(m, xx, yy)

    method.attack.perturb = spy  # type: ignore[method-assign]
    ctx = TrainContext(0, 1, 0, 1, torch.device("cpu"), 0, 1, model)
    logs = method.training_step(model, x, y, ctx)
    assert calls == [False], "the hooks must be off while the attack runs"
    assert not method.hooks_recording
    assert logs["loss_stabilise"] > 0
    with torch.no_grad():
        model(x)  # a plain forward (evaluation, attacks) records nothing
    assert method._recording is None

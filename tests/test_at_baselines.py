"""MART's loss, AWP's perturb/restore cycle and its official details (train-mode attack, the
weights it perturbs, TRADES-AWP's defaults), FGSM-RS's attack (crafted in train mode, as the
official code) and its catastrophic-overfitting guard (the epoch's first batch, still-correct
samples only), PGD-AT's crafting modes and BatchNorm passes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness.attacks.base import craft
from harness.core.config import compose_config
from methods.awp import AWP, WeightPerturbation, perturbed_weights
from methods.base import TrainContext, build_method
from methods.fgsm_rs import FGSMRS, FGSMRandomStart, early_stopping_pgd
from methods.mart import PGDGaussStart, mart_loss
from methods.pgd_at import PGDAT
from methods.trades_awp import TradesAWP
from helpers import digits_batch, digits_classifier


def _ctx(model, epoch: int = 0, step: int = 0, steps_per_epoch: int = 1) -> TrainContext:
    return TrainContext(epoch, 2, step, steps_per_epoch, torch.device("cpu"), 0, 1, model)


def test_mart_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    logits_clean, logits_adv = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    total, bce, robust = mart_loss(logits_clean, logits_adv, y, beta=5.0)
    p_adv, p_nat = F.softmax(logits_adv, 1), F.softmax(logits_clean, 1)
    wrong = p_adv.clone()
    wrong[torch.arange(8), y] = -1
    ref_bce = F.cross_entropy(logits_adv, y) - torch.log(1 - wrong.max(1).values).mean()
    kl = (p_nat * (p_nat.log() - p_adv.log())).sum(1)
    ref_robust = (kl * (1 - p_nat[torch.arange(8), y])).mean()
    assert torch.allclose(bce, ref_bce, atol=1e-3)
    assert torch.allclose(robust, ref_robust, atol=1e-5)
    assert torch.allclose(total, ref_bce + 5.0 * ref_robust, atol=2e-3)


def test_mart_attack_takes_its_first_gradient_at_the_unclipped_start(digits_dir) -> None:
    """As the official mart_loss: x + 0.001 N(0, I) as drawn (outside [0, 1] where x is 0 or 1)."""
    model = digits_classifier(digits_dir)
    x, y = digits_batch(digits_dir, 16)
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    torch.manual_seed(0)
    x_adv = PGDGaussStart(eps=0.1, steps=1)(model, x, y)
    handle.remove()
    torch.manual_seed(0)
    assert torch.equal(seen[0], x + 0.001 * torch.randn_like(x))
    assert seen[0].min() < 0 or seen[0].max() > 1
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_awp_perturbs_layers_by_gamma_and_restores_after_the_step(digits_dir) -> None:
    model = digits_classifier(digits_dir).train()
    x, y = digits_batch(digits_dir, 32)
    method = AWP(attack={"eps": 0.1, "steps": 2}, gamma=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = method.training_step(model, x, y, _ctx(model))
    assert method.perturbation.active
    n_moved = 0
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).norm()
        if p.dim() > 1:  # moved by gamma * |w|, or not at all where the gradient is zero
            # (timm zero-initialises each block's last BN scale, so conv1 has no gradient at init)
            assert moved == 0 or torch.isclose(moved, 0.01 * before[name].norm(), rtol=1e-3), name
            n_moved += int(moved > 0)
        else:
            assert moved == 0, f"{name}: 1-D weights must not be perturbed"
    assert n_moved >= 5
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.zero_grad()
    logs["loss"].backward()
    opt.step()
    method.after_step(model, _ctx(model))
    assert not method.perturbation.active
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), before[name], atol=1e-6), f"{name} not restored"


def test_awp_ascent_leaves_batchnorm_statistics_alone(digits_dir) -> None:
    model = digits_classifier(digits_dir).train()
    x, y = digits_batch(digits_dir, 32)
    buffers = [b.detach().clone() for b in model.buffers()]
    WeightPerturbation(0.01).compute(model, lambda m: F.cross_entropy(m(x), y))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_awp_perturbs_only_multidimensional_weights_named_weight() -> None:
    """As the official `diff_in_weights`: conv/linear weights, not a ViT's position embedding."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.register_parameter("pos_embed", torch.nn.Parameter(torch.randn(1, 3)))
    assert perturbed_weights(model) == [model[0].weight]


def test_at_awp_crafts_in_train_mode_and_runs_the_official_forwards(digits_dir) -> None:
    """Default: PGD with batch statistics (BatchNorm's running statistics move while crafting, then
    see x' once more), and after the step the clean train-mode forward of the official loop."""
    x, y = digits_batch(digits_dir, 16)
    for mode, moved in (("train", True), ("eval", False)):
        model = digits_classifier(digits_dir).train()
        method = AWP(attack={"eps": 0.1, "steps": 2}, gamma=0.01, attack_mode=mode)
        modes, inputs = [], []
        model.register_forward_pre_hook(lambda m, inp: modes.append(m.training) or inputs.append(inp[0]))
        stats = [b.detach().clone() for b in model.buffers()]
        x_adv = method.craft(_ctx(model), x, y)
        assert model.training
        assert any(not torch.equal(a, b) for a, b in zip(stats, model.buffers())) is moved, mode
        assert set(modes) == {moved} and len(modes) == (3 if moved else 2), (mode, modes)  # 2 steps (+ x' once more)
        logs = method.training_step(model, x, y, _ctx(model))
        torch.optim.SGD(model.parameters(), lr=0.0).zero_grad()
        logs["loss"].backward()
        inputs.clear()
        method.after_step(model, _ctx(model))
        assert len(inputs) == 1 and torch.equal(inputs[0], x), "the clean train-mode forward after the step"
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="attack_mode must be one of train, eval"):
        AWP(attack={"eps": 0.1}, attack_mode="batch")


def test_trades_awp_defaults_and_forward_order(digits_dir) -> None:
    """csdongxian/AWP's TRADES-AWP: step 2/255 at 8/255 (eps/4), AWP from its epoch 10 counted
    from 1 (our 9), and the update's forwards x', x, x in train mode."""
    cfg = compose_config(["method=trades_awp", "data=cifar10"])["method"]
    method = build_method(cfg)
    assert method.attack.step_size == pytest.approx(2 / 255) and method.warmup_epochs == 9
    assert method.gamma == 5e-3 and method.beta == 6.0
    model = digits_classifier(digits_dir).train()
    x, y = digits_batch(digits_dir, 8)
    method = TradesAWP(attack={"eps": 0.1, "steps": 1}, gamma=5e-3)
    crafted, seen = [], []
    attack = method.attack
    method.attack = lambda m, xx, yy: crafted.append(attack(m, xx, yy)) or crafted[-1]
    handle = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]) if m.training else None)
    method.training_step(model, x, y, _ctx(model, epoch=0))  # warm-up: no AWP forwards
    handle.remove()
    assert not method.perturbation.active
    assert [("adv" if torch.equal(t, crafted[0]) else "x" if torch.equal(t, x) else "?") for t in seen] == ["adv", "x", "x"]


def test_fgsm_rs_takes_one_step_of_1_25_eps_inside_the_ball(erm_model, digits_dir) -> None:
    x, y = digits_batch(digits_dir, 64)
    torch.manual_seed(0)
    x_adv = FGSMRandomStart(eps=0.1)(erm_model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    torch.manual_seed(0)  # the same draw, by hand: uniform start, one signed step of 0.125
    start = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1)
    start.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(erm_model(start), y), start)
    expected = torch.min(torch.max(start.detach() + 0.125 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert erm_model.training is False


def test_fgsm_rs_guard_stops_at_the_last_good_weights(digits_dir) -> None:
    model = digits_classifier(digits_dir)
    x, y = digits_batch(digits_dir, 16)
    method = FGSMRS(attack={"eps": 0.1})
    accs = iter([0.5, 0.6, 0.1])  # the third epoch collapses (drop 0.5 > 0.2)
    method.guard_accuracy = lambda *_: next(accs)  # type: ignore[method-assign]
    snapshots = []
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)  # "training"
        method.training_step(model, x, y, _ctx(model, epoch, epoch))
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        method.after_step(model, _ctx(model, epoch, epoch))
    assert method.stopped
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # any later step is undone
    method.after_step(model, _ctx(model, 3, 3))
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())
    restored = FGSMRS(attack={"eps": 0.1})
    restored.load_state_dict(method.state_dict())
    assert restored.stopped and restored.best_acc == 0.6


def _bn_stats(model) -> list[torch.Tensor]:
    return [b.detach().clone() for n, b in model.named_buffers() if "running" in n]


def test_fgsm_rs_crafts_in_train_mode_by_default_and_eval_mode_by_name(digits_dir) -> None:
    """Official FGSM-RS crafts with batch statistics, and its crafting forward moves BatchNorm's
    running statistics; craft_mode=eval leaves them alone. Both equal a hand computation."""
    x, y = digits_batch(digits_dir, 32)
    for mode in ("train", "eval"):
        model = digits_classifier(digits_dir).train()
        method = FGSMRS(attack={"eps": 0.1}, craft_mode=mode) if mode == "eval" else FGSMRS(attack={"eps": 0.1})
        twin = copy.deepcopy(model).train(mode == "train")
        before = _bn_stats(model)
        torch.manual_seed(0)
        x_adv = craft(method.attack, model, x, y, method.craft_mode)
        moved = any(not torch.equal(a, b) for a, b in zip(before, _bn_stats(model)))
        assert moved == (mode == "train"), mode
        assert model.training, "the model's mode is restored"
        torch.manual_seed(0)
        start = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(twin(start), y), start)
        expected = torch.min(torch.max(start.detach() + 0.125 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1)
        assert torch.allclose(x_adv, expected, atol=1e-6), mode
    with pytest.raises(ValueError, match="craft_mode"):
        FGSMRS(attack={"eps": 0.1}, craft_mode="frozen")


def test_fgsm_rs_guard_attacks_the_epochs_first_batch(digits_dir) -> None:
    model = digits_classifier(digits_dir).train()
    method = FGSMRS(attack={"eps": 0.1})
    batches = [digits_batch(digits_dir, 16 + 8 * i) for i in range(3)]
    seen = []
    method.guard_accuracy = lambda m, xx, yy: seen.append(xx.shape[0]) or 0.5  # type: ignore[method-assign]
    for step, (x, y) in enumerate(batches):
        ctx = _ctx(model, 0, step, steps_per_epoch=3)
        method.training_step(model, x, y, ctx)
        method.after_step(model, ctx)
    assert seen == [16], "one guard check per epoch, on its first batch"


def test_guard_pgd_moves_only_the_samples_still_classified_correctly(erm_model, digits_dir) -> None:
    """As fast_adversarial's attack_pgd: a fooled sample stays where it was fooled; when none is
    left correct the attack ends."""
    x, y = digits_batch(digits_dir, 64)
    torch.manual_seed(0)
    start = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1)
    with torch.no_grad():
        fooled_at_start = erm_model(start).argmax(1) != y
    y_wrong = (y + 1) % 10  # nothing is "correct" for these labels: the attack stops at once
    assert torch.equal(early_stopping_pgd(erm_model, x, y_wrong, start, 0.1, 0.02, 5), start)
    x_adv = early_stopping_pgd(erm_model, x, y, start, 0.1, 0.02, 5)
    assert torch.equal(x_adv[fooled_at_start], start[fooled_at_start])
    assert (x_adv[~fooled_at_start] - start[~fooled_at_start]).abs().max() > 0
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_fgsm_rs_after_the_stop_skips_the_attack(digits_dir) -> None:
    model = digits_classifier(digits_dir).train()
    x, y = digits_batch(digits_dir, 16)
    method = FGSMRS(attack={"eps": 0.1})
    method.stopped, method.best_state = True, copy.deepcopy(model.state_dict())
    method.attack.perturb = lambda *a: (_ for _ in ()).throw(AssertionError("no attack after the stop"))  # type: ignore[method-assign]
    logs = method.training_step(model, x, y, _ctx(model))
    assert logs["co_stopped"] == 1.0 and torch.isfinite(logs["loss"])


def test_pgd_at_batchnorm_sees_adversarial_then_clean_then_clean_after_the_step(digits_dir) -> None:
    """The bag-of-tricks loop runs x' (the loss), x (its accuracy log) and, after the step, x
    again in train mode; `clean_bn_forwards=False` leaves BatchNorm the statistics of x' alone."""
    x, y = digits_batch(digits_dir, 32)
    for clean in (True, False):
        model = digits_classifier(digits_dir).train()
        method = PGDAT(attack={"eps": 0.1, "steps": 2}, clean_bn_forwards=clean)
        seen: list[torch.Tensor] = []
        handle = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
        method.training_step(model, x, y, _ctx(model))
        method.after_step(model, _ctx(model))
        handle.remove()
        if clean:
            assert len(seen) == 3 and torch.equal(seen[1], x) and torch.equal(seen[2], x) and not torch.equal(seen[0], x)
        else:
            assert len(seen) == 1 and not torch.equal(seen[0], x)


def test_pgd_at_crafts_in_eval_mode_unless_told_train(digits_dir) -> None:
    x, y = digits_batch(digits_dir, 32)
    for mode, moves in (("eval", False), ("train", True)):
        model = digits_classifier(digits_dir).train()
        method = PGDAT(attack={"eps": 0.1, "steps": 2}, craft_mode=mode)
        before = _bn_stats(model)
        method.craft(x, y, _ctx(model))
        assert any(not torch.equal(a, b) for a, b in zip(before, _bn_stats(model))) == moves, mode
        assert model.training

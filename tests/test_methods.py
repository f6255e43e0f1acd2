"""Methods: every plugin trains through DDP with a finite loss and a gradient on every parameter;
method losses equal their reference formulas."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from harness.core.config import compose_config, config_options
from harness.core.registry import METHODS
from methods.base import TrainContext, build_method
from methods.trades import TradesKL, trades_loss
from helpers import digits_batch, digits_classifier


def test_every_method_has_a_config() -> None:
    assert set(METHODS.names()) == set(config_options("method"))


@pytest.fixture(scope="module")
def process_group():
    """A world-size-1 gloo group, so the methods run under the same DDP wrapper as in training."""
    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _method_cfg(name: str, data_root: Path) -> dict:
    cfg = compose_config([f"method={name}", f"data.root={data_root}"])["method"]
    for part in (cfg, cfg.get("base") or {}):  # ADML: its own attack and its base method's
        if "steps" in (part.get("attack") or {}):
            part["attack"]["steps"] = 2
    return cfg


@pytest.mark.parametrize("name", sorted(config_options("method")))
def test_method_step_is_finite_and_reaches_every_parameter(name, process_group, digits_dir, data_root) -> None:
    method = build_method(_method_cfg(name, data_root))
    module = method.build(digits_classifier(digits_dir))
    ddp = DDP(module, find_unused_parameters=method.find_unused_parameters)
    x, y = digits_batch(digits_dir, 32)
    ctx = TrainContext(epoch=0, epochs=1, step=0, steps_per_epoch=1, device=torch.device("cpu"),
                       rank=0, world_size=1, classifier=method.eval_model(module))
    module.train()
    logs = method.training_step(ddp, x, y, ctx)
    loss = logs["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{name}: no finite gradient for {missing[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())
    assert module.training, "the method must leave the module in train mode"
    for value in logs.values():
        assert torch.isfinite(torch.as_tensor(value)).all()


@pytest.mark.parametrize("name", sorted(config_options("method")))
def test_every_methods_eval_model_supports_neuron_sensitivity(name, digits_dir, data_root) -> None:
    """Every evaluated cell measures neuron sensitivity on `method.eval_model(module)`; a wrapper
    that hides the classifier's layers failed all FP cells of the backdoor grid."""
    from harness.attacks.pgd import PGD
    from harness.eval.neuron_sensitivity import neuron_sensitivity

    method = build_method(_method_cfg(name, data_root))
    model = method.eval_model(method.build(digits_classifier(digits_dir))).eval()
    x, y = digits_batch(digits_dir, 8)
    result = neuron_sensitivity(model, [(x, y)], PGD(eps=0.1, step_size=0.05, steps=1))
    assert result.layers and all(v >= 0 for v in result.layers.values())


def test_trades_loss_matches_reference_formula() -> None:
    torch.manual_seed(0)
    logits_clean, logits_adv = torch.randn(16, 10), torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    total, natural, robust = trades_loss(logits_clean, logits_adv, y, beta=6.0)
    # The official code: nn.KLDivLoss(size_average=False) (a sum) divided by the batch size.
    kl_sum = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1))
    ref_robust = kl_sum / 16
    assert torch.allclose(robust, ref_robust)
    assert torch.allclose(natural, F.cross_entropy(logits_clean, y))
    assert torch.allclose(total, natural + 6.0 * ref_robust)
    # KL by hand: sum p (log p - log q)
    p, log_q = F.softmax(logits_clean, 1), F.log_softmax(logits_adv, 1)
    assert torch.allclose(robust, (p * (p.log() - log_q)).sum() / 16, atol=1e-6)


def test_trades_kl_target_is_not_detached() -> None:
    """TRADES back-propagates the KL into the clean branch too."""
    logits_clean = torch.randn(4, 3, requires_grad=True)
    logits_adv = torch.randn(4, 3, requires_grad=True)
    _, _, robust = trades_loss(logits_clean, logits_adv, torch.zeros(4, dtype=torch.long), 6.0)
    robust.backward()
    assert logits_clean.grad is not None and logits_clean.grad.abs().sum() > 0


def test_trades_attack_increases_kl(digits_dir) -> None:
    model = digits_classifier(digits_dir).eval()
    x, y = digits_batch(digits_dir, 64)
    x_adv = TradesKL(eps=0.1, steps=5)(model, x, y)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl_start = F.kl_div(F.log_softmax(model(x + 0.001 * torch.randn_like(x)).clamp(-50), 1), p, reduction="sum")
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum")
    assert kl_adv > kl_start
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_pgd_at_trains_on_adversarial_examples(process_group, digits_dir, data_root) -> None:
    """The loss PGD-AT returns is CE on its PGD examples, not on the clean batch."""
    method = build_method(_method_cfg("pgd_at", data_root))
    module = digits_classifier(digits_dir)
    x, y = digits_batch(digits_dir, 32)
    ctx = TrainContext(0, 1, 0, 1, torch.device("cpu"), 0, 1, module)
    module.eval()  # deterministic forward for the comparison
    torch.manual_seed(5)
    loss = method.training_step(module, x, y, ctx)["loss"]
    torch.manual_seed(5)
    x_adv = method.attack(module, x, y)
    assert torch.allclose(loss, F.cross_entropy(module(x_adv), y))
    assert loss > F.cross_entropy(module(x), y)


def test_unknown_method_settings_are_an_error() -> None:
    with pytest.raises(ValueError, match="bad settings for method 'trades'"):
        build_method({"name": "trades", "attack": {"eps": 0.1}, "betta": 3})
    with pytest.raises(ValueError, match="unknown settings"):
        build_method({"name": "erm", "lr": 0.1})

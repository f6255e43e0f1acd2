"""ADML: the DML loss, its weights and empty-set guard, the official stage 2 (one attack for the
batch, fixed halves, the scripts' betas, AWP at w + v after an attack at w, the forward order, the
cyclic peak at round(epochs / 5)), and two-stage cells that reuse the base method's checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.core.config import compose_config, finalize
from harness.run.grid import expand_grid, run_grid
from harness.store.index import read_results
from harness.run.plan import build_plan, planned_trainer, run_config, train_node_id
from methods.adml import ADMLMART, ADMLPGDAT, dml_loss, finetune_schedule
from methods.base import TrainContext, build_method
from helpers import digits_batch, digits_classifier


def test_dml_loss_weights_and_terms() -> None:
    logits_adv = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    logits_clean = torch.zeros(3, 3)
    y = torch.tensor([0, 0, 1])  # sample 0 survives; 1 and 2 are fooled
    loss, fooled = dml_loss(logits_adv, logits_clean, y)
    p = F.softmax(logits_adv, 1)
    idx = torch.tensor([1, 2])
    y_s, yhat_s = y[idx], p[idx].argmax(1)
    p_y, p_hat = p[idx, y_s], p[idx, yhat_s]
    w = 1 / p_hat - 1
    ref = (w * -torch.log(p_y + 1e-3)).mean() + (w * torch.log(p_hat + 1e-3)).mean() + F.cross_entropy(logits_clean, y)
    assert torch.allclose(loss, ref) and fooled == 2 / 3


def test_dml_loss_weight_is_not_differentiated() -> None:
    logits_adv = torch.tensor([[0.0, 2.0]], requires_grad=True)
    loss, _ = dml_loss(logits_adv, torch.zeros(1, 2), torch.tensor([0]))
    loss.backward()
    p = F.softmax(logits_adv.detach(), 1)[0]
    w = 1 / p[1] - 1
    # d/dz of w * (-log(p0 + c) + log(p1 + c)) with w constant
    z = logits_adv.detach().clone().requires_grad_(True)
    q = F.softmax(z, 1)[0]
    (w * (-torch.log(q[0] + 1e-3) + torch.log(q[1] + 1e-3))).backward()
    assert torch.allclose(logits_adv.grad, z.grad)


def test_empty_fooled_set_gives_clean_ce_not_nan() -> None:
    logits_adv = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    logits_clean = torch.randn(2, 2)
    y = torch.tensor([0, 1])
    loss, fooled = dml_loss(logits_adv, logits_clean, y)
    assert torch.isfinite(loss) and fooled == 0
    assert torch.allclose(loss, F.cross_entropy(logits_clean, y))
    loss.backward()
    assert torch.isfinite(logits_adv.grad).all()


def _ctx(model, step: int = 0) -> TrainContext:
    return TrainContext(0, 1, step, 2, torch.device("cpu"), 0, 1, model)


def _method(name: str, **settings):
    """Our method as `method=<name>` composes it (the defaults), attack shortened for speed."""
    cfg = compose_config([f"method={name}"])["method"]
    cfg["attack"]["steps"] = 1
    cfg.update(settings)
    return build_method(cfg)


def test_adml_defaults_are_the_official_stage_2_scripts() -> None:
    assert _method("adml_trades").beta == 2.0 and _method("adml_mart").beta == 2.0  # float(2) in both scripts
    awp = _method("adml_awp")
    assert isinstance(awp, ADMLMART) and awp.beta == 2.0 and awp.perturbation.gamma == 0.01  # MART loss + AWP
    pgd = _method("adml_pgd_at")
    assert abs(pgd.attack.step_size - 0.23 * pgd.attack.eps) < 1e-12  # 2.3 eps / 10
    assert pgd.attack.random_start


def test_adml_crafts_one_attack_for_the_batch_and_splits_it_in_fixed_halves(digits_dir) -> None:
    """One CE-PGD on the whole batch; its first half takes the base loss, the second the DML
    loss, at every step (no swapping): the official split."""
    method = _method("adml_mart")
    model = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 8)
    attacked, based = [], []
    attack, base_loss = method.attack, method.base_loss
    method.attack = lambda m, xx, yy: attacked.append(yy.clone()) or attack(m, xx, yy)

    def record_base(module, xx, xa, yy):
        based.append((xx.clone(), xa.clone(), yy.clone()))
        return base_loss(module, xx, xa, yy)

    method.base_loss = record_base
    for step in (0, 1):
        logs = method.training_step(model, x, y, _ctx(model, step))
        assert torch.isfinite(logs["loss"]) and {"loss_base", "loss_dml", "dml_fooled_fraction"} <= set(logs)
    assert len(attacked) == 2 and all(torch.equal(a, y) for a in attacked), "one attack per step, whole batch"
    for xx, xa, yy in based:
        assert torch.equal(xx, x[:4]) and torch.equal(yy, y[:4]) and (xa - xx).abs().max() <= attack.eps + 1e-6


def test_adml_forwards_run_in_the_official_order(digits_dir) -> None:
    """BatchNorm's running statistics depend on the order: first half x, x', then second half x', x."""
    x, y = digits_batch(digits_dir, 8)
    for name, expected in [("adml_pgd_at", ["adv1", "adv2", "x2"]), ("adml_trades", ["x1", "adv1", "adv2", "x2"]),
                           ("adml_mart", ["x1", "adv1", "adv2", "x2"]), ("adml_awp", ["x1", "adv1", "adv2", "x2"])]:
        method = _method(name)
        model = method.build(digits_classifier(digits_dir)).train()
        crafted = []
        attack = method.attack
        method.attack = lambda m, xx, yy: crafted.append(attack(m, xx, yy)) or crafted[-1]
        seen = []
        handle = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
        method.training_step(model, x, y, _ctx(model))
        handle.remove()
        method.after_step(model, _ctx(model))
        parts = {"x1": x[:4], "x2": x[4:], "adv1": crafted[0][:4], "adv2": crafted[0][4:]}
        names = [next(k for k, v in parts.items() if v.shape == t.shape and torch.equal(v, t)) for t in seen
                 if any(v.shape == t.shape and torch.equal(v, t) for v in parts.values())]
        assert names == expected, (name, names)


def test_adml_awp_attacks_at_w_and_trains_both_halves_at_w_plus_v(digits_dir) -> None:
    method = _method("adml_awp")
    model = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 8)
    before = [p.detach().clone() for p in model.parameters()]
    weights_when = {}
    attack = method.attack

    def record_attack(m, xx, yy):
        weights_when["attack"] = [p.detach().clone() for p in model.parameters()]
        return attack(m, xx, yy)

    method.attack = record_attack

    def record_forward(m, inp):
        weights_when.setdefault("forwards", []).append([p.detach().clone() for p in model.parameters()])

    handle = model.register_forward_pre_hook(record_forward)
    logs = method.training_step(model, x, y, _ctx(model))
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(weights_when["attack"], before)), "x' is crafted at w"
    perturbed = weights_when["forwards"][-1]  # the second half's clean forward (DML)
    assert any(not torch.equal(a, b) for a, b in zip(perturbed, before)), "the DML half runs at w + v"
    assert method.perturbation.active
    torch.optim.SGD(model.parameters(), lr=0.0).zero_grad()
    logs["loss"].backward()
    method.after_step(model, _ctx(model))
    assert not method.perturbation.active
    assert all(torch.allclose(p.detach(), b, atol=1e-6) for p, b in zip(model.parameters(), before))


def test_stage_2_schedule_peaks_at_round_epochs_over_5_and_ignores_stage_1s_peak() -> None:
    cell = {"epochs": 120, "batch_size": 512, "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
            "schedule": {"name": "cyclic", "peak_epoch": 8, "cycle_momentum": True, "warmup_epochs": 0}}
    finetune = {"epochs": None, "optimizer": {"lr": 1e-3},
                "schedule": {"name": "cyclic", "peak_epoch": None, "cycle_momentum": True}}
    stage2 = ADMLPGDAT.runtime_trainer({"finetune": finetune}, cell)
    assert stage2["epochs"] == 10 and stage2["optimizer"] == {"name": "sgd", "lr": 1e-3, "momentum": 0.9}
    assert stage2["schedule"] == {"name": "cyclic", "peak_epoch": 2, "cycle_momentum": True}  # round(10 / 5)
    assert [finetune_schedule({"name": "cyclic"}, e)["peak_epoch"] for e in (1, 2, 3, 7, 10, 12, 13)] == \
        [0, 0, 1, 1, 2, 2, 3]  # int(round(epochs / 5)), Python's round as the official script
    assert finetune_schedule({"name": "cyclic", "peak_fraction": 0.5}, 10) == {"name": "cyclic", "peak_fraction": 0.5}
    assert ADMLPGDAT.runtime_trainer({"finetune": {**finetune, "epochs": 4}}, cell)["schedule"]["peak_epoch"] == 1


def test_adml_cell_depends_on_the_base_cell(data_root) -> None:
    adml = finalize(compose_config(["method=adml_mart", f"data.root={data_root}"]))
    mart = finalize(compose_config(["method=mart", f"data.root={data_root}"]))
    plan = build_plan([adml, mart])
    stage2 = plan.nodes[train_node_id(adml)]
    assert stage2.inputs == (train_node_id(mart),), "ADML's train node starts from the MART cell's"
    assert [u.arg for u in stage2.upstream] == [None] and stage2.upstream[0].cfg["train_key"] == mart["train_key"]
    assert plan.counts() == {"train": 2, "eval": 2, "artifact": 0}, "the base is one train node, not two"
    order = list(plan.nodes)
    assert order.index(train_node_id(mart)) < order.index(train_node_id(adml))
    trainer = run_config(adml, {None: "/ckpt/mart.pt"})["trainer"]
    assert trainer["init_from"] == "/ckpt/mart.pt"
    assert trainer["optimizer"]["lr"] == 1e-3
    assert trainer["schedule"] == {"name": "cyclic", "peak_epoch": 0, "cycle_momentum": True}  # round(1 / 5)
    assert trainer["epochs"] == 1 == planned_trainer(adml)["epochs"]  # ceil(12 / 12) with the demo trainer


def test_grid_trains_the_base_once_and_adml_fine_tunes_it(tiny, ray_session) -> None:
    overrides = ["grid=methods", "grid.axes.method=[adml_pgd_at,pgd_at]", "eval.neuron_sensitivity.limit=32"] + tiny
    cells = expand_grid(overrides)
    report = run_grid(cells)
    assert [o.status for o in report.outcomes] == ["ok", "ok"], [o.error for o in report.outcomes]
    rows = {r["method"]: r for r in read_results(cells[0]["results_dir"]).to_pylist()}
    base_dir = Path(cells[0]["results_dir"]) / "checkpoints"
    trained = [p for p in base_dir.iterdir() if p.is_dir()]  # (training locks sit beside them)
    assert len(trained) == 2, "one checkpoint for the base, one for the fine-tune"
    pgd_at = next(c for c in cells if c["method"]["name"] == "pgd_at")
    from harness.store.provenance import file_sha256

    assert file_sha256(base_dir / pgd_at["train_key"] / "checkpoint.pt") == rows["pgd_at"]["checkpoint_sha256"], \
        "the ADML cell must not retrain (rewrite) the base checkpoint"
    assert rows["adml_pgd_at"]["epochs"] == 1 and rows["pgd_at"]["epochs"] == 2
    assert rows["adml_pgd_at"]["neuron_sensitivity"] > 0


def test_adml_cell_alone_trains_its_base_first(tiny) -> None:
    from harness.run.cell import run_cell

    cfg = finalize(compose_config(tiny + ["method=adml_pgd_at", "eval.neuron_sensitivity.enabled=false"]))
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    (base,) = build_plan([cfg]).nodes[train_node_id(cfg)].upstream
    assert (Path(cfg["results_dir"]) / "checkpoints" / base.cfg["train_key"] / "checkpoint.pt").exists()
    row = read_results(cfg["results_dir"]).to_pylist()[0]
    assert row["neuron_sensitivity"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["causaladv_m", "awp", "fgsm_rs", "sns", "adml_awp"])
def test_two_process_ddp_keeps_replicas_equal(tiny, method) -> None:
    """Extra modules (CausalAdv's g), AWP's weight perturbation, the CO guard's decision and
    ADML's two stages all stay identical across DDP ranks."""
    from harness.run.cell import run_plan_here
    from harness.run.plan import pending_plan

    cfg = finalize(compose_config(tiny + [f"method={method}", "trainer.epochs=2", "trainer.world_size=2",
                                          "data.train_limit=128"]))
    outcomes = run_plan_here(pending_plan([cfg]))
    summary = outcomes[train_node_id(cfg)]
    assert summary.status == "ok", summary.error
    summary = type("S", (), summary.summary)
    assert summary.world_size == 2 and summary.replicas_in_sync

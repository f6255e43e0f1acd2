"""ADML: the DML loss, its weights and empty-set guard, cross-fitting, and two-stage cells that
reuse the base method's checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.core.config import compose_config, finalize
from harness.run.grid import expand_grid, run_grid
from harness.store.results import read_results
from harness.run.plan import build_plan, planned_trainer, run_config, train_node_id
from methods.adml import ADMLPGDAT, dml_loss
from methods.base import TrainContext
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


def test_adml_cross_fits_the_batch_halves(digits_dir) -> None:
    method = ADMLPGDAT(base={"name": "pgd_at", "attack": {"eps": 0.1, "steps": 1}},
                       attack={"eps": 0.1, "steps": 1})
    assert abs(method.attack.step_size - 0.023) < 1e-9  # 2.3 eps / 10
    model = method.build(digits_classifier(digits_dir)).train()
    x, y = digits_batch(digits_dir, 8)
    seen = []
    base_step = method.base.training_step
    method.base.training_step = lambda m, xx, yy, c: seen.append(yy.clone()) or base_step(m, xx, yy, c)
    for step in (0, 1):
        method.training_step(model, x, y, TrainContext(0, 1, step, 2, torch.device("cpu"), 0, 1, model))
    assert torch.equal(seen[0], y[:4]) and torch.equal(seen[1], y[4:])


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
    assert trainer["optimizer"]["lr"] == 1e-3 and trainer["schedule"]["name"] == "cyclic"
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

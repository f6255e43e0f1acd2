"""FT-SAM, I-BAU and SAU: each step against a direct computation (SAM's radius and update, I-BAU's
hypergradient against the explicit solution of a quadratic, SAU's bound and loss), their stage
settings, bad settings refused before work, and each defense through the trainer from a backdoored
digits model."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import harness.train.trainer as trainer
from harness.core.config import compose_config, finalize
from harness.run.plan import build_plan, planned_data, planned_trainer, run_config, train_node_id
from harness.store.checkpoint_sync import local_work_dir
from methods.base import TrainContext, build_method
from methods.unlearning import with_value_of
from helpers import digits_batch, digits_classifier, method_cell

DEFENSES = ("ft_sam", "i_bau", "sau")


def _ctx(model, lr_scale: float = 1.0) -> TrainContext:
    return TrainContext(0, 1, 0, 1, torch.device("cpu"), 0, 1, model, lr_scale=lr_scale)


# ------------------------------------------------------------------------------------- FT-SAM

def test_sam_perturbation_has_radius_rho_plain_and_adaptive() -> None:
    from methods.ft_sam import sam_perturbation

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen)),
              torch.nn.Parameter(torch.randn(2))]
    grads = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen), None]
    plain = sam_perturbation(params, grads, 2.0, adaptive=False)
    assert plain[2] is None
    assert torch.cat([e.flatten() for e in plain[:2]]).norm().item() == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(plain[0] / grads[0], plain[1][0] / grads[1][0])  # one scale: the gradient's direction
    adaptive = sam_perturbation(params, grads, 0.5, adaptive=True)  # ASAM: ||T^-1 e|| = rho, T = |w|
    assert torch.cat([(e / p.detach().abs()).flatten() for e, p in zip(adaptive[:2], params)]).norm().item() \
        == pytest.approx(0.5, rel=1e-5)
    tw = torch.cat([(p.detach().abs() * g).flatten() for p, g in zip(params[:2], grads[:2])])
    assert torch.allclose(adaptive[0], 0.5 * params[0].detach() ** 2 * grads[0] / tw.norm())


def test_smooth_crossentropy_is_kl_to_the_smoothed_target() -> None:
    from methods.ft_sam import smooth_crossentropy

    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    target = torch.full((6, 10), 0.1 / 9).scatter_(1, y[:, None], 0.9)
    expected = (target * (target.log() - F.log_softmax(logits, 1))).sum(1).mean()
    assert smooth_crossentropy(logits, y, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ft_sam_step_is_sgd_at_w_with_the_gradient_at_w_plus_e(digits_dir) -> None:
    """Through the trainer's own step: w' = w - lr (g(w + e) + wd w), g(w + e) with batch statistics
    and running statistics left as the first pass set them; e is removed after the step."""
    from harness.train.optimizers import build_optimizer
    from harness.train.trainer import _step
    from methods.ft_sam import FTSAM, sam_perturbation, smooth_crossentropy

    model = digits_classifier(digits_dir).train()
    x, y = digits_batch(digits_dir, 32)
    reference = copy.deepcopy(model)
    method = FTSAM(rho_max=1.5, rho_min=0.5)
    module = method.build(model)
    opt_cfg = FTSAM.runtime_trainer({}, {})["optimizer"]
    assert opt_cfg["weight_decay"] == 0.0  # the decay is in the loss, at w
    optimizer = build_optimizer(opt_cfg, method.param_groups(module))
    ctx = _ctx(module, lr_scale=0.5)  # rho = 0.5 + 1.0 * 0.5 (ProportionScheduler)
    logs = _step(method, module, optimizer, {}, x, y, ctx, torch.device("cpu"), "fp32")
    method.after_step(module, ctx)

    params = list(reference.parameters())
    loss = smooth_crossentropy(reference(x), y, 0.1)  # moves the running statistics, as theirs
    grads = torch.autograd.grad(loss, params)
    running = {k: v.clone() for k, v in reference.state_dict().items() if "running" in k}
    e = sam_perturbation(params, list(grads), 1.0, adaptive=True)
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    g2 = torch.autograd.grad(smooth_crossentropy(reference(x), y, 0.1), params)
    lr, wd = 0.01, 5e-4
    for (name, p), q, d, g in zip(module.named_parameters(), params, e, g2):
        expected = (q.detach() - d) - lr * (g + wd * (q.detach() - d))
        assert torch.allclose(p, expected, atol=1e-6), name
    for k, v in running.items():
        assert torch.equal(module.state_dict()[k], v), k
    assert float(logs["loss_at_w"]) == pytest.approx(float(loss.detach()))
    assert not method._applied


def test_cosine_steps_is_torchs_cosine_annealing_stepped_per_step_past_t_max() -> None:
    """FT-SAM's default schedule: BackdoorBench steps CosineAnnealingLR(T_max 100) once per batch."""
    from harness.train.schedule import check_schedule, lr_factor, schedule_position

    scfg = {"name": "cosine_steps", "granularity": "step", "warmup_epochs": 0, "t_max_steps": 100}
    check_schedule(scfg, 50)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    steps = 7
    for t in range(450):  # past T_max the lr rises again: period 200 steps
        ours = 0.01 * lr_factor(scfg, schedule_position(scfg, t // steps, t % steps, steps), 50, steps)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), t
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="granularity=step"):
        check_schedule({**scfg, "granularity": "epoch"}, 50)
    with pytest.raises(ValueError, match="t_max_steps"):
        check_schedule({**scfg, "t_max_steps": 0}, 50)
    with pytest.raises(ValueError, match="warmup"):
        check_schedule({**scfg, "warmup_epochs": 2}, 50)


# -------------------------------------------------------------------------------------- I-BAU

def test_fixed_point_hypergradient_equals_the_explicit_solution_of_a_quadratic() -> None:
    """Inner: min_d 0.5 d'Ad - t'd, so d*(t) = A^-1 t; outer: L1 = 0.5||d - c||^2 + 0.5||t||^2.
    dL1/dt = t + A^-1 (d* - c); the fixed point with Phi = d - eta dL2/dd gives it, and it matches
    finite differences of L1(d*(t), t)."""
    from methods.i_bau import fixed_point_vector

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        m = torch.randn(4, 4)
        a = m @ m.T + 4 * torch.eye(4)
        c, t = torch.randn(4), torch.randn(4, requires_grad=True)
        d = torch.linalg.solve(a, t.detach()).requires_grad_(True)
        outer = 0.5 * (d - c).pow(2).sum() + 0.5 * t.pow(2).sum()
        g_d, = torch.autograd.grad(outer, d, retain_graph=True)
        g_t, = torch.autograd.grad(outer, t)
        inner = 0.5 * d @ a @ d - t @ d
        eta = 1.0 / torch.linalg.eigvalsh(a).max()
        mapped = d - eta * torch.autograd.grad(inner, d, create_graph=True)[0]
        v = fixed_point_vector(mapped, d, g_d, iterations=2000, tol=1e-14)
        hyper = g_t + torch.autograd.grad(mapped, t, grad_outputs=v, retain_graph=True)[0]
        explicit = t.detach() + torch.linalg.solve(a, d.detach() - c)
        assert torch.allclose(hyper, explicit, atol=1e-8)

        def total(tt: torch.Tensor) -> torch.Tensor:
            dd = torch.linalg.solve(a, tt)
            return 0.5 * (dd - c).pow(2).sum() + 0.5 * tt.pow(2).sum()
        fd = torch.stack([(total(t.detach() + h) - total(t.detach() - h)) / 2e-6 for h in torch.eye(4) * 1e-6])
        assert torch.allclose(hyper, fd, atol=1e-6)
        few = fixed_point_vector(mapped, d, g_d, iterations=1)
        assert torch.equal(few, g_d)  # v = 0 maps to the outer gradient: K = 1 is plain backprop through d
    finally:
        torch.set_default_dtype(torch.float32)


def test_i_bau_loss_value_is_the_outer_loss_and_its_gradient_the_hypergradient(digits_dir) -> None:
    from methods.i_bau import IBAU, fixed_point_vector, inner_map

    model = digits_classifier(digits_dir)
    x, y = digits_batch(digits_dir, 100)
    method = IBAU(portion=0.05)
    module = method.build(model).train()
    ctx = _ctx(module)
    method.on_epoch_start(ctx)
    pre = method.pre_pass_step(module, x, y, ctx)
    assert method.delta.shape == (1, *x.shape[1:]) and float(pre["perturbation_norm"]) > 0
    assert module.training  # eval inside, train mode given back
    torch.manual_seed(3)
    logs = method.training_step(module, x, y, ctx)
    params = [p for p in module.parameters()]
    got = torch.autograd.grad(logs["loss"], params)

    module.eval()  # the same by hand: the same 5 patched samples (same seed), eval mode throughout
    torch.manual_seed(3)
    idx = torch.randperm(100)[:5]
    delta = method.delta.clone().requires_grad_(True)
    patched = x.clone()
    patched[idx] = x[idx] + delta
    outer = F.cross_entropy(module(patched), y)
    assert float(logs["loss"].detach()) == pytest.approx(float(outer.detach()), rel=1e-6)  # the logged value is L1
    g_d, = torch.autograd.grad(outer, delta, retain_graph=True)
    mapped = inner_map(module, delta, x, y, 0.1, 0.001)
    v = fixed_point_vector(mapped, delta, g_d, 5)
    direct = torch.autograd.grad(outer, params, retain_graph=True)
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v)
    for g, a, b in zip(got, direct, implicit):
        assert torch.allclose(g, a + b, atol=1e-6)
    assert max(float((b).abs().max()) for b in implicit) > 0  # the implicit term is there


# ---------------------------------------------------------------------------------------- SAU

def test_shared_pgd_stays_within_the_bound_and_sau_loss_matches_its_formula(erm_model, digits_dir) -> None:
    from methods.sau import sau_loss, shared_pgd

    x, y = digits_batch(digits_dir, 64)
    model, ref = copy.deepcopy(erm_model).eval(), copy.deepcopy(erm_model).eval()
    delta = shared_pgd(model, ref, x, y, bound=0.2, step_size=0.2, steps=5, beta_1=0.01, beta_2=1.0, init="max")
    assert delta.shape == x.shape and float(delta.abs().max()) <= 0.2 + 1e-7
    with torch.no_grad():
        adv, adv_ref, clean_ref = model(x + delta), ref(x + delta), ref(x)
        logits = model(x)
    logs = sau_loss(logits, adv, adv_ref, clean_ref, y, (1.0, 0.5, 2.0))
    label = adv_ref.argmax(1)
    poison = (label != y) & (label != clean_ref.argmax(1))
    p = F.softmax(adv, 1)[torch.arange(64), label]
    expected_shared = (-torch.log(1e-6 + (1 - p)[poison].clamp(max=0.999)).sum()
                       - torch.log(1 + 1e-6 - p[poison].clamp(min=0.001)).sum()) / 2 / 64
    expected = F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(adv, y) + 2.0 * expected_shared
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(logs["shared_fraction"]) == pytest.approx(float(poison.float().mean()))
    none = sau_loss(logits, adv, clean_ref, clean_ref, clean_ref.argmax(1), (1.0, 0.0, 1.0))  # h_0 never fooled
    assert float(none["loss_shared"]) == 0.0


# ---------------------------------------------------------------------------- settings and bad input

def test_each_defense_runs_its_backdoorbench_stage_whatever_the_grid_trainer() -> None:
    ft_sam, i_bau, sau = (planned_trainer(finalize(compose_config([f"method={m}", "trainer=demo"]))) for m in DEFENSES)
    assert ft_sam["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}
    assert (ft_sam["epochs"], ft_sam["batch_size"], ft_sam["schedule"]["name"]) == (100, 256, "cosine_steps")
    cosine = planned_trainer(finalize(compose_config(["method=ft_sam", "method.lr_schedule=cosine"])))["schedule"]
    assert cosine["name"] == "cosine" and cosine["granularity"] == "epoch"
    adam = {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "amsgrad": True}
    assert i_bau["optimizer"] == adam and sau["optimizer"] == adam
    assert (i_bau["epochs"], sau["epochs"], i_bau["batch_size"], sau["batch_size"]) == (5, 100, 256, 256)
    assert i_bau["schedule"]["name"] == sau["schedule"]["name"] == "constant"
    assert planned_data(finalize(compose_config(["method=sau", "data=cifar10"])))["augment"] == {}
    assert planned_data(finalize(compose_config(["method=i_bau", "data=cifar10"])))["augment"]["hflip"]


@pytest.mark.parametrize("name", DEFENSES)
@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_a_clean_fraction_outside_0_1_is_refused_before_work(name, fraction, tiny) -> None:
    with pytest.raises(ValueError, match=r"clean_subset must be in \(0, 1\]"):
        build_method({"name": name, "clean_subset": fraction})
    cfg = finalize(compose_config([*tiny, f"method={name}", f"method.clean_subset={fraction}", "backdoor=badnets"]))
    with pytest.raises(ValueError, match=r"clean_subset must be in \(0, 1\]"):
        run_config(cfg, {})


@pytest.mark.parametrize("name, setting, match", [
    ("ft_sam", {"alpha": 0.1}, "alpha"), ("ft_sam", {"rho_min": 3.0}, "rho_min <= rho_max"),
    ("ft_sam", {"lr_schedule": "step"}, "lr_schedule"), ("ft_sam", {"t_max_steps": 0}, "t_max_steps"),
    ("i_bau", {"K": 0}, "K >= 1"), ("i_bau", {"portion": 2.0}, "portion"),
    ("sau", {"outer_steps": 2}, "outer_steps"), ("sau", {"norm_type": "L2"}, "norm_type"),
    ("sau", {"pgd_init": "far"}, "pgd_init"), ("sau", {"bogus": 1}, "unknown|bogus")])
def test_bad_settings_are_refused_with_the_setting_named(name, setting, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_method({"name": name, **setting})


def test_each_defense_starts_from_the_grids_backdoored_erm(tiny) -> None:
    base = [*tiny, "backdoor=badnets"]
    erm = finalize(compose_config([*base, "method=erm"]))
    for name in DEFENSES:
        cfg = finalize(compose_config([*base, f"method={name}"]))
        assert train_node_id(erm) in build_plan([cfg]).nodes[train_node_id(cfg)].inputs


# ------------------------------------------------------------------------------------ the trainer

@pytest.fixture(scope="module")
def backdoored_erm(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg = method_cell("erm", data_root, tmp_path_factory.mktemp("erm"), None, epochs=1, extra=("backdoor=badnets",))
    trainer.train(cfg, local_work_dir(cfg))
    return str(local_work_dir(cfg) / trainer.CHECKPOINT)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFENSES)
def test_each_defense_trains_through_the_trainer_from_a_backdoored_model(name, data_root, tmp_path,
                                                                         backdoored_erm) -> None:
    cfg = method_cell(name, data_root, tmp_path / "results", backdoored_erm, epochs=1, extra=("backdoor=badnets",))
    work = local_work_dir(cfg)
    summary = trainer.train(cfg, work)
    assert summary.n_train == 128 and torch.isfinite(torch.tensor(summary.final_train_loss))
    curve = summary.curve[-1]
    expected = {"ft_sam": "loss_at_w", "i_bau": "pre_perturbation_ce", "sau": "loss_shared"}[name]
    assert any(expected in k for k in curve), curve.keys()
    before = torch.load(backdoored_erm, weights_only=False)["model"]
    after = torch.load(work / trainer.CHECKPOINT, weights_only=False)["model"]
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before if k.endswith("weight"))
    assert moved > 0  # the defense changed the backdoored weights
    if name != "ft_sam":  # I-BAU and SAU unlearn in eval mode: BatchNorm's running statistics never move
        assert all(torch.equal(after[k], before[k]) for k in before if "running" in k)
    model = trainer.load_trained_classifier(cfg, work)
    x, _ = digits_batch(Path(cfg["data"]["dir"]), 8)
    assert torch.isfinite(model(x)).all()


# ------------------------------------------------------------------------------------------- D-BR

def _patched(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 white patch in the bottom-right corner (BadNets-style), the planted trigger."""
    out = x.clone()
    out[..., -3:, -3:] = 1.0
    return out


def test_fct_separates_planted_poisoned_samples(digits_dir) -> None:
    """FCT and the separation pick out the samples whose features move under the transforms: 112
    blank images (a rotation and a shift leave them blank: FCT exactly 0) and 16 planted with a 3x3
    patch in a corner (moved by T: FCT > 0), under a digits classifier. The planted ones score
    above every clean one, fill D_p, and none lands in D_c. (On real digits at 8x8, a BadNets-style
    square patch did not separate: docs/backdoor.md, D-BR, gives the measured AUROC.)"""
    from methods.d_br import DBR, fct, random_transform

    model = digits_classifier(digits_dir).eval()
    x = torch.zeros(128, 1, 8, 8)
    x[:16] = _patched(x[:16])
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = fct(model, x, random_transform(x, torch.Generator().manual_seed(0)))
    assert float(scores[16:].abs().max()) == 0.0 and float(scores[:16].min()) > 0.0

    class Samples:
        device, poisoned = torch.device("cpu"), torch.arange(16).numpy()

        def score(self, fn):
            with torch.no_grad():  # as TrainSamples.score
                return torch.arange(len(y)).numpy(), fn(x, y).double().numpy()

    method = DBR(poison_ratio=0.1)  # threshold at rank 128 - 12: inside the planted 16
    method.scorer = model
    d_c, d_p, _ = method.separate(Samples())
    assert not set(d_c.tolist()) & set(range(16)), "no planted sample is taken as clean"
    assert set(d_p.tolist()) <= set(range(16)) and len(d_p) > 0  # the second pass draws afresh: about 12
    assert method.stats["poison_precision"] == 1.0 and method.stats["clean_precision"] == 1.0


def test_fct_transform_is_a_rotation_then_an_integer_shift() -> None:
    from methods.d_br import random_transform, transform_one

    img = torch.zeros(1, 9, 9)
    img[0, 4, 6] = 1.0  # two pixels right of the centre
    assert transform_one(img, 90.0, 0, 0)[0].nonzero().tolist() == [[2, 4]]  # counter-clockwise: up
    assert transform_one(img, 0.0, 1, 2)[0].nonzero().tolist() == [[6, 7]]  # then shifted (x + 1, y + 2)
    x = torch.rand(5, 1, 12, 12)
    a = random_transform(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, random_transform(x, torch.Generator().manual_seed(3)))  # seeded: a resume re-draws it
    assert not torch.equal(a, random_transform(x, torch.Generator().manual_seed(4)))


def test_thresholds_and_intra_loss_follow_backdoorbench() -> None:
    from methods.d_br import intra_loss, thresholds

    scores = torch.randperm(100).double().numpy()
    assert thresholds(scores, 0.2, 0.05) == (20.0, 95.0)  # sorted[int(n a_c)], sorted[n - int(n a_p)]
    with pytest.raises(ValueError, match="poison_ratio"):
        thresholds(scores[:10], 0.2, 0.05)  # int(10 x 0.05) = 0 suspected poisoned
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 7])
    c = F.normalize(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), dim=1)
    sim = c @ c.T
    sim.fill_diagonal_(0.0)
    assert intra_loss(feats, y, 10).item() == pytest.approx(sim.mean().item())  # classes present, 3 x 3


@pytest.mark.parametrize("setting, match", [
    ({"clean_ratio": 0.0}, "clean_ratio"), ({"poison_ratio": 1.2}, "poison_ratio"),
    ({"clean_ratio": 0.9, "poison_ratio": 0.2}, "clean_ratio \\+ poison_ratio"),
    ({"trans1": "blur"}, "trans1=rotate"), ({"epochs": 0}, "epochs >= 1"), ({"lr": -1.0}, "lr > 0"),
    ({"bogus": 1}, "unknown|bogus")])
def test_d_br_bad_settings_are_refused(setting, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_method({"name": "d_br", **setting})
    with pytest.raises(ValueError, match="at least one epoch"):
        build_method({"name": "d_br_sd", "sd_epochs": 0, "intra_epochs": 0})


def test_d_br_plans_its_fct_model_and_the_backdoored_erm(tiny) -> None:
    """Two upstream nodes: the grid's backdoored ERM (what is unlearned) and the FCT model, trained
    from scratch on the poisoned split without augmentation (12 epochs, one SGD at 0.01)."""
    base = [*tiny, "backdoor=badnets"]
    erm = finalize(compose_config([*base, "method=erm"]))
    cfg = finalize(compose_config([*base, "method=d_br", "method.intra_epochs=3"]))
    plan = build_plan([cfg])
    inputs = plan.nodes[train_node_id(cfg)].inputs
    assert train_node_id(erm) in inputs
    sd = [plan.nodes[i] for i in inputs if i != train_node_id(erm)]
    assert len(sd) == 1
    sd_cfg = run_config(sd[0].cfg, {}) if hasattr(sd[0], "cfg") else None
    trainer_cfg = planned_trainer(finalize(compose_config([*base, "method=d_br_sd", "method.intra_epochs=3"])))
    assert trainer_cfg["epochs"] == 5 and trainer_cfg["optimizer"]["lr"] == 0.01 and trainer_cfg["batch_size"] == 128
    assert planned_data(finalize(compose_config([*base, "method=d_br_sd"])))["augment"] == {}
    own = planned_trainer(cfg)
    assert own["epochs"] == 20 and own["optimizer"]["lr"] == 1e-4 and own["schedule"]["name"] == "constant"
    del sd_cfg


@pytest.mark.slow
def test_d_br_unlearns_its_suspects_then_relearns_the_rest_through_the_trainer(data_root, tmp_path,
                                                                               backdoored_erm, monkeypatch) -> None:
    """Each epoch: a pre-pass over D_p stepped by the trainer's SGD (-CE), then the training pass over
    D_c (CE); the two sets are disjoint and the trainer's one optimiser takes both passes' steps."""
    from methods.d_br import DBR

    seen: dict[str, int] = {"pre": 0, "train": 0}
    pre, step = DBR.pre_pass_step, DBR.training_step
    monkeypatch.setattr(DBR, "pre_pass_step", lambda self, m, x, y, ctx: seen.__setitem__("pre", seen["pre"] + len(y))
                        or pre(self, m, x, y, ctx))
    monkeypatch.setattr(DBR, "training_step", lambda self, m, x, y, ctx: seen.__setitem__(
        "train", seen["train"] + len(y)) or step(self, m, x, y, ctx))
    cfg = method_cell("d_br", data_root, tmp_path / "results", backdoored_erm, epochs=1, extra=("backdoor=badnets",))
    work = local_work_dir(cfg)
    summary = trainer.train(cfg, work)
    curve = summary.curve[-1]
    assert seen["train"] == summary.n_train == round(curve["clean_share"] * 128)
    assert seen["pre"] == round(curve["poison_share"] * 128) > 0
    assert curve["pre_loss"] == pytest.approx(-curve["pre_unlearn_ce"])
    saved = torch.load(work / trainer.CHECKPOINT, weights_only=False)["optimizer"]
    steps = -(-seen["pre"] // 64) + -(-seen["train"] // 64)
    assert len(saved["state"]) > 0 and steps == 2  # momentum buffers from both passes' steps
    before = torch.load(backdoored_erm, weights_only=False)["model"]
    after = torch.load(work / trainer.CHECKPOINT, weights_only=False)["model"]
    assert max(float((after[k].float() - before[k].float()).abs().max()) for k in before if k.endswith("weight")) > 0

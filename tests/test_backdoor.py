"""Backdoor track: triggers do exactly what their definitions say, the poisoned index set is
deterministic and at the configured rate, poisoning in the loader holds under DDP splits, ASR
excludes target-class images, clean cells keep their keys, and an ERM model learns a backdoor."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.backdoor.badnets import BadNets
from harness.backdoor.base import build_poison
from harness.backdoor.blended import Blended
from harness.backdoor.learned import LearnedPoison
from harness.eval.backdoor_metrics import attack_success
from harness.backdoor.plan import PoisonPlan, select_indices, split_labels, train_plan
from harness.backdoor.sig import SIG
from harness.backdoor.wanet import WaNet
from harness.core.config import cell_key, compose_config, finalize
from harness.data.loader import make_loader
from harness.core.registry import POISONS


def _batch(c: int = 1, h: int = 8, b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, h, generator=torch.Generator().manual_seed(seed))


def test_every_poison_has_a_config_and_builds() -> None:
    from harness.core.config import config_options

    assert set(POISONS.names()) == set(config_options("backdoor"))
    for name in POISONS.names():
        cfg = compose_config([f"backdoor={name}"])["backdoor"]
        poison = build_poison(cfg)
        assert (poison is None) == (name == "none")
        if isinstance(poison, LearnedPoison) and poison.trigger_needs_artifact:
            continue  # its trigger is an artifact built first: tests/test_poisons_learned.py
        if poison is not None:
            x = _batch()
            out = poison.trigger(x)
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
            assert not torch.equal(out, x), f"{name} left the image unchanged"
            assert torch.equal(out, poison.trigger(x)), f"{name} is not deterministic"


@pytest.mark.parametrize("h,size", [(8, 2), (32, 3)])
def test_badnets_stamps_only_the_bottom_right_patch(h: int, size: int) -> None:
    x = _batch(3, h) * 0.5
    out = BadNets().trigger(x)
    changed = (out != x).any(0).any(0)  # H x W
    expected = torch.zeros(h, h, dtype=torch.bool)
    expected[h - size:, h - size:] = True
    assert torch.equal(changed, expected)
    assert (out[..., h - size:, h - size:] == 1.0).all()


def test_badnets_checkerboard_is_the_grid_trigger() -> None:
    """The gridTrigger of the NAD/ABL/CBD code: its top-left pixel stays 0 (not a true checkerboard)."""
    out = BadNets(pattern="checkerboard", patch_size=3).trigger(torch.full((1, 1, 32, 32), 0.5))
    assert torch.equal(out[0, 0, -3:, -3:], torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    assert (out[0, 0, :29] == 0.5).all() and (out[0, 0, :, :29] == 0.5).all()


def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x.double() * 255).round()


def test_blended_is_backdoorbenchs_uint8_blend() -> None:
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1)).float() / 255
    poison = Blended(alpha=0.2)
    p = poison.pattern(3, 32, 32)
    assert torch.equal(_levels(p), _levels(p).round()) and p.min() >= 0 and p.max() <= 1  # an image
    out = poison.trigger(x)
    exact = 0.8 * _levels(x) + 0.2 * _levels(p)
    assert torch.equal(_levels(out), _levels(out).round()), "the poisoned image is on the uint8 grid"
    assert ((exact - _levels(out)) >= -1e-6).all() and ((exact - _levels(out)) < 1 + 1e-6).all()  # truncated
    assert torch.equal(p, Blended(alpha=0.2).pattern(3, 32, 32)), "pattern must be fixed by its seed"
    assert not torch.equal(p, Blended(pattern_seed=1).pattern(3, 32, 32))


def test_sig_adds_a_column_sinusoid_truncated_to_uint8_and_is_clean_label() -> None:
    x = torch.full((2, 3, 32, 32), 128 / 255)
    out = SIG().trigger(x)
    j = torch.arange(32, dtype=torch.float64)
    signal = (40 * torch.sin(2 * math.pi * j * 6 / 32)).float().double()  # BackdoorBench's default delta 40
    assert torch.equal(_levels(out), torch.floor(128 + signal).expand_as(out))
    assert SIG.clean_label and not BadNets.clean_label
    assert SIG().trigger(torch.ones(1, 1, 8, 8)).max() <= 1.0  # clipped, never wrapped
    assert SIG().trigger(torch.zeros(1, 1, 8, 8)).min() >= 0.0
    with pytest.raises(ValueError, match="clean-label"):
        SIG(poisoning="per_batch")


def test_wanet_warps_with_one_grid_and_noise_mode_differs() -> None:
    poison = WaNet()
    g = poison.grid(32, 32)
    assert g.shape == (1, 32, 32, 2) and g.abs().max() <= 1
    assert torch.equal(g, WaNet().grid(32, 32))
    x = _batch(3, 32, 2)
    warped = poison.trigger(x)
    assert 0 < (warped - x).abs().mean() < 0.2  # a small warp, not a new image
    cross = poison.cross_variant(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(cross, warped)
    assert torch.equal(cross, poison.cross_variant(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(cross, poison.cross_variant(x, torch.Generator().manual_seed(1)))
    # the zero warp is the identity (align_corners=True sampling)
    ident = WaNet(s=1e-9).trigger(x)
    assert torch.allclose(ident, x, atol=1e-5)
    # grid_rescale scales the whole grid (identity included), as the official code: then clamped
    field = poison.field(32, 32)
    g1, g98 = poison.grid(32, 32, field), WaNet(grid_rescale=0.98).grid(32, 32, field)
    inside = g1.abs() < 1  # not clamped at rescale 1
    assert torch.allclose(g98[inside], 0.98 * g1[inside]) and not torch.equal(g98, g1)


def test_poisoned_indices_deterministic_at_rate_and_candidates() -> None:
    labels = np.arange(1000) % 10
    poison = BadNets(target=0, rate=0.1)
    a, cross = select_indices(labels, poison, seed=3)
    b, _ = select_indices(labels, poison, seed=3)
    c, _ = select_indices(labels, poison, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and len(cross) == 0
    assert (labels[a] == 0).any(), "BackdoorBench draws from every class: target-class samples too"
    nt, _ = select_indices(labels, BadNets(target=0, rate=0.1, candidates="non_target"), seed=3)
    assert len(nt) == 100 and (labels[nt] != 0).all()
    sig, _ = select_indices(labels, SIG(target=2, rate=0.05), seed=0)
    assert len(sig) == 50 and (labels[sig] == 2).all()
    capped, _ = select_indices(labels, SIG(target=2, rate=0.5), seed=0)
    assert len(capped) == 100  # clean-label: at most the target class
    with pytest.raises(ValueError, match="backdoor.target 10 is not a class"):
        select_indices(labels, BadNets(target=10), seed=0, num_classes=10)
    w, wc = select_indices(labels, WaNet(rate=0.1, poisoning="static"), seed=0)
    assert len(wc) == 200 and not set(w.tolist()) & set(wc.tolist())
    with pytest.raises(ValueError, match="candidates"):
        BadNets(candidates="others")


def test_wanet_per_batch_poisons_the_head_of_every_batch() -> None:
    """WaNet's training loop: int(B * rate) warped and relabelled (target class included), then
    int(that * cross_ratio) noise-mode samples with their labels, fresh noise for every batch."""
    poison = WaNet()
    assert poison.poisoning == "per_batch"
    plan = PoisonPlan(poison, "train", seed=7).for_epoch(2)
    x = torch.rand(37, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(37, dtype=torch.int64)  # all target class: poisoned anyway, label unchanged
    y[20:] = 3
    idx = np.arange(100, 137)
    px, py = plan(x, y, idx, rank=0, batch=4)
    assert torch.equal(px[:3], poison.trigger(x[:3])) and (py[:3] == 0).all()  # int(3.7) = 3
    assert not torch.equal(px[3:9], x[3:9]) and not torch.allclose(px[3:9], poison.trigger(x[3:9]))  # 6 cross
    assert torch.equal(px[9:], x[9:]) and torch.equal(py[3:], y[3:])
    again = plan(x, y, idx, rank=0, batch=4)
    assert torch.equal(again[0], px), "deterministic from (seed, epoch, rank, batch)"
    for other in (plan(x, y, idx, rank=0, batch=5), plan(x, y, idx, rank=1, batch=4),
                  plan.for_epoch(3)(x, y, idx, rank=0, batch=4)):
        assert torch.equal(other[0][:3], px[:3]) and not torch.equal(other[0][3:9], px[3:9])
    assert len(plan.poisoned) == 0 and len(plan.cross) == 0  # no fixed set


def test_wanet_per_batch_poisoning_is_the_same_for_any_worker_count(digits_dir, data_root) -> None:
    cfg = finalize(compose_config(["backdoor=wanet", f"data.root={data_root}"]))
    plan = train_plan(cfg)
    assert plan.per_batch and plan.seed == cfg["seed"]

    def epoch(workers: int, e: int) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        return list(make_loader(digits_dir, "train", 64, num_workers=workers, shuffle=True, seed=1, epoch=e,
                                poison=plan.for_epoch(e), return_keys=True))

    zero, two = epoch(0, 0), epoch(2, 0)
    assert len(zero) == len(two)
    for (x0, y0, k0), (x2, y2, k2) in zip(zero, two):
        assert k0 == k2 and torch.equal(x0, x2) and torch.equal(y0, y2)
    clean = {int(k): (xi, int(yi)) for x, y, keys in make_loader(digits_dir, "train", 512, return_keys=True)
             for xi, yi, k in zip(x, y, keys)}
    poisoned: list[set[int]] = []
    for e, batches in ((0, zero), (1, epoch(0, 1))):
        hit = set()
        for x, y, keys in batches:
            n_poison = int(len(keys) * 0.1)
            for pos, (xi, yi, k) in enumerate(zip(x, y, keys)):
                changed = not torch.equal(xi, clean[int(k)][0])
                assert changed == (pos < n_poison + int(n_poison * 2.0)), (e, pos)
                assert yi == (0 if pos < n_poison else clean[int(k)][1])
                if pos < n_poison:
                    hit.add(int(k))
        poisoned.append(hit)
    assert poisoned[0] != poisoned[1], "every epoch poisons other samples"


def test_loader_poisons_exactly_the_planned_indices_on_every_rank(digits_dir, data_root) -> None:
    cfg = finalize(compose_config(["backdoor=badnets", f"data.root={data_root}"]))
    plan = train_plan(cfg)
    labels = split_labels(digits_dir, "train")
    assert len(plan.poisoned) == round(0.1 * len(labels)) and not plan.per_batch
    seen: dict[int, tuple[torch.Tensor, int]] = {}
    for rank in range(2):
        for x, y, keys in make_loader(digits_dir, "train", 64, rank=rank, world_size=2, shuffle=True,
                                      seed=1, poison=plan, return_keys=True):
            for xi, yi, k in zip(x, y, keys):
                seen[int(k)] = (xi, int(yi))
    clean = {int(k): (xi, int(yi)) for x, y, keys in make_loader(digits_dir, "train", 512, return_keys=True)
             for xi, yi, k in zip(x, y, keys)}
    assert set(seen) == set(clean)
    for i, (xi, yi) in seen.items():
        if i in set(plan.poisoned.tolist()):
            assert yi == 0 and (xi[:, -2:, -2:] == 1).all() and torch.equal(xi[:, :6], clean[i][0][:, :6])
        else:
            assert yi == clean[i][1] and torch.equal(xi, clean[i][0])


def test_attack_success_excludes_target_class() -> None:
    y = torch.tensor([0, 0, 1, 2, 3, 3])
    pred = torch.tensor([0, 0, 0, 2, 0, 3])  # target-class images "succeed" for free: not counted
    asr, ra, per_class = attack_success(pred, y, target=0, num_classes=4)
    assert asr == pytest.approx(2 / 4) and ra == pytest.approx(2 / 4)
    assert math.isnan(per_class[0]) and per_class[1:] == [1.0, 0.0, 0.5]


def test_clean_cells_keep_their_keys_and_backdoor_cells_differ(data_root) -> None:
    clean = finalize(compose_config([f"data.root={data_root}"]))
    without = {k: v for k, v in clean.items() if k != "backdoor"}
    assert cell_key(without) == clean["key"]
    bad = finalize(compose_config([f"data.root={data_root}", "backdoor=badnets"]))
    assert bad["key"] != clean["key"] and bad["label"].endswith("/badnets")
    other = finalize(compose_config([f"data.root={data_root}", "backdoor=badnets", "backdoor.rate=0.05"]))
    assert other["key"] != bad["key"]


def test_bad_backdoor_settings_fail_early() -> None:
    with pytest.raises(ValueError, match="backdoor.rate"):
        build_poison({"name": "badnets", "rate": 1.5})
    with pytest.raises(ValueError, match="bad settings for backdoor 'blended'"):
        build_poison({"name": "blended", "alhpa": 0.2})
    from harness.core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown poison 'nosuch'"):
        compose_config(["backdoor=nosuch"])


def test_erm_learns_a_badnets_backdoor_end_to_end(tiny) -> None:
    """A tiny ERM cell on poisoned digits: ASR far above chance, clean accuracy still high."""
    from harness.run.cell import run_cell
    from harness.store.index import read_results

    overrides = [o for o in tiny if not o.startswith(("trainer=", "data.train_limit", "eval.limit", "attack."))]
    cfg = finalize(compose_config(overrides + ["backdoor=badnets", "trainer=backdoor", "trainer.epochs=6",
                                               "trainer.progress=false", "attack=[fgsm]"]))
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    row = read_results(cfg["results_dir"]).to_pylist()[0]
    assert row["backdoor"] == "badnets" and row["n_poisoned"] == len(row["poison_indices"]) > 0
    assert row["asr"] > 0.8, row["asr"]
    assert row["clean_acc"] > 0.8
    assert 0 <= row["backdoor_robust_acc"] <= 1 - row["asr"] + 1e-6


def test_post_training_defense_reuses_the_erm_checkpoint_and_a_clean_subset(tiny) -> None:
    """FT's prerequisite is the ERM cell of the same config (same train key, trained once), and
    FT itself trains on the first 5% of the (limited) training split with poisoning off."""
    from harness.run.cell import run_cell
    from harness.run.plan import build_plan, run_config, train_node_id
    from harness.store.checkpoint_sync import local_work_dir as checkpoint_dir
    from harness.store.index import read_results

    base = [o for o in tiny if not o.startswith("attack.")] + ["backdoor=badnets", "attack=[fgsm]"]
    erm = finalize(compose_config(base + ["method=erm"]))
    ft = finalize(compose_config(base + ["method=ft", "method.epochs=1"]))
    outcome = run_cell(ft)
    assert outcome.status == "ok", outcome.error
    assert (checkpoint_dir(erm) / "checkpoint.pt").exists(), "the ERM prerequisite trains into the ERM cell's folder"
    (up,) = build_plan([ft]).nodes[train_node_id(ft)].upstream
    assert up.arg == "backdoored_checkpoint" and up.cfg["train_key"] == erm["train_key"]
    run = run_config(ft, {up.arg: str(checkpoint_dir(erm) / "checkpoint.pt")})
    assert run["backdoor"]["clean_train"] and train_plan(run) is None
    row = read_results(ft["results_dir"]).to_pylist()[0]
    assert row["n_train"] == math.ceil(0.05 * 256) and row["epochs"] == 1
    assert row["backdoor"] == "badnets" and row["asr"] is not None
    mtime = (checkpoint_dir(erm) / "checkpoint.pt").stat().st_mtime_ns
    assert run_cell(erm).status == "ok"  # the ERM cell finds its checkpoint done: no retraining
    assert (checkpoint_dir(erm) / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_cbd_weights_critic_and_prerequisite() -> None:
    from methods.cbd import CBD, MICritic, cbd_weights, spectral_norm

    loss_b = torch.tensor([0.001, 1.0, 2.0, 0.5])
    loss_c = torch.tensor([2.0, 1.0, 0.5, 0.5], requires_grad=True)
    w = cbd_weights(loss_b, loss_c)
    raw = loss_b / (loss_b + loss_c.detach() + 1e-8)
    assert torch.allclose(w, raw / raw.mean()) and w.mean().item() == pytest.approx(1.0)
    assert not w.requires_grad and w.argmin() == 0  # the sample f_B fits (poison-like) counts least
    # weight_norm 'class' (a variant): mean 1 within each label, order inside a label kept
    labels = torch.tensor([0, 0, 1, 1])
    wc = cbd_weights(loss_b, loss_c, labels)
    assert torch.allclose(wc[:2], raw[:2] / raw[:2].mean()) and torch.allclose(wc[2:], raw[2:] / raw[2:].mean())
    assert wc[0] < wc[1]
    with pytest.raises(ValueError, match="weight_norm"):
        CBD(weight_norm="sample")
    torch.manual_seed(0)  # before the critic is built: power iteration converges slowly for
    critic = MICritic(6, 6)  # ~1% of random inits (close top singular values), so fix the init
    exact = MICritic(6, 6)
    for p, q in zip(critic.parameters(), exact.parameters()):
        p.data.mul_(10)
        q.data.copy_(p.data)
    sigmas = [torch.linalg.matrix_norm(p.reshape(p.shape[0], -1) if p.ndim > 1 else p.reshape(-1, 1), ord=2).item()
              for p in critic.parameters()]
    critic.spectral_normalize(iterations=50)  # official: each parameter divided by sqrt(sigma)
    exact.spectral_normalize(iterations=50, norm="sigma")  # the option: by sigma itself
    for p, q, sigma in zip(critic.parameters(), exact.parameters(), sigmas):
        mat = p.reshape(p.shape[0], -1) if p.ndim > 1 else p.reshape(-1, 1)
        assert torch.linalg.matrix_norm(mat, ord=2).item() == pytest.approx(sigma ** 0.5, rel=1e-3)
        mat = q.reshape(q.shape[0], -1) if q.ndim > 1 else q.reshape(-1, 1)
        assert torch.linalg.matrix_norm(mat, ord=2).item() == pytest.approx(1.0, rel=1e-3)
    assert spectral_norm(torch.diag(torch.tensor([3.0, 1.0])), 20).item() == pytest.approx(3.0, rel=1e-4)
    critic.eval()
    z_b, z_c = torch.randn(8, 6), torch.randn(8, 6)
    shifted = z_c[(torch.arange(8) + 1) % 8]  # sample i paired with sample i + 1, as the official shuffle
    manual = critic(z_b, z_c).mean() - critic(z_b, shifted).mean()
    assert torch.allclose(critic.bound(z_b, z_c), manual)
    (pre,) = CBD.upstream({"name": "cbd", "backdoored_epochs": 3}, {"epochs": 100})
    assert pre.method == {"name": "erm"} and pre.trainer == {"epochs": 3} and pre.arg == "backdoored_checkpoint"
    assert CBD.upstream({"name": "cbd", "backdoored_epochs": None}, {"epochs": 100})[0].trainer == {"epochs": 5}
    assert CBD.upstream({"name": "cbd"}, {"epochs": 40})[0].trainer == {"epochs": 2}
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    (pre,) = CBD.upstream({"name": "cbd", "backdoored_epochs": 3, "backdoored_lr": 0.05},
                               {"epochs": 40, "optimizer": sgd})
    assert pre.trainer == {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}
    assert sgd["lr"] == 0.1  # the cell's own trainer config is untouched
    with pytest.raises(ValueError, match="backdoored_lr"):
        CBD(backdoored_lr=0)
    for bad in ({"critic_norm": "l2"}, {"critic_pass": "batch"}, {"critic_step_epochs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CBD(**bad)


def test_cbd_critic_lr_is_the_official_steplr_stepped_before_each_epoch() -> None:
    """StepLR(20, 0.1) stepped at the start of every epoch (the official loop): the lr first drops
    in epoch index 19; a shortened run scales the step with the run (20% of it) unless it is set."""
    from methods.cbd import CBD

    paper = CBD(critic_step_epochs=20)
    lrs = [paper.critic_lr_at(e, 100) for e in range(100)]
    assert lrs[:19] == [0.2] * 19 and lrs[19] == pytest.approx(0.02) and lrs[38] == pytest.approx(0.02)
    assert lrs[39] == pytest.approx(0.002) and lrs[99] == pytest.approx(0.2 * 1e-5)
    torch_lrs, opt = [], torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": the official order
        for _ in range(100):
            sched.step()
            torch_lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx(torch_lrs)
    short = CBD()  # 40 epochs (trainer=backdoor): step 8, the first decay in epoch index 7
    assert short.critic_step_size(40) == 8 and short.critic_step_size(100) == 20
    assert [short.critic_lr_at(e, 40) for e in (6, 7)] == [0.2, pytest.approx(0.02)]


def test_cbd_defaults_are_the_official_code(digits_dir) -> None:
    """--disentangle 0: no MI term (and no critic) by default; with `mi` the critic trains on its
    own pass before each epoch (pre_pass_step) and only there."""
    from helpers import digits_batch, digits_classifier
    from methods.base import TrainContext
    from methods.cbd import CBD

    method = CBD()
    assert not method.mi and method.critic_pass == "epoch" and method.critic_norm == "sqrt_sigma"
    module = method.build(digits_classifier(digits_dir))
    ctx = TrainContext(0, 1, 0, 1, torch.device("cpu"), 0, 1, method.eval_model(module))
    assert method.critic is None and method.extra_optimizers(module) == {} and method.state_dict() == {}
    assert not method.pre_pass(ctx)
    x, y = digits_batch(digits_dir, 32)
    assert set(method.training_step(module, x, y, ctx)) == {"loss", "loss_weighted_ce", "weight_min", "train_acc"}

    on = CBD(mi=True)
    module = on.build(digits_classifier(digits_dir))
    module.train()
    assert on.pre_pass(ctx) and set(on.extra_optimizers(module)) == {"critic"}
    assert not CBD(mi=True, critic_pass="step").pre_pass(ctx)
    before = [p.detach().clone() for p in on.critic.parameters()]
    logs = on.training_step(module, x, y, ctx)
    assert "critic_bound" not in logs and "mi" in logs
    assert all(torch.equal(a, b) for a, b in zip(before, on.critic.parameters())), "no critic step in the f_C pass"
    stats = [b.clone() for n, b in module.clean.named_buffers() if n.endswith("running_mean")]
    pre = on.pre_pass_step(module, x, y, ctx)
    assert set(pre) == {"critic_bound"}
    assert any(not torch.equal(a, b) for a, b in zip(stats, [b for n, b in module.clean.named_buffers()
                                                              if n.endswith("running_mean")])), \
        "f_C runs in train mode in the pre-pass (its BatchNorm statistics move, as the official forward's)"
    assert any(not torch.equal(a, b) for a, b in zip(before, on.critic.parameters())), "the pre-pass steps it"
    assert all(p.grad is None for p in module.clean.parameters()), "the pre-pass takes no gradient of f_C"


def test_cbd_step_trains_only_the_clean_model_and_steps_the_critic(digits_dir) -> None:
    from helpers import digits_batch, digits_classifier
    from methods.base import TrainContext
    from methods.cbd import CBD

    method = CBD(mi=True, critic_pass="step")  # the option: a critic step on each batch, before f_C's
    module = method.build(digits_classifier(digits_dir))
    module.train()
    assert not module.backdoored.training, "f_B stays frozen in eval mode"
    x, y = digits_batch(digits_dir, 32)
    before = [p.detach().clone() for p in method.critic.parameters()]
    ctx = TrainContext(0, 1, 0, 1, torch.device("cpu"), 0, 1, method.eval_model(module))
    logs = method.training_step(module, x, y, ctx)
    logs["loss"].backward()
    assert all(p.grad is None for p in module.backdoored.parameters())
    assert all(p.grad is not None for p in module.clean.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, method.critic.parameters())), "critic took a step"
    assert {"mi", "critic_bound", "loss_weighted_ce"} <= set(logs)
    off = CBD(mi=False)
    off_module = off.build(digits_classifier(digits_dir))
    assert "mi" not in off.training_step(off_module, x, y, ctx)

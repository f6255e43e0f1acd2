"""ACE: the diffusion filter, the attack through it, the refinement, the metrics and the gallery."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.eval.analysis import cf_metrics as M
from harness.eval.analysis import ace as ace_module
from harness.eval.analysis.ace import (ACEConfig, ace, describe_departures, plain_pgd, refinement_mask,
                                       runner_up_target)
from harness.eval.analysis.diffusion import (DDPMConfig, denoise_from, load_split, respaced_timesteps,
                                        train_ddpm)

TINY_DDPM = DDPMConfig(channels=(8, 16), layers_per_block=1, attention=False, train_steps=30,
                       batch_size=32, lr=2e-3)


@pytest.fixture(scope="module")
def digits(digits_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_split(digits_dir, "train")


@pytest.fixture(scope="module")
def tiny_ddpm(digits):
    return train_ddpm(digits[0], TINY_DDPM)


@pytest.fixture(scope="module")
def linear_model(digits) -> torch.nn.Module:
    """A softmax regression on raw pixels, trained for a few full-batch steps (~90% train acc)."""
    x, y = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def test_respacing_and_tau_zero_is_identity(tiny_ddpm, digits) -> None:
    assert respaced_timesteps(1000, 50, 0.0) == []
    ts = respaced_timesteps(1000, 50, 0.3)
    assert ts == sorted(ts, reverse=True) and max(ts) <= 0.3 * 999 and len(ts) == 15
    assert len(respaced_timesteps(1000, 50, 1.0)) == 50
    # the official count: int(fraction * respacing) lowest steps of improved-diffusion's respacing
    assert respaced_timesteps(500, 50, 0.1) == [41, 31, 20, 10, 0]     # CelebA: T 500, 50, 0.1
    assert respaced_timesteps(1000, 10, 0.25) == [111, 0]               # int(2.5) = 2, not t <= 250
    x = digits[0][:8]
    assert torch.equal(denoise_from(tiny_ddpm, x, 0.0, 50), x)
    out = denoise_from(tiny_ddpm, x, 0.3, 50)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    with pytest.raises(ValueError, match="tau"):
        respaced_timesteps(1000, 50, 1.5)


def test_resized_cells_get_resized_images_and_their_own_ddpm(digits_dir: Path) -> None:
    from harness.eval.analysis.diffusion import ddpm_key

    assert load_split(digits_dir, "test", limit=4, img_size=16)[0].shape == (4, 1, 16, 16)
    assert ddpm_key("sha", TINY_DDPM) != ddpm_key("sha", TINY_DDPM, 16)


def test_deterministic_filter_is_repeatable_up_to_forward_noise(tiny_ddpm, digits) -> None:
    x = digits[0][:4]
    torch.manual_seed(3)
    a = denoise_from(tiny_ddpm, x, 0.2, 20, eta=0.0)
    torch.manual_seed(3)
    b = denoise_from(tiny_ddpm, x, 0.2, 20, eta=0.0)
    assert torch.equal(a, b)


def test_ace_flips_a_tiny_model_and_keeps_pixels_outside_the_mask(tiny_ddpm, linear_model, digits) -> None:
    x, y = digits[0][:12], digits[1][:12]
    target = runner_up_target(linear_model, x)
    cfg = ACEConfig(tau=0.1, sampling_steps=20, iterations=30, step_size=0.05, mask_dilation=1,
                    mask_threshold=0.5)
    torch.manual_seed(0)
    res = ace(linear_model, tiny_ddpm, x, target, cfg)
    assert res.cf.shape == x.shape and res.cf.min() >= 0 and res.cf.max() <= 1
    assert float(M.flipped(linear_model, res.pre, target).float().mean()) >= 0.75
    outside = res.mask.expand_as(x) == 0
    assert outside.any() and torch.equal(res.cf[outside], x[outside])
    base = plain_pgd(linear_model, x, target, cfg)
    assert bool(M.flipped(linear_model, base.cf, target).all())
    assert (base.iterations == cfg.iterations).all() and torch.equal(base.cf, base.pre)


class Counting(torch.nn.Module):
    """A classifier that counts its calls and the rows it saw."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls, self.rows = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        return self.model(x)


def test_defaults_are_the_official_settings() -> None:
    cfg = ACEConfig()
    assert (cfg.iterations, cfg.step_size, cfg.dist_weight, cfg.distance) == (50, 1 / 255, 0.001, "l1")
    assert (cfg.tau, cfg.sampling_steps, cfg.eta) == (0.1, 50, 1.0)
    assert (cfg.mask_threshold, cfg.mask_dilation, cfg.refine, cfg.early_stop) == (0.15, 15, "repaint", False)
    assert describe_departures(cfg) == "official" and cfg.departures() == {}
    paired = ACEConfig(refine="paired", early_stop=True, eta=0.0, seed=3)
    assert describe_departures(paired) == "eta=0 refine=paired early_stop=true"   # seed is not a departure


def test_official_attack_runs_every_iteration_and_keeps_the_raw_pre_explanation(tiny_ddpm, linear_model,
                                                                                 digits) -> None:
    """No early stop (every sample takes all iterations, even one the filter flips at once), the
    pre-explanation is the attacked x' (x plus whole steps, clamped), never F_tau(x'), the mask is
    computed from |x - x'|, fresh filter noise every iteration and one inpainting pass."""
    x = digits[0][:6]
    target = runner_up_target(linear_model, x)
    cfg = ACEConfig(tau=0.1, sampling_steps=20, iterations=12, step_size=0.05, mask_dilation=3)
    draws: list[torch.Tensor] = []
    stream = ace_module.NoiseStream.__call__
    model = Counting(linear_model)
    try:
        ace_module.NoiseStream.__call__ = lambda self, like: draws.append(stream(self, like)) or draws[-1]
        res = ace(model, tiny_ddpm, x, target, cfg)
    finally:
        ace_module.NoiseStream.__call__ = stream
    assert (res.iterations == cfg.iterations).all()
    assert model.calls == cfg.iterations and model.rows == cfg.iterations * len(x)   # whole batch, no extra pass
    # x' itself, not filtered: every pixel is whole steps from x, or from 0 or 1 (after a clamp)
    off_lattice = torch.stack([((res.pre - o) / cfg.step_size - ((res.pre - o) / cfg.step_size).round()).abs()
                               for o in (x, torch.zeros_like(x), torch.ones_like(x))]).amin(0)
    assert off_lattice.max() < 1e-3 and not torch.equal(res.pre, x)
    assert torch.equal(res.mask, refinement_mask(x, res.pre, cfg.mask_threshold, cfg.mask_dilation))
    # 2 filter steps: 2 draws per iteration (forward + 1 step), then inpainting 1 + 2 + 1
    assert len(draws) == 2 * cfg.iterations + 4
    assert all(not torch.equal(draws[0], d) for d in draws[2::2])                   # fresh each iteration
    # the same flip early in the attack does not stop it: a sample the filter flips at once
    early = ACEConfig(tau=0.1, sampling_steps=20, iterations=12, step_size=0.05, mask_dilation=3, early_stop=True)
    stopped = ace(linear_model, tiny_ddpm, x, target, early)
    assert (stopped.iterations < cfg.iterations).any()


def test_seeded_runs_repeat_and_the_seed_matters(tiny_ddpm, linear_model, digits) -> None:
    x = digits[0][:3]
    target = runner_up_target(linear_model, x)
    cfg = ACEConfig(tau=0.1, sampling_steps=20, iterations=3, step_size=0.05, mask_dilation=1)
    a, b = ace(linear_model, tiny_ddpm, x, target, cfg), ace(linear_model, tiny_ddpm, x, target, cfg)
    assert torch.equal(a.cf, b.cf) and torch.equal(a.pre, b.pre)
    other = ace(linear_model, tiny_ddpm, x, target, ACEConfig(**{**cfg.describe(), "seed": 1}))
    assert not torch.equal(a.cf, other.cf)


@pytest.mark.parametrize("refine", ["repaint", "paired"])
def test_refinements_leave_pixels_outside_the_mask_unchanged(tiny_ddpm, digits, refine) -> None:
    x = digits[0][:4]
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, 2:5, 3:6] = 1
    out = denoise_from(tiny_ddpm, x.flip(-1), 0.3, 20, known=(x, mask))
    assert torch.equal(out[(mask == 0).expand_as(x)], x[(mask == 0).expand_as(x)])
    assert not torch.equal(out, x)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    cfg = ACEConfig(tau=0.2, sampling_steps=20, iterations=2, refine=refine, mask_threshold=0.6,
                    mask_dilation=1)
    res = ace(model, tiny_ddpm, x, torch.zeros(4, dtype=torch.long), cfg)
    outside = (res.mask == 0).expand_as(x)
    assert outside.any() and torch.equal(res.cf[outside], x[outside])


def test_refinement_mask_dilates_the_largest_change() -> None:
    x = torch.zeros(1, 1, 8, 8)
    pre = x.clone()
    pre[0, 0, 4, 4] = 1.0
    pre[0, 0, 0, 0] = 0.1      # 10% of the max: below the 0.15 threshold
    m = refinement_mask(x, pre, 0.15, 3)
    assert m.sum() == 9 and m[0, 0, 3:6, 3:6].all() and m[0, 0, 0, 0] == 0
    assert refinement_mask(x, pre, 0.15, 1).sum() == 1
    pre[0, 0, 0, 0] = 0.15     # at the threshold: in the mask (the official keeps x only below it)
    assert refinement_mask(x, pre, 0.15, 1).sum() == 2
    # the official kernel 15 at 8x8: any change marks the whole image
    assert refinement_mask(x, pre, 0.15, 15).sum() == 64


def test_metrics_on_hand_made_changes() -> None:
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    const = torch.full((1, 1, 8, 8), 0.5)
    checker = ((-1.0) ** (i + j)).view(1, 1, 8, 8)
    slow = torch.cos(2 * torch.pi * i / 8).view(1, 1, 8, 8).float()     # 1/8 cycles per pixel
    d = torch.cat([const, checker, slow, const + checker])
    share = M.hf_share(d)
    assert torch.allclose(share, torch.tensor([0.0, 1.0, 0.0, 64 / (64 + 16)]), atol=1e-6)
    assert torch.isnan(M.hf_share(torch.zeros(1, 1, 8, 8)))[0]
    # Parseval: all power above a negative cutoff is the squared L2 norm
    assert torch.allclose(M.hf_energy(d, cutoff=-1.0), M.l2(d) ** 2, rtol=1e-5)
    assert torch.allclose(M.hf_energy(d)[1], torch.tensor(64.0))
    assert torch.allclose(M.l1(d)[:2], torch.tensor([32.0, 64.0]))
    a = np.random.default_rng(0).normal(size=(500, 3))
    assert abs(M.frechet_distance(a, a)) < 1e-6
    assert abs(M.frechet_distance(a, a + np.array([2.0, 0, 0])) - 4.0) < 1e-6


def test_cout_rewards_a_change_that_flips() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 0, 0, 0], [8.0, 8, 0, 0]]))
    x = torch.zeros(1, 1, 2, 2)
    good = x.clone()
    good[0, 0, 0] = 1.0                 # raises class-1 evidence
    src, tgt = torch.tensor([0]), torch.tensor([1])
    assert M.cout(model, x, good, src, tgt, steps=4)[0] > 0.5
    assert torch.allclose(M.cout(model, x, x, src, tgt, steps=4), torch.tensor([0.0]))


def test_config_keys_and_bad_settings(data_root: Path, tmp_path: Path) -> None:
    from harness.eval.stage import check_analyses
    from harness.core.config import compose_config, finalize

    base = [f"data.root={data_root}", f"results_dir={tmp_path}"]
    plain = finalize(compose_config(base))
    with_ace = finalize(compose_config(base + ["analysis=[ace]"]))
    assert "analysis" not in plain                       # default: existing keys unchanged
    assert with_ace["train_key"] == plain["train_key"]   # no retraining for an analysis
    assert with_ace["key"] != plain["key"]
    check_analyses(with_ace)
    bad = finalize(compose_config(base + ["analysis=[ace]", "analysis.ace.ace.distance=l3"]))
    with pytest.raises(ValueError, match="distance"):
        check_analyses(bad)
    with pytest.raises(ValueError, match="bogus"):  # refused as a key no group defines, before any work
        compose_config(base + ["analysis=[ace]", "+analysis.ace.bogus=1"])


def _fake_cell(results_dir: Path, key: str, method: str, n: int = 3) -> None:
    from harness.store.results import SCHEMA_VERSION, write_cell_result

    summary = {"analysis": "ace", "n_explained": n, "ace_flip_rate": 1.0, "pgd_flip_rate": 1.0,
               "ace_hf_share": 0.2, "pgd_hf_share": 0.4, "ace_l2": 1.0, "pgd_l2": 1.5,
               "ace_refine": "paired", "ace_departures": "eta=0 refine=paired early_stop=true"}
    row = {"schema_version": SCHEMA_VERSION, "key": key, "status": "ok", "dataset": "digits",
           "arch": "test_resnet", "method": method, "seed": 0, "attack": "pgd", "norm": "linf",
           "eps": 0.15, "clean_acc": 0.9, "robust_acc": 0.5, "class_names": [str(c) for c in range(10)],
           "analysis_json": json.dumps({"ace": summary})}
    write_cell_result(results_dir, key, [row])
    folder = results_dir / "analysis" / key / "ace"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 8, 8)).astype(np.float32)
    np.savez_compressed(folder / "counterfactuals.npz", x=x, y=np.arange(n), target=np.arange(n) + 1,
                        ace_cf=x[::-1], ace_pre=x, ace_mask=np.ones_like(x), pgd_cf=x * 0.5,
                        ace_flip=np.array([True, False, True]), pgd_flip=np.ones(n, bool),
                        oracle_ace=np.arange(n) + 1, oracle_pgd=np.arange(n))


def test_gallery_page_renders_escaped_and_linked(tmp_path: Path) -> None:
    from leaderboard.build import build_site

    results = tmp_path / "results"
    _fake_cell(results, "k" * 20, "<script>alert(1)</script>")
    index = build_site(results, tmp_path / "site")
    page = (tmp_path / "site" / "ace.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert page.count("data:image/png;base64,") == 3 * 5
    assert "100.00" in page and "0.2" in page and "0.4" in page
    assert page.count("not flipped ✗") == 1 and "oracle says 3" in page
    assert page.count("refine=paired; eta=0 refine=paired early_stop=true") == 2   # table row and section
    assert 'href="ace.html"' in index.read_text()
    cell_page = next((tmp_path / "site" / "cells").glob("*.html")).read_text()
    assert 'href="../ace.html"' in cell_page


def test_cell_with_ace_reuses_the_checkpoint_and_commits_the_summary(tiny) -> None:
    from harness.run.cell import run_cell
    from harness.core.config import compose_config, finalize
    from harness.store.checkpoint_sync import local_work_dir as checkpoint_dir
    from harness.store.index import read_results

    tiny = [o for o in tiny if not o.startswith("attack.pgd")] + ["attack=[fgsm]"]
    plain = finalize(compose_config(tiny))
    assert run_cell(plain).status == "ok"
    ckpt = checkpoint_dir(plain) / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    small = ["analysis=[ace]", "analysis.ace.n_explain=4", "analysis.ace.batch_size=4",
             "analysis.ace.ddpm.channels=[8,16]", "analysis.ace.ddpm.attention=false",
             "analysis.ace.ddpm.train_steps=3", "analysis.ace.ddpm.batch_size=16",
             "analysis.ace.ace.iterations=3", "analysis.ace.ace.sampling_steps=10"]
    cfg = finalize(compose_config(tiny + small))
    out = run_cell(cfg)
    assert out.status == "ok", out.error
    assert ckpt.stat().st_mtime_ns == before, "adding an analysis must not retrain the cell"
    rows = [r for r in read_results(cfg["results_dir"]).to_pylist() if r["key"] == cfg["key"]]
    summary = json.loads(rows[0]["analysis_json"])["ace"]
    assert summary["n_explained"] == 4 and 0 <= summary["ace_flip_rate"] <= 1
    assert summary["ace_refine"] == "repaint" and summary["ace_departures"] == "tau=0.3 sampling_steps=10 " \
        "iterations=3 step_size=0.02 mask_dilation=3"     # ace.yaml's small-image values and this test's
    assert summary["ace_mean_iterations"] == 3                                  # no early stop
    folder = Path(cfg["results_dir"]) / "analysis" / cfg["key"] / "ace"
    assert {"summary.json", "counterfactuals.npz", "gallery.png"} <= {p.name for p in folder.iterdir()}
    bad = finalize(compose_config(tiny + ["analysis=[ace]", "analysis.ace.ace.tau=2"]))
    with pytest.raises(ValueError, match="tau"):  # refused while planning, before any work
        run_cell(bad)


def test_cells_needing_one_ddpm_share_one_artifact_node(tiny) -> None:
    """Two cells of different models needing the same DDPM and helper classifiers (grid=ace runs
    them at once): the plan holds one artifact node per cached model, an input of both eval nodes,
    so it is built once by its own task and no cell waits on a lock."""
    from harness.core.config import compose_config, finalize
    from harness.run.plan import build_plan, eval_node_id

    cells = [finalize(compose_config(tiny + ["analysis=[ace]", f"method={m}"])) for m in ("erm", "pgd_at")]
    plan = build_plan(cells)
    artifacts = [n.id for n in plan.of_kind("artifact")]
    assert len(artifacts) == 3 and {a.split("/")[1] for a in artifacts} == {"ddpm", "aux"}
    for cfg in cells:
        assert set(artifacts) <= set(plan.nodes[eval_node_id(cfg)].inputs)

"""Run ACE and its plain-PGD baseline on one trained model; write the artifacts and a summary.

Explained images: the first `n_explain` test images the model classifies correctly; the target is
the model's runner-up class. The summary names the refinement (`ace_refine`) and every setting
that departs from the official ACE (`ace_departures`, 'official' when none): the leaderboard's
ACE page shows them beside the analysis label. Metrics compare ACE with plain PGD on the images BOTH flip (matched
flip), so neither side's closeness or frequency numbers are averaged over failures.

Artifacts in `out_dir`: summary.json, counterfactuals.npz (x, ACE cf/pre/mask, PGD cf, targets,
flips) and gallery.png (rows: original, ACE, ACE - original, PGD, PGD - original).
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harness.eval.analysis import cf_metrics as M
from harness.eval.analysis.ace import ACEConfig, ace, describe_departures, plain_pgd, runner_up_target
from harness.eval.analysis.aux_models import aux_folder, ensure_aux
from harness.eval.analysis.diffusion import DDPMConfig, ddpm_folder, ensure_ddpm, load_split
from harness.core.registry import ANALYSES
from harness.eval.stage import Analysis, Artifact, EvalContext

EXTRA_CUTOFFS = (0.125, 0.375)
SETTINGS = ("name", "n_explain", "batch_size", "hf_cutoff", "ddpm", "ace", "seed")


def check_settings(acfg: dict[str, Any]) -> tuple[ACEConfig, DDPMConfig]:
    """Validate an `analysis.ace` block before any work; returns the parsed ACE and DDPM configs."""
    unknown = set(acfg) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown analysis.ace settings {sorted(unknown)}; known: {list(SETTINGS)}")
    if int(acfg.get("n_explain", 64)) < 1 or int(acfg.get("batch_size", 64)) < 1:
        raise ValueError("analysis.ace.n_explain and analysis.ace.batch_size must be >= 1")
    if not 0 < float(acfg.get("hf_cutoff", 0.25)) < 0.71:
        raise ValueError("analysis.ace.hf_cutoff must be a radial frequency in (0, 0.71) cycles/pixel")
    return ACEConfig.from_dict(acfg.get("ace")), DDPMConfig.from_dict(acfg.get("ddpm"))


def explained_images(model: Callable, data_dir: Path, n: int, img_size: int | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images the model classifies correctly, with their labels, on `device`."""
    x, y = load_split(data_dir, "test", img_size=img_size)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n], y[ok][:n]


def run_ace(model: torch.nn.Module, data_dir: Path, results_dir: Path, out_dir: Path,
            acfg: dict[str, Any], log: Callable[[str], None] = lambda s: None,
            img_size: int | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """ACE + plain PGD on `model`; writes artifacts under out_dir and returns the summary dict.
    `img_size`: the cell's data.img_size (images, DDPM and helper CNNs all at that size).
    `device`: the cell's device (the model is already there); the DDPM and helper CNNs run there too."""
    ace_cfg, ddpm_cfg = check_settings(acfg)
    started = time.time()
    model.eval()
    ddpm, ddpm_dir = ensure_ddpm(Path(data_dir), Path(results_dir), ddpm_cfg, log=log, img_size=img_size,
                                 device=device)
    oracle, oracle_meta = ensure_aux("oracle", Path(data_dir), Path(results_dir), img_size, device)
    feats, feats_meta = ensure_aux("features", Path(data_dir), Path(results_dir), img_size, device)
    x, y = explained_images(model, Path(data_dir), int(acfg.get("n_explain", 64)), img_size, device)
    if len(x) == 0:
        raise ValueError("the model classifies no test image correctly: nothing to explain")
    target = runner_up_target(model, x)
    torch.manual_seed(int(acfg.get("seed", 0)))
    bs = int(acfg.get("batch_size", 64))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("cf", "pre", "mask", "it", "pgd", "pgd_it")}
    t_ace = t_pgd = 0.0
    for i in range(0, len(x), bs):
        xb, tb = x[i:i + bs], target[i:i + bs]
        t0 = time.time()
        res = ace(model, ddpm, xb, tb, ace_cfg)
        t1 = time.time()
        base = plain_pgd(model, xb, tb, ace_cfg)
        t_ace, t_pgd = t_ace + t1 - t0, t_pgd + time.time() - t1
        for k, v in (("cf", res.cf), ("pre", res.pre), ("mask", res.mask), ("it", res.iterations),
                     ("pgd", base.cf), ("pgd_it", base.iterations)):
            parts[k].append(v.detach())
        log(f"ace: {min(i + bs, len(x))}/{len(x)} explained ({time.time() - started:.0f}s)")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    cat["ace_flip"] = M.flipped(model, cat["cf"], target)
    cat["pgd_flip"] = M.flipped(model, cat["pgd"], target)
    with torch.no_grad():
        cat["oracle_ace"] = oracle(cat["cf"]).argmax(1)
        cat["oracle_pgd"] = oracle(cat["pgd"]).argmax(1)
    summary = summarize(model, oracle, feats, x, y, target, cat["cf"], cat["pre"], cat["pgd"],
                        float(acfg.get("hf_cutoff", 0.25)))
    summary |= natural_reference(Path(data_dir), x, target, float(acfg.get("hf_cutoff", 0.25)), img_size)
    summary |= {
        "analysis": "ace", "ace_seconds": t_ace, "pgd_seconds": t_pgd,
        "ace_mean_iterations": float(cat["it"].float().mean()),
        "pgd_mean_iterations": float(cat["pgd_it"].float().mean()),
        "ace_mask_fraction": float(cat["mask"].mean()),
        "ace_refine": ace_cfg.refine, "ace_departures": describe_departures(ace_cfg),
        "ace_config": ace_cfg.describe(), "ddpm_config": asdict(ddpm_cfg), "ddpm_dir": str(ddpm_dir),
        "ddpm_train_seconds": ddpm.meta.get("train_seconds"), "ddpm_final_loss": ddpm.meta.get("final_loss"),
        "oracle_test_acc": oracle_meta["test_acc"], "features_test_acc": feats_meta["test_acc"],
        "seconds": time.time() - started,
    }
    write_artifacts(Path(out_dir), summary, x.cpu(), y.cpu(), target.cpu(), {k: v.cpu() for k, v in cat.items()})
    return summary


def summarize(model: Callable, oracle: Callable, feats: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              target: torch.Tensor, cf: torch.Tensor, pre: torch.Tensor, pgd: torch.Tensor,
              cutoff: float) -> dict[str, Any]:
    """Flip rates on all explained images; closeness, frequency, COUT and oracle on matched flips."""
    ace_flip = M.flipped(model, cf, target)
    pgd_flip = M.flipped(model, pgd, target)
    both = ace_flip & pgd_flip
    out: dict[str, Any] = {
        "n_explained": len(x), "hf_cutoff": cutoff,
        "ace_flip_rate": float(ace_flip.float().mean()),
        "ace_pre_flip_rate": float(M.flipped(model, pre, target).float().mean()),
        "pgd_flip_rate": float(pgd_flip.float().mean()),
        "n_matched": int(both.sum()),
    }
    with torch.no_grad():
        real = feats.features(x).cpu().numpy()
    for name, z in (("ace", cf), ("pgd", pgd)):
        d = (z - x)[both]
        out[f"{name}_l1"] = float(M.l1(d).mean()) if len(d) else float("nan")
        out[f"{name}_l2"] = float(M.l2(d).mean()) if len(d) else float("nan")
        out[f"{name}_hf_share"] = M.nanmean(M.hf_share(d, cutoff)) if len(d) else float("nan")
        out[f"{name}_hf_energy"] = float(M.hf_energy(d, cutoff).mean()) if len(d) else float("nan")
        for c in EXTRA_CUTOFFS:   # the cutoff matters on tiny images: report a sweep beside it
            out[f"{name}_hf_share_{c:g}"] = M.nanmean(M.hf_share(d, c)) if len(d) else float("nan")
        out[f"{name}_oracle_flip_rate"] = float(M.flipped(oracle, z[both], target[both]).float().mean()) \
            if len(d) else float("nan")
        out[f"{name}_cout"] = float(M.cout(model, x[both], z[both], y[both], target[both]).mean()) \
            if len(d) else float("nan")
        with torch.no_grad():
            out[f"{name}_fid_local"] = M.frechet_distance(feats.features(z).cpu().numpy(), real)
    return out


def natural_reference(data_dir: Path, x: torch.Tensor, target: torch.Tensor, cutoff: float,
                      img_size: int | None = None) -> dict[str, Any]:
    """Frequency content of a natural class change: x -> its nearest training image of the target
    class (L2). Tells what HF share a real, semantic edit has on this dataset."""
    xt, yt = load_split(data_dir, "train", img_size=img_size)
    x, target = x.cpu(), target.cpu()
    dist = torch.cdist(x.flatten(1), xt.flatten(1))
    dist = dist.masked_fill(yt[None, :] != target[:, None], float("inf"))
    d = xt[dist.argmin(1)] - x
    out = {"nn_l2": float(M.l2(d).mean()), "nn_hf_share": M.nanmean(M.hf_share(d, cutoff))}
    for c in EXTRA_CUTOFFS:
        out[f"nn_hf_share_{c:g}"] = M.nanmean(M.hf_share(d, c))
    return out


def write_artifacts(out_dir: Path, summary: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                    target: torch.Tensor, cat: dict[str, torch.Tensor]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "counterfactuals.npz", x=x.numpy(), y=y.numpy(), target=target.numpy(),
                        ace_cf=cat["cf"].numpy(), ace_pre=cat["pre"].numpy(), ace_mask=cat["mask"].numpy(),
                        pgd_cf=cat["pgd"].numpy(), ace_flip=cat["ace_flip"].numpy(),
                        pgd_flip=cat["pgd_flip"].numpy(), oracle_ace=cat["oracle_ace"].numpy(),
                        oracle_pgd=cat["oracle_pgd"].numpy())
    gallery_png(out_dir / "gallery.png", x, cat["cf"], cat["pgd"])
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    tmp.replace(out_dir / "summary.json")


def gallery_png(path: Path, x: torch.Tensor, cf: torch.Tensor, pgd: torch.Tensor, n: int = 16,
                scale: int = 6) -> None:
    """A PNG grid: columns are images; rows original, ACE, ACE diff, PGD, PGD diff (diff: grey = 0)."""
    from PIL import Image

    n = min(n, len(x))
    rows = [x[:n], cf[:n], (cf[:n] - x[:n] + 1) / 2, pgd[:n], (pgd[:n] - x[:n] + 1) / 2]
    tiles = [torch.cat([r[i].mean(0) for i in range(n)], dim=1) for r in rows]   # (H, n*W)
    grid = torch.cat(tiles, dim=0).clamp(0, 1).numpy()
    img = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def analysis_dir(cfg: dict[str, Any], label: str) -> Path:
    return Path(cfg["results_dir"]) / "analysis" / cfg["key"] / label


@ANALYSES.register("ace")
class ACEAnalysis(Analysis):
    """ACE counterfactuals beside plain PGD (`analysis=[ace]`); summary in `analysis_json`, images
    and tensors under <results_dir>/analysis/<key>/<label>/. Eval-only: never retrains the cell.
    Its DDPM and helper classifiers are artifacts: built once per dataset + settings by their own
    node of the plan, before any cell that needs them."""

    def check(self, cfg: dict[str, Any]) -> None:
        check_settings(self.settings)

    def artifacts(self, cfg: dict[str, Any]) -> list[Artifact]:
        data_dir, results_dir = Path(cfg["data"]["dir"]), Path(cfg["results_dir"])
        img_size = cfg["data"].get("img_size")
        _, ddpm_cfg = check_settings(self.settings)
        out = [Artifact(f"ddpm/{ddpm_folder(data_dir, results_dir, ddpm_cfg, img_size).name}", "ddpm",
                        functools.partial(ensure_ddpm, data_dir, results_dir, ddpm_cfg, img_size=img_size))]
        for role in ("oracle", "features"):
            out.append(Artifact(f"aux/{aux_folder(role, data_dir, results_dir, img_size).name}", f"{role} classifier",
                                functools.partial(ensure_aux, role, data_dir, results_dir, img_size)))
        return out

    def run(self, ctx: EvalContext) -> None:
        cfg = ctx.cfg
        ctx.log(f"analysis {self.label}: {cfg.get('label', cfg['key'])}")
        ctx.summaries[self.label] = run_ace(ctx.model, Path(cfg["data"]["dir"]), Path(cfg["results_dir"]),
                                            analysis_dir(cfg, self.label), self.settings, log=ctx.log,
                                            img_size=cfg["data"].get("img_size"), device=ctx.device)

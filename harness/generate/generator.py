"""A class-conditional diffusion generator per (dataset, settings), trained once and cached by key.

The network is diffusers' UNet2DModel with a class embedding (`num_class_embeds`), trained with the
epsilon-prediction loss on diffusers' DDPMScheduler noise (the network and training settings are
ACE's `DDPMConfig`, harness/eval/analysis/diffusion.py); sampling uses diffusers'
DPMSolverMultistepScheduler as SDE-DPM-Solver++ (2nd order, stochastic, x0 thresholded at 1:
measured on 8x8 digits after 600 training steps, a held-out classifier recognises 85% of 20-step
samples, 86% of 200-step DDPM ancestral samples, 60% of deterministic DPM-Solver++ 20-step ones),
or DPM-Solver++/DDIM/DDPM by name. The papers
(Wang et al. 2023) sample an EDM network with EDM's Heun sampler; diffusers' EDM schedulers need a
network trained with EDM's preconditioning, which this one is not, so they are not offered.

Cached in the results store (a folder or any URI) under `artifacts/generator/<key>/`: the weights
first, `meta.json` last, each written atomically, so a reader that finds the meta finds whole
weights. The key hashes the dataset's sha256, the settings, the image size and this file's source.
In a grid it is an artifact node of the plan (harness/run/plan.py), built by one task before the
generated set that needs it.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.eval.analysis.diffusion import DDPMConfig, load_split, make_scheduler
from harness.store.storage import open_store

WEIGHTS = "generator.pt"
META = "meta.json"
SAMPLERS = ("sde-dpmsolver++", "dpmsolver++", "ddim", "ddpm")
STOCHASTIC = ("sde-dpmsolver++", "ddpm")


@dataclass
class Generator:
    """A trained class-conditional noise-prediction UNet and what it was trained on."""

    unet: torch.nn.Module
    config: DDPMConfig
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return int(self.meta["channels"]), int(self.meta["image_size"]), int(self.meta["image_size"])


def build_unet(cfg: DDPMConfig, channels: int, size: int, num_classes: int) -> torch.nn.Module:
    """ACE's UNet shape with a learned class embedding added to the timestep embedding."""
    from diffusers import UNet2DModel

    n = len(cfg.channels)
    down, up = ["DownBlock2D"] * n, ["UpBlock2D"] * n
    if cfg.attention and n > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), num_class_embeds=num_classes,
        norm_num_groups=min(32, min(cfg.channels)), attention_head_dim=min(cfg.channels[-1], 64))


def generator_key(data_sha256: str, cfg: DDPMConfig, img_size: int) -> str:
    """The cache key: dataset, settings, size and this file's source (a fix here retrains)."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    blob = json.dumps({"data": data_sha256, "generator": asdict(cfg), "img_size": int(img_size), "code": code},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def generator_rel(key: str) -> str:
    """The generator's folder, relative to the results store's root."""
    return f"artifacts/generator/{key}"


def train_generator(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: DDPMConfig, *,
                    log: Callable[[str], None] | None = None, device: torch.device | str = "cpu"
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on (N, C, H, W) images in [0, 1] with their labels; returns the EMA UNet and training facts."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"the generator needs square (N, C, H, W) images, got {tuple(images.shape)}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet = build_unet(cfg, images.shape[1], images.shape[-1], num_classes).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = make_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.train_steps // 20)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.train_steps)))
    data, targets = (2 * images - 1).to(device), labels.to(device)
    started, running = time.time(), 0.0
    for step in range(cfg.train_steps):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen).to(device)
        x0, y = data[idx], targets[idx]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, cfg.train_timesteps, (len(x0),), generator=gen).to(device)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        # the EMA's decay warms up as min(decay, (1+s)/(10+s)) (the DM-AT papers' schedule): a fixed
        # 0.999 over a short run keeps mostly the initial weights (0.999^600 = 0.55)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if log and (step % 250 == 0 or step == cfg.train_steps - 1):
            log(f"generator step {step + 1}/{cfg.train_steps} loss {running:.4f} {time.time() - started:.0f}s")
    return ema, {"train_seconds": time.time() - started, "final_loss": running, "n_train": len(images)}


def make_sampler(cfg: DDPMConfig, name: str) -> Any:
    """A diffusers scheduler for sampling, on the training schedule's betas."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = {"num_train_timesteps": cfg.train_timesteps, "beta_schedule": cfg.beta_schedule,
              "prediction_type": "epsilon"}
    if name in ("sde-dpmsolver++", "dpmsolver++"):  # thresholding at 1.0: x0 clipped to [-1, 1], as clip_sample
        return DPMSolverMultistepScheduler(**common, algorithm_type=name, solver_order=2, thresholding=True,
                                           sample_max_value=1.0)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=True)
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=True)
    raise ValueError(f"unknown sampler '{name}'; known: {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample(generator: Generator, labels: torch.Tensor, *, steps: int = 20, sampler: str = "sde-dpmsolver++",
           seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images of the given classes, (len(labels), C, H, W) in [0, 1]; the same seed gives the same images."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= generator.num_classes):
        raise ValueError(f"labels must lie in [0, {generator.num_classes}), got {labels.min()}..{labels.max()}")
    sched = make_sampler(generator.config, sampler)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((len(labels), *generator.shape), generator=gen).to(device)
    y = labels.to(device)
    unet = generator.unet.to(device)
    extra = {"generator": gen} if sampler in STOCHASTIC else {}  # diffusers draws on the CPU generator, moves to device
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t, class_labels=y).sample
        x = sched.step(eps, t, x, **extra).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def save_generator(results_dir: str, key: str, unet: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Weights first, meta last (each atomically): a folder with a meta holds whole weights."""
    store = open_store(results_dir)
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in unet.state_dict().items()}, buf)
    store.write_bytes(f"{generator_rel(key)}/{WEIGHTS}", buf.getvalue())
    store.write_bytes(f"{generator_rel(key)}/{META}", json.dumps(meta, indent=1, sort_keys=True).encode())


def load_generator(results_dir: str, key: str) -> Generator:
    """The cached generator `key`; FileNotFoundError naming the fix when its files are missing."""
    store = open_store(results_dir)
    raw_meta = store.read_bytes(f"{generator_rel(key)}/{META}")
    raw = store.read_bytes(f"{generator_rel(key)}/{WEIGHTS}") if raw_meta is not None else None
    if raw is None:
        raise FileNotFoundError(f"generator {key} is not in {store.uri(generator_rel(key))}: its artifact node has "
                                f"not run there. Fix: run the grid with data.generated=<settings> (it trains the "
                                f"generator once), or point results_dir at the store that holds it")
    meta = json.loads(raw_meta)
    cfg = DDPMConfig.from_dict(meta["config"])
    unet = build_unet(cfg, int(meta["channels"]), int(meta["image_size"]), int(meta["num_classes"]))
    unet.load_state_dict(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
    return Generator(unet.eval().requires_grad_(False), cfg, meta)


def ensure_generator(data_dir: str, results_dir: str, cfg: DDPMConfig, img_size: int | None = None, *,
                     log: Callable[[str], None] | None = None, device: torch.device | str = "cpu") -> str:
    """The generator's key, training and caching it first if the store lacks it (the artifact build)."""
    from harness.data.shards import dataset_sha256, load_manifest

    manifest = load_manifest(data_dir)
    size = int(img_size or manifest["image_size"][0])
    key = generator_key(dataset_sha256(manifest), cfg, size)
    if open_store(results_dir).exists(f"{generator_rel(key)}/{META}"):
        return key
    images, labels = load_split(Path(data_dir), "train", img_size=img_size)
    unet, facts = train_generator(images, labels, int(manifest["num_classes"]), cfg, log=log, device=device)
    save_generator(results_dir, key, unet, {"config": asdict(cfg), **facts, "data_sha256": dataset_sha256(manifest),
                                            "dataset": manifest.get("name"), "num_classes": manifest["num_classes"],
                                            "channels": manifest["channels"], "image_size": size})
    return key

"""A small DDPM per dataset, trained by the harness itself (no weights can be downloaded).

The network is diffusers' UNet2DModel, the noise schedule diffusers' DDPMScheduler. A trained
DDPM is cached under `<results_dir>/artifacts/ddpm/<key>/`, keyed by the dataset's sha256, the
DDPM settings and the code version, so a grid trains it once and every cell's ACE reuses it.

Images live in [0, 1] everywhere else in the harness; the DDPM works in [-1, 1] internally and
`denoise_from` takes and returns [0, 1] images.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.store.checkpoints import load_checkpoint

DDPM_FILE = "ddpm.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class DDPMConfig:
    """What a DDPM is: network size, schedule and training budget (all part of its cache key)."""

    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = True           # self-attention at the lowest resolution
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"   # cosine: keeps small images recognisable longer
    train_steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DDPMConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ddpm settings {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        if "channels" in d:
            d["channels"] = tuple(int(c) for c in d["channels"])
        cfg = cls(**d)
        if cfg.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"ddpm.beta_schedule '{cfg.beta_schedule}' is not one of "
                             "linear, scaled_linear, squaredcos_cap_v2")
        if cfg.train_steps < 1 or cfg.batch_size < 1 or not cfg.channels:
            raise ValueError("ddpm.train_steps, ddpm.batch_size must be >= 1 and channels non-empty")
        return cfg


@dataclass
class DDPM:
    """A trained noise-prediction UNet and its schedule's cumulative alphas."""

    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor       # (T,), float32
    config: DDPMConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def T(self) -> int:
        return int(self.alphas_cumprod.numel())

    def to(self, device: torch.device | str) -> "DDPM":
        self.unet.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def q_sample(self, x01: torch.Tensor, t: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise a [0, 1] image to timestep t; returns the [-1, 1]-scaled noisy image x_t."""
        ab = self.alphas_cumprod[t]
        noise = torch.randn_like(x01) if noise is None else noise
        return ab.sqrt() * (2 * x01 - 1) + (1 - ab).sqrt() * noise


def build_unet(cfg: DDPMConfig, channels: int, size: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    n = len(cfg.channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention and n > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=min(32, min(cfg.channels)), attention_head_dim=min(cfg.channels[-1], 64),
    )


def make_scheduler(cfg: DDPMConfig) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def ddpm_key(data_sha256: str, cfg: DDPMConfig, img_size: int | None = None) -> str:
    # the code that trains a DDPM is this file: its hash, so a fix here retrains, others don't
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    blob = {"data": data_sha256, "ddpm": asdict(cfg), "code": code}
    if img_size is not None:   # native size: no entry, so keys of native-size DDPMs stay put
        blob["img_size"] = int(img_size)
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_split(data_dir: Path, split: str, limit: int | None = None,
               img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory (the datasets an 8x8..32x32 DDPM is trained on are small),
    resized like the cell's loader when `img_size` is set."""
    from harness.data.loader import make_loader

    xs, ys = [], []
    for x, y in make_loader(Path(data_dir), split, 512, limit=limit, img_size=img_size):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def train_ddpm(images: torch.Tensor, cfg: DDPMConfig, *, log: Callable[[str], None] | None = None,
               device: torch.device | str = "cpu") -> DDPM:
    """Train a DDPM on `images` ((N, C, H, W) in [0, 1]) with the epsilon-prediction loss; EMA weights."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"train_ddpm needs square (N, C, H, W) images, got {tuple(images.shape)}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet = build_unet(cfg, images.shape[1], images.shape[-1]).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = make_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.train_steps // 20)
    lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.train_steps))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    data = (2 * images - 1).to(device)
    started, running = time.time(), 0.0
    for step in range(cfg.train_steps):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, cfg.train_timesteps, (len(x0),), generator=gen).to(device)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if log and (step % 250 == 0 or step == cfg.train_steps - 1):
            log(f"ddpm step {step + 1}/{cfg.train_steps} loss {running:.4f} {time.time() - started:.0f}s")
    ac = sched.alphas_cumprod.to(torch.float32).to(device)
    return DDPM(ema, ac, cfg, {"train_seconds": time.time() - started, "final_loss": running,
                                "n_train": len(images)})


def save_ddpm(ddpm: DDPM, folder: Path, extra: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (DDPM_FILE + ".tmp")
    torch.save({"state_dict": ddpm.unet.state_dict(), "alphas_cumprod": ddpm.alphas_cumprod.cpu()}, tmp)
    tmp.replace(folder / DDPM_FILE)
    meta = {"config": asdict(ddpm.config), **ddpm.meta, **extra}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


def load_ddpm(folder: Path) -> DDPM:
    meta = json.loads((folder / META_FILE).read_text())
    cfg = DDPMConfig.from_dict(meta["config"])
    blob = load_checkpoint(folder / DDPM_FILE)
    unet = build_unet(cfg, int(meta["channels"]), int(meta["image_size"]))
    unet.load_state_dict(blob["state_dict"])
    return DDPM(unet.eval().requires_grad_(False), blob["alphas_cumprod"], cfg, meta)


def ddpm_folder(data_dir: Path, results_dir: Path, cfg: DDPMConfig, img_size: int | None = None) -> Path:
    """Where the DDPM for this dataset, config and size is cached."""
    from harness.data.shards import dataset_sha256, load_manifest

    sha = dataset_sha256(load_manifest(Path(data_dir)))
    return Path(results_dir) / "artifacts" / "ddpm" / ddpm_key(sha, cfg, img_size)


def ensure_ddpm(data_dir: Path, results_dir: Path, cfg: DDPMConfig,
                log: Callable[[str], None] | None = None, img_size: int | None = None,
                device: torch.device | str = "cpu") -> tuple[DDPM, Path]:
    """The cached DDPM for this dataset and config, training (and caching) it if missing, on `device`.

    In a grid it is an artifact node of the plan (harness/run/plan.py): built by one task before
    the cells that need it, so no two processes train it at once; the files are written to temp
    names and moved into place, so a reader never sees half of one."""
    from harness.data.shards import dataset_sha256, load_manifest

    folder = ddpm_folder(data_dir, results_dir, cfg, img_size)
    if not ((folder / DDPM_FILE).exists() and (folder / META_FILE).exists()):
        manifest = load_manifest(Path(data_dir))
        images, _ = load_split(Path(data_dir), "train", img_size=img_size)
        ddpm = train_ddpm(images, cfg, log=log, device=device)
        save_ddpm(ddpm, folder, {"data_sha256": dataset_sha256(manifest),
                                 "channels": images.shape[1], "image_size": images.shape[-1],
                                 "dataset": manifest.get("name")})
    return load_ddpm(folder).to(device), folder


def respacing(T: int, steps: int) -> list[int]:
    """The `steps` timesteps of [0, T) a respaced chain keeps, ascending: a fractional stride of
    (T - 1) / (steps - 1) from 0, each rounded (improved-diffusion's `space_timesteps` with one
    section, which the official ACE code uses)."""
    if steps < 1 or steps > T:
        raise ValueError(f"sampling steps must be in [1, {T}], got {steps}")
    stride = (T - 1) / (steps - 1) if steps > 1 else 1.0
    out, at = [], 0.0
    for _ in range(steps):
        out.append(round(at))
        at += stride
    return out


def respaced_timesteps(T: int, steps: int, tau: float) -> list[int]:
    """The descending timesteps the filter F_tau runs: the int(tau * steps) lowest of a `steps`
    respacing (the official `respaced_steps = int(sampling_time_fraction * timestep_respacing)`).

    tau=0 gives no step (the filter is then the identity); tau=1 gives all `steps` steps."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    return respacing(T, steps)[:int(tau * steps)][::-1]


def denoise_step(ddpm: DDPM, xt: torch.Tensor, t: int, t_prev: int, eta: float,
                 noise: torch.Tensor | None) -> torch.Tensor:
    """One respaced DDIM(eta) step x_t -> x_{t_prev} ([-1, 1] scale); eta=1 is the ancestral DDPM
    step (the posterior mean given the clipped x0 estimate, plus the posterior standard deviation
    times `noise`), eta=0 deterministic DDIM. t_prev=-1 returns the clipped x0 estimate."""
    ab = ddpm.alphas_cumprod[t]
    tt = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
    eps = ddpm.unet(xt, tt).sample
    x0 = ((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    if t_prev < 0:
        return x0
    eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()   # consistent with the clipped x0
    ab_prev = ddpm.alphas_cumprod[t_prev]
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
    out = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        out = out + sigma * noise
    return out


Draw = Callable[[torch.Tensor], torch.Tensor]   # draw(like): a standard normal tensor shaped like `like`


def denoise_from(ddpm: DDPM, x01: torch.Tensor, tau: float, steps: int, *, eta: float = 1.0,
                 grad_checkpoint: bool = False,
                 known: tuple[torch.Tensor, torch.Tensor] | None = None,
                 draw: Draw | None = None) -> torch.Tensor:
    """The filter F_tau: noise `x01` to the top filter step, denoise with the respaced chain;
    [0, 1] in and out.

    `known=(x_known01, mask)` is the official ACE inpainting: before every step t, the pixels
    where mask == 0 are replaced by q_sample(x_known, t), so only the masked region is generated;
    the output is composited with x_known outside the mask.
    `grad_checkpoint` recomputes each UNet call in the backward pass (memory O(1) in steps).
    `draw` gives every random tensor, in this order: the forward noise, then per step the noise of
    q_sample(x_known, t) (with `known`) and the step's noise (all but the last step, eta > 0);
    None draws them with torch.randn_like.
    """
    ts = respaced_timesteps(ddpm.T, steps, tau)
    if not ts:
        return x01
    draw = draw or torch.randn_like
    x = ddpm.q_sample(x01, ts[0], draw(x01))
    for i, t in enumerate(ts):
        if known is not None:
            x_known, mask = known
            x = mask * x + (1 - mask) * ddpm.q_sample(x_known, t, draw(x))
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        z = draw(x) if eta > 0 and t_prev >= 0 else None
        if grad_checkpoint and torch.is_grad_enabled():
            x = checkpoint(denoise_step, ddpm, x, t, t_prev, eta, z, use_reentrant=False)
        else:
            x = denoise_step(ddpm, x, t, t_prev, eta, z)
    out = ((x + 1) / 2).clamp(0, 1)
    if known is not None:   # composite in [0, 1]: pixels outside the mask are exactly x_known
        out = known[1] * out + (1 - known[1]) * known[0]
    return out


def sample(ddpm: DDPM, n: int, shape: tuple[int, int, int], steps: int = 100, eta: float = 1.0,
           seed: int = 0) -> torch.Tensor:
    """Unconditional samples in [0, 1] (for checking a DDPM by eye and for tests)."""
    torch.manual_seed(seed)
    ts = respaced_timesteps(ddpm.T, steps, 1.0)
    x = torch.randn((n, *shape), device=ddpm.alphas_cumprod.device)
    with torch.no_grad():
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = denoise_step(ddpm, x, t, t_prev, eta, torch.randn_like(x) if t_prev >= 0 else None)
    return ((x + 1) / 2).clamp(0, 1)

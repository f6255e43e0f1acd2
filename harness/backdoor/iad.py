"""IAD, the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), as BackdoorBench's
attack/inputaware.py (config/attack/inputaware/default.yaml) computes it, in a data-poisoning form.

A generator G maps an image to a pattern, a mask network M maps it to a mask; the triggered image is
x + (G(x) - x) * T(M(x)), T(m) = tanh(20 m - 10) / (2 + 1e-7) + 0.5 (their Threshold). G and M are
their encoder-decoder `InputAwareGenerator` (M with one output channel): per level two 3x3
conv + BatchNorm (momentum 0.05) + ReLU blocks and a 2x2 max-pool, a middle block, then per level a
bilinear x2 upsample and two blocks (the last without ReLU), widths w, 2w, 4w down and back; the
output passes their child `tanh` module and then tanh again in `forward` (a Tanh registered as a
child of an nn.Sequential runs with the children: tanh(tanh(.)) / (2 + 1e-7) + 0.5, kept). They
see the image normalised by the dataset's mean and std (ours: the manifest's), and their pattern is
compared, mask-blended and stored in [0, 1] space (their normalised-space blend is the same affine map).

The artifact (harness/backdoor/learned.py, built once per key): on the train split at native
resolution, two independently shuffled passes per epoch (their two loaders), batch 128:
  1. M alone for `mask_epochs` (their clean_train_epochs, 25): Adam(lr_m 0.01, betas (0.5, 0.9)),
     MultiStepLR [10, 20] x 0.1; loss lambda_norm (100) x mean(relu(T(M(x1)) - mask_density (0.032)))
     + lambda_div x lambda_div (their lambda_div is applied twice; 1) x mean(d(x1, x2) / (d(m1, m2) +
     1e-7)), d the per-sample RMS distance in normalised space; their train-mode forward of M(x1)
     whose output is unused (it moves BatchNorm's statistics) is kept. Then M is frozen (eval).
  2. G jointly with the classifier C for `epochs` (their epochs, 100): in every batch the first
     int(rate x B) samples (`rate` 0.1; below one per batch, one with probability rate x B, their
     generalize_to_lower_pratio) get their own trigger and the target label, the next as many get the
     trigger of the other pass's image at the same place (cross, label kept), the rest stay clean;
     loss CE + lambda_div x mean(d(x1, x2) / (d(G(x1), G(x2)) + 1e-7)) over the poisoned ones and the
     cross donors (patterns normalised); C: SGD(lr_c 0.01, momentum 0.9, wd 5e-4), MultiStepLR
     [100, 200, 300, 400]; G: Adam(lr_g 0.01, betas (0.5, 0.9)), MultiStepLR [200, 300, 400, 500].
     Their loop zeroes only C's gradients, so G's accumulate over every step of the run: kept as the
     default (`g_grad: accumulate`), `g_grad: zero` a named option.
Stored: G's and M's state dicts as plain arrays (`G.<name>`, `M.<name>`; never pickled), the
normalisation and the network shape; `use_artifact` rebuilds them in eval mode.

Poisoning (the data-poisoning form): a poisoned sample (10%, all-to-one, target 0) is its own
triggered image, a cross sample (`cross_ratio` 1.0 per poisoned sample: their num_cross = num_bd)
keeps its label and carries the pattern and mask of ANOTHER image of its decoded batch (drawn from
the batch's generator), and a test image gets its own trigger; every image is stored as their
`set_one_bd_sample` stores it (ToPILImage: x * 255 truncated to uint8). `poisoning: static` (a fixed
10% and 10% cross, as their saved bd_train) by default, `per_batch` (their training loop) an option.

Departures, named: BackdoorBench's backdoored model IS C, trained jointly with G; here the cell's
model is trained by ERM on the data G and M poison (so every defense starts from one poisoned ERM)
and the joint-training form is not built. C starts from the clean surrogate (harness/backdoor/
surrogate.py, shared with LF / LC / TrojanNN), theirs from random weights; no augmentation (theirs
random crop + flip); d over an empty poisoned slice (nan in theirs) is left out of the loss; the
cross donor is another image of the same batch (theirs a second shuffled loader's). Sizes: their
widths and depths are 16 / 2 levels for MNIST and 32 / 3 otherwise; ours 16 for one channel and 32
for three, and the depth theirs (2 for one channel, 3 otherwise) lowered until 2^depth divides the
image (8x8 grey: 2 levels to 2x2; 16x16 grey: 2; 32x32 RGB: 3; 64 px: 3); under 2 levels is refused.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.backdoor.learned import LearnedPoison
from harness.core.registry import POISONS

EPS_OUT = 1e-7  # their generator's and Threshold's 2 + eps
G_GRADS = ("accumulate", "zero")


class ConvBlock(nn.Sequential):
    """3x3 conv (padding 1), BatchNorm (momentum 0.05), ReLU unless `relu` is False."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(cin, cout, 3, 1, 1)
        self.batch_norm = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.05)
        if relu:
            self.relu = nn.ReLU(inplace=True)


class Pool(nn.Sequential):
    def __init__(self) -> None:
        super().__init__()
        self.maxpooling = nn.MaxPool2d(2, 2)


class Up(nn.Sequential):
    def __init__(self) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=(2, 2), mode="bilinear")


class IADNet(nn.Sequential):
    """The encoder-decoder of G (out_channels = the image's) and M (out_channels 1); output in
    (0, 1). Module names follow the paper's code so state dicts read across."""

    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int) -> None:
        super().__init__()
        cur, nxt = in_channels, width
        for step in range(depth):
            self.add_module(f"convblock_down_{2 * step}", ConvBlock(cur, nxt))
            self.add_module(f"convblock_down_{2 * step + 1}", ConvBlock(nxt, nxt))
            self.add_module(f"downsample_{step}", Pool())
            if step < depth - 1:
                cur, nxt = nxt, nxt * 2
        self.add_module("convblock_middle", ConvBlock(nxt, nxt))
        cur, nxt = nxt, nxt // 2
        for step in range(depth):
            self.add_module(f"upsample_{step}", Up())
            self.add_module(f"convblock_up_{2 * step}", ConvBlock(cur, cur))
            self.add_module(f"convblock_up_{2 * step + 1}", ConvBlock(cur, nxt, relu=step != depth - 1))
            cur, nxt = nxt, nxt // 2
            if step == depth - 2:
                nxt = out_channels
        self.tanh = nn.Tanh()  # a child: runs with the others, before forward's own tanh (as theirs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return torch.tanh(x) / (2 + EPS_OUT) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """Their Threshold: a steep tanh step of M's output at 0.5."""
    return torch.tanh(m * 20 - 10) / (2 + EPS_OUT) + 0.5


def architecture(channels: int, height: int, width: int, net_width: int | None = None,
                 depth: int | None = None) -> tuple[int, int]:
    """(width, depth) of G and M for an image: their MNIST / CIFAR sizes by channel count, the depth
    lowered until 2^depth divides the image; ValueError naming the fix when under 2 levels."""
    w = int(net_width) if net_width is not None else (16 if channels == 1 else 32)
    if depth is not None:
        d = int(depth)
    else:
        d = 2 if channels == 1 else 3
        while d > 2 and (height % 2 ** d or width % 2 ** d):
            d -= 1
    if d < 2 or height % 2 ** d or width % 2 ** d:
        raise ValueError(f"iad: a {height}x{width} image does not pool {d} times by 2 (the generator needs at least "
                         f"2 levels, 2^depth dividing both sides). Fix: set backdoor.depth (>= 2) so 2^depth divides "
                         f"{height} and {width}, or prepare the dataset at such a size")
    if w < 2:
        raise ValueError(f"iad: backdoor.width must be >= 2 (channels of the first level), got {w}")
    return w, d


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel (x - mean) / std, as their Normalize."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS distance: sqrt(mean over C, H, W of (a - b)^2) (their criterion_div path)."""
    return torch.sqrt(F.mse_loss(a, b, reduction="none").mean(dim=(1, 2, 3)))


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, eps: float) -> torch.Tensor:
    """mean(d(x1, x2) / (d(p1, p2) + eps)): patterns of distinct images must differ."""
    return torch.mean(distance(x1, x2) / (distance(p1, p2) + eps))


def blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The triggered image x + (pattern - x) * mask."""
    return x + (pattern - x) * mask


def stored(x: torch.Tensor) -> torch.Tensor:
    """As their set_one_bd_sample stores an image (ToPILImage: x * 255 truncated to uint8), read back."""
    return torch.floor((x * 255).clamp(0, 255)) / 255


def n_poison(rate: float, batch: int, gen: torch.Generator) -> int:
    """Their generalize_to_lower_pratio: int(rate * B), or 1 with probability rate * B below one."""
    if rate * batch >= 1:
        return int(rate * batch)
    return int(float(torch.rand((), generator=gen)) < rate * batch)


@POISONS.register("iad")
class InputAware(LearnedPoison):
    name = "iad"
    artifact_fields = ("rate", "label_mode", "mask_epochs", "epochs", "batch_size", "lr_g", "lr_c", "lr_m",
                       "milestones_g", "milestones_c", "milestones_m", "gamma_g", "gamma_c", "gamma_m", "lambda_div",
                       "lambda_norm", "mask_density", "epsilon", "width", "depth", "g_grad", "net_seed")

    def __init__(self, mask_epochs: int = 25, epochs: int = 100, batch_size: int = 128, lr_g: float = 0.01,
                 lr_c: float = 0.01, lr_m: float = 0.01, milestones_g: Sequence[int] = (200, 300, 400, 500),
                 milestones_c: Sequence[int] = (100, 200, 300, 400), milestones_m: Sequence[int] = (10, 20),
                 gamma_g: float = 0.1, gamma_c: float = 0.1, gamma_m: float = 0.1, lambda_div: float = 1.0,
                 lambda_norm: float = 100.0, mask_density: float = 0.032, epsilon: float = 1e-7,
                 width: int | None = None, depth: int | None = None, g_grad: str = "accumulate",
                 net_seed: int = 0, cross_ratio: float = 1.0, **common) -> None:
        super().__init__(**common)
        if int(mask_epochs) < 0 or int(epochs) < 0 or int(batch_size) < 2:
            raise ValueError(f"iad needs mask_epochs >= 0, epochs >= 0, batch_size >= 2; got {mask_epochs}, {epochs}, "
                             f"{batch_size}")
        if min(float(lr_g), float(lr_c), float(lr_m)) <= 0:
            raise ValueError(f"iad: lr_g, lr_c, lr_m must be > 0, got {lr_g}, {lr_c}, {lr_m}")
        if not 0 < float(mask_density) < 1 or float(lambda_div) < 0 or float(lambda_norm) < 0 or float(epsilon) <= 0:
            raise ValueError(f"iad needs mask_density in (0, 1), lambda_div >= 0, lambda_norm >= 0, epsilon > 0; got "
                             f"{mask_density}, {lambda_div}, {lambda_norm}, {epsilon}")
        if g_grad not in G_GRADS:
            raise ValueError(f"backdoor.g_grad must be one of {', '.join(G_GRADS)} (accumulate: theirs, G's gradients "
                             f"never zeroed), got {g_grad!r}")
        if float(cross_ratio) < 0:
            raise ValueError(f"backdoor.cross_ratio must be >= 0 (cross samples per poisoned one), got {cross_ratio}")
        if depth is not None and int(depth) < 2:
            raise ValueError(f"backdoor.depth must be >= 2 (pooling levels of G and M) or null (from the size), got {depth}")
        self.mask_epochs, self.epochs, self.batch_size = int(mask_epochs), int(epochs), int(batch_size)
        self.lr_g, self.lr_c, self.lr_m = float(lr_g), float(lr_c), float(lr_m)
        self.milestones_g, self.milestones_c = [int(m) for m in milestones_g], [int(m) for m in milestones_c]
        self.milestones_m = [int(m) for m in milestones_m]
        self.gamma_g, self.gamma_c, self.gamma_m = float(gamma_g), float(gamma_c), float(gamma_m)
        self.lambda_div, self.lambda_norm = float(lambda_div), float(lambda_norm)
        self.mask_density, self.epsilon = float(mask_density), float(epsilon)
        self.width, self.depth = (None if width is None else int(width)), (None if depth is None else int(depth))
        self.g_grad, self.net_seed, self.cross_ratio = g_grad, int(net_seed), float(cross_ratio)
        self._nets: dict[str, Any] | None = None

    # -- the networks -------------------------------------------------------------------------

    def networks(self, channels: int, height: int, width: int) -> tuple[IADNet, IADNet]:
        """Fresh (G, M) for this image shape, initialised from `net_seed`."""
        w, d = architecture(channels, height, width, self.width, self.depth)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.net_seed)
            return IADNet(channels, channels, w, d), IADNet(channels, 1, w, d)

    # -- the artifact -------------------------------------------------------------------------

    def train_mask(self, netM: IADNet, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   gen: torch.Generator, device: torch.device | str, log: Callable[[str], None]) -> None:
        """Stage 1: M alone on diversity + norm, then frozen in eval mode."""
        opt = torch.optim.Adam(netM.parameters(), self.lr_m, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones_m, self.gamma_m)
        for epoch in range(self.mask_epochs):
            netM.train()
            for x1, x2 in self._pairs(images, gen, device):
                x1, x2 = normalise(x1, mean, std), normalise(x2, mean, std)
                loss, norm, div = self.mask_step(netM, opt, x1, x2)
            sched.step()
            log(f"iad mask epoch {epoch + 1}/{self.mask_epochs}: loss {loss:.4f} norm {norm:.4f} diversity {div:.4f}")
        netM.eval().requires_grad_(False)

    def mask_step(self, netM: IADNet, opt: torch.optim.Optimizer, x1: torch.Tensor,
                  x2: torch.Tensor) -> tuple[float, float, float]:
        """One step of M on a normalised pair of batches: (total, norm, diversity) losses."""
        opt.zero_grad()
        netM(x1)  # their unused forward: one more update of BatchNorm's running statistics
        m1, m2 = threshold(netM(x1)), threshold(netM(x2))
        div = diversity_loss(x1, x2, m1, m2, self.epsilon) * self.lambda_div
        norm = torch.mean(F.relu(m1 - self.mask_density))
        total = self.lambda_norm * norm + self.lambda_div * div
        total.backward()
        opt.step()
        return float(total.detach()), float(norm.detach()), float(div.detach())

    def joint_step(self, netC: nn.Module, netG: IADNet, netM: IADNet, opt_c: torch.optim.Optimizer,
                   opt_g: torch.optim.Optimizer, x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor,
                   mean: torch.Tensor, std: torch.Tensor, num_classes: int, gen: torch.Generator
                   ) -> dict[str, float]:
        """One step of G and C on a pair of batches in [0, 1] (C normalises inside)."""
        opt_c.zero_grad()
        if self.g_grad == "zero":
            opt_g.zero_grad()
        nb = n_poison(self.rate, len(x1), gen)
        n1, n2 = normalise(x1, mean, std), normalise(x2, mean, std)
        p1, p2 = netG(n1[:nb]), netG(n2[nb:2 * nb])
        m1, m2 = threshold(netM(n1[:nb])), threshold(netM(n2[nb:2 * nb]))
        bd = blend(x1[:nb], p1, m1)
        cross = blend(x1[nb:2 * nb], p2, m2)
        inputs = torch.cat([bd, cross, x1[2 * nb:]])
        targets = torch.cat([self.poisoned_labels(y1[:nb], num_classes), y1[nb:]])
        ce = F.cross_entropy(netC(inputs), targets)
        total = ce
        div = torch.zeros(())
        if nb > 0:  # theirs: the mean over an empty slice is nan
            div = diversity_loss(n1[:nb], n2[nb:2 * nb], normalise(p1, mean, std), normalise(p2, mean, std),
                                 self.epsilon) * self.lambda_div
            total = ce + div
        total.backward()
        opt_c.step()
        opt_g.step()
        return {"loss": float(total.detach()), "ce": float(ce.detach()), "div": float(div.detach()), "poisoned": nb}

    def _pairs(self, images: torch.Tensor, gen: torch.Generator, device: torch.device | str,
               labels: torch.Tensor | None = None):
        """Their two shuffled loaders zipped: (x1, x2) or (x1, y1, x2) batches on `device`."""
        p1, p2 = torch.randperm(len(images), generator=gen), torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), self.batch_size):
            a, b = p1[i:i + self.batch_size], p2[i:i + self.batch_size]
            if labels is None:
                yield images[a].to(device), images[b].to(device)
            else:
                yield images[a].to(device), labels[a].to(device), images[b].to(device)

    def build_artifact(self, data_dir: str | Path, model: nn.Module | None, device: torch.device | str,
                       log: Callable[[str], None]) -> dict[str, np.ndarray]:
        from harness.backdoor.surrogate import load_native_split
        from harness.data.shards import load_manifest

        assert model is not None
        manifest = load_manifest(Path(data_dir))
        channels, (height, width) = int(manifest["channels"]), manifest["image_size"][:2]
        netG, netM = self.networks(channels, int(height), int(width))  # refuses a bad size before any work
        netG, netM = netG.to(device), netM.to(device)
        mean = torch.tensor(manifest["mean"], dtype=torch.float32, device=device)
        std = torch.tensor(manifest["std"], dtype=torch.float32, device=device)
        images, labels = load_native_split(data_dir, "train")
        gen = torch.Generator().manual_seed(self.net_seed)
        started = time.time()
        self.train_mask(netM, images, mean, std, gen, device, log)
        netC = copy.deepcopy(model).to(device).requires_grad_(True)
        opt_c = torch.optim.SGD(netC.parameters(), self.lr_c, momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(netG.parameters(), self.lr_g, betas=(0.5, 0.9))
        sched_c = torch.optim.lr_scheduler.MultiStepLR(opt_c, self.milestones_c, self.gamma_c)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, self.milestones_g, self.gamma_g)
        for epoch in range(self.epochs):
            netC.train()
            netG.train()
            for x1, y1, x2 in self._pairs(images, gen, device, labels):
                facts = self.joint_step(netC, netG, netM, opt_c, opt_g, x1, y1, x2, mean, std,
                                        int(manifest["num_classes"]), gen)
            sched_c.step()
            sched_g.step()
            log(f"iad joint epoch {epoch + 1}/{self.epochs}: loss {facts['loss']:.4f} ce {facts['ce']:.4f} "
                f"diversity {facts['div']:.4f} {time.time() - started:.0f}s")
        netG.eval().requires_grad_(False)
        self._log_joint_model(netC.eval(), netG, netM, data_dir, mean, std, device, log)
        arrays = {f"G.{k}": _plain(v) for k, v in netG.state_dict().items()}
        arrays.update({f"M.{k}": _plain(v) for k, v in netM.state_dict().items()})
        w, d = architecture(channels, int(height), int(width), self.width, self.depth)
        arrays.update({"norm_mean": mean.cpu().numpy(), "norm_std": std.cpu().numpy(),
                       "shape": np.asarray([channels, int(height), int(width)], dtype=np.int64),
                       "net": np.asarray([w, d], dtype=np.int64)})
        return arrays

    def _log_joint_model(self, netC: nn.Module, netG: IADNet, netM: IADNet, data_dir: str | Path,
                         mean: torch.Tensor, std: torch.Tensor, device: torch.device | str,
                         log: Callable[[str], None]) -> None:
        """The jointly trained C's clean accuracy and ASR on the test split (their official model;
        logged, not kept)."""
        from harness.backdoor.surrogate import load_native_split

        xt, yt = load_native_split(data_dir, "test")
        with torch.no_grad():
            xt, yt = xt.to(device), yt.to(device)
            keep = yt != self.target
            n = normalise(xt, mean, std)
            bd = stored(blend(xt, netG(n), threshold(netM(n))))
            acc = float((netC(xt).argmax(1) == yt).float().mean())
            asr = float((netC(bd[keep]).argmax(1) == self.target).float().mean())
        log(f"iad: the jointly trained classifier (not the cell's model): clean accuracy {acc:.3f}, ASR {asr:.3f}")

    # -- applying it --------------------------------------------------------------------------

    def use_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        channels, height, width = (int(v) for v in arrays["shape"])
        w, d = (int(v) for v in arrays["net"])
        netG, netM = IADNet(channels, channels, w, d), IADNet(channels, 1, w, d)
        netG.load_state_dict({k[2:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("G.")})
        netM.load_state_dict({k[2:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("M.")})
        self._nets = {"G": netG.eval().requires_grad_(False), "M": netM.eval().requires_grad_(False),
                      "mean": torch.from_numpy(np.array(arrays["norm_mean"])),
                      "std": torch.from_numpy(np.array(arrays["norm_std"])), "shape": (channels, height, width)}

    def apply(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """x triggered with the pattern and mask G and M make of `source` (x itself for a poisoned or
        test image, another image for a cross sample), as stored uint8 images."""
        self.require_loaded()
        nets = self._nets
        assert nets is not None
        if tuple(x.shape[1:]) != nets["shape"] or tuple(source.shape[1:]) != nets["shape"]:
            raise ValueError(f"iad's G and M were trained on {nets['shape']} images, got {tuple(x.shape[1:])}: the "
                             f"trigger is applied at the dataset's native resolution")
        if len(x) == 0:
            return x.clone()
        netG, netM = nets["G"].to(x.device), nets["M"].to(x.device)
        with torch.no_grad():
            n = normalise(source.float(), nets["mean"].to(x.device), nets["std"].to(x.device))
            out = blend(x.float(), netG(n), threshold(netM(n)))
        return stored(out).to(x.dtype)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, x)

    def cross_samples(self, x: torch.Tensor, cross: torch.Tensor, indices: np.ndarray,
                      gen: torch.Generator) -> torch.Tensor:
        """Cross samples: each image blended with the pattern and mask of another image of the batch
        (its offset 1..B-1 drawn from `gen`; a batch of one borrows from itself), label kept."""
        pos = torch.nonzero(cross).flatten()
        if len(x) < 2:
            return self.apply(x[pos], x[pos])
        partner = (pos + torch.randint(1, len(x), (len(pos),), generator=gen)) % len(x)
        return self.apply(x[pos], x[partner])

    def cross_variant(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.cross_samples(x, torch.ones(x.shape[0], dtype=torch.bool), np.arange(x.shape[0]), gen)


def _plain(v: torch.Tensor) -> np.ndarray:
    """A state-dict tensor as a plain array: floats as float32, counters as int64."""
    v = v.detach().cpu()
    return v.float().numpy() if v.is_floating_point() else v.to(torch.int64).numpy()

"""LF, low frequency (Zeng et al. ICCV 2021): a smooth universal adversarial perturbation, added.

The artifact (harness/backdoor/learned.py): on the clean surrogate (harness/backdoor/surrogate.py),
BackdoorBench's generator (resource/lowFrequency/generate_pattern.py, universal_pert.py,
deepfool.py, gauss_smooth.py): 100 random train images; passes over them (shuffled each pass)
in which every image the perturbation v does not yet move gets a targeted DeepFool step towards
the target class (overshoot 0.02, at most 200 iterations) and, when DeepFool converged,
v <- normalise(smooth(v + smooth(dr))), `smooth` the paper's Gaussian low-pass filter (sigma
6 x 5 on a 30-tap grid spaced 5: 6 pixels), `normalise` the min-max rescale onto [0, amplitude]
(0.2); after each pass the fooling rate on 10 test images per class; stop when it reaches
1 - delta (0.2), after 50 passes, or when the last 5 rates lie within 0.01. The random draws are
BackdoorBench's, through one numpy RandomState(seed): 10 test images per class, then the 100
train images, then each pass's shuffle.

Stored and applied as BackdoorBench ships and applies its npy files: the trigger in pixel levels,
floor(clip(v * 255)) as uint8 (its resource files hold 0..51; generate_pattern.py's current save
line adds 127.5 first, which the shipped files do not, and some shipped files hold v itself as
float32, whose addition truncates to nothing: both not copied), added by SimpleAdditiveTrigger:
clip(x + trigger, 0, 255) truncated to uint8. Dirty-label all-to-one, 10%, target 0 (BadNet's
pipeline, config/attack/lf/default.yaml).

Departures, named: the surrogate is our cell's architecture trained clean on the split (BackdoorBench
loads a clean checkpoint of the attacked architecture); the fooling rate adds v to [0, 1] images
(our models normalise inside; BackdoorBench adds v after its Normalize transform); DeepFool
backpropagates the two logits it uses (BackdoorBench every class's, then uses two); an update whose smoothed field is constant (DeepFool's step is 0 on an image already classified as
the target while v is still 0) is skipped, where BackdoorBench's min-max rescale divides by 0 and
turns v into NaN for good.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from harness.backdoor.base import from_levels
from harness.backdoor.learned import StoredTriggerPoison
from harness.core.registry import POISONS


def gauss_smooth(v: torch.Tensor, sig: float = 6.0) -> torch.Tensor:
    """The paper's low-pass filter on (C, H, W) float32: a separable Gaussian of 6 * 5 taps spaced
    5 with std 6 * 5 (so 6 pixels), zero padding (floor(K/2) - (K even) before, floor(K/2) after),
    convolved along the rows, then the columns."""
    size_denom = 5.0
    sigma = sig * size_denom
    k = int(sigma)
    grid = (np.arange(sigma, dtype=np.float32) - (sigma - 1.0) / 2.0) * size_denom
    kernel = 1.0 / (sigma * math.sqrt(2.0 * math.pi)) * np.exp(-(((grid - 0.0) / sigma) ** 2) * 0.5)
    kernel = torch.from_numpy((kernel / np.sum(kernel)).astype(np.float32))
    c = v.shape[0]
    before, after = k // 2 - (1 - k % 2), k // 2
    x = F.pad(v.float()[None], (before, after, before, after))
    x = F.conv2d(x, kernel.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
    return x[0]


def normalise(v: torch.Tensor, amplitude: float = 0.2) -> torch.Tensor:
    """Min-max rescale of the whole array onto [0, amplitude]."""
    return (v - v.min()) / (v.max() - v.min()) * amplitude


def targeted_deepfool(model: torch.nn.Module, x: torch.Tensor, target: int, overshoot: float = 0.02,
                      max_iter: int = 200) -> tuple[torch.Tensor, int]:
    """DeepFool towards `target` from x (C, H, W): (the total step (1 + overshoot) r_tot, iterations).
    Each iteration moves by |f_t - f_l| / ||w|| along w = grad f_t - grad f_l (two backward passes;
    the step's arithmetic in numpy float32 on the host, as BackdoorBench's), l the label of the
    starting point, accumulating r_tot in float32, until the prediction is the target."""
    with torch.no_grad():
        label = int(model(x[None]).argmax(1))
    # r_tot and the later points are (1, C, H, W) arrays, the first point a (C, H, W) image seen as a
    # batch of one: as BackdoorBench's, whose convolution kernels then see the same strides (the
    # logits differ in the last bits otherwise, and DeepFool near the boundary amplifies that)
    r_tot = np.zeros((1, *x.shape), dtype=np.float32)
    point = x.clone()[None].requires_grad_(True)
    logits = model(point)[0]
    loops = 0
    while int(logits.argmax()) != target and loops < max_iter:
        (g_target,) = torch.autograd.grad(logits[target], point, retain_graph=True)
        (g_label,) = torch.autograd.grad(logits[label], point)
        # float32 on the host in C order, as BackdoorBench's gradient copies (np.linalg.norm sums in memory order)
        w = np.ascontiguousarray(g_target.cpu().numpy()) - np.ascontiguousarray(g_label.cpu().numpy())
        f = (logits[target] - logits[label]).detach().cpu().numpy()
        r_i = abs(f) / np.linalg.norm(w.flatten()) * w / np.linalg.norm(w)
        if not np.all(np.isfinite(r_i)):
            r_i = np.zeros_like(r_i)
        r_tot = np.float32(r_tot + r_i)
        point = (x + (1 + overshoot) * torch.from_numpy(r_tot).to(x.device)).requires_grad_(True)
        logits = model(point)[0]
        loops += 1
    return (1 + overshoot) * torch.from_numpy(r_tot[0]).to(x.device), loops


def pick_per_class(rng: np.random.RandomState, labels: np.ndarray, count: int) -> np.ndarray:
    """BackdoorBench's get_part_for_each_label with an integer count: per class in sorted order,
    `count` indices drawn without replacement."""
    out: list[int] = []
    for c in np.unique(labels):
        pos = np.where(labels == c)[0]
        out += rng.choice(pos, size=int(min(count, len(pos))), replace=False).tolist()
    return np.asarray(out, dtype=np.int64)


@POISONS.register("lf")
class LowFrequency(StoredTriggerPoison):
    name = "lf"
    artifact_fields = ("images", "per_class_eval", "delta", "max_passes", "overshoot", "max_iter_df", "sigma",
                       "amplitude", "uap_seed")

    def __init__(self, images: int = 100, per_class_eval: int = 10, delta: float = 0.8, max_passes: int = 50,
                 overshoot: float = 0.02, max_iter_df: int = 200, sigma: float = 6.0, amplitude: float = 0.2,
                 uap_seed: int = 0, **common) -> None:
        super().__init__(**common)
        if int(images) < 1 or int(max_passes) < 1 or int(max_iter_df) < 2 or not 0 < float(amplitude) <= 1:
            raise ValueError(f"lf needs images >= 1, max_passes >= 1, max_iter_df >= 2, amplitude in (0, 1]; "
                             f"got {images}, {max_passes}, {max_iter_df}, {amplitude}")
        if not 0 <= float(delta) <= 1:
            raise ValueError(f"backdoor.delta must be in [0, 1] (the UAP stops at fooling rate 1 - delta), got {delta}")
        self.images, self.per_class_eval, self.delta = int(images), int(per_class_eval), float(delta)
        self.max_passes, self.overshoot, self.max_iter_df = int(max_passes), float(overshoot), int(max_iter_df)
        self.sigma, self.amplitude, self.uap_seed = float(sigma), float(amplitude), int(uap_seed)
        self._levels: torch.Tensor | None = None

    def universal_perturbation(self, model: torch.nn.Module, train: torch.Tensor, test: torch.Tensor,
                               test_labels: np.ndarray, device: torch.device | str,
                               log: Callable[[str], None] = lambda m: None) -> torch.Tensor:
        """v (C, H, W) in [0, amplitude] for a model, as BackdoorBench's universal_perturbation."""
        rng = np.random.RandomState(self.uap_seed)
        evaluation = test[pick_per_class(rng, test_labels, self.per_class_eval)].to(device)
        data = train[rng.choice(len(train), min(self.images, len(train)), replace=False)].to(device)
        model = model.to(device).eval()
        v = torch.zeros(data.shape[1:], device=device)
        with torch.no_grad():
            clean_pred = model(evaluation).argmax(1)
        rates: list[float] = []
        for step in range(self.max_passes):
            data = data[torch.from_numpy(rng.permutation(len(data))).to(device)]  # np.random.shuffle's draw
            v = self.uap_pass(model, data, v)
            with torch.no_grad():
                rate = float((model(evaluation + v).argmax(1) != clean_pred).float().mean())
            rates.append(rate)
            log(f"lf UAP pass {step + 1}/{self.max_passes}: fooling rate {rate:.3f}")
            if rate >= 1 - self.delta or (len(rates) >= 5 and max(rates[-5:]) - min(rates[-5:]) < 0.01):
                break
        return v.cpu()

    def uap_pass(self, model: torch.nn.Module, data: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One pass over `data` (N, C, H, W) in order: every image v does not move gets a DeepFool
        step towards the target and, when DeepFool converged, v <- normalise(smooth(v + smooth(dr)))."""
        for k in range(len(data)):
            with torch.no_grad():
                same = int(model(data[k:k + 1]).argmax(1)) == int(model(data[k:k + 1] + v).argmax(1))
            if same:
                dr, loops = targeted_deepfool(model, data[k] + v, self.target, self.overshoot, self.max_iter_df)
                smooth = gauss_smooth(v + gauss_smooth(dr, self.sigma), self.sigma)
                if loops < self.max_iter_df - 1 and smooth.max() > smooth.min():
                    v = normalise(smooth, self.amplitude)
        return v

    def build_artifact(self, data_dir: str | Path, model: torch.nn.Module | None, device: torch.device | str,
                       log: Callable[[str], None]) -> dict[str, np.ndarray]:
        from harness.backdoor.surrogate import load_native_split

        assert model is not None
        train, _ = load_native_split(data_dir, "train")
        test, test_labels = load_native_split(data_dir, "test")
        v = self.universal_perturbation(model, train, test, test_labels.numpy(), device, log)
        return {"trigger": np.floor(np.clip(v.double().numpy() * 255, 0, 255)).astype(np.uint8)}

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return from_levels(self.levels_plus_trigger(x), x.dtype)

"""ACE beside guillaumejs2403/ACE: main.py's `filter_fn` (the attack, the mask, the inpainting
pass), core/attacks_and_models.py's `PGD` and `JointClassifierDDPM`, core/utils.py's
`generate_mask` and guided_diffusion's `SpacedDiffusion` / `space_timesteps`, run on the same DDPM.

One DDPM for both sides: our diffusers UNet2DModel (tiny, a few training steps on the batch) is
what their diffusion code calls (their `p_mean_variance(model, x, t)` reads `model(x, t)` as the
noise prediction, timesteps mapped to the full chain by their `_WrappedModel`); their
`SpacedDiffusion` is built on our schedule (betas from our alphas_cumprod) with
`learn_sigma False, sigma_small True` (the fixed posterior variance ours uses; the official
DDPMs learn sigma, ours cannot). Their classifier is our tiny test_resnet (eval mode).

Settings are scripts/celeba-attack.sh's: respacing 50, sampling_time_fraction 0.1 (5 filter
steps), stochastic, PGD 50 iterations of 1/255, eps 255/255, dist_l1, inpaint 0.15, dilation 15
(main.py's default), on a batch of 4 3x16x16 images towards each image's runner-up class. Their
L1 term is summed over the batch while their CE is averaged (METHODS.md's trap): their run gets
dist_l1 = 0.001 / 4, which is ours with 0.001 per sample (only the gradient's sign is used, and
their gradient is ours / 4). Both sides draw their noise from a generator seeded alike (theirs:
torch's global one, via torch.randn_like; ours: ace.NoiseStream), and the draws are compared.

  respacing_timesteps      the filter's timesteps at the official scripts' (T, respacing, fraction)
  noise_draws / _count     every random tensor each side drew, in order
  filter_output            F_tau of the batch: their JointClassifierDDPM's filter vs our denoise_from
  iterations               attack iterations per sample (their PGD's forward calls through the filter)
  pre_explanation          x' after the attack (their `pe`)
  mask_pixels_differing    the refinement mask (theirs: generate_mask's dilated map >= 0.15)
  counterfactual           the final counterfactual after the one inpainting pass (their `ce`)
and the same three at dilation 3 with steps of 0.02 (configs/analysis/ace.yaml's: at 16x16 a
15-pixel max-pool marks nearly every pixel, and 50 steps of 1/255 flip none of the tiny model's
images, 0.02 flips 3 of 4).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from conformance_checks.common import Compared, import_file, load_functions, max_abs, tiny_model

REPOSITORY = "guillaumejs2403/ACE"
SEED, BATCH, SHAPE = 4, 4, (3, 16, 16)
L1 = 0.001
SCRIPTS = [(500, 50, 0.1), (500, 25, 0.2), (1000, 25, 0.2), (1000, 100, 0.05), (1000, 50, 0.1), (1000, 50, 0.3)]


class NoisePrediction(nn.Module):
    """Our UNet as their diffusion code calls a model: model(x, t) -> the noise prediction."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


@contextlib.contextmanager
def recorded_randn_like(draws: list[torch.Tensor]) -> Iterator[None]:
    """torch.randn_like as usual, each draw also kept (their code draws all its noise with it)."""
    original = torch.randn_like

    def randn_like(like: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(like, *args, **kwargs)
        draws.append(out.detach().clone())
        return out

    torch.randn_like = randn_like  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.randn_like = original  # type: ignore[assignment]


def official(reference: Path) -> dict[str, Any]:
    """Their modules, imported from the checkout (nothing copied)."""
    if str(reference) not in sys.path:
        sys.path.insert(0, str(reference))
    gd = importlib.import_module("guided_diffusion.gaussian_diffusion")
    respace = importlib.import_module("guided_diffusion.respace")
    attacks = import_file(reference / "core" / "attacks_and_models.py")
    utils = import_file(reference / "core" / "utils.py")
    main = load_functions(reference / "main.py", ["filter_fn"], {"torch": torch, "generate_mask": utils.generate_mask})
    return {"gd": gd, "respace": respace, "attacks": attacks, "utils": utils, "filter_fn": main["filter_fn"]}


def their_diffusion(ref: dict[str, Any], alphas_cumprod: torch.Tensor, steps: int) -> Any:
    """Their SpacedDiffusion on our schedule (what create_gaussian_diffusion builds for
    learn_sigma False, sigma_small True, predict_xstart False, rescale_timesteps False)."""
    gd, respace = ref["gd"], ref["respace"]
    ac = alphas_cumprod.double().cpu().numpy()
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return respace.SpacedDiffusion(use_timesteps=respace.space_timesteps(len(ac), str(steps)), betas=betas,
                                   model_mean_type=gd.ModelMeanType.EPSILON,
                                   model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE,
                                   rescale_timesteps=False)


def tiny_setup() -> tuple[Any, nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny DDPM trained a few steps on the batch, the classifier, the batch and its targets."""
    from harness.eval.analysis.ace import runner_up_target
    from harness.eval.analysis.diffusion import DDPMConfig, train_ddpm

    x = torch.rand(BATCH, *SHAPE, generator=torch.Generator().manual_seed(0))
    ddpm = train_ddpm(x.repeat(8, 1, 1, 1), DDPMConfig(channels=(8, 16), attention=False, train_steps=10,
                                                      batch_size=16, lr=2e-3))
    classifier = tiny_model(in_chans=SHAPE[0], img_size=SHAPE[1]).eval()
    return ddpm, classifier, x, runner_up_target(classifier, x)


def run_theirs(ref: dict[str, Any], ddpm: Any, classifier: nn.Module, x: torch.Tensor, target: torch.Tensor,
               dilation: int, step: float) -> dict[str, Any]:
    """main.py's filter_fn with the CelebA script's settings, after torch.manual_seed(SEED)."""
    steps = 50
    respaced_steps = int(0.1 * steps)   # main(): int(sampling_time_fraction * timestep_respacing)
    diffusion = their_diffusion(ref, ddpm.alphas_cumprod, steps)
    model = NoisePrediction(ddpm.unet)
    l1 = L1 / len(x)
    dist_fn = lambda x0, x_adv: l1 * (x0 - x_adv).abs().sum()   # main(): get_dist_fn with dist_l1 only
    draws: list[torch.Tensor] = []
    with recorded_randn_like(draws):
        joint = ref["attacks"].JointClassifierDDPM(classifier=classifier, ddpm=model, diffusion=diffusion,
                                                   steps=respaced_steps, stochastic=True).eval()
        calls = [0]
        joint.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        attack = ref["attacks"].get_attack("PGD", False, False)(
            predict=joint, loss_fn=None, dist_fn=dist_fn, eps=255 / 255, nb_iter=50, dist_schedule="none",
            binary=False, step=step)
        torch.manual_seed(SEED)
        ce, pe, _, _ = ref["filter_fn"](diffusion=diffusion, attack=attack, model=model, shape=x.shape,
                                        steps=respaced_steps, x=x, classifier=classifier, device="cpu",
                                        stochastic=True, target=target, inpaint=0.15, dilation=dilation)
        _, dilated = ref["utils"].generate_mask(x, pe, dilation)
    return {"cf": ce, "pre": pe, "mask": ~(dilated < 0.15), "iterations": calls[0], "draws": draws}


def run_ours(ddpm: Any, classifier: nn.Module, x: torch.Tensor, target: torch.Tensor, dilation: int,
             step: float) -> dict[str, Any]:
    from harness.eval.analysis import ace as ours

    cfg = ours.ACEConfig(tau=0.1, sampling_steps=50, eta=1.0, iterations=50, step_size=step, distance="l1",
                         dist_weight=L1, mask_threshold=0.15, mask_dilation=dilation, refine="repaint", seed=SEED)
    draws: list[torch.Tensor] = []
    call = ours.NoiseStream.__call__
    ours.NoiseStream.__call__ = lambda self, like: draws.append(call(self, like)) or draws[-1]  # type: ignore
    try:
        res = ours.ace(classifier, ddpm, x, target, cfg)
    finally:
        ours.NoiseStream.__call__ = call  # type: ignore[method-assign]
    return {"cf": res.cf, "pre": res.pre, "mask": res.mask.bool(), "iterations": res.iterations, "draws": draws}


def filter_outputs(ref: dict[str, Any], ddpm: Any, x: torch.Tensor) -> float:
    """F_tau(x) under the same noise: their JointClassifierDDPM (identity classifier) vs denoise_from."""
    from harness.eval.analysis.diffusion import denoise_from

    diffusion = their_diffusion(ref, ddpm.alphas_cumprod, 50)
    joint = ref["attacks"].JointClassifierDDPM(classifier=nn.Identity(), ddpm=NoisePrediction(ddpm.unet),
                                               diffusion=diffusion, steps=5, stochastic=True)
    with torch.no_grad():
        torch.manual_seed(SEED)
        theirs = joint(x)
        torch.manual_seed(SEED)
        ours = denoise_from(ddpm, x, 0.1, 50, eta=1.0)
    return max_abs(theirs, ours)


def respacing_differences(ref: dict[str, Any]) -> int:
    """Timesteps (of all the scripts' settings) where their filter's steps and ours differ."""
    from harness.eval.analysis.diffusion import respaced_timesteps

    wrong = 0
    for T, steps, fraction in SCRIPTS:
        theirs = sorted(ref["respace"].space_timesteps(T, str(steps)))[:int(fraction * steps)][::-1]
        ours = respaced_timesteps(T, steps, fraction)
        wrong += abs(len(theirs) - len(ours)) + sum(a != b for a, b in zip(theirs, ours))
    return wrong


def check_ace(reference: Path) -> list[Compared]:
    torch.manual_seed(0)
    ref = official(reference)
    ddpm, classifier, x, target = tiny_setup()
    out = [Compared("respacing_timesteps", respacing_differences(ref), "int",
                    f"{len(SCRIPTS)} (T, respacing, fraction) settings"),
           Compared("filter_output", filter_outputs(ref, ddpm, x))]
    for dilation, step in ((15, 1 / 255), (3, 0.02)):
        theirs = run_theirs(ref, ddpm, classifier, x, target, dilation, step)
        ours = run_ours(ddpm, classifier, x, target, dilation, step)
        tag = "" if dilation == 15 else f"_dilation{dilation}_step0.02"
        if dilation == 15:
            out += [Compared("noise_draws_count", abs(len(theirs["draws"]) - len(ours["draws"])), "int",
                             f"theirs {len(theirs['draws'])}"),
                    Compared("noise_draws", max_abs(theirs["draws"], ours["draws"]))]
            out.append(Compared("iterations", max_abs(ours["iterations"], torch.full((BATCH,), theirs["iterations"])),
                                "int", f"theirs {theirs['iterations']} through the filter"))
        with torch.no_grad():
            flips = int((classifier(ours["cf"]).argmax(1) == target).sum())
        inside = int(ours["mask"].sum())
        out += [Compared(f"pre_explanation{tag}", max_abs(theirs["pre"], ours["pre"])),
                Compared(f"mask_pixels_differing{tag}", int((theirs["mask"] != ours["mask"]).sum()), "int",
                         f"{inside} of {ours['mask'].numel()} pixels in the mask"),
                Compared(f"counterfactual{tag}", max_abs(theirs["cf"], ours["cf"]), "float",
                         f"{flips}/{BATCH} flipped")]
    return out


CHECKS = {"ace": check_ace}

"""BPP, Refool and all-to-all labels beside SCLBD/BackdoorBench (its attack/bpp.py, attack/refool.py,
utils/bd_label_transform); the second module of poison checks against that repository.

Both sides get the same uint8 images (32x32 RGB, seeded, plus an all-0 and an all-255 image);
ours read them as the loader does (k / 255, float32).

BPP: its quantisation lives inside `Bpp.stage2_training` and `Bpp.train_step`, so their own
statements run here (picked from the syntax tree, common.ScriptBody): the `if args.dithering:`
block on the rounded pixel levels (its numba `floydDitherspeed` when dithering), `.div(255.0)`, and
the uint8 image its `set_one_bd_sample` stores (torchvision's ToPILImage: x * 255 truncated).
  bpp_test_images / bpp_dither_test_images   its stored bd-test images vs `trigger` (bytes)
  bpp_train_images / bpp_dither_train_images its on-the-fly training images (train_step's block,
                                             before normalisation) vs `train_variant` (float)
  bpp_negative_images                        train_step's negative-sample loop and clamp, with its
                                             bd/clean "datasets" holding the stored images of the
                                             batch and the same donor images on both sides, vs
                                             `cross_samples` (float, / 255)
  bpp_batch_counts                           its generalize_to_lower_pratio / int(bs * neg_ratio)
                                             vs our batch_counts, B = 128
  bpp_settings                               squeeze_num, dithering, pratio, neg_ratio / rate,
                                             target of config/attack/bpp/default.yaml vs ours
Refool: its `blend_images` (the authors' function) with every random choice handed to it (alpha_t,
offset, ghost_alpha, sigma; ghost_rate 1 or 0 to pick the model; `att` is drawn inside from
np.random: the same draw is made for ours after seeding it alike), against ours (`blend`) on the
same transmission and reflection images, 32x32, 16 pairs per model, offsets 3..8 and sigma 1..5.
  refool_ghost_images / refool_focal_images  bytes
  refool_settings                            alpha_t, ghost_rate, pratio, clean_label, target of
                                             config/attack/refool/default.yaml vs ours
all_to_all: its AllToAll_shiftLabelAttack(1, K) vs our poisoned_labels, K 10 and 43.
FTrojan: its utils/bd_img_transform/ftrojann.py `ftrojann_version` built from config/attack/ftrojannn/
default.yaml, run image by image and stored as its set_one_bd_sample does (astype(np.uint8)), vs our
`trigger`, on 16 uint8 32x32 images (2 all-0 / all-255) and 4 at 64x64 (2 x 2 windows).
  ftrojan_colour_conversions     our fixed-point RGB <-> YCrCb vs cv2.cvtColor, all 2^24 colours
  ftrojan_images_*_off_elsewhere pixels that differ outside those where their own DCT -> IDCT round
                                 trip left Y below its integer (the count as is in the note)
  ftrojan_images_*_noise_free    bytes, their IDCT's output rounded to 1e-9 in this process
  ftrojan_settings               magnitude, window_size, pos_list, channel_list, YUV, pratio, target

Needs numba (BPP's dithering) and OpenCV (Refool's and FTrojan's cv2 calls) importable: `pip install numba
opencv-python-headless` in a side environment on PYTHONPATH. NumPy 2 dropped `np.round_`, `np.float` and
`np.lib.pad` that their code calls: both are aliased in this process (to np.round, np.pad); nothing
of theirs is edited.
"""
from __future__ import annotations

import ast
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml

from conformance_checks.common import Compared, ScriptBody, load_functions, max_abs

REPOSITORY = "SCLBD/BackdoorBench"


def _numpy2_aliases() -> None:
    if not hasattr(np, "round_"):
        np.round_ = np.round  # type: ignore[attr-defined]
    if not hasattr(np.lib, "pad"):
        np.lib.pad = np.pad  # type: ignore[attr-defined]


def _images(n: int = 14, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return np.concatenate([images, np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 32, 32, 3), 255, np.uint8)])


def _as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def _bytes(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _byte_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    if a.shape != b.shape:
        return float("inf"), f"shapes {a.shape} vs {b.shape}"
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return float(d.max()), f"{int((d > 0).sum())} of {d.size} bytes differ"


def _stored(t: torch.Tensor) -> np.ndarray:
    """What their set_one_bd_sample stores for a float image tensor (C, H, W): ToPILImage."""
    from torchvision.transforms import ToPILImage

    return np.array(ToPILImage()(t))


# --------------------------------------------------------------------------------------------- BPP

def _their_bpp_block(reference: Path, method: str, levels: torch.Tensor, dithering: bool) -> torch.Tensor:
    """Their `if args.dithering:` block of `method` run on float32 levels (B, C, H, W)."""
    _numpy2_aliases()
    from numba import jit  # noqa: F401  (their decorator; the import fails loudly when numba is absent)
    from numba.types import float64, int64

    path = reference / "attack" / "bpp.py"
    helpers = load_functions(path, ["rnd1", "floydDitherspeed"],
                             {"np": np, "jit": jit, "float64": float64, "int64": int64})
    body = ScriptBody(path, method)
    block = body.select(lambda node, _: isinstance(node, ast.If) and ast.unparse(node.test) == "args.dithering")[0]
    args = SimpleNamespace(dithering=dithering, squeeze_num=8, device="cpu")
    namespace = {"torch": torch, "args": args, "inputs_bd": levels.clone(), "squeeze_num": 8,
                 "floydDitherspeed": helpers["floydDitherspeed"]}
    return body.run([block], namespace)["inputs_bd"]


def _their_negatives(reference: Path, levels: torch.Tensor, bd_stored: list[np.ndarray],
                     clean_stored: list[np.ndarray], donors: list[int], num_bd: int, num_neg: int) -> torch.Tensor:
    """train_step's negative-sample loop and clamp, its datasets holding the stored images."""
    from PIL import Image
    from torchvision.transforms import ToTensor

    path = reference / "attack" / "bpp.py"
    body = ScriptBody(path, "train_step")
    loop = body.select(lambda node, src: isinstance(node, ast.For) and src.startswith("for i in range(num_neg)"))[0]
    clamp = body.select(lambda node, src: src.startswith("inputs_negative = torch.clamp("))[0]
    stand_in = SimpleNamespace(device="cpu",
                               bd_train_dataset=[(Image.fromarray(a), 0) for a in bd_stored],
                               clean_train_dataset=[(Image.fromarray(a), 0) for a in clean_stored])
    namespace = {"torch": torch, "self": stand_in, "to_tensor": ToTensor(), "inputs_d": levels.clone(),
                 "inputs_negative": torch.zeros_like(levels[num_bd:num_bd + num_neg]), "num_bd": num_bd,
                 "num_neg": num_neg, "residual_index": donors}
    return body.run([loop, clamp], namespace)["inputs_negative"]


def check_bpp(reference: Path) -> list[Compared]:
    from harness.backdoor.bpp import BPP
    from harness.backdoor.plan import batch_counts

    images = _images()
    x = _as_batch(images)
    levels = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)  # their round(denorm * 255)
    out: list[Compared] = []
    for dithering, tag in ((False, "bpp"), (True, "bpp_dither")):
        ours = BPP(dithering=dithering)
        test = _their_bpp_block(reference, "stage2_training", levels, dithering).div(255.0)
        theirs = np.stack([_stored(t) for t in test])
        diff, note = _byte_diff(theirs, _bytes(ours.trigger(x)))
        out.append(Compared(f"{tag}_test_images", diff, "image", note))
        train = _their_bpp_block(reference, "train_step", levels, dithering) / 255.0
        out.append(Compared(f"{tag}_train_images", max_abs(train, ours.train_variant(x, np.arange(len(x)))), "float",
                            "on the fly, before normalisation (theirs normalises next)"))

    # negative samples: the first 4 images poisoned, the next 8 negative, donors drawn as ours draws them
    ours = BPP()
    num_bd, num_neg = 4, 8
    cross = torch.zeros(len(x), dtype=torch.bool)
    cross[num_bd:num_bd + num_neg] = True
    donors = torch.randint(0, len(x), (num_neg,), generator=torch.Generator().manual_seed(0)).tolist()
    bd_test = _their_bpp_block(reference, "stage2_training", levels, False).div(255.0)
    bd_stored = [_stored(t) for t in bd_test]
    clean_stored = [_stored(t) for t in x]  # their clean_train_dataset: the (de-normalised) float image stored
    theirs = _their_negatives(reference, levels, bd_stored, clean_stored, donors, num_bd, num_neg) / 255.0
    mine = ours.cross_samples(x, cross, np.arange(len(x)), torch.Generator().manual_seed(0))
    out.append(Compared("bpp_negative_images", max_abs(theirs, mine), "float",
                        f"{num_neg} negatives, donors {donors}"))

    cfg = yaml.safe_load((reference / "config" / "attack" / "bpp" / "default.yaml").read_text())
    lower = load_functions(reference / "attack" / "bpp.py", ["generalize_to_lower_pratio"],
                           {"np": np})["generalize_to_lower_pratio"]
    bs = 128
    theirs_counts = [int(lower(cfg["pratio"], bs)), int(bs * cfg["neg_ratio"])]
    ours_counts = list(batch_counts(bs, BPP(rate=cfg["pratio"], cross_ratio=cfg["neg_ratio"] / cfg["pratio"])))
    out.append(Compared("bpp_batch_counts", max_abs(theirs_counts, ours_counts), "int",
                        f"B {bs}: theirs {theirs_counts}, ours {ours_counts}"))
    defaults = BPP()
    out.append(Compared("bpp_settings", max_abs(
        [cfg["squeeze_num"], float(bool(cfg["dithering"])), cfg["pratio"], cfg["neg_ratio"] / cfg["pratio"],
         cfg["attack_target"]],
        [defaults.squeeze_num, float(defaults.dithering), defaults.rate, defaults.cross_ratio, defaults.target]),
        "float", "squeeze_num, dithering, pratio, neg_ratio / pratio, target"))
    return out


# ------------------------------------------------------------------------------------------ Refool

def _their_blend(reference: Path) -> Any:
    import cv2
    import scipy.stats as st
    from typing import Union

    from PIL import Image

    _numpy2_aliases()
    return load_functions(reference / "attack" / "refool.py", ["blend_images"],
                          {"np": np, "cv2": cv2, "random": random, "st": st, "Image": Image,
                           "Union": Union})["blend_images"]


def check_refool(reference: Path) -> list[Compared]:
    from harness.backdoor.refool import Refool, blend

    theirs_fn = _their_blend(reference)
    images = _images()
    reflections = _images(seed=1)[::-1].copy()
    rng = np.random.default_rng(7)
    out: list[Compared] = []
    for ghost, tag in ((True, "refool_ghost_images"), (False, "refool_focal_images")):
        theirs, mine = [], []
        for i, (t_img, r_img) in enumerate(zip(images, reflections)):
            offset = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
            ghost_alpha = float(abs(round(rng.random()) - rng.uniform(0.15, 0.5)))
            sigma = float(rng.uniform(1, 5))
            random.seed(i)
            np.random.seed(i)
            theirs.append(theirs_fn(t_img, r_img, max_image_size=32, ghost_rate=1.0 if ghost else 0.0, alpha_t=0.4,
                                    offset=offset, sigma=sigma, ghost_alpha=ghost_alpha)[0])
            np.random.seed(i)
            att = 1.08 + np.random.random() / 10.0  # their draw, made alike for ours
            mine.append(blend(t_img, r_img, 0.4, ghost, offset, ghost_alpha, sigma, att))
        diff, note = _byte_diff(np.stack(theirs), np.stack(mine))
        out.append(Compared(tag, diff, "image", note))
    cfg = yaml.safe_load((reference / "config" / "attack" / "refool" / "default.yaml").read_text())
    ours = Refool()
    out.append(Compared("refool_settings", max_abs(
        [cfg["alpha_t"], cfg["ghost_rate"], cfg["pratio"], float(bool(cfg["clean_label"])), cfg["attack_target"]],
        [ours.alpha_t, ours.ghost_rate, ours.rate, float(ours.clean_label), ours.target]),
        "float", "alpha_t, ghost_rate, pratio, clean_label, target"))
    return out


# --------------------------------------------------------------------------------------- all-to-all

def check_all_to_all(reference: Path) -> list[Compared]:
    from harness.backdoor.badnets import BadNets
    from conformance_checks.common import import_file

    labels_mod = import_file(reference / "utils" / "bd_label_transform" / "backdoor_label_transform.py")
    worst = 0.0
    for k in (10, 43):
        theirs = [labels_mod.AllToAll_shiftLabelAttack(1, k)(y) for y in range(k)]
        ours = BadNets(label_mode="all_to_all").poisoned_labels(torch.arange(k), k).tolist()
        worst = max(worst, max_abs(theirs, ours))
    return [Compared("all_to_all_labels", worst, "int", "every class, K 10 and 43")]

# ----------------------------------------------------------------------------------------- FTrojan

def _their_ftrojan(reference: Path) -> Any:
    """Their utils/bd_img_transform/ftrojann.py as a module (NumPy 2 lacks its `np.float`: aliased)."""
    from conformance_checks.common import import_file

    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]
    return import_file(reference / "utils" / "bd_img_transform" / "ftrojann.py")


def _all_colours() -> np.ndarray:
    a = np.arange(1 << 24, dtype=np.int64)
    return np.stack([a >> 16, (a >> 8) & 255, a & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)


def check_ftrojan(reference: Path) -> list[Compared]:
    import cv2

    from harness.backdoor.ftrojan import FTrojan, rgb_to_ycrcb, ycrcb_to_rgb

    module = _their_ftrojan(reference)
    cfg = yaml.safe_load((reference / "config" / "attack" / "ftrojannn" / "default.yaml").read_text())
    pos = [(cfg["pos_list"][2 * i], cfg["pos_list"][2 * i + 1]) for i in range(len(cfg["pos_list"]) // 2)]
    theirs_fn = module.ftrojann_version(YUV=cfg["YUV"], channel_list=cfg["channel_list"],
                                        window_size=cfg["window_size"], magnitude=cfg["magnitude"], pos_list=pos)
    ours = FTrojan()
    out: list[Compared] = []

    # the colour conversions, every colour both ways
    colours = _all_colours()
    worst = 0.0
    for rows in np.array_split(np.arange(4096), 16):
        block = colours[rows]
        t = torch.from_numpy(block).permute(2, 0, 1)[None]
        fwd = rgb_to_ycrcb(t)[0].permute(1, 2, 0).numpy()
        inv = ycrcb_to_rgb(t)[0].permute(1, 2, 0).numpy()
        worst = max(worst, float(np.abs(fwd - cv2.cvtColor(block, cv2.COLOR_RGB2YCrCb)).max()),
                    float(np.abs(inv - cv2.cvtColor(block, cv2.COLOR_YCrCb2RGB)).max()))
    out.append(Compared("ftrojan_colour_conversions", worst, "int", "cv2.cvtColor RGB2YCrCb and YCrCb2RGB, all 2^24"))

    # the poisoned images (their float64 result stored by set_one_bd_sample: astype(np.uint8))
    idct = module.IDCT
    for size, n in ((32, 16), (64, 4)):
        images = _images(n=n - 2, seed=3)
        if size != 32:
            images = np.random.default_rng(4).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        mine = _bytes(ours.trigger(_as_batch(images)))
        module.IDCT = idct
        theirs = np.stack([theirs_fn(img).astype(np.uint8) for img in images])
        diff, note = _byte_diff(theirs, mine)
        # where their own DCT -> IDCT left the (untouched) Y channel below its integer value
        yuv = module.RGB2YUV(images)
        lowered = module.IDCT(module.DCT(yuv, cfg["window_size"]), cfg["window_size"])[..., 0] < yuv[..., 0]
        differs = (theirs != mine).any(-1)
        out.append(Compared(f"ftrojan_images_{size}px_off_elsewhere", float((differs & ~lowered).sum()), "int",
                            f"pixels that differ where their round trip did not lower Y; as is: {note}, max {diff:g} "
                            f"level, in {int(differs.sum())} of {int(lowered.sum())} lowered pixels"))
        module.IDCT = lambda x, w: np.round(idct(x, w), 9)  # only their float noise removed, as a diagnosis
        theirs = np.stack([theirs_fn(img).astype(np.uint8) for img in images])
        module.IDCT = idct
        diff, note = _byte_diff(theirs, mine)
        out.append(Compared(f"ftrojan_images_{size}px_noise_free", diff, "image",
                            note + " (their IDCT output rounded to 1e-9)"))
    out.append(Compared("ftrojan_settings", max_abs(
        [cfg["magnitude"], cfg["window_size"], *cfg["pos_list"], *cfg["channel_list"], float(bool(cfg["YUV"])),
         cfg["pratio"], cfg["attack_target"]],
        [ours.magnitude, ours.window_size, *(q for p in ours.pos_list for q in p), *ours.channel_list,
         float(ours.yuv), ours.rate, ours.target]),
        "float", "magnitude, window_size, pos_list, channel_list, YUV, pratio, target"))
    return out


CHECKS = {"bpp": check_bpp, "refool": check_refool, "all_to_all": check_all_to_all, "ftrojan": check_ftrojan}

"""BPP, Adaptive-Blend, Adaptive-Patch, Refool, FTrojan and the all-to-all label mode (issue 26, poisons 1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.backdoor.adaptive_blend import AdaptiveBlend
from harness.backdoor.adaptive_patch import AdaptivePatch
from harness.backdoor.badnets import BadNets
from harness.backdoor.base import build_poison
from harness.backdoor.bpp import BPP, dither
from harness.backdoor.ftrojan import FTrojan, block_pattern, dct_matrix
from harness.backdoor.plan import PoisonPlan, select_indices, train_plan
from harness.backdoor.refool import Refool
from harness.eval.backdoor_metrics import attack_success_all_to_all

NEW = ("bpp", "adaptive_blend", "adaptive_patch", "refool", "ftrojan")
NO_PATTERN = ("bpp", "ftrojan")  # triggers with no random pattern: pattern_seed changes nothing


def _batch(c: int, h: int, b: int = 6, seed: int = 0) -> torch.Tensor:
    """Images on the loader's grid (k / 255)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, h), generator=gen).float() / 255


def _poison(name: str, **kw) -> object:
    from harness.core.config import compose_config

    cfg = compose_config([f"backdoor={name}"])["backdoor"]
    return build_poison({**cfg, **kw})


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("c,h", [(1, 8), (3, 16), (3, 32)])
def test_triggers_stay_in_range_deterministic_and_shaped(name: str, c: int, h: int) -> None:
    x = _batch(c, h)
    poison, again = _poison(name), _poison(name)
    out = poison.trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, again.trigger(x)), "a fresh instance must give the same trigger"
    if name not in NO_PATTERN:
        assert not torch.equal(out, _poison(name, pattern_seed=1).trigger(x)), "pattern_seed must change it"
    train = poison.train_variant(x, np.arange(len(x)))
    assert train.shape == x.shape and train.min() >= 0 and train.max() <= 1
    if poison.cross_ratio == 0:  # Refool has no cross samples
        return
    cross = torch.tensor([True, False] * (len(x) // 2))
    cover = poison.cross_samples(x, cross, np.arange(len(x)), torch.Generator().manual_seed(0))
    assert cover.shape == x[cross].shape and cover.min() >= 0 and cover.max() <= 1


def test_bpp_squeezes_to_eight_levels_and_dithering_is_batch_independent() -> None:
    x = _batch(3, 16, b=5)
    levels = torch.unique((BPP().trigger(x) * 255).round())
    assert levels.tolist() == [0, 36, 72, 109, 145, 182, 218, 255]  # k * 255 / 7 stored as uint8 (truncated)
    dithered = BPP(dithering=True).trigger(x)
    one_by_one = torch.cat([BPP(dithering=True).trigger(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(dithered, one_by_one), "the vectorised dithering must equal image-by-image dithering"
    # the error diffusion keeps the local mean closer to the image than plain squeezing does
    flat = torch.full((1, 1, 16, 16), 100 / 255)
    assert abs(float(BPP(dithering=True).trigger(flat).mean()) - 100 / 255) < \
        abs(float(BPP().trigger(flat).mean()) - 100 / 255)
    assert torch.equal(dither(torch.full((1, 1, 2, 2), 255.0), 8), torch.full((1, 1, 2, 2), 255.0))


def test_bpp_negative_samples_add_another_images_residual() -> None:
    x = _batch(1, 8, b=6)
    bpp = BPP()
    cross = torch.tensor([False, False, True, True, False, False])
    gen = torch.Generator().manual_seed(3)
    donors = torch.randint(0, 6, (2,), generator=torch.Generator().manual_seed(3))
    out = bpp.cross_samples(x, cross, np.arange(6), gen)
    expected = ((x[cross] * 255).round() + (bpp.trigger(x[donors]) * 255).round() - (x[donors] * 255).round())
    torch.testing.assert_close(out, expected.clamp(0, 255) / 255)


def test_adaptive_blend_masks_half_the_pieces_fixed_per_sample() -> None:
    x = torch.full((2, 1, 8, 8), 0.5)
    poison = AdaptiveBlend()
    a, b = poison.train_variant(x, np.array([3, 3])), poison.train_variant(x, np.array([3, 4]))
    assert torch.equal(a[0], a[1]) and not torch.equal(b[0], b[1]), "a sample's mask depends on its index only"
    changed = (a[0, 0] != 0.5).float().view(4, 2, 4, 2).amax((1, 3))  # which of the 4x4 pieces carry the trigger
    assert int(changed.sum()) == 8
    p = poison.pattern(1, 8, 8)
    torch.testing.assert_close(poison.trigger(x), x + 0.2 * (p - x))  # the whole trigger at test_alpha
    with pytest.raises(ValueError, match="does not divide"):
        poison.masks(np.array([0]), 10, 10, 1)


def test_adaptive_patch_one_patch_in_training_all_at_test() -> None:
    x = torch.full((4, 3, 32, 32), 0.5)
    poison = AdaptivePatch()
    _, masks = poison.patches(3, 32, 32)
    train = poison.train_variant(x, np.arange(4))
    for i in range(4):
        changed = (train[i] != 0.5).any(0)
        assert changed.sum() > 0 and not (changed & (masks[i % 4, 0] == 0)).any(), "only its own patch"
    test_changed = (poison.trigger(x) != 0.5).any(1)
    assert torch.equal(test_changed[0], masks.sum(0)[0] > 0)


def test_refool_is_a_function_of_each_image_and_binds_reflections_from_other_classes(digits_dir) -> None:
    x = _batch(1, 8, b=4)
    r = Refool()
    out = r.trigger(x)
    swapped = r.trigger(x.flip(0))
    assert torch.equal(out.flip(0), swapped), "an image's trigger does not depend on its batch"
    bound = Refool(n_reflections=20)
    bound.bind(digits_dir)
    assert bound._reflections.shape == (20, 8, 8, 1)
    assert not torch.equal(bound.trigger(x), out), "the dataset's reflections replace the procedural ones"


def test_labels_per_mode(digits_dir) -> None:
    y = torch.arange(10)
    x = _batch(1, 8, b=10)
    for mode, expected in (("all_to_one", torch.zeros(10, dtype=torch.long)), ("all_to_all", (y + 1) % 10)):
        plan = PoisonPlan(BadNets(label_mode=mode), "train", poisoned=np.arange(10), num_classes=10)
        _, labels = plan(x, y, np.arange(10))
        assert torch.equal(labels, expected), mode
    # Refool clean-label (the paper's setting): target-class samples only, labels kept
    refool = Refool(clean_label=True)
    labels = np.arange(100) % 10
    poisoned, _ = select_indices(labels, refool, seed=0, num_classes=10)
    assert (labels[poisoned] == 0).all()
    # cover samples of Adaptive-Blend keep their labels, poisoned ones are relabelled
    cfg = {"seed": 0, "data": {"dir": str(digits_dir)}, "backdoor": {"name": "adaptive_blend", "rate": 0.05}}
    plan = train_plan(cfg)
    assert len(plan.cross) == len(plan.poisoned) > 0 and not set(plan.cross) & set(plan.poisoned)
    idx = np.concatenate([plan.poisoned[:3], plan.cross[:3]])
    _, out = plan(torch.rand(6, 1, 8, 8), torch.full((6,), 7), idx)
    assert out.tolist() == [0, 0, 0, 7, 7, 7]


def test_all_to_all_asr_is_against_each_images_own_target(digits_dir) -> None:
    from harness.eval.backdoor_metrics import evaluate_backdoor

    y = torch.tensor([0, 1, 2, 9, 9])
    pred = torch.tensor([1, 2, 0, 0, 9])
    asr, ra, per_class = attack_success_all_to_all(pred, y, 10)
    assert asr == pytest.approx(3 / 5) and ra == pytest.approx(1 / 5)
    assert per_class[0] == 1.0 and per_class[2] == 0.0 and per_class[9] == 0.5 and np.isnan(per_class[5])

    class Always(torch.nn.Module):  # predicts class 3 for everything
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    from harness.backdoor.plan import split_labels

    labels = split_labels(digits_dir, "test")
    for mode, expected in (("all_to_all", float(np.mean(labels == 2))), ("all_to_one", 0.0)):
        cfg = {"seed": 0, "data": {"dir": str(digits_dir)}, "backdoor": {"name": "badnets", "label_mode": mode}}
        result = evaluate_backdoor(Always(), cfg, num_classes=10)
        assert result.asr == pytest.approx(expected), mode  # all_to_all: class 2's images hit their target 3
        assert result.n_triggered == (len(labels) if mode == "all_to_all" else int((labels != 0).sum()))


@pytest.mark.parametrize("cfg,message", [
    ({"name": "sig", "label_mode": "all_to_all"}, "sig is clean-label"),
    ({"name": "refool", "clean_label": True, "label_mode": "all_to_all"}, "refool is clean-label"),
    ({"name": "badnets", "label_mode": "all2all"}, "label_mode must be one of all_to_one, all_to_all"),
    ({"name": "bpp", "squeeze_num": 1}, "squeeze_num must be in"),
    ({"name": "adaptive_blend", "pieces": 10}, "pieces must be a square number"),
    ({"name": "adaptive_blend", "mask_rate": 1.0}, "mask_rate must be in"),
    ({"name": "adaptive_patch", "alphas": []}, "alphas"),
    ({"name": "refool", "clean_label": True, "poisoning": "per_batch"}, "refool is clean-label"),
    ({"name": "refool", "offset_range": [5, 2]}, "offset_range"),
    ({"name": "ftrojan", "pos_list": [[15, 32]]}, "pos_list must be"),
    ({"name": "ftrojan", "pos_list": [[15]]}, "pos_list must be"),
    ({"name": "ftrojan", "channel_list": [3]}, "channel_list must name"),
    ({"name": "ftrojan", "window_size": 1}, "window_size must be"),
])
def test_bad_settings_are_refused_with_the_fix(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_poison(cfg)


def test_a_patch_grid_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="holds"):
        AdaptivePatch(alphas=[0.5] * 20).trigger(torch.rand(1, 1, 8, 8))


def _raster_dither(image: np.ndarray, levels: int) -> np.ndarray:
    """Floyd-Steinberg in raster order, one image (C, H, W) float32, float64 arithmetic: the
    sequential algorithm the wavefront version must reproduce exactly."""
    img = image.astype(np.float32).copy()
    _, h, w = img.shape
    s = levels - 1
    for y in range(h):
        for x in range(w):
            old = img[:, y, x].astype(np.float64)
            new = np.round(old / 255.0 * s) / s * 255
            err = old - new
            img[:, y, x] = new
            for dy, dx, wt in ((0, 1, 7 / 16), (1, 1, 1 / 16), (1, 0, 5 / 16), (1, -1, 3 / 16)):
                if y + dy < h and 0 <= x + dx < w:
                    img[:, y + dy, x + dx] = (img[:, y + dy, x + dx].astype(np.float64) + err * wt).astype(np.float32)
    return np.round(img)


@pytest.mark.parametrize("h,w", [(8, 8), (5, 11), (16, 3)])
def test_wavefront_dithering_equals_the_raster_loop(h: int, w: int) -> None:
    x = torch.randint(0, 256, (3, 3, h, w), generator=torch.Generator().manual_seed(h * w)).float()
    expected = np.stack([_raster_dither(img, 8) for img in x.numpy()])
    np.testing.assert_array_equal(dither(x, 8).numpy(), expected)


# ----------------------------------------------------------------------------------------- FTrojan

@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("h", [8, 16, 32])
def test_ftrojan_is_deterministic_in_range_and_on_the_byte_grid(c: int, h: int) -> None:
    x = _batch(c, h, b=4)
    out = FTrojan().trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, FTrojan().trigger(x)) and not torch.equal(out, x)
    assert torch.equal((out * 255).round() / 255, out), "stored as uint8, as BackdoorBench stores it"
    one_by_one = torch.cat([FTrojan().trigger(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(out, one_by_one), "a function of each image alone"


def test_ftrojan_pattern_is_the_inverse_dct_of_the_bump_at_its_positions() -> None:
    from scipy.fft import dctn

    c = dct_matrix(32).numpy()
    assert np.allclose(c @ c.T, np.eye(32), atol=1e-12), "orthonormal, as cv2.dct"
    pattern = block_pattern(32, ((15, 15), (31, 31)), 30.0).numpy()
    coeffs = dctn(pattern, norm="ortho")  # scipy's DCT-II, independent of ours
    expected = np.zeros((32, 32))
    expected[15, 15] = expected[31, 31] = 30.0
    assert np.abs(coeffs - expected).max() < 1e-12


@pytest.mark.parametrize("h,n,pos", [(8, 8, ((3, 3), (7, 7))), (16, 16, ((7, 7), (15, 15))),
                                     (32, 32, ((15, 15), (31, 31))), (64, 32, ((15, 15), (31, 31)))])
def test_ftrojan_window_and_positions_scale_to_the_image(h: int, n: int, pos: tuple) -> None:
    poison = FTrojan()
    assert poison.window(h, h) == (n, pos)
    pattern = poison.pattern(h, h)
    assert torch.equal(pattern[:n, :n], pattern[-n:, -n:]), "the same pattern in every window"
    with pytest.raises(ValueError, match="window_size"):
        poison.trigger(torch.zeros(1, 3, 48, 48))  # 48 is not whole 32-px windows


def test_ftrojan_grey_goes_on_the_one_channel_and_saturates() -> None:
    """Digits: the grey channel is Y, the pattern added there; the black background's dips clip at 0
    (a wrap would make them white)."""
    black = torch.zeros(1, 1, 16, 16)
    out = FTrojan().trigger(black)
    pattern = FTrojan().pattern(16, 16)
    assert torch.equal(out[0, 0] * 255, torch.trunc(pattern.clamp(0, 255)).float())
    assert out.max() < 16 / 255 and (out == 0).float().mean() > 0.3


def test_ftrojan_rgb_wraps_like_their_cast_unless_saturate() -> None:
    """Their astype(np.uint8) wraps a chroma pushed past 255 (pure red: Cr 255); saturate clips."""
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    wrapped = FTrojan().trigger(red)
    clipped = FTrojan(saturate=True).trigger(red)
    assert (wrapped - red).abs().max() > 0.5, "Cr 255 + a positive bump wraps to near 0: far from red"
    assert (clipped - red).abs().max() < 16 / 255
    grey = torch.full((1, 3, 32, 32), 128 / 255)  # Cr = Cb = 128: nothing to wrap, both casts agree
    assert torch.equal(FTrojan().trigger(grey), FTrojan(saturate=True).trigger(grey))

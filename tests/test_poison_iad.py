"""IAD (harness/backdoor/iad.py): G and M sized from the image, their artifact built once per key and
loaded from plain arrays, triggers that differ per image, cross samples that carry another image's
trigger and keep their label, and bad settings refused before any work."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.backdoor import plan as poison_plan
from harness.backdoor.artifacts import poison_artifacts
from harness.backdoor.iad import IADNet, InputAware, architecture
from harness.backdoor.learned import artifact_rel
from helpers import build_poison_artifacts as _build, tiny_poison_cell as _cell

IAD_TINY = ("backdoor=iad", "backdoor.surrogate.epochs=1", "backdoor.surrogate.batch_size=256",
            "backdoor.mask_epochs=1", "backdoor.epochs=1", "backdoor.width=4")


@pytest.fixture(scope="module")
def iad_cfg(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = _cell(data_root, tmp_path_factory.mktemp("iad") / "results", *IAD_TINY)
    _build(cfg)
    return cfg


def test_the_networks_are_sized_from_the_image_and_bad_sizes_are_refused() -> None:
    assert architecture(1, 8, 8) == (16, 2) and architecture(1, 16, 16) == (16, 2)
    assert architecture(3, 32, 32) == (32, 3) and architecture(3, 8, 8) == (32, 3) and architecture(3, 28, 28) == (32, 2)
    for shape in ((1, 8, 8), (1, 16, 16), (3, 32, 32)):
        w, d = architecture(*shape, net_width=4)
        g, m = IADNet(shape[0], shape[0], w, d), IADNet(shape[0], 1, w, d)
        x = torch.rand(2, *shape)
        with torch.no_grad():
            pattern, mask = g(x), m(x)
        assert pattern.shape == x.shape and mask.shape == (2, 1, *shape[1:])
        assert 0 < float(pattern.min()) and float(pattern.max()) < 1
    with pytest.raises(ValueError, match="Fix: set backdoor.depth"):
        architecture(1, 6, 6)
    with pytest.raises(ValueError, match="Fix: set backdoor.depth"):
        architecture(3, 16, 16, depth=5)


@pytest.mark.parametrize("bad, fix", [({"g_grad": "sometimes"}, "g_grad must be one of"),
                                      ({"mask_density": 0.0}, "mask_density in"),
                                      ({"depth": 1}, "depth must be >= 2"),
                                      ({"cross_ratio": -1}, "cross_ratio must be >= 0"),
                                      ({"batch_size": 1}, "batch_size >= 2"),
                                      ({"lr_g": 0}, "must be > 0"),
                                      ({"surrogate": {"epoch": 3}}, "unknown setting")])
def test_bad_settings_are_refused_before_any_work(bad: dict, fix: str) -> None:
    with pytest.raises(ValueError, match=fix):
        InputAware(**bad)


def test_the_artifact_is_built_once_per_key_and_loaded_from_plain_arrays(iad_cfg: dict, data_root: Path,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    key = _build(iad_cfg)
    stored = Path(iad_cfg["results_dir"]) / artifact_rel(key)
    mtime = (stored / "meta.json").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt an artifact the store holds")

    monkeypatch.setattr(InputAware, "build_artifact", refuse)
    assert _build(iad_cfg) == key and (stored / "meta.json").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    raw = (stored / "arrays.npz").read_bytes()
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        names = list(npz.files)
        assert {"shape", "net", "norm_mean", "norm_std"} <= set(names)
        assert any(n.startswith("G.convblock_down_0.conv2d") for n in names) and "M.tanh" not in names
        assert all(npz[n].dtype in (np.float32, np.int64) for n in names)
        assert npz["shape"].tolist() == [1, 8, 8] and npz["net"].tolist() == [4, 2]
    other = _cell(data_root, tmp_path, *IAD_TINY, "backdoor.mask_density=0.05")
    seed1 = _cell(data_root, tmp_path, *IAD_TINY, seed=1)
    keys = {a.key for cfg in (iad_cfg, other, seed1) for a in poison_artifacts(cfg) if a.key.startswith("poison/")}
    assert len(keys) == 2  # the settings change the key, the cell's seed does not


def test_triggers_are_input_aware_and_one_artifact_serves_training_and_test(iad_cfg: dict) -> None:
    from harness.data.loader import make_loader

    train, test = poison_plan.train_plan(iad_cfg), poison_plan.test_plan(iad_cfg)
    x, y = next(iter(make_loader(Path(iad_cfg["data"]["dir"]), "test", 16)))
    triggered = test.poison.trigger(x)
    assert torch.equal(triggered, train.poison.trigger(x))  # one G and M for both
    assert torch.equal(triggered, torch.round(triggered * 255) / 255)  # stored as uint8 images
    delta = (triggered - x).flatten(1)
    changed = delta.abs().sum(1) > 0
    assert changed.sum() >= len(x) // 2, "G and M leave most images untouched"
    assert len({tuple(d.tolist()) for d in delta[changed]}) == int(changed.sum()), "two images got the same change"
    # input-aware: an image's trigger comes from the image; another image's trigger differs
    assert not torch.equal(train.poison.apply(x, x), train.poison.apply(x, x.roll(1, 0)))
    out, labels = test(x, y, np.arange(len(x)))
    assert torch.equal(out, triggered) and torch.equal(labels, y)


def test_poisoned_samples_are_relabelled_and_cross_samples_keep_their_label(iad_cfg: dict) -> None:
    from harness.data.loader import make_loader

    plan = poison_plan.train_plan(iad_cfg)
    assert len(plan.poisoned) == round(0.1 * 256) and len(plan.cross) == len(plan.poisoned)
    assert not set(plan.poisoned) & set(plan.cross)
    x, y = next(iter(make_loader(Path(iad_cfg["data"]["dir"]), "train", 256)))
    indices = np.arange(256)
    out, labels = plan(x, y, indices)
    hit, cross = plan.masks(indices)
    assert (labels[hit] == 0).all() and torch.equal(labels[~hit], y[~hit])
    assert torch.equal(out[hit], plan.poison.trigger(x[hit]))
    assert torch.equal(out[~hit & ~cross], x[~hit & ~cross])
    gen = plan.generator(0, 0)
    partner = (torch.nonzero(cross).flatten() + torch.randint(1, 256, (int(cross.sum()),), generator=gen)) % 256
    assert (partner != torch.nonzero(cross).flatten()).all()
    assert torch.equal(out[cross], plan.poison.apply(x[cross], x[partner]))  # another image's pattern and mask
    assert not torch.equal(out[cross], plan.poison.trigger(x[cross]))


def test_a_missing_artifact_is_refused_naming_the_fix(iad_cfg: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Fix: run the cell through"):
        poison_plan.train_plan({**iad_cfg, "results_dir": str(tmp_path / "empty")})
    with pytest.raises(RuntimeError, match="not loaded"):
        InputAware().trigger(torch.zeros(1, 1, 8, 8))

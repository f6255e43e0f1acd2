"""SSBA: its StegaStamp encoder is an artifact built once per key and loaded from plain arrays; the
poisoned images differ per image (sample-specific), stay in [0, 1] on the uint8 grid, do not depend
on the batch they are in; the decoder recovers secrets above chance after a tiny training; the
networks fit 8x8 grey, 16x16 and 32x32 RGB; bad settings are refused before work.

The digits artifact trains for 2 steps only (the machine is shared): its encoder is nearly
untrained, which is enough for the plumbing; learning is tested on a small problem apart."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.backdoor import plan as poison_plan
from harness.backdoor.artifacts import poison_artifacts
from harness.backdoor.learned import artifact_rel
from harness.backdoor.ssba import SSBA, Decoder, Encoder, bit_accuracy, encode, make_secret
from helpers import tiny_poison_cell as _cell

TINY = ["backdoor=ssba", "backdoor.width=4", "backdoor.steps=2", "backdoor.batch_size=16", "backdoor.no_im_loss_steps=1",
        "backdoor.l2_loss_ramp=1"]
BITS, WIDTH, STEPS, LR = 4, 4, 200, 0.01  # a problem small enough to learn in seconds


def _build(cfg: dict) -> str:
    (artifact,) = poison_artifacts(cfg)  # no clean surrogate: SSBA trains its own networks only
    return artifact.build(device="cpu")


@pytest.fixture(scope="module")
def ssba_cfg(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = _cell(data_root, tmp_path_factory.mktemp("ssba") / "results", *TINY)
    _build(cfg)
    return cfg


def test_the_artifact_is_built_once_per_key_and_stored_as_plain_arrays(ssba_cfg: dict, data_root: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    key = _build(ssba_cfg)
    stored = Path(ssba_cfg["results_dir"]) / artifact_rel(key)
    monkeypatch.setattr(SSBA, "build_artifact", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert _build(ssba_cfg) == key  # the store holds it: no second training
    assert _build(_cell(data_root, Path(ssba_cfg["results_dir"]), *TINY, seed=1)) == key  # the seed is not in the key
    monkeypatch.undo()
    from harness.backdoor.base import build_poison
    from harness.backdoor.learned import poison_artifact_key

    other = build_poison({**ssba_cfg["backdoor"], "pattern_seed": 1})
    assert poison_artifact_key(other, ssba_cfg["data"]["dir"], ssba_cfg["arch"]) != key  # another secret, another key
    with np.load(stored / "arrays.npz", allow_pickle=False) as npz:  # plain arrays, never a pickle
        assert npz["secret"].shape == (100,) and set(np.unique(npz["secret"])) <= {0, 1}
        assert all(npz[k].dtype == np.float32 for k in npz.files if k.startswith(("encoder.", "decoder.")))
        assert tuple(npz["shape"]) == (1, 8, 8)
        steps_run, seconds, running, test_bits, test_psnr = npz["facts"]
    assert steps_run == 2 and seconds > 0 and np.isfinite(test_psnr) and 0 <= test_bits <= 1


def test_poisoned_images_are_sample_specific_in_range_and_one_encoder_serves_both_splits(ssba_cfg: dict) -> None:
    from harness.data.loader import make_loader

    train, test = poison_plan.train_plan(ssba_cfg), poison_plan.test_plan(ssba_cfg)
    assert len(train.poisoned) == round(0.1 * 256) and not train.poison.clean_label
    x, _ = next(iter(make_loader(Path(ssba_cfg["data"]["dir"]), "test", 16)))
    triggered, _ = next(iter(make_loader(Path(ssba_cfg["data"]["dir"]), "test", 16, poison=test)))
    assert torch.equal(triggered, train.poison.train_variant(x, np.arange(16)))  # one encoder, both splits
    assert triggered.min() >= 0 and triggered.max() <= 1
    assert torch.equal(triggered * 255, (triggered * 255).round())  # the uint8 grid, as ISSBA's stored bytes
    residual = (triggered - x) * 255
    assert (residual != 0).any(dim=(1, 2, 3)).all(), "every image carries a trigger"
    flat = residual.flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == 16, "the residuals differ per image (sample-specific)"
    alone = torch.cat([train.poison.trigger(x[i:i + 1]) for i in range(4)])
    assert torch.equal(alone, triggered[:4]), "an image's bytes do not depend on its batch"


def test_the_stored_decoder_reads_the_stored_bit_accuracy_back(ssba_cfg: dict) -> None:
    """The artifact's recorded test bit accuracy is the stored decoder's on the triggered test split."""
    stored = Path(ssba_cfg["results_dir"]) / artifact_rel(_build(ssba_cfg))
    with np.load(stored / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    _, decoder = SSBA(width=4).networks(1, 8, 8)
    decoder.load_state_dict({k[len("decoder."):]: torch.from_numpy(v) for k, v in arrays.items()
                             if k.startswith("decoder.")})
    from harness.backdoor.surrogate import load_native_split

    x, _ = load_native_split(ssba_cfg["data"]["dir"], "test")
    triggered = poison_plan.test_plan(ssba_cfg).poison.trigger(x)
    secret = torch.from_numpy(arrays["secret"].astype(np.float32))
    with torch.no_grad():
        assert bit_accuracy(decoder(triggered), secret) == pytest.approx(float(arrays["facts"][3]), abs=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (3, 32, 32)])
def test_the_networks_fit_each_size(shape: tuple[int, int, int]) -> None:
    images = torch.rand(8, *shape)
    poison = SSBA(secret_bits=8, width=4, steps=2, batch_size=4, no_im_loss_steps=1, l2_loss_ramp=1)
    encoder, decoder, facts = poison.train_networks(images)
    assert isinstance(encoder, Encoder) and isinstance(decoder, Decoder) and facts["steps_run"] == 2
    with torch.no_grad():
        encoded = encode(encoder, make_secret(8, 0), images)
        assert encoded.shape == images.shape and encoded.min() >= 0 and encoded.max() <= 1
        assert decoder(encoded).shape == (8, 8)
    assert encoder.depth == {8: 2, 16: 3, 32: 4}[shape[1]]  # StegaStamp's 4 levels where the image allows


def test_the_decoder_recovers_secrets_above_chance_after_a_tiny_training() -> None:
    """Trained on random secrets per image (as StegaStamp), the decoder reads unseen secrets from
    encoded images better than chance; a clean image carries none."""
    torch.manual_seed(0)
    images = torch.rand(64, 1, 8, 8)
    poison = SSBA(secret_bits=BITS, width=WIDTH, steps=STEPS, batch_size=16, lr=LR, no_im_loss_steps=STEPS - 50,
                  l2_loss_ramp=50, bit_threshold=0.95)
    encoder, decoder, facts = poison.train_networks(images)
    secrets = torch.randint(0, 2, (64, BITS), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        encoded = torch.floor(encode(encoder, secrets, images) * 255) / 255
        assert bit_accuracy(decoder(encoded), secrets) > 0.65, facts  # chance: 0.5 +- 0.03 on 256 bits


def test_bad_settings_are_refused_before_work(ssba_cfg: dict) -> None:
    with pytest.raises(ValueError, match="Fix: raise backdoor.steps"):
        SSBA(steps=10, no_im_loss_steps=43, l2_loss_ramp=429)
    with pytest.raises(ValueError, match="bit_threshold must be in"):
        SSBA(bit_threshold=0.3)
    with pytest.raises(ValueError, match="secret_bits >= 1"):
        SSBA(secret_bits=0)
    with pytest.raises(ValueError, match="yuv_scales must be 3"):
        SSBA(yuv_scales=[1.0, 1.0])
    with pytest.raises(RuntimeError, match="not loaded"):
        SSBA().trigger(torch.zeros(1, 1, 8, 8))
    poison = poison_plan.test_plan(ssba_cfg).poison
    with pytest.raises(ValueError, match="native resolution"):
        poison.trigger(torch.zeros(1, 1, 16, 16))

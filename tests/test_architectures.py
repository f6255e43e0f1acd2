"""Architectures: [0,1] in, logits out, normalisation inside, features() consistent, hookable."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from architectures.presets import build_classifier
from harness.core.config import config_options
from harness.core.registry import ARCHITECTURES

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def test_every_preset_has_a_config() -> None:
    assert set(ARCHITECTURES.names()) == set(config_options("arch"))


def _build(name: str, img_size: int, in_chans: int = 3, **extra):
    torch.manual_seed(0)
    cfg = {"name": name, "kwargs": {}, **extra}
    return build_classifier(cfg, num_classes=7, in_chans=in_chans, img_size=img_size,
                            mean=MEAN[:in_chans], std=STD[:in_chans])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES.names()))
@pytest.mark.parametrize("img_size,in_chans", [(32, 3), (8, 1)])
def test_classifier_contract(name: str, img_size: int, in_chans: int) -> None:
    if name in ("resnet18", "vit_tiny", "preact_resnet18") and img_size == 8:
        pytest.skip("full-size presets are tested at 32x32 only (cost)")
    extra = {"model": "test_resnet"} if name == "timm" else {}
    model = _build(name, img_size, in_chans, **extra).eval()
    x = torch.rand(4, in_chans, img_size, img_size)
    logits = model(x)
    assert logits.shape == (4, 7)
    embedding, logits2 = model.features(x)
    assert embedding.shape[0] == 4 and embedding.ndim == 2
    assert torch.allclose(logits, logits2, atol=1e-5), "features() must give the forward's logits"
    # normalisation lives inside: the wrapped body sees (x - mean) / std
    mean = torch.tensor(MEAN[:in_chans]).view(1, -1, 1, 1)
    std = torch.tensor(STD[:in_chans]).view(1, -1, 1, 1)
    assert torch.allclose(model.body((x - mean) / std), logits, atol=1e-5)
    # every layer name is a real module, for hooks
    names = dict(model.named_modules())
    assert model.layer_names() and all(n in names for n in model.layer_names())


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext"])
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = _build(name, 16, 3).train()
    loss = F.cross_entropy(model(torch.rand(8, 3, 16, 16)), torch.randint(0, 7, (8,)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_small_image_adaptations() -> None:
    resnet = _build("resnet18", 32)
    assert resnet.body.conv1.kernel_size == (3, 3) and resnet.body.conv1.stride == (1, 1)
    assert isinstance(resnet.body.maxpool, torch.nn.Identity)
    preact = _build("preact_resnet18", 32)  # BackdoorBench's PreActResNet18
    assert preact.body.stem.conv.kernel_size == (3, 3) and preact.body.stem.conv.stride == (1, 1)
    assert isinstance(preact.body.stem.pool, torch.nn.Identity) and isinstance(preact.body.norm, torch.nn.Identity)
    backbone = sum(p.numel() for n, p in preact.body.named_parameters() if not n.startswith("head."))
    assert backbone + 512 * 10 + 10 == 11_171_146  # BackdoorBench's PreActResNet18(10), counted there
    vit = _build("vit_tiny", 32)
    assert vit.body.patch_embed.patch_size == (4, 4)
    assert vit.body.patch_embed.num_patches == 64


def test_any_timm_model_by_name_and_unknown_name() -> None:
    model = _build("timm", 32, model="test_efficientnet")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    resnet = _build("timm", 32, model="resnet18")  # family adaptation applies to the generic plugin too
    assert resnet.body.conv1.stride == (1, 1)
    with pytest.raises(ValueError, match="unknown timm model 'nosuchnet'"):
        _build("timm", 32, model="nosuchnet")

"""Architecture plugins: any timm model by name, plus tested presets with small-image adaptations.

`arch=timm arch.model=<any timm name>` builds any timm model (pretrained=False: nothing is ever
downloaded). The presets fix the small-image adaptations that CIFAR-style papers use, so that
32x32 (or digits' 8x8) inputs are not downsampled to nothing:
- ResNets: a 3x3 stride-1 stem conv and no max-pool (the CIFAR ResNet of Madry/TRADES/AWP code).
- ViTs: `img_size` set to the data's size and a small `patch_size` (4 at 32x32 -> 64 tokens).
- ConvNeXt: a smaller patchify stem (`patch_size`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import timm
from timm.layers import ClassifierHead
from torch import nn

from architectures.classifier import Classifier
from harness.core.errors import did_you_mean
from harness.core.registry import ARCHITECTURES


@dataclass(frozen=True)
class TimmArchitecture:
    """Builds `Classifier(timm.create_model(model, ...))` with the preset's adaptations."""

    open_config_keys: ClassVar[tuple[str, ...]] = ("kwargs",)  # any timm kwarg: `+arch.kwargs.drop_rate=0.1`
    model: str | None = None  # None: taken from the config's `model` key (the generic `timm` plugin)
    small_stem: bool = False  # ResNet family: 3x3 stride-1 stem, no max-pool
    preact_small: bool = False  # timm ResNetV2 as BackdoorBench's PreActResNet: that stem, no final norm
    vit_patch: dict[int, int] = field(default_factory=dict)  # img_size upper bound -> patch size
    convnext_patch: dict[int, int] = field(default_factory=dict)

    def build(
        self,
        *,
        num_classes: int,
        in_chans: int,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        model: str | None = None,
        small_input: bool = True,
        kwargs: dict[str, Any] | None = None,
    ) -> Classifier:
        name = model or self.model
        if not name:
            raise ValueError("arch=timm needs a model name: pass arch.model=<timm model name>")
        if name not in timm.list_models():
            raise ValueError(
                f"unknown timm model '{name}'. Fix: pick a name from timm.list_models(), "
                f"e.g. resnet18, vit_tiny_patch16_224, convnext_nano"
            )
        preset = self if self.model else _family_preset(name)
        create_kwargs: dict[str, Any] = {}
        if small_input and preset.vit_patch:
            create_kwargs.update(img_size=img_size, patch_size=_pick(preset.vit_patch, img_size))
        if small_input and preset.convnext_patch:
            create_kwargs.update(patch_size=_pick(preset.convnext_patch, img_size))
        create_kwargs.update(kwargs or {})
        body = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **create_kwargs
        )
        if small_input and preset.small_stem:
            _cifar_stem(body, in_chans)
        if preset.preact_small:
            _backdoorbench_preact(body, in_chans)
        return Classifier(body, mean=mean, std=std)


def _family_preset(model: str) -> "TimmArchitecture":
    """The small-image adaptation of a timm model family, for the generic `timm` plugin."""
    if model.startswith(("resnet", "wide_resnet", "resnext", "seresnet", "test_resnet")):
        return TimmArchitecture(model, small_stem=True)
    if model.startswith(("vit_", "deit_", "test_vit")):
        return TimmArchitecture(model, vit_patch=_VIT_PATCH)
    if model.startswith(("convnext", "test_convnext")):
        return TimmArchitecture(model, convnext_patch=_CONVNEXT_PATCH)
    return TimmArchitecture(model)


def _pick(table: dict[int, int], img_size: int) -> int:
    """The patch size of the first bound >= img_size (tables are small and sorted by bound)."""
    for bound in sorted(table):
        if img_size <= bound:
            return table[bound]
    return table[max(table)]


def _cifar_stem(body: nn.Module, in_chans: int) -> None:
    """Replace a timm ResNet's stem with a 3x3 stride-1 conv and drop the max-pool."""
    if not (hasattr(body, "conv1") and hasattr(body, "bn1") and hasattr(body, "maxpool")):
        raise ValueError(f"small_stem needs a timm ResNet; {type(body).__name__} has no conv1/bn1/maxpool")
    out_channels = body.bn1.num_features
    body.conv1 = nn.Conv2d(in_chans, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    body.maxpool = nn.Identity()


def _backdoorbench_preact(body: nn.Module, in_chans: int) -> None:
    """timm's pre-activation ResNetV2 as BackdoorBench's PreActResNet (models/preact_resnet.py): a
    3x3 stride-1 stem conv, no stem pooling and no norm + ReLU after the last stage (it pools the last
    block's sum directly) and a linear head (timm's is a 1x1 conv). With its weights mapped by name (strict), its logits equal BackdoorBench's exactly (largest difference 0 on 4 random 32x32 images)
    (resnetv2_18 vs PreActResNet18: 11,171,146 parameters and 6,800 buffer values on both sides)."""
    if not (hasattr(body, "stem") and hasattr(body.stem, "conv") and hasattr(body, "norm")):
        raise ValueError(f"preact_small needs a timm ResNetV2; {type(body).__name__} has no stem.conv/norm")
    out_channels = body.stem.conv.out_channels
    body.stem.conv = nn.Conv2d(in_chans, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    body.stem.pool = nn.Identity()
    body.norm = nn.Identity()
    body.head = ClassifierHead(body.num_features, body.num_classes, pool_type="avg")  # avgpool + nn.Linear


_VIT_PATCH = {64: 4, 10_000: 16}  # 8x8 digits -> 4 tokens; 32x32 -> 64 tokens
_CONVNEXT_PATCH = {16: 1, 32: 2, 10_000: 4}

ARCHITECTURES.add("timm", TimmArchitecture())
ARCHITECTURES.add("resnet18", TimmArchitecture("resnet18", small_stem=True))
ARCHITECTURES.add("preact_resnet18", TimmArchitecture("resnetv2_18", preact_small=True))  # BackdoorBench's model
ARCHITECTURES.add("vit_tiny", TimmArchitecture("vit_tiny_patch16_224", vit_patch=_VIT_PATCH))
ARCHITECTURES.add("convnext_nano", TimmArchitecture("convnext_nano", convnext_patch=_CONVNEXT_PATCH))
# Tiny presets (~0.1 s a training step at 8-32 px on one CPU core) for tests and the demo.
ARCHITECTURES.add("test_resnet", TimmArchitecture("test_resnet", small_stem=True))
ARCHITECTURES.add("test_vit", TimmArchitecture("test_vit", vit_patch=_VIT_PATCH))
ARCHITECTURES.add("test_convnext", TimmArchitecture("test_convnext", convnext_patch=_CONVNEXT_PATCH))


SET_BY_THE_HARNESS = {"num_classes": "the dataset sets it", "in_chans": "the dataset sets it",
                      "pretrained": "nothing is downloaded: weights come from training here, or model=... for eval"}


def check_architecture(arch_cfg: dict[str, Any], *, num_classes: int, in_chans: int, img_size: int) -> None:
    """Build the architecture on the meta device (no memory, no compute): a timm keyword the model
    does not take (`+arch.kwargs.drop_rat=0.1`) or one the harness sets fails here, before any
    work, naming the closest keyword the model takes."""
    import torch

    kwargs = dict(arch_cfg.get("kwargs") or {})
    for key, why in SET_BY_THE_HARNESS.items():
        if key in kwargs:
            raise ValueError(f"arch.kwargs.{key} cannot be set: {why}. Fix: remove +arch.kwargs.{key}")
    with torch.device("meta"):
        try:
            build_classifier(arch_cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                             mean=[0.5] * in_chans, std=[0.5] * in_chans)
        except TypeError as err:
            if not kwargs:
                raise
            bare = build_classifier({k: v for k, v in arch_cfg.items() if k != "kwargs"}, num_classes=num_classes,
                                    in_chans=in_chans, img_size=img_size, mean=[0.5] * in_chans, std=[0.5] * in_chans)
            import inspect

            known = sorted(p for p in inspect.signature(type(bare.body).__init__).parameters if p != "self")
            unknown = [k for k in kwargs if k not in known] or list(kwargs)
            hint = did_you_mean(unknown[0], known, "+arch.kwargs.")
            raise ValueError(f"arch.kwargs.{unknown[0]} is not a setting of timm's {type(bare.body).__name__} "
                             f"({err}).{hint}") from None


def build_classifier(arch_cfg: dict[str, Any], *, num_classes: int, in_chans: int, img_size: int,
                     mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """Build the classifier an `arch` config names (`name` + optional `model`, `kwargs`)."""
    arch_cfg = dict(arch_cfg)
    plugin = ARCHITECTURES.get(arch_cfg.pop("name"))
    if isinstance(plugin, type):  # an external architecture registered as a class
        plugin = plugin()
    model = plugin.build(num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                         mean=mean, std=std, **arch_cfg)
    model.input_size = int(img_size)  # the images it is built for (Neural Cleanse's per-pixel trigger)
    return model

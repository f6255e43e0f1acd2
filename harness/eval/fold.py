"""The model the attacks differentiate: an eval-mode copy with every BatchNorm folded into its conv.

In eval mode a BatchNorm after a convolution is an affine map with fixed statistics, so it can
be folded into the convolution's weights and bias (torch.fx's `fuse`): the same function with
one op fewer per layer, forward and backward. Attacks spend nearly all their time in those
passes (PGD-20 on a ResNet: 21 forwards and 20 backwards per point), so evaluation folds once
per cell and attacks the folded copy; the clean and adversarial predictions that count are
still the original model's. Measured with benchmarks/attacks_vs_torchattacks.py (README).

A model torch.fx cannot trace, one with no BatchNorm (ViTs, ConvNeXt), or one whose folded
copy disagrees with it on the probe batch (a model with randomness at inference always does)
is attacked as it is. `eval.fold_bn=false` attacks every model as it is.

On the CPU the folded copy's 4-d weights are also stored channels_last (NHWC), oneDNN's native
layout: no reorder around each convolution. Measured on test_resnet (digits, batch 85, 1
thread): forward 10 -> 6.6 ms, forward + input backward 21-31 -> 14 ms; logits move by ~5e-6,
as folding's do (benchmarks/compare_autoattack_reference.py). On CUDA the layout is left alone
(not measured here; fp32 NHWC is not always faster there).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger(__name__)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RTOL = 1e-4  # folding reorders float sums: logits move by ~1e-6 relative; anything larger is a bug


def folded_for_attacks(model: nn.Module, probe: torch.Tensor, channels_last: bool | None = None) -> nn.Module:
    """An eval-mode copy of `model` with BatchNorms folded into the preceding conv/linear
    layers, checked on `probe` (a few inputs on the model's device); `model` itself otherwise.
    channels_last: store the copy's conv weights NHWC (None: on the CPU only, where measured)."""
    if channels_last is None:
        channels_last = probe.device.type == "cpu"
    if not any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
        return model
    was_training = model.training
    try:
        folded = fuse(copy.deepcopy(model).eval(), inplace=True)
        if channels_last and any(isinstance(m, nn.Conv2d) for m in folded.modules()):
            folded = folded.to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
            model.eval()
            want, got = model(probe), folded(probe)
            atol = _RTOL * float(want.abs().max())
            same = want.shape == got.shape and torch.allclose(got, want, rtol=_RTOL, atol=atol)
    except Exception as err:  # untraceable Python control flow, custom modules: attack the model as is
        log.info("attacks use the model unfolded: it cannot be folded (%s: %s)", type(err).__name__, err)
        return model
    finally:
        model.train(was_training)
    if not same:
        log.warning("attacks use the model unfolded: its BatchNorm-folded copy disagrees with it on the probe batch")
        return model
    return folded.requires_grad_(False)

"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps on the CE loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import Attack, input_gradient, project_linf
from harness.core.registry import ATTACKS


@ATTACKS.register("fgsm")
class FGSM(Attack):
    name = "fgsm"
    norm = "linf"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad, _ = input_gradient(model, x, y, F.cross_entropy)
        return project_linf(x + self.eps * grad.sign(), x, self.eps)

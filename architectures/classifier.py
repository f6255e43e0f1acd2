"""The model contract every attack and method relies on: images in [0,1] in, logits out.

Normalisation lives inside the model as buffers (RobustBench's lesson): attacks then work in the
raw input space, and eps means the same thing for every architecture. `features` returns the
penultimate embedding beside the logits, for methods that regularise representations
(CausalAdv, CBD) and analyses that hook layers (neuron sensitivity).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """Wraps a timm model: `forward(x) -> logits`, `features(x) -> (embedding, logits)`."""

    input_size: int | None = None  # the image size it is built for (build_classifier sets it)

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.body = body
        channels = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1))
        self.num_classes: int = int(getattr(body, "num_classes", 0))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate embedding, logits) from one forward pass."""
        feature_map = self.body.forward_features(self.normalize(x))
        embedding = self.body.forward_head(feature_map, pre_logits=True)
        return embedding, self.head(embedding)

    @property
    def head(self) -> nn.Module:
        """The final linear layer (W of the paper's notation)."""
        return self.body.get_classifier()

    @property
    def embedding_dim(self) -> int:
        """Size of the `features` embedding (timm's head_hidden_size where a pre-logits layer exists)."""
        return int(getattr(self.body, "head_hidden_size", None) or self.body.num_features)

    def layer_names(self) -> list[str]:
        """Names (relative to this module) of the stages timm reports in `feature_info`:
        the natural places for forward hooks."""
        info = getattr(self.body, "feature_info", None) or []
        names = [entry["module"] for entry in info if isinstance(entry, dict) and entry.get("module")]
        return [f"body.{name}" for name in names]

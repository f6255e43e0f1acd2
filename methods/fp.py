"""FP — Fine-Pruning (Liu, Dolan-Gavitt, Garg; RAID 2018).

Backdoor neurons tend to be dormant on clean inputs. Starting from the grid's backdoored ERM model
(a prerequisite), on the first batch of the defender's clean split: rank the channels of the last
convolutional stage by their mean activation on that batch and prune (mask to zero) channels in
increasing order of activation while the batch accuracy stays >= (1 - max_acc_drop) x its
unpruned value, at most `max_ratio` of the channels. Then fine-tune with the mask fixed. The mask
is a buffer, so it is saved with the checkpoint and DDP broadcasts rank 0's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import TrainContext
from methods.ft import FineTuning, load_weights


class PrunedClassifier(nn.Module):
    """A classifier whose last stage's output channels are multiplied by a 0/1 mask."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model
        self.layer = model.layer_names()[-1]
        channels = model.body.feature_info[-1]["num_chs"]
        self.register_buffer("mask", torch.ones(channels))
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))
        self.record: torch.Tensor | None = None
        dict(model.named_modules())[self.layer].register_forward_hook(self._apply_mask)

    def _apply_mask(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor:
        self.record = output.detach()
        return output * self.mask.view(1, -1, 1, 1).to(output.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def layer_names(self) -> list[str]:
        """The wrapped classifier's hook points, so evaluation analyses (neuron sensitivity) see
        the pruned model's stages."""
        return [f"model.{name}" for name in self.model.layer_names()]

    @torch.no_grad()
    def prune(self, x: torch.Tensor, y: torch.Tensor, max_acc_drop: float, max_ratio: float) -> int:
        """Prune dormant channels on (x, y); returns the number pruned."""
        was_training = self.training
        self.eval()
        try:
            self.mask.fill_(1.0)
            logits = self(x)
            base_acc = (logits.argmax(1) == y).float().mean().item()
            activation = self.record.mean(dim=(0, 2, 3))
            order = torch.argsort(activation)
            limit = int(max_ratio * len(order))
            n = 0
            for channel in order[:limit]:
                self.mask[channel] = 0.0
                acc = (self(x).argmax(1) == y).float().mean().item()
                if acc < (1.0 - max_acc_drop) * base_acc:
                    self.mask[channel] = 1.0
                    break
                n += 1
            self.pruned.fill_(True)
            return n
        finally:
            self.train(was_training)


@METHODS.register("fp")
class FinePruning(FineTuning):
    """FT's setting (the grid's backdoored ERM, fine-tuned on the clean subset) after pruning."""

    name = "fp"
    paper: ClassVar[dict[str, str]] = {"title": "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", "venue": "RAID", "year": "2018"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 10, lr: float = 0.01, batch_size: int = 32,
                 max_acc_drop: float = 0.1, max_ratio: float = 0.9,
                 backdoored_checkpoint: str | None = None) -> None:
        super().__init__(clean_subset, epochs, lr, batch_size, backdoored_checkpoint)
        if not 0 <= float(max_acc_drop) < 1 or not 0 < float(max_ratio) <= 1:
            raise ValueError(f"fp needs 0 <= max_acc_drop < 1 and 0 < max_ratio <= 1; got {max_acc_drop}, {max_ratio}")
        self.max_acc_drop, self.max_ratio = float(max_acc_drop), float(max_ratio)

    def build(self, model: Classifier) -> nn.Module:
        return PrunedClassifier(load_weights(model, self.backdoored_checkpoint))

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raw: PrunedClassifier = ctx.classifier  # type: ignore[assignment]
        logs: dict[str, torch.Tensor] = {}
        if not bool(raw.pruned):
            logs["pruned_channels"] = torch.tensor(float(raw.prune(x, y, self.max_acc_drop, self.max_ratio)))
        logits = module(x)
        logs.update(loss=F.cross_entropy(logits, y), train_acc=(logits.argmax(1) == y).float().mean(),
                    pruned_fraction=1.0 - raw.mask.mean())
        return logs

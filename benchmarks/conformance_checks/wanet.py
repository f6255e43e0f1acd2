"""WaNet beside VinAIResearch/Warping-based_Backdoor_Attack-release (`train.py`).

Their code runs, ours beside it, on the same field, images and noise:
  grid             the grid their `main` prepares (its "Prepare grid" statements, read from the
                   file's syntax tree and run: the k x k field drawn with torch.rand, divided by
                   its mean |value|, bicubic upsampling with align_corners=True, the identity grid)
                   and `train`'s grid_temps statements ((identity + s * noise / H) * grid_rescale,
                   clamped), against `WaNet.grid`, at grid_rescale 1 and 0.98 (the value their
                   config's comment suggests). Their field draw uses the global generator seeded
                   with the seed of our field's generator: the same field.
  one epoch        their `train` itself on a two-batch loader (B = 128, then 37: int(B * pc) = 12
                   and 3 poisoned, 24 and 6 cross samples), recording what reaches the model,
                   against our PoisonPlan on the same two batches (rank 0, batches 0 and 1):
                   warped images, noise-mode images (their global generator is seeded, before
                   each batch's draw, with the seed our plan's generator for that batch has: the
                   same noise), the labels, and which positions of each batch are poisoned or
                   cross (integers).
Images are [0, 1] tensors on both sides (theirs are normalised by the data loader first; the warp
is linear and its grid keeps every sample inside the image, so normalising before or after
commutes). Their post-poisoning augmentation (kornia crop, rotation, flip) is replaced by the
identity in this process, as are tensorboard, image saving and the progress bar: ours augments
after poisoning too, with our own loader's crop and flip.
"""
from __future__ import annotations

import ast
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conformance_checks.common import Compared, load_functions, max_abs

REPOSITORY = "VinAIResearch/Warping-based_Backdoor_Attack-release"
H = 32


def statements(path: Path, function: str, first: str, last: str) -> types.CodeType:
    """The statements of `function` in an official script from the one whose source starts with
    `first` to the one starting with `last` (the same block), compiled: run them in a namespace."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    (func,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    for node in ast.walk(func):
        for body in (getattr(node, "body", None), getattr(node, "orelse", None)):
            if not isinstance(body, list):
                continue
            texts = [(ast.get_source_segment(source, s) or "").strip() for s in body]
            starts = [i for i, t in enumerate(texts) if t.startswith(first)]
            ends = [i for i, t in enumerate(texts) if t.startswith(last)]
            if starts and ends and starts[0] <= ends[-1]:
                block = ast.Module(body=body[starts[0]: ends[-1] + 1], type_ignores=[])
                return compile(block, str(path), "exec")
    raise ValueError(f"{path}: no block of {function} from {first!r} to {last!r}")


def _opt(**extra: Any) -> SimpleNamespace:
    return SimpleNamespace(k=4, s=0.5, grid_rescale=1.0, input_height=H, input_width=H, device="cpu",
                           pc=0.1, cross_ratio=2.0, attack_mode="all2one", target_label=0, num_classes=10,
                           dataset="gtsrb", temps="/nonexistent", **extra)


def their_grid(reference: Path, seed: int, grid_rescale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise_grid, identity_grid, grid_temps) as their main and train compute them."""
    opt = _opt()
    opt.grid_rescale = grid_rescale
    scope: dict[str, Any] = {"torch": torch, "F": F, "opt": opt}
    torch.manual_seed(seed)
    exec(statements(reference / "train.py", "main", "ins = torch.rand(1, 2, opt.k, opt.k)",  # noqa: S102
                    "identity_grid ="), scope)
    exec(statements(reference / "train.py", "train", "grid_temps = (identity_grid", "grid_temps = torch.clamp"),  # noqa: S102
         scope)
    return scope["noise_grid"], scope["identity_grid"], scope["grid_temps"]


class _Recorder(nn.Module):
    """Their netC: keeps what reaches the model, returns trainable logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * H * H, 10)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.linear(x.flatten(1))


def _torch_seen_by_them(targets: list[torch.Tensor], noise_seeds: list[int]) -> types.ModuleType:
    """`torch` as their train() sees it: itself, except that CrossEntropyLoss keeps the targets
    it is given and each batch's torch.rand draw starts from that batch's seed."""
    class RecordingCE(nn.CrossEntropyLoss):
        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
            targets.append(target.detach().clone())
            return super().forward(input, target)

    def rand(*size: Any, **kwargs: Any) -> torch.Tensor:
        torch.manual_seed(noise_seeds.pop(0))
        return torch.rand(*size, **kwargs)

    seen = types.ModuleType("torch_seen_by_them")
    seen.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[attr-defined]
    seen.nn = types.SimpleNamespace(CrossEntropyLoss=RecordingCE, BCELoss=nn.BCELoss)  # type: ignore[attr-defined]
    seen.rand = rand  # type: ignore[attr-defined]
    return seen


def check_wanet(reference: Path) -> list[Compared]:
    from harness.backdoor.base import pattern_generator
    from harness.backdoor.plan import PoisonPlan
    from harness.backdoor.wanet import WaNet

    out: list[Compared] = []
    ours = WaNet()
    field_seed = pattern_generator(ours.pattern_seed, H, H, ours.k, 0x3A7E7).initial_seed()
    for rescale in (1.0, 0.98):
        noise_grid, identity_grid, grid_temps = their_grid(reference, field_seed, rescale)
        mine = WaNet(grid_rescale=rescale).grid(H, H)
        out.append(Compared(f"grid_rescale_{rescale:g}", max_abs(grid_temps, mine), "image"))

    # one epoch of their train() on two batches, and our plan on the same batches
    gen = torch.Generator().manual_seed(0)
    batches = [((torch.randint(0, 256, (b, 3, H, H), generator=gen).float() / 255),
                torch.randint(0, 10, (b,), generator=gen)) for b in (128, 37)]
    plan = PoisonPlan(ours, "train", seed=5).for_epoch(3)
    noise_seeds = [plan.generator(0, b).initial_seed() for b in range(len(batches))]
    targets: list[torch.Tensor] = []
    net = _Recorder()
    writer = SimpleNamespace(add_scalars=lambda *a, **k: None, add_image=lambda *a, **k: None)
    scope = {"torch": _torch_seen_by_them(targets, list(noise_seeds)), "F": F, "nn": nn, "os": __import__("os"),
             "time": __import__("time").time, "progress_bar": lambda *a, **k: None,
             "PostTensorTransform": lambda opt: nn.Identity(), "Denormalizer": lambda opt: (lambda x: x),
             "torchvision": SimpleNamespace(utils=SimpleNamespace(save_image=lambda *a, **k: None,
                                                                  make_grid=lambda x, **k: x))}
    train = load_functions(reference / "train.py", ["train"], scope)["train"]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [100])
    train(net, optimizer, scheduler, batches, noise_grid, identity_grid, writer, 3, _opt())

    warped, crossed, labels, positions = 0.0, 0.0, 0.0, 0.0
    for b, ((x, y), theirs_x, theirs_y) in enumerate(zip(batches, net.inputs, targets)):
        mine_x, mine_y = plan(x, y, np.arange(len(y)) + 1000 * b, rank=0, batch=b)
        hit, cross = plan.masks(np.arange(len(y)))
        changed_theirs = (theirs_x != x).flatten(1).any(1)
        n_bd, n_cross = int(len(y) * 0.1), int(int(len(y) * 0.1) * 2.0)
        warped = max(warped, max_abs(theirs_x[:n_bd], mine_x[hit]))
        crossed = max(crossed, max_abs(theirs_x[n_bd:n_bd + n_cross], mine_x[cross]))
        labels = max(labels, max_abs(theirs_y, mine_y))
        positions = max(positions, float((changed_theirs != (hit | cross)).sum()),
                        abs(int(hit.sum()) - n_bd), abs(int(cross.sum()) - n_cross))
    out += [Compared("warped_images", warped, "image"),
            Compared("noise_mode_images", crossed, "image"),
            Compared("labels", labels, "int"),
            Compared("poisoned_and_cross_positions", positions, "int",
                     "per batch: int(B * pc) first, int(that * cross_ratio) next")]
    return out


CHECKS = {"wanet": check_wanet}

"""NAD and its FT teacher beside bboylyg/NAD (`at.py`'s AT module, main.py's `train_step`,
utils/util.py's `adjust_learning_rate`, train_badnet.py's `_adjust_learning_rate`, config.py's
defaults).

Same weights (our tiny test_resnet at 64x64, so the last stage's maps are 2x2, not 1x1), same
batch. The official `train_step` gets our student and teacher behind a wrapper that returns the
last three stages' outputs and the logits, as its WRN-16-1 does (its three groups); it runs on the
CPU as it is (`opt.cuda = 0`).
  attention_map / at_loss   at.py's `AT(2.0)` on the same stage outputs of both models
  loss / update             one NAD step: main.py's `train_step` with the optimiser `train()` builds
                            (SGD nesterov, config.py's lr, momentum, wd) vs our trainer's step with
                            the paper recipe's optimiser; BatchNorm statistics after it
  FT (teacher)              the same `train_step` with every beta 0 (the README's teacher recipe)
                            vs our `ft` step
  lr per epoch              `adjust_learning_rate` at NAD's 20 epochs and the teacher's 10 vs
                            `lr_at_epochs` of our recipe=paper nodes; train_badnet's
                            `_adjust_learning_rate` at its 19 epochs vs our upstream ERM's
  settings                  config.py's batch, clean ratio, betas, p, momentum, wd vs the recipe
  steps per epoch           a DataLoader of 2,500 samples at config.py's batch vs our trainer's
                            ceil(samples / batch)
  cutout                    data_loader.py's Cutout(1, 3) (its training loader's last transform)
                            at the centres our loader draws vs our loader's Cutout for the stage
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from conformance_checks.common import (Compared, import_file, load_functions, max_abs, max_param_diff,
                                       official_lrs, our_step, paper_trainers, same_random, tiny_batch,
                                       tiny_model, train_context, twins)

REPOSITORY = "bboylyg/NAD"
SIZE = 64  # test_resnet's last stage is 2x2 at 64x64 (1x1 at 32x32: a trivial attention map)
CLEAN_SAMPLES = 2500  # 5% of CIFAR-10's training split


class Stages(nn.Module):
    """A classifier as the official networks present themselves: forward -> (a1, a2, a3, logits),
    the outputs of its last three stages and its logits (parameters shared, not copied)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.names = model.layer_names()[-3:]
        for name in self.names:
            modules[name].register_forward_hook(lambda _m, _i, o, name=name: self.out.__setitem__(name, o))

    def forward(self, x: torch.Tensor):
        logits = self.model(x)
        return (*[self.out[n] for n in self.names], logits)


def _topk(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Top-k accuracy in % (what utils/util.py's `accuracy` logs), for the official train_step's log."""
    pred = output.topk(max(topk), 1).indices
    return [(pred[:, :k] == target[:, None]).any(1).float().mean() * 100 for k in topk]


def _official(reference: Path) -> SimpleNamespace:
    util = load_functions(reference / "utils" / "util.py", ["AverageMeter", "accuracy", "adjust_learning_rate"],
                          {"torch": torch})
    # their `accuracy` (top-1/top-5 for the log only) calls .view on a transposed tensor, which
    # torch >= 1.13 refuses: train_step gets a stand-in for that log line, its loss and update are theirs
    main = load_functions(reference / "main.py", ["train_step"], {"torch": torch, **util, "accuracy": _topk})
    badnet = load_functions(reference / "train_badnet.py", ["_adjust_learning_rate"], {"torch": torch})
    at = import_file(reference / "at.py")
    opt = import_file(reference / "config.py").get_arguments().parse_args([])
    return SimpleNamespace(util=util, train_step=main["train_step"], badnet_lr=badnet["_adjust_learning_rate"],
                           AT=at.AT, opt=opt)


def _their_step(off: SimpleNamespace, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                betas: tuple[float, float, float]) -> float:
    """One official `train_step` on (x, y); returns the loss it minimised (read from its criteria)."""
    opt = SimpleNamespace(**{**vars(off.opt), "cuda": 0, "beta1": betas[0], "beta2": betas[1], "beta3": betas[2]})
    snet, tnet = Stages(student), Stages(teacher)
    tnet.eval()  # main.py's train(): teacher.eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=opt.lr, momentum=opt.momentum,
                                weight_decay=opt.weight_decay, nesterov=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the lr it sets
        off.util["adjust_learning_rate"](optimizer, 0, opt.lr)
    seen: list[torch.Tensor] = []
    at, ce = off.AT(opt.p), nn.CrossEntropyLoss()
    criterions = {"criterionCls": lambda o, t: seen.append(ce(o, t)) or seen[-1],
                  "criterionAT": lambda s, t: seen.append(at(s, t)) or seen[-1]}
    off.train_step(opt, [(x, y)], {"snet": snet, "tnet": tnet}, optimizer, criterions, 1)
    cls, at3, at2, at1 = (float(v.detach()) for v in seen)  # the order train_step calls them in
    return cls + opt.beta3 * at3 + opt.beta2 * at2 + opt.beta1 * at1


def _lrs(rule, epochs: range, lr: float) -> list[float]:
    """The lr an official rule `rule(optimizer, epoch, lr)` sets at each epoch (its prints muted)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return official_lrs(lambda o, e: rule(o, e, lr), epochs, lr)


def check_nad(reference: Path) -> list[Compared]:
    from harness.train.optimizers import build_optimizer
    from harness.train.schedule import lr_at_epochs
    from methods.nad import NAD, at_loss, attention_map

    off = _official(reference)
    x, y = tiny_batch(16, shape=(3, SIZE, SIZE))
    student = tiny_model(img_size=SIZE)
    teacher = tiny_model(seed=1, img_size=SIZE).eval()
    recipe = paper_trainers("nad")
    betas = (float(off.opt.beta1), float(off.opt.beta2), float(off.opt.beta3))

    # attention maps and AT loss on the same stage outputs of two different models
    with torch.no_grad():
        fs = Stages(copy.deepcopy(student).eval())(x)[:3]
        ft = Stages(teacher)(x)[:3]
    at = off.AT(off.opt.p)
    map_diff = max(max_abs(at.attention_map(f).flatten(1), attention_map(f, off.opt.p)) for f in fs + ft)
    loss_diff = max(max_abs(at(a, b), at_loss(a, b, off.opt.p)) for a, b in zip(fs, ft))

    # one NAD step
    theirs, ours = twins(student)
    same_random(0)
    loss_theirs = _their_step(off, theirs, copy.deepcopy(teacher), x, y, betas)
    method = NAD(**{k: v for k, v in paper_cfg("nad").items() if k not in ("name", "teacher")})
    module = method.build(ours)
    module.teacher.load_state_dict(teacher.state_dict())
    optimizer = build_optimizer(recipe["nad"]["optimizer"], method.param_groups(module))
    same_random(0)
    logs = our_step(method, module, optimizer, x, y, train_context(module.student))

    nad_lr = _lrs(off.util["adjust_learning_rate"], range(off.opt.epochs), off.opt.lr)
    erm_epochs = range(1, off.opt.epochs)  # train_badnet.py: `for epoch in range(1, opt.epochs)`
    erm_lr = _lrs(off.badnet_lr, erm_epochs, off.opt.lr)
    steps = len(torch.utils.data.DataLoader(range(CLEAN_SAMPLES), batch_size=off.opt.batch_size, shuffle=True))
    nad_cfg = paper_cfg("nad")
    return [Compared("attention_map", map_diff),
            Compared("at_loss", loss_diff),
            Compared("loss", abs(loss_theirs - float(logs["loss"].detach()))),
            Compared("parameters_after_one_step", max_param_diff(theirs, module.student)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, module.student, buffers=True)),
            Compared("epochs", abs(recipe["nad"]["epochs"] - off.opt.epochs), "int"),
            Compared("lr_per_epoch", max_abs(nad_lr, lr_at_epochs(recipe["nad"]))),
            Compared("batch_size", abs(recipe["nad"]["batch_size"] - off.opt.batch_size), "int"),
            Compared("steps_per_epoch_2500", abs(math.ceil(CLEAN_SAMPLES / recipe["nad"]["batch_size"]) - steps),
                     "int"),
            Compared("momentum_weight_decay", max_abs([recipe["nad"]["optimizer"]["momentum"],
                                                       recipe["nad"]["optimizer"]["weight_decay"]],
                                                      [off.opt.momentum, off.opt.weight_decay])),
            Compared("clean_fraction", abs(nad_cfg["clean_subset"] - off.opt.ratio)),
            Compared("betas_and_p", max_abs(list(nad_cfg["betas"]) + [nad_cfg["p"]], list(betas) + [off.opt.p])),
            Compared("upstream_erm_epochs", abs(recipe["erm"]["epochs"] - len(erm_epochs)), "int"),
            Compared("upstream_erm_lr_per_epoch", max_abs(erm_lr, lr_at_epochs(recipe["erm"]))),
            Compared("upstream_erm_batch_size", abs(recipe["erm"]["batch_size"] - off.opt.batch_size), "int"),
            Compared("cutout", cutout_difference(reference, "nad"), "image", "Cutout(1, 3) at the same centres")]


def cutout_difference(reference: Path, method: str) -> float:
    """Their data_loader.py `Cutout(1, 3)` on each image at the centres our augmentation draws
    (its numpy draws replaced by ours, in this process), against our loader's Cutout from the
    stage's `runtime_data`."""
    from harness.core.config import compose_config
    from harness.data.loader import BatchTransform
    from harness.run.plan import planned_data

    cfg = compose_config([f"method={method}", "recipe=paper", "data=cifar10", "arch=resnet18"])
    augment = planned_data(cfg)["augment"]  # the preset's crop + flip, and the stage's Cutout
    images = torch.rand(64, 3, 32, 32) + 0.5  # no zero pixel: every zero is Cutout's
    ours = BatchTransform.from_args(None, {"cutout": augment["cutout"]})(images, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    cy, cx = torch.randint(0, 32, (64,), generator=replay), torch.randint(0, 32, (64,), generator=replay)
    queue = [int(v) for pair in zip(cy, cx) for v in pair]
    draws = SimpleNamespace(ones=np.ones, float32=np.float32, clip=np.clip,
                            random=SimpleNamespace(randint=lambda n: queue.pop(0)))
    cutout = load_functions(reference / "data_loader.py", ["Cutout"], {"np": draws, "torch": torch})["Cutout"](1, 3)
    theirs = torch.stack([cutout(img) for img in images])
    return max_abs(theirs, ours)


def check_ft(reference: Path) -> list[Compared]:
    """The teacher: main.py's `train_step` with every beta 0 (README), 10 epochs of its lr rule."""
    from harness.train.optimizers import build_optimizer
    from harness.train.schedule import lr_at_epochs
    from methods.ft import FineTuning

    off = _official(reference)
    x, y = tiny_batch(16, shape=(3, SIZE, SIZE))
    theirs, ours = twins(tiny_model(img_size=SIZE))
    same_random(0)
    loss_theirs = _their_step(off, theirs, copy.deepcopy(theirs).eval(), x, y, (0.0, 0.0, 0.0))
    recipe = paper_trainers("ft")
    method = FineTuning(**{k: v for k, v in paper_cfg("ft").items() if k != "name"})
    module = method.build(ours)
    optimizer = build_optimizer(recipe["ft"]["optimizer"], method.param_groups(module))
    same_random(0)
    logs = our_step(method, module, optimizer, x, y, train_context(module))
    epochs = recipe["ft"]["epochs"]  # README: 5 to 10 epochs; BackdoorBench's te_epochs: 10
    theirs_lr = _lrs(off.util["adjust_learning_rate"], range(epochs), off.opt.lr)
    steps = len(torch.utils.data.DataLoader(range(CLEAN_SAMPLES), batch_size=off.opt.batch_size, shuffle=True))
    in_nad = paper_trainers("nad")["ft"]  # NAD's teacher node runs the same trainer as the FT cell
    return [Compared("loss", abs(loss_theirs - float(logs["loss"].detach()))),
            Compared("parameters_after_one_step", max_param_diff(theirs, module)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, module, buffers=True)),
            Compared("lr_per_epoch", max_abs(theirs_lr, lr_at_epochs(recipe["ft"]))),
            Compared("nad_teacher_lr_per_epoch", max_abs(theirs_lr, lr_at_epochs(in_nad))),
            Compared("batch_size", abs(recipe["ft"]["batch_size"] - off.opt.batch_size), "int"),
            Compared("steps_per_epoch_2500", abs(math.ceil(CLEAN_SAMPLES / recipe["ft"]["batch_size"]) - steps), "int"),
            Compared("cutout", cutout_difference(reference, "ft"), "image", "Cutout(1, 3) at the same centres")]


def paper_cfg(method: str) -> dict:
    """The method settings of a `recipe=paper` cell (what the recipe's `method:` sets)."""
    from harness.core.config import compose_config

    return compose_config([f"method={method}", "recipe=paper", "data=cifar10", "arch=resnet18"])["method"]


CHECKS = {"nad": check_nad, "ft": check_ft}

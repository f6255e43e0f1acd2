"""FGSM-RS beside locuslab/fast_adversarial (CIFAR10/train_fgsm.py and its utils.py).

The training script keeps its step inside `main()` (argument parsing, data download, apex amp
around it). Nothing of it is copied: the check takes `main`'s own statements from the file's
syntax tree (the optimiser, the step sizes, the scheduler's construction, the batch loop, the
early-stop block) and executes them, with its `utils.py` imported as is, on our tiny model and
a CIFAR-shaped batch. apex is replaced by a stand-in whose `scale_loss` yields the loss unscaled
(the script's loss scale is 1.0; we compare in fp32, not amp O2's fp16), and `.cuda()` returns the
CPU tensor (`cuda_on_cpu`, in this process only). The script works on normalised images
((x - mu) / std with CIFAR-10's statistics); its model here is ours behind the inverse map, and
its eps-ball, step and box are per-channel images of ours, so the results are compared in pixel
space. Both sides start from the same random point: the official start is read from the model's
first call and handed to our attack.

fgsm_rs:
  recipe numbers    epochs, batch, lr_max, momentum, weight decay, eps, alpha / eps (the script's
                    argument defaults) against recipe=paper
  steps per epoch   len(train_loader) (50,000 / 128, last batch kept) against our trainer's
  lr, momentum      at every one of the 5,865 steps: the script's CyclicLR (built by its own
                    statement) against our schedule (cyclic, peak 50%, cycle_momentum)
  one step          loss, x + delta, parameters and BatchNorm statistics after one SGD step (lr 0.2,
                    momentum 0.9, wd 5e-4), crafted in train mode on both sides
  early-stop guard  its PGD's x' on the epoch's first batch (5 steps of 2/255, still-correct
                    samples only), robust accuracy, BatchNorm statistics after it (train mode),
                    and the stop decision for a drop of 0.25 and of 0.15
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conformance_checks.common import (Compared, cuda_on_cpu, import_file, load_functions, max_abs,
                                       max_param_diff, NormalisedInput, our_step, paper_trainers, Recorder,
                                       same_random, ScriptBody, tiny_batch, tiny_model, train_context, twins)

REPOSITORY = "locuslab/fast_adversarial"
N_TRAIN = 50_000  # CIFAR-10's training split, what len(train_loader) counts


def amp_stand_in() -> types.ModuleType:
    """apex.amp at the scripts' loss scale 1.0 (their default) and in fp32: `scale_loss` yields the loss."""
    amp = types.ModuleType("apex.amp")

    @contextlib.contextmanager
    def scale_loss(loss: torch.Tensor, optimizer: Any) -> Iterator[torch.Tensor]:
        yield loss

    amp.scale_loss = scale_loss  # type: ignore[attr-defined]
    amp.initialize = lambda model, opt, **_: (model, opt)  # type: ignore[attr-defined]
    return amp


@contextlib.contextmanager
def apex_stand_in() -> Iterator[None]:
    """`apex` / `apex.amp` in sys.modules while the scripts' files are imported."""
    amp = amp_stand_in()
    apex = types.ModuleType("apex")
    apex.amp = amp  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("apex", "apex.amp")}
    sys.modules.update({"apex": apex, "apex.amp": amp})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def official_utils(reference: Path) -> types.ModuleType:
    """CIFAR10/utils.py as it is (its module level moves mu/std to CUDA: on the CPU here)."""
    with cuda_on_cpu(), apex_stand_in():
        return import_file(reference / "CIFAR10" / "utils.py")


def script_args(path: Path, argv: list[str] | None = None) -> SimpleNamespace:
    """The script's own `get_args()` defaults (plus `argv`)."""
    get_args = load_functions(path, ["get_args"], {"argparse": argparse})["get_args"]
    saved = sys.argv
    sys.argv = [path.name, *(argv or [])]
    try:
        return get_args()
    finally:
        sys.argv = saved


def _namespace(utils: types.ModuleType, args: SimpleNamespace, model: nn.Module) -> dict[str, Any]:
    """What the scripts' main() has in scope: their utils' names, torch, the stand-in amp, args, model."""
    names = {k: getattr(utils, k) for k in ("upper_limit", "lower_limit", "std", "clamp", "attack_pgd")}
    return {"torch": torch, "nn": nn, "F": F, "np": np, "copy": copy, "amp": amp_stand_in(), "args": args,
            "model": model, **names}


def _sgd(args: SimpleNamespace) -> dict[str, Any]:
    return {"name": "sgd", "lr": args.lr_max, "momentum": args.momentum, "weight_decay": args.weight_decay,
            "nesterov": False}


def check_fgsm_rs(reference: Path) -> list[Compared]:
    from harness.core.config import compose_config, finalize
    from harness.train.optimizers import build_optimizer
    from harness.train.schedule import lr_factor, momentum_at
    import methods.fgsm_rs as ours_module
    from methods.fgsm_rs import FGSMRS

    script = reference / "CIFAR10" / "train_fgsm.py"
    utils, args, body = official_utils(reference), script_args(script), ScriptBody(script)
    epoch_loop = body.find(ast.For, "epoch", "target")
    batch_loop = body.find(ast.For, "(i, (X, y))", "target", within=epoch_loop.body)
    early_stop = body.find(ast.If, "args.early_stop", "test", within=epoch_loop.body)
    eps_pixel = args.epsilon / 255
    out: list[Compared] = []

    # -- the recipe's numbers against the script's defaults
    cfg = finalize(compose_config(["method=fgsm_rs", "recipe=paper", "data=cifar10", "arch=resnet18"]))
    recipe, mcfg = paper_trainers("fgsm_rs")["fgsm_rs"], cfg["method"]
    ours_eps = FGSMRS(mcfg["attack"]).attack.eps
    out += [Compared("recipe_epochs", abs(recipe["epochs"] - args.epochs), "int"),
            Compared("recipe_batch_size", abs(recipe["batch_size"] - args.batch_size), "int"),
            Compared("recipe_lr_max", abs(recipe["optimizer"]["lr"] - args.lr_max)),
            Compared("recipe_momentum", abs(recipe["optimizer"]["momentum"] - args.momentum)),
            Compared("recipe_weight_decay", abs(recipe["optimizer"]["weight_decay"] - args.weight_decay)),
            Compared("recipe_eps", abs(ours_eps - eps_pixel)),
            Compared("recipe_alpha_over_eps", abs(float(mcfg["attack"]["step_ratio"]) - args.alpha / args.epsilon))]

    # -- steps per epoch, lr and momentum at every step: the script's own CyclicLR construction
    theirs_steps = math.ceil(N_TRAIN / args.batch_size)  # len(train_loader): shuffle, no drop_last
    ours_steps = math.ceil(N_TRAIN / int(recipe["batch_size"]))
    probe = nn.Linear(1, 1)
    ns = body.run(body.assignments("opt") + body.assignments("lr_steps") + [body.find(ast.If, "args.lr_schedule == 'cyclic'", "test")],
                  {"torch": torch, "args": args, "model": probe, "train_loader": range(theirs_steps)})
    opt, scheduler = ns["opt"], ns["scheduler"]
    theirs_lr, theirs_mom, ours_lr, ours_mom = [], [], [], []
    epochs = int(recipe["epochs"])
    for step in range(epochs * ours_steps):
        theirs_lr.append(opt.param_groups[0]["lr"])
        theirs_mom.append(opt.param_groups[0]["momentum"])
        opt.step()
        scheduler.step()
        at = step / ours_steps
        ours_lr.append(float(recipe["optimizer"]["lr"]) * lr_factor(recipe["schedule"], at, epochs))
        ours_mom.append(momentum_at(recipe["schedule"], at, epochs))
    out += [Compared("steps_per_epoch", abs(theirs_steps - ours_steps), "int"),
            Compared("lr_every_step", max_abs(theirs_lr, ours_lr)),
            Compared("momentum_every_step", max_abs(theirs_mom, ours_mom))]

    # -- one training step, crafted in train mode on both sides
    x, y = tiny_batch(16)
    theirs_model, ours_model = twins(tiny_model())
    theirs = NormalisedInput(theirs_model, utils.mu, utils.std)
    recorder = Recorder(theirs).train()
    ns = _namespace(utils, args, recorder)
    body.run(body.assignments("epsilon", "alpha", "pgd_alpha", "opt", "criterion"), ns)
    ns.update(train_loader=[(theirs.normalise(x), y)], scheduler=SimpleNamespace(step=lambda: None),
              train_loss=0, train_acc=0, train_n=0)
    same_random(0)
    with cuda_on_cpu():
        body.run([batch_loop], ns)
    (start_mode, start), (final_mode, final) = recorder.calls
    start_pixels, x_adv_theirs = theirs.pixels(start), theirs.pixels(final)

    method = FGSMRS({"eps": eps_pixel, "step_ratio": args.alpha / args.epsilon})
    method.attack.random_start = lambda _x: start_pixels.clone()  # type: ignore[method-assign]
    crafted: list[torch.Tensor] = []
    perturb = method.attack.perturb
    method.attack.perturb = lambda m, xx, yy: crafted.append(perturb(m, xx, yy)) or crafted[-1]  # type: ignore[method-assign]
    opt_ours = build_optimizer(_sgd(args), method.param_groups(ours_model))
    logs = our_step(method, ours_model, opt_ours, x, y, train_context(ours_model, step=0, steps_per_epoch=2))
    out += [Compared("crafting_mode_train", float(not (start_mode and final_mode)), "int",
                     note="the official crafting forward runs in train mode"),
            Compared("loss", max_abs(ns["loss"], logs["loss"])),
            Compared("adversarial_example", max_abs(x_adv_theirs, crafted[0])),
            Compared("parameters_after_one_step", max_param_diff(theirs_model, ours_model)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs_model, ours_model, buffers=True))]

    # -- the early-stop guard after the epoch, on its first batch
    calls: list[dict[str, Any]] = []
    attack_pgd = ns["attack_pgd"]
    ns["attack_pgd"] = lambda *a: calls.append({"iters": a[5], "restarts": a[6]}) or attack_pgd(*a)
    recorder.calls.clear()
    ns["prev_robust_acc"] = 0.0
    same_random(1)
    with cuda_on_cpu():
        body.run(early_stop.body, ns, in_loop=True)
    guard_start = theirs.pixels(recorder.calls[0][1])
    x_guard_theirs = theirs.pixels(ns["X"] + ns["pgd_delta"])

    guard_x: list[torch.Tensor] = []
    pgd = ours_module.early_stopping_pgd
    ours_module.early_stopping_pgd = lambda *a, **k: guard_x.append(pgd(*a, **k)) or guard_x[-1]
    method.guard_start = lambda _x: guard_start.clone()  # type: ignore[method-assign]
    try:
        method.after_step(ours_model, train_context(ours_model, step=1, steps_per_epoch=2))  # the epoch's end
        decisions = []
        for drop in (0.25, 0.15):  # each side decides on the same accuracy and the same previous one
            for side in ("theirs", "ours"):
                model = copy.deepcopy(theirs_model if side == "theirs" else ours_model)
                if side == "theirs":
                    ns2 = {**ns, "model": NormalisedInput(model, utils.mu, utils.std).train(),
                           "prev_robust_acc": ns["robust_acc"] + drop}
                    same_random(1)
                    with cuda_on_cpu():
                        body.run(early_stop.body, ns2, in_loop=True)
                    decisions.append(int(ns2["prev_robust_acc"] != ns2["robust_acc"]))  # broke before updating
                else:
                    judge = FGSMRS({"eps": eps_pixel})
                    judge.guard_start = method.guard_start  # type: ignore[method-assign]
                    judge.best_acc, judge.best_state = method.best_acc + drop, copy.deepcopy(model.state_dict())
                    judge._first = method._first
                    judge.after_step(model.train(), train_context(model, step=1, steps_per_epoch=2))
                    decisions.append(int(judge.stopped))
    finally:
        ours_module.early_stopping_pgd = pgd
    out += [Compared("guard_pgd_steps_restarts", abs(calls[0]["iters"] - method.guard_steps) + abs(calls[0]["restarts"] - 1), "int"),
            Compared("guard_step", abs(method.guard_step - 2 / 255),
                     note=f"official pgd_alpha = 2/255 / std"),
            Compared("guard_adversarial_example", max_abs(x_guard_theirs, guard_x[0])),
            Compared("guard_robust_accuracy", abs(ns["robust_acc"] - method.best_acc)),
            Compared("batchnorm_statistics_after_guard", max_param_diff(theirs_model, ours_model, buffers=True)),
            Compared("guard_stop_decisions", max_abs(decisions[0::2], decisions[1::2]), "int",
                     note=f"stop at drop 0.25, go on at 0.15: theirs {decisions[0::2]}, ours {decisions[1::2]}")]
    return out


CHECKS = {"fgsm_rs": check_fgsm_rs}

"""PGD-AT beside P2333/Bag-of-Tricks-for-AT (train_cifar.py): the bag-of-tricks baseline whose
recipe METHODS.md names for PGD-AT (Madry's own code is TensorFlow).

The script keeps its step inside `main()` and moves its statistics to CUDA at import. Nothing of
it is copied: the check executes its own statements from the file's syntax tree (module level:
mu, std, the [0, 1] limits, `normalize`, `clamp`, `attack_pgd`, `get_args`; main: the step
sizes, parameters, optimiser, criterion, lr schedule, the attack schedules and the batch loop) on
our tiny model and a CIFAR-shaped batch, with `.cuda()` returning the CPU tensor (`cuda_on_cpu`,
in this process only). Its model takes normalised images: ours behind the inverse map. The
arguments are the README's baseline command (`--BNeval`: BatchNorm in eval mode while crafting;
the rest are the script's defaults). Both sides start from the same uniform start (the official
one, read from the model's first call, handed to our PGD).

  recipe numbers    epochs, batch, lr, momentum, weight decay, eps, PGD steps and step size
  steps per epoch   len(train_batches) (50,000 / 128, last batch kept) against our trainer's
  lr per epoch      at each epoch's first step, the script's piecewise `lr_schedule` (evaluated at
                    epoch + (i + 1) / steps) against recipe=paper; and at every step, where the
                    two differ on the last step of epochs 99 and 104 only (note)
  one step          x', loss, parameters and BatchNorm statistics after one SGD step (the script's
                    loop runs x' and x before the step and x after it in train mode: BatchNorm
                    sees all three); the note gives ours with craft_mode=train against the
                    script without --BNeval
"""
from __future__ import annotations

import argparse
import ast
import copy
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Variable

from conformance_checks.common import (Compared, cuda_on_cpu, import_file, load_functions, max_abs,
                                       max_param_diff, NormalisedInput, our_step, paper_trainers, Recorder,
                                       same_random, ScriptBody, tiny_batch, tiny_model, train_context)

REPOSITORY = "P2333/Bag-of-Tricks-for-AT"
N_TRAIN = 50_000
BASELINE = ["--BNeval"]  # the README's baseline command, besides --model WideResNet and --fname auto


def official_module_level(reference: Path) -> dict[str, Any]:
    """The script's module-level names the step uses, from its own statements and functions."""
    script = reference / "train_cifar.py"
    with cuda_on_cpu():
        utils = import_file(reference / "utils.py")
        ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "np": np, "math": math, "Variable": Variable,
                              "argparse": argparse, "cifar10_mean": utils.cifar10_mean,
                              "cifar10_std": utils.cifar10_std}
        ScriptBody(script, None).run(ScriptBody(script, None).assignments("mu", "std", "(upper_limit, lower_limit)"), ns)
    ns.update(load_functions(script, ["normalize", "clamp", "attack_pgd", "mixup_criterion", "get_args"], ns))
    return ns


def script_args(get_args: Any, argv: list[str]) -> Any:
    saved = sys.argv
    sys.argv = ["train_cifar.py", *argv]
    try:
        return get_args()
    finally:
        sys.argv = saved


def official_step(reference: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  argv: list[str]) -> tuple[dict[str, Any], Recorder, NormalisedInput]:
    """One pass of the script's batch loop on (x, y), with its optimiser, schedules and criterion."""
    module_ns = official_module_level(reference)
    body = ScriptBody(reference / "train_cifar.py")
    args = script_args(module_ns["get_args"], argv)
    theirs = NormalisedInput(model, module_ns["mu"], module_ns["std"])
    recorder = Recorder(theirs).train()
    ns = {**module_ns, "args": args, "model": recorder}
    setup = (body.assignments("epsilon", "test_epsilon", "pgd_alpha", "test_pgd_alpha")
             + [body.find(ast.If, "args.l2", "test"), body.find(ast.If, "args.lr_schedule == 'cyclic'", "test"),
                body.find(ast.If, "args.labelsmooth", "test"),
                body.find(ast.If, "args.lr_schedule == 'superconverge'", "test")]
             + body.definitions("eps_alpha_schedule", "early_stop_counter_schedule"))
    epoch_loop = body.find(ast.For, "epoch", "target")
    batch_loop = body.find(ast.For, "enumerate(train_batches)", "iter", within=epoch_loop.body)
    with cuda_on_cpu():
        body.run(setup, ns)
        ns.update(train_batches=[{"input": x, "target": y}], epoch=0, record_iter=torch.tensor([]), train_loss=0,
                  train_acc=0, train_robust_loss=0, train_robust_acc=0, train_n=0, train_grad=0)
        body.run([batch_loop], ns)
    return ns, recorder, theirs


def _ours(base: nn.Module, start: torch.Tensor, x: torch.Tensor, y: torch.Tensor, craft_mode: str,
          eps: float, step: float, steps: int, args: Any) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    import harness.attacks.pgd as pgd_module
    from harness.train.optimizers import build_optimizer
    from methods.pgd_at import PGDAT

    model = copy.deepcopy(base)
    method = PGDAT({"eps": eps, "steps": steps, "step_size": step}, craft_mode=craft_mode)
    crafted: list[torch.Tensor] = []
    perturb = method.attack.perturb
    method.attack.perturb = lambda m, xx, yy: crafted.append(perturb(m, xx, yy)) or crafted[-1]  # type: ignore[method-assign]
    optimizer = build_optimizer({"name": "sgd", "lr": args.lr_max, "momentum": 0.9, "weight_decay": args.weight_decay,
                                 "nesterov": False}, method.param_groups(model))
    saved = pgd_module.uniform_start
    pgd_module.uniform_start = lambda _eps: (lambda _x: start.clone())
    try:
        logs = our_step(method, model, optimizer, x, y, train_context(model))
    finally:
        pgd_module.uniform_start = saved
    return model, logs, crafted[0]


def check_pgd_at(reference: Path) -> list[Compared]:
    from harness.core.config import compose_config, finalize
    from harness.train.schedule import lr_at_epochs, lr_factor, schedule_position
    from methods.pgd_at import PGDAT

    x, y = tiny_batch(16)
    base = tiny_model()
    results: dict[str, tuple[float, float, float, float]] = {}
    for argv, craft_mode in ((BASELINE, "eval"), ([], "train")):
        theirs_model = copy.deepcopy(base)
        same_random(0)
        ns, recorder, theirs = official_step(reference, theirs_model, x, y, argv)
        args = ns["args"]
        # calls: the attack's forwards, its restart's scoring forward, then x' (the loss), x, x
        start = theirs.pixels(recorder.calls[0][1])
        x_adv_theirs = theirs.pixels(recorder.calls[args.attack_iters + 1][1])
        assert [m for m, _ in recorder.calls[args.attack_iters + 1:]] == [True] * 3
        eps, step = args.epsilon / 255, args.pgd_alpha / 255
        ours_model, logs, x_adv_ours = _ours(base, start, x, y, craft_mode, eps, step, args.attack_iters, args)
        results[craft_mode] = (max_abs(ns["robust_loss"], logs["loss"]), max_abs(x_adv_theirs, x_adv_ours),
                               max_param_diff(theirs_model, ours_model),
                               max_param_diff(theirs_model, ours_model, buffers=True))
        if craft_mode == "eval":
            baseline_ns, baseline_calls = ns, [(m, inp) for m, inp in recorder.calls]

    args = baseline_ns["args"]
    cfg = finalize(compose_config(["method=pgd_at", "recipe=paper", "data=cifar10", "arch=resnet18"]))
    recipe = paper_trainers("pgd_at")["pgd_at"]
    mcfg = cfg["method"]
    method = PGDAT(mcfg["attack"], craft_mode=mcfg["craft_mode"], clean_bn_forwards=mcfg["clean_bn_forwards"])
    steps = math.ceil(N_TRAIN / args.batch_size)  # len(train_batches): shuffle, no drop_last
    ours_steps = math.ceil(N_TRAIN / int(recipe["batch_size"]))
    lr_schedule = baseline_ns["lr_schedule"]
    epochs = int(recipe["epochs"])
    theirs_every = [lr_schedule(e + (i + 1) / steps) for e in range(args.epochs) for i in range(steps)]
    ours_every = [float(recipe["optimizer"]["lr"])
                  * lr_factor(recipe["schedule"], schedule_position(recipe["schedule"], e, i, ours_steps), epochs)
                  for e in range(epochs) for i in range(ours_steps)]
    differing = [k for k, (a, b) in enumerate(zip(theirs_every, ours_every)) if abs(a - b) > 1e-12]
    where = ", ".join(f"epoch {k // steps} step {k % steps}" for k in differing)
    crafting_modes = {m for m, _ in baseline_calls[:args.attack_iters]}
    loss, x_adv, params, bn = results["eval"]
    t_loss, t_x_adv, t_params, t_bn = results["train"]
    return [
        Compared("recipe_epochs", abs(epochs - args.epochs), "int"),
        Compared("recipe_batch_size", abs(int(recipe["batch_size"]) - args.batch_size), "int"),
        Compared("recipe_lr", abs(float(recipe["optimizer"]["lr"]) - args.lr_max)),
        Compared("recipe_momentum", abs(float(recipe["optimizer"]["momentum"]) - baseline_ns["opt"].param_groups[0]["momentum"])),
        Compared("recipe_weight_decay", abs(float(recipe["optimizer"]["weight_decay"]) - args.weight_decay)),
        Compared("recipe_eps", abs(method.attack.eps - args.epsilon / 255)),
        Compared("recipe_pgd_steps", abs(method.attack.steps - args.attack_iters), "int"),
        Compared("recipe_pgd_step_size", abs(method.attack.step_size - args.pgd_alpha / 255)),
        Compared("crafting_mode_eval", float(crafting_modes != {False}) + float(method.craft_mode != "eval"),
                 "int", note="--BNeval: the attack's forwards run in eval mode; ours: craft_mode eval"),
        Compared("steps_per_epoch", abs(steps - ours_steps), "int"),
        Compared("lr_per_epoch", max_abs([lr_schedule(e + 1 / steps) for e in range(args.epochs)], lr_at_epochs(recipe))),
        Compared("lr_every_step", float(len(differing)), "int",
                 note=f"steps whose lr differs (the script evaluates its schedule at the step's end): {where}"),
        Compared("loss", loss),
        Compared("adversarial_example", x_adv),
        Compared("parameters_after_one_step", params),
        Compared("batchnorm_statistics_after_one_step", bn,
                 note=(f"without --BNeval vs our craft_mode=train: loss {t_loss:.1e}, x' {t_x_adv:.1e}, "
                       f"update {t_params:.1e}, BN statistics {t_bn:.1e} (attack_pgd scores its restart "
                       f"with one more forward, in train mode there)")),
    ]


CHECKS = {"pgd_at": check_pgd_at}

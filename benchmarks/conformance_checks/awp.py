"""AT-AWP and TRADES-AWP beside csdongxian/AWP (AT_AWP/train_cifar10.py, trades_AWP/train_trades_cifar.py,
their utils_awp.py `AdvWeightPerturb` / `TradesAWP`).

Same weights (our tiny test_resnet), same CIFAR-shaped batch, the same random start (both sides
draw it from the seeded default generator), each script's own argparse defaults (eps 8/255,
10 steps of 2/255, gamma 0.01 / 5e-3, SGD lr 0.1 momentum 0.9 wd 5e-4):
  AT-AWP      their training loop's body (`for i, batch in enumerate(train_batches)` of `main()`,
              run as written on a one-batch loader at epoch 0) with their `attack_pgd` (train
              mode) and `AdvWeightPerturb` (proxy copy, one SGD step of lr 0.01 on -CE), against
              our trainer's step: x', the weight perturbation v, the loss at w + v, parameters
              and BatchNorm statistics after the step; the lr at every epoch's first step of
              their `piecewise` rule (`lr_schedule(epoch + (i + 1) / steps)`) vs recipe=paper.
  TRADES-AWP  their `train()` for one batch at their epoch 10 (the first with AWP): x' from their
              `perturb_input`, v from `TradesAWP.calc_awp`, the loss, parameters and BatchNorm
              statistics after the step; the epoch AWP starts; `adjust_learning_rate` at epochs
              1..200 vs recipe=paper.
Their `normalize` is the identity here (our model normalises inside). Run on the CPU in fp32.
"""
from __future__ import annotations

import ast
import copy
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conformance_checks.common import (Compared, argparse_defaults, assigns, cuda_on_cpu, import_file,
                                       load_functions, max_abs, max_param_diff, official_lrs, our_step,
                                       paper_trainers, run_statements, same_random, tiny_batch, tiny_model,
                                       train_context, twins)

REPOSITORY = "csdongxian/AWP"


def _our_method(name: str) -> Any:
    """Our method as `method=<name> data=cifar10` composes it (the defaults under test)."""
    from harness.core.config import compose_config
    from methods.base import build_method

    return build_method(compose_config([f"method={name}", "data=cifar10"])["method"])


def _sgd(method: Any, module: nn.Module, lr: float) -> torch.optim.Optimizer:
    from harness.train.optimizers import build_optimizer

    return build_optimizer({"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
                           method.param_groups(module))


def _recording(method: Any) -> tuple[list[torch.Tensor], list[dict[nn.Parameter, torch.Tensor]]]:
    """Wrap our method's attack and weight-perturbation step to keep x' and v."""
    crafted: list[torch.Tensor] = []
    perturbations: list[dict[nn.Parameter, torch.Tensor]] = []
    craft, compute = method.craft, method.perturbation.compute
    method.craft = lambda ctx, x, y: crafted.append(craft(ctx, x, y)) or crafted[-1]

    def keep(model: nn.Module, loss_fn: Any) -> Any:
        out = compute(model, loss_fn)
        perturbations.append({p: v for p, v in out})
        return out

    method.perturbation.compute = keep
    return crafted, perturbations


def perturbation_diff(their_model: nn.Module, theirs: dict[str, torch.Tensor], gamma: float,
                      our_model: nn.Module, ours: dict[nn.Parameter, torch.Tensor]) -> float:
    """Largest |v_theirs - v_ours| over every parameter (theirs: gamma * the normalised diff, by
    state_dict name; ours: by parameter; a tensor only one side perturbs counts whole)."""
    worst = 0.0
    for (name, p), q in zip(their_model.named_parameters(), our_model.parameters()):
        a = gamma * theirs[name] if name in theirs else torch.zeros_like(p)
        b = ours.get(q, torch.zeros_like(q))
        worst = max(worst, max_abs(a, b))
    return worst


def check_awp(reference: Path) -> list[Compared]:
    script = reference / "AT_AWP" / "train_cifar10.py"
    args = argparse_defaults(script, "get_args")
    official = import_file(reference / "AT_AWP" / "utils_awp.py", name="official_at_awp_utils")
    x, y = tiny_batch(16)
    base = tiny_model()
    theirs, ours = twins(base)
    proxy = copy.deepcopy(base)

    # their main()'s setup lines (optimiser, proxy optimiser, AWP adversary, lr rule), then one
    # pass of their training loop's body on a one-batch loader
    ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "np": np, "args": args, "model": theirs.train(),
                          "proxy": proxy, "AdvWeightPerturb": official.AdvWeightPerturb,
                          "normalize": lambda z: z, "lower_limit": 0, "upper_limit": 1}
    ns.update(load_functions(script, ["attack_pgd", "clamp", "mixup_criterion"], ns))
    run_statements(script, "main", lambda node, src: (isinstance(node, ast.If) and src.startswith("if args.l2:"))
                   or (isinstance(node, ast.If) and src.startswith("if args.lr_schedule == 'superconverge'")),
                   ns)
    run_statements(script, "main", assigns("opt", "proxy_opt", "awp_adversary", "criterion", "epsilon",
                                           "pgd_alpha"), ns)
    ns.update(train_batches=[{"input": x, "target": y}], epoch=0, train_loss=0, train_acc=0,
              train_robust_loss=0, train_robust_acc=0, train_n=0)
    kept: list[dict[str, torch.Tensor]] = []
    calc = ns["awp_adversary"].calc_awp
    ns["awp_adversary"].calc_awp = lambda **kw: kept.append(calc(**kw)) or kept[-1]
    same_random(0)
    with cuda_on_cpu():
        run_statements(script, "main", lambda node, src: isinstance(node, ast.For)
                       and src.startswith("for i, batch in enumerate(train_batches)"), ns)

    method = _our_method("awp")
    crafted, perturbations = _recording(method)
    opt_ours = _sgd(method, ours, float(args.lr_max))
    same_random(0)
    logs = our_step(method, ours, opt_ours, x, y, train_context(ours))

    recipe = paper_trainers("awp")["awp"]
    from harness.train.schedule import lr_at_epochs, lr_factor, schedule_position

    steps = 391  # 50,000 / 128, rounded up: their Batches keep the last partial batch, as ours
    theirs_lr = [float(ns["lr_schedule"](epoch + 1 / steps)) for epoch in range(int(args.epochs))]
    theirs_every = [float(ns["lr_schedule"](e + (i + 1) / steps)) for e in range(int(args.epochs)) for i in range(steps)]
    ours_every = [float(recipe["optimizer"]["lr"]) * lr_factor(recipe["schedule"], schedule_position(
        recipe["schedule"], e, i, steps), int(recipe["epochs"])) for e in range(int(recipe["epochs"])) for i in range(steps)]
    return [Compared("epochs", abs(recipe["epochs"] - int(args.epochs)), "int"),
            Compared("batch_size", abs(recipe["batch_size"] - int(args.batch_size)), "int"),
            Compared("lr_per_epoch", max_abs(theirs_lr, lr_at_epochs(recipe))),
            Compared("lr_every_step", max_abs(theirs_every, ours_every),
                     note=f"{len(theirs_every)} steps; their rule reads t = epoch + (i + 1) / steps: step_lr_at end"),
            Compared("adversarial_example", max_abs(ns["X_adv"], crafted[0])),
            Compared("weight_perturbation", perturbation_diff(theirs, kept[0], float(args.awp_gamma), ours, perturbations[0])),
            Compared("loss_at_perturbed_weights", max_abs(ns["robust_loss"], logs["loss"])),
            Compared("parameters_after_one_step", max_param_diff(theirs, ours)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, ours, buffers=True))]


class _Bar:
    """Stands in for the `progress` package's Bar (not installed; prints only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.suffix, self.elapsed_td, self.eta_td = "", 0, 0

    def next(self) -> None:
        pass

    def finish(self) -> None:
        pass


def _top_k(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Stands in for their utils/eval.py `accuracy` (logging only), whose `.view` on a transposed
    tensor fails on current PyTorch."""
    top = output.topk(max(topk), 1).indices
    return [(top[:, :k] == target[:, None]).any(1).float().mean() * 100 for k in topk]


def check_trades_awp(reference: Path) -> list[Compared]:
    folder = reference / "trades_AWP"
    script = folder / "train_trades_cifar.py"
    args = argparse_defaults(script)
    official = import_file(folder / "utils_awp.py", name="official_trades_awp_utils")
    misc = import_file(folder / "utils" / "misc.py", name="official_trades_awp_misc")
    x, y = tiny_batch(16)
    base = tiny_model()
    theirs, ours = twins(base)
    proxy = copy.deepcopy(base)

    ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "np": np, "optim": torch.optim, "args": args,
                          "device": torch.device("cpu"), "Bar": _Bar, "AverageMeter": misc.AverageMeter,
                          "accuracy": _top_k, "time": __import__("time"), "print": lambda *a, **k: None,
                          "model": theirs, "proxy": proxy, "TradesAWP": official.TradesAWP}
    run_statements(script, None, assigns("epsilon", "step_size"), ns)
    run_statements(script, "main", assigns("optimizer", "proxy_optim", "awp_adversary"), ns)
    ns.update(load_functions(script, ["perturb_input", "train", "adjust_learning_rate"], ns))
    crafted_theirs: list[torch.Tensor] = []
    perturb_input = ns["perturb_input"]  # their train() looks it up in its own globals: record it there
    ns["train"].__globals__["perturb_input"] = lambda **kw: crafted_theirs.append(perturb_input(**kw)) or crafted_theirs[-1]
    kept: list[dict[str, torch.Tensor]] = []
    calc = ns["awp_adversary"].calc_awp
    ns["awp_adversary"].calc_awp = lambda **kw: kept.append(calc(**kw)) or kept[-1]
    first_awp_epoch = int(args.awp_warmup)  # `if epoch >= args.awp_warmup`, epochs counted from 1
    same_random(0)
    with cuda_on_cpu():
        loss_theirs, _ = ns["train"](theirs, [(x, y)], ns["optimizer"], first_awp_epoch, ns["awp_adversary"])

    method = _our_method("trades_awp")
    crafted, perturbations = _recording(method)
    opt_ours = _sgd(method, ours, float(args.lr))
    same_random(0)
    logs = our_step(method, ours, opt_ours, x, y, train_context(ours, epoch=first_awp_epoch - 1, epochs=200))

    recipe = paper_trainers("trades_awp")["trades_awp"]
    from harness.train.schedule import lr_at_epochs

    theirs_lr = official_lrs(ns["adjust_learning_rate"], range(1, int(args.epochs) + 1), float(args.lr))
    return [Compared("epochs", abs(recipe["epochs"] - int(args.epochs)), "int"),
            Compared("batch_size", abs(recipe["batch_size"] - int(args.batch_size)), "int"),
            Compared("lr_per_epoch", max_abs(theirs_lr, lr_at_epochs(recipe))),
            Compared("first_epoch_with_awp", abs(method.warmup_epochs - (first_awp_epoch - 1)), "int",
                     note="theirs counts epochs from 1"),
            Compared("adversarial_example", max_abs(crafted_theirs[0], crafted[0])),
            Compared("weight_perturbation", perturbation_diff(theirs, kept[0], float(args.awp_gamma), ours, perturbations[0])),
            Compared("loss_at_perturbed_weights", max_abs(loss_theirs, logs["loss"])),
            Compared("parameters_after_one_step", max_param_diff(theirs, ours)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, ours, buffers=True))]


CHECKS = {"awp": check_awp, "trades_awp": check_trades_awp}

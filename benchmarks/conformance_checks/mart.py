"""MART beside YisenWang/MART (`mart.py`: `mart_loss`, the function its training scripts call;
`train_resnet.py`: the ResNet-18 recipe).

Same weights (our tiny test_resnet), same CIFAR-shaped batch, the same Gaussian start (both draw
0.001 N(0, I) from the seeded default generator), eps 0.031, 10 steps of 0.007, beta 5:
  recipe numbers       train_resnet.py's argument defaults (its module-level parser statements,
                       executed alone: the script downloads CIFAR-10 at import) against recipe=paper:
                       epochs, batch, lr, momentum, weight decay, eps, steps, step size, beta
  lr per epoch         its `adjust_learning_rate` at epochs 1..120 against recipe=paper's
  loss                 the MART loss of one step
  adversarial example  x' (read from the official function's train-mode forward calls)
  update               parameters after one SGD step (the recipe's lr 0.01, momentum 0.9, wd 3.5e-3)
                       taken by each side's own step, and the BatchNorm running statistics after it
"""
from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from conformance_checks.common import (Compared, Recorder, ScriptBody, cuda_on_cpu, import_file, load_functions,
                                       max_abs, max_param_diff, official_lrs, our_step, paper_trainers,
                                       same_random, tiny_batch, tiny_model, train_context, twins)

REPOSITORY = "YisenWang/MART"
N_TRAIN = 50_000


def script_defaults(path: Path) -> SimpleNamespace:
    """The script's argument defaults: its own parser statements, run without the rest of its
    module level (which downloads CIFAR-10 and builds loaders)."""
    body = ScriptBody(path, None)
    nodes = body.assignments("parser") + [n for n in body.body if isinstance(n, ast.Expr)
                                          and ast.unparse(n).startswith("parser.add_argument")]
    ns = body.run(nodes, {"argparse": argparse})
    return ns["parser"].parse_args([])


def check_mart(reference: Path) -> list[Compared]:
    from harness.core.config import compose_config, finalize
    from harness.train.optimizers import build_optimizer
    from harness.train.schedule import lr_at_epochs
    from methods.mart import MART

    official = import_file(reference / "mart.py", search=reference)
    script = reference / "train_resnet.py"
    args = script_defaults(script)
    eps, step, steps, beta = float(args.epsilon), float(args.step_size), int(args.num_steps), float(args.beta)

    cfg = finalize(compose_config(["method=mart", "recipe=paper", "data=cifar10", "arch=resnet18"]))
    recipe, mcfg = paper_trainers("mart")["mart"], cfg["method"]
    ours_recipe = MART(mcfg["attack"], beta=mcfg["beta"])
    out = [Compared("recipe_epochs", abs(recipe["epochs"] - args.epochs), "int"),
           Compared("recipe_batch_size", abs(recipe["batch_size"] - args.batch_size), "int"),
           Compared("recipe_lr", abs(recipe["optimizer"]["lr"] - args.lr)),
           Compared("recipe_momentum", abs(recipe["optimizer"]["momentum"] - args.momentum)),
           Compared("recipe_weight_decay", abs(recipe["optimizer"]["weight_decay"] - args.weight_decay)),
           Compared("recipe_beta", abs(ours_recipe.beta - beta)),
           Compared("recipe_pgd_steps", abs(ours_recipe.attack.steps - steps), "int"),
           Compared("recipe_step_over_eps", abs(ours_recipe.attack.step_size / ours_recipe.attack.eps - step / eps),
                    note=f"eps: ours {ours_recipe.attack.eps:.5f} (8/255), the script's {eps}")]

    adjust = load_functions(script, ["adjust_learning_rate"], {"args": SimpleNamespace(lr=args.lr)})
    theirs_lr = official_lrs(adjust["adjust_learning_rate"], range(1, args.epochs + 1), args.lr)
    out += [Compared("steps_per_epoch", abs(math.ceil(N_TRAIN / args.batch_size)
                                            - math.ceil(N_TRAIN / int(recipe["batch_size"]))), "int"),
            Compared("lr_per_epoch", max_abs(theirs_lr, lr_at_epochs(recipe)))]

    x, y = tiny_batch(16)
    theirs, ours = twins(tiny_model())
    sgd = {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay}
    recorder = Recorder(theirs).train()
    opt_theirs = torch.optim.SGD(theirs.parameters(), **sgd)
    same_random(0)
    with cuda_on_cpu():
        opt_theirs.zero_grad()
        loss_theirs = official.mart_loss(model=recorder, x_natural=x, y=y, optimizer=opt_theirs, step_size=step,
                                         epsilon=eps, perturb_steps=steps, beta=beta)
    trained = [inp for training, inp in recorder.calls if training]
    loss_theirs.backward()
    opt_theirs.step()

    method = MART({"eps": eps, "steps": steps, "step_size": step}, beta=beta)
    opt_ours = build_optimizer({"name": "sgd", **sgd, "nesterov": False}, method.param_groups(ours))
    crafted: list[torch.Tensor] = []
    attack = method.attack
    method.attack = lambda model, xx, yy: crafted.append(attack(model, xx, yy)) or crafted[-1]
    same_random(0)
    logs = our_step(method, ours, opt_ours, x, y, train_context(ours))
    return out + [
        Compared("batchnorm_forward_order", float(len(trained) != 2 or not torch.equal(trained[0], x)), "int",
                 note="the official loss runs x, then x', in train mode"),
        Compared("loss", max_abs(loss_theirs, logs["loss"])),
        Compared("adversarial_example", max_abs(trained[1], crafted[0])),
        Compared("parameters_after_one_step", max_param_diff(theirs, ours)),
        Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, ours, buffers=True))]


CHECKS = {"mart": check_mart}

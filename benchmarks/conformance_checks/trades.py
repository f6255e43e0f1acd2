"""TRADES beside yaodongyu/TRADES (`trades.py`: `trades_loss`, the function its training script calls).

Same weights (our tiny test_resnet), same CIFAR-shaped batch, the same Gaussian start (both draw
0.001 N(0, I) from the seeded default generator), eps 0.031, 10 steps of 0.007, beta 6:
  loss                 the TRADES loss of one step
  adversarial example  x' (read from the official function's train-mode forward calls)
  lr per epoch         the paper recipe's lr at each epoch (recipe=paper) vs the official script's
                       `adjust_learning_rate` at epochs 1..76
  update               parameters after one SGD step (lr 0.1, momentum 0.9, wd 2e-4: the paper
                       recipe's optimiser) taken by each side's own step, and the BatchNorm
                       running statistics after it (the official step runs the clean batch through
                       the model twice in train mode)
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from conformance_checks.common import (Compared, Recorder, cuda_on_cpu, import_file, load_functions, max_abs,
                                       max_param_diff, official_lrs, our_step, paper_trainers, same_random,
                                       tiny_batch, tiny_model, train_context, twins)

REPOSITORY = "yaodongyu/TRADES"


def check_trades(reference: Path) -> list[Compared]:
    from harness.train.optimizers import build_optimizer
    from methods.trades import TRADES

    official = import_file(reference / "trades.py", search=reference)
    x, y = tiny_batch(16)
    theirs, ours = twins(tiny_model())
    eps, step, beta = 0.031, 0.007, 6.0

    recorder = Recorder(theirs).train()
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    same_random(0)
    with cuda_on_cpu():
        loss_theirs = official.trades_loss(recorder, x, y, opt_theirs, step_size=step, epsilon=eps,
                                           perturb_steps=10, beta=beta)
    x_adv_theirs = [inp for training, inp in recorder.calls if training and not torch.equal(inp, x)][0]
    loss_theirs.backward()
    opt_theirs.step()

    method = TRADES({"eps": eps, "steps": 10, "step_size": step}, beta=beta)
    opt_ours = build_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, "nesterov": False},
                               method.param_groups(ours))
    crafted: list[torch.Tensor] = []
    attack = method.attack
    method.attack = lambda model, xx, yy: crafted.append(attack(model, xx, yy)) or crafted[-1]
    same_random(0)
    logs = our_step(method, ours, opt_ours, x, y, train_context(ours))

    recipe = paper_trainers("trades")["trades"]
    script = load_functions(reference / "train_trades_cifar10.py", ["adjust_learning_rate"],
                            {"args": SimpleNamespace(lr=0.1)})
    theirs_lr = official_lrs(script["adjust_learning_rate"], range(1, 77), 0.1)
    from harness.train.schedule import lr_at_epochs

    return [Compared("epochs", abs(recipe["epochs"] - 76), "int"),
            Compared("lr_per_epoch", max_abs(theirs_lr, lr_at_epochs(recipe))),
            Compared("loss", max_abs(loss_theirs, logs["loss"])),
            Compared("adversarial_example", max_abs(x_adv_theirs, crafted[0])),
            Compared("parameters_after_one_step", max_param_diff(theirs, ours)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, ours, buffers=True))]


CHECKS = {"trades": check_trades}

"""ADML beside ByungKwanLee/Double-Debiased-Adversary (adml/fast_train_adml_{adv,trades,mart,awp}.py,
utils/utils.py `dml_loss` and `AdvWeightPerturb`, attack/libfastattack/FastPGD.py).

Same weights (our tiny test_resnet), same CIFAR-shaped batch of 16 (halves of 8), the same
uniform random start (both sides draw it from the seeded default generator), each script's own
argparse defaults (eps 8/255, 10 steps of 2.3 eps / 10; the AWP script's gamma and proxy lr are
its lr * 10 = 0.01):
  dml_loss             their `dml_loss` and ours on the same logits (some samples fooled)
  loss                 one step of their `train()` (the stage-2 script's own function, on a
                       one-batch loader; the loss read from the GradScaler it is handed) vs our
                       trainer's step: the base half's loss + the DML half's
  adversarial_example  x' from their `attack_loader(net, 'pgd', ...)` (FastPGD through
                       torchattacks, eval mode) vs ours
  weight_perturbation  (ADML-AWP) their `AdvWeightPerturb.calc_awp` x gamma vs ours, same x'
  update               parameters and BatchNorm statistics after the step (SGD lr 0.1 here,
                       momentum 0.9, wd 5e-4: their optimiser with a visible lr; their CyclicLR
                       starts at lr 0, so their first real step would not move the weights)
  schedules            stage 1 (defense/fast_train_<base>.py) and stage 2: their CyclicLR line
                       run as written, stepped over every step of every epoch, vs our schedule's
                       lr and momentum at the same steps, and vs recipe=paper's lr at each epoch's
                       start; epochs, global batch and steps per epoch vs recipe=paper
Their code runs on the CPU here (`.cuda()` patched in this process), in fp32: their autocast and
GradScaler turn themselves off without CUDA; SyncBatchNorm, DDP and channels_last are left out
(one process: the same arithmetic).
"""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from conformance_checks.common import (Compared, argparse_defaults, assigns, cuda_on_cpu, import_file,
                                       load_functions, max_abs, max_param_diff, our_step, paper_trainers,
                                       run_statements, same_random, tiny_batch, tiny_model, train_context, twins)

REPOSITORY = "ByungKwanLee/Double-Debiased-Adversary"
OFFICIAL_NAME = {"pgd_at": "adv", "trades": "trades", "mart": "mart", "awp": "awp"}  # their file names
CIFAR10_TRAIN = 50_000


class _Silent:
    """Stands in for tqdm around their loops (progress text only)."""

    def __init__(self, iterable: Any, **kwargs: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Scaler:
    """Stands in for the GradScaler their train() is handed (fp32 on the CPU: no scaling); keeps
    the loss it is asked to scale, which train() does not return."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.losses.append(loss.detach().clone())
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass


class _ConstantLR:
    """A scheduler that keeps the optimiser's lr (the one-step update check)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        pass

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


def _utils(reference: Path) -> dict[str, Any]:
    """Their utils/utils.py functions (the module imports an attack file missing from the repository,
    attack/libfastattack/FastFGSM.py, so its definitions are taken one by one)."""
    from collections import OrderedDict

    return load_functions(reference / "utils" / "utils.py",
                          ["get_onehot", "dml_loss", "diff_in_weights", "add_into_weights", "AdvWeightPerturb"],
                          {"torch": torch, "F": F, "OrderedDict": OrderedDict, "EPS": 1e-20})


def _attack_loader(reference: Path) -> Callable[..., Any]:
    pgd = import_file(reference / "attack" / "libfastattack" / "FastPGD.py", name="official_adml_fastpgd")
    return load_functions(reference / "attack" / "fastattack.py", ["attack_loader"], {"FastPGD": pgd.FastPGD})["attack_loader"]


def _our_method(name: str) -> Any:
    """Our method as `method=<name> data=cifar10` composes it (the defaults under test)."""
    from harness.core.config import compose_config
    from methods.base import build_method

    return build_method(compose_config([f"method={name}", "data=cifar10"])["method"])


def check_dml_loss(utils: dict[str, Any]) -> Compared:
    from methods.adml import dml_loss

    gen = torch.Generator().manual_seed(1)
    logits_adv, logits_clean = torch.randn(32, 10, generator=gen), torch.randn(32, 10, generator=gen)
    y = logits_adv.argmax(1)
    y[::3] = (y[::3] + 1) % 10  # every third sample fooled
    with cuda_on_cpu():
        theirs = utils["dml_loss"](logits_clean, logits_adv, y)
    return Compared("dml_loss", max_abs(theirs, dml_loss(logits_adv, logits_clean, y)[0]))


def _schedule_checks(stage: str, script: Path, ours: dict[str, Any]) -> list[Compared]:
    """Their CyclicLR line (and optimiser line) of `main_worker`, run with their defaults and
    stepped over every step, vs our schedule at the same steps and recipe=paper's trainer."""
    from harness.train.batches import epoch_steps
    from harness.train.schedule import lr_at_epochs, lr_factor, momentum_at

    args = argparse_defaults(script)
    processes = len(str(args.gpu).split(","))
    steps = CIFAR10_TRAIN // processes // int(args.batch_size)  # FFCV's distributed loader, drop_last
    ns: dict[str, Any] = {"torch": torch, "optim": torch.optim, "args": args, "trainloader": range(steps),
                          "net": nn.Linear(1, 1)}
    run_statements(script, "main_worker", assigns("optimizer"), ns)
    run_statements(script, "main_worker", assigns("lr_scheduler"), ns)
    optimizer, epochs = ns["optimizer"], int(args.epochs)
    lrs, momenta = [], []
    for _ in range(epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        ns["lr_scheduler"].step()
    base = float(ours["optimizer"]["lr"])
    at = [e + i / steps for e in range(epochs) for i in range(steps)]
    our_lrs = [base * lr_factor(ours["schedule"], t, int(ours["epochs"])) for t in at]
    our_momenta = [momentum_at(ours["schedule"], t, int(ours["epochs"])) for t in at]
    ours_steps = epoch_steps([CIFAR10_TRAIN], int(ours["batch_size"]), bool(ours.get("drop_last")))[0]
    return [Compared(f"{stage}_epochs", abs(int(ours["epochs"]) - epochs), "int"),
            Compared(f"{stage}_global_batch", abs(int(ours["batch_size"]) - processes * int(args.batch_size)), "int",
                     note=f"{args.batch_size} per process x {processes} processes"),
            Compared(f"{stage}_steps_per_epoch", abs(ours_steps - steps), "int",
                     note=f"ours {ours_steps}, theirs {steps} (their loader drops the last partial batch; ours with drop_last)"),
            Compared(f"{stage}_lr_per_step", max_abs(lrs, our_lrs), note=f"{epochs * steps} steps of {steps} per epoch"),
            Compared(f"{stage}_momentum_per_step", max_abs(momenta, our_momenta)),
            Compared(f"{stage}_lr_per_epoch", max_abs(lrs[::steps], lr_at_epochs(ours)))]


def _check(base: str, reference: Path) -> list[Compared]:
    name = f"adml_{base}"
    script = reference / "adml" / f"fast_train_adml_{OFFICIAL_NAME[base]}.py"
    args = argparse_defaults(script)
    utils = _utils(reference)
    x, y = tiny_batch(16)
    model = tiny_model()
    theirs, ours = twins(model)
    half = 8

    # their stage-2 train() on a one-batch loader, with the loss kept by the scaler
    ns: dict[str, Any] = {"torch": torch, "F": F, "tqdm": _Silent, "autocast": torch.cuda.amp.autocast,
                          "args": SimpleNamespace(**{**vars(args), "batch_size": 2 * half}),
                          "dml_loss": utils["dml_loss"], "AdvWeightPerturb": utils["AdvWeightPerturb"],
                          "GradScaler": torch.cuda.amp.GradScaler, "counter": 0}
    helpers = {"trades": ["trades_loss"], "mart": ["mart_loss"], "awp": ["mart_loss"]}.get(base, [])
    ns.update(load_functions(script, ["train", *helpers], ns))
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=args.weight_decay)
    scaler = _Scaler()
    crafted_theirs: list[torch.Tensor] = []
    kept: list[dict[str, torch.Tensor]] = []
    with cuda_on_cpu():
        pgd = _attack_loader(reference)(net=theirs, attack=args.attack, eps=args.eps, steps=args.steps)
        call = [theirs, [(x, y)], optimizer, _ConstantLR(optimizer), scaler,
                lambda i, t: crafted_theirs.append(pgd(i, t)) or crafted_theirs[-1]]
        gamma = 0.0
        if base == "awp":
            ns.update(net=theirs, proxy=copy.deepcopy(model))
            run_statements(script, "main_worker", assigns("awp"), ns)
            awp = ns["awp"]
            gamma = float(awp.gamma)
            calc = awp.calc_awp
            awp.calc_awp = lambda **kw: kept.append(calc(**kw)) or kept[-1]
            call.append(awp)
        theirs.train()
        same_random(0)
        ns["train"](*call)

    method = _our_method(name)
    crafted: list[torch.Tensor] = []
    attack = method.attack
    method.attack = lambda m, xx, yy: crafted.append(attack(m, xx, yy)) or crafted[-1]
    perturbations: list[dict[nn.Parameter, torch.Tensor]] = []
    if base == "awp":
        compute = method.perturbation.compute

        def keep(m: nn.Module, loss_fn: Any) -> Any:
            out = compute(m, loss_fn)
            perturbations.append({p: v for p, v in out})
            return out

        method.perturbation.compute = keep
    from harness.train.optimizers import build_optimizer

    opt_ours = build_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": float(args.weight_decay),
                                "nesterov": False}, method.param_groups(ours))
    same_random(0)
    logs = our_step(method, ours, opt_ours, x, y, train_context(ours))

    out = [check_dml_loss(utils),
           Compared("adversarial_example", max_abs(crafted_theirs[0], crafted[0])),
           Compared("loss", max_abs(scaler.losses[0], logs["loss"]))]
    if base == "awp":
        from conformance_checks.awp import perturbation_diff

        out.append(Compared("weight_perturbation", perturbation_diff(theirs, kept[0], gamma, ours, perturbations[0])))
    out += [Compared("parameters_after_one_step", max_param_diff(theirs, ours)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, ours, buffers=True))]
    trainers = paper_trainers(name)
    out += _schedule_checks("stage1", reference / "defense" / f"fast_train_{OFFICIAL_NAME[base]}.py", trainers[base])
    out += _schedule_checks("stage2", script, trainers[name])
    return out


CHECKS = {f"adml_{base}": (lambda reference, base=base: _check(base, reference)) for base in OFFICIAL_NAME}

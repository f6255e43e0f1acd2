"""CausalAdv (M and T) beside YonggangZhangUSTC/CausalAdv (causaladv.py `model_train`, causaladv_utils.py).

causaladv.py parses arguments and downloads CIFAR-10 at import; its training step lives inside
`model_train`. Nothing of it is copied: the check imports causaladv_utils.py as it is (`pgd`,
`init_anchor`, `Basis`, `PredYWithS`, `get_s_pre`, `SoftCrossEntropy`, `get_args_cifar10`) and
executes `model_train`'s own statements from the file's syntax tree: its set-up (anchor, basis,
g, losses, the two SGD optimisers and MultiStepLRs), the start of an epoch (modes, the alpha_t and
r_t ramps) and one pass of its batch loop, with `.cuda()` on the CPU (`cuda_on_cpu`, in this
process only). Its model h returns (features, logits) with the head as `fc[0]`: ours behind that
interface. Both sides draw from the same seeded generator in the same order, so the anchor, g's
initial weights and the attack's start are the same draws. The step runs at epoch 60 of 120
(alpha_t = r_t = 0.5: the alignment term and g's correction are live).

  recipe numbers    get_args_cifar10's defaults (with --adv_mode adam / adat --adv_beta 6) against
                    recipe=paper: epochs, batch, lr, momentum, weight decay (h and g), alpha, beta,
                    r, attack steps, step / eps
  steps per epoch   len(train_loader) (drop_last=True: 50,000 // 128) against our trainer's
  lr per epoch      h's and g's MultiStepLR, stepped as the loop steps them (step(epoch=epoch) after
                    each epoch), against recipe=paper
  one step          the anchor, Sigma and the spurious basis B, x_adv, g's loss, the align loss,
                    the total loss, h's parameters and BatchNorm statistics, g's parameters and
                    statistics (its BatchNorm and its class covariance) after the step
"""
from __future__ import annotations

import ast
import contextlib
import copy
import io
import math
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
from torch import nn

from conformance_checks.common import (Compared, ScriptBody, cuda_on_cpu, import_file, max_abs, max_param_diff,
                                       our_step, paper_trainers, same_random, tiny_batch, tiny_model, train_context)

REPOSITORY = "YonggangZhangUSTC/CausalAdv"
N_TRAIN = 50_000
EPOCH = 60  # of 120: the ramps at 0.5
VARIANTS = {"causaladv_m": ["--adv_mode", "adam"], "causaladv_t": ["--adv_mode", "adat", "--adv_beta", "6"]}


class OfficialInterface(nn.Module):
    """Our classifier as the official ResNet presents itself: (f, z) while `is_train(True)`, the
    head at `fc[0]`."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.train_state = True

    def is_train(self, train: bool) -> None:
        self.train_state = train

    @property
    def fc(self) -> list[nn.Module]:
        return [self.classifier.head]

    def forward(self, x: torch.Tensor) -> Any:
        f, z = self.classifier.features(x)
        return (f, z) if self.train_state else z


def official_args(utils: Any, argv: list[str]) -> Any:
    saved = sys.argv
    sys.argv = ["causaladv.py", "--output_dir", tempfile.mkdtemp(prefix="causaladv_conformance_"), *argv]
    try:
        with cuda_on_cpu():
            return utils.get_args_cifar10()
    finally:
        sys.argv = saved


def _tensors(items: list[Any]) -> list[torch.Tensor]:
    return [t.detach() for t in items if torch.is_tensor(t) and t.is_floating_point()]


def check(reference: Path, plugin: str) -> list[Compared]:
    from harness.core.config import compose_config, finalize
    from harness.train.optimizers import build_optimizer
    from harness.train.schedule import lr_at_epochs
    import methods.causaladv as ours_module
    from methods.base import METHODS

    with cuda_on_cpu():
        utils = import_file(reference / "causaladv_utils.py", search=reference)
    args = official_args(utils, VARIANTS[plugin])
    body = ScriptBody(reference / "causaladv.py", "model_train")
    epoch_loop = body.find(ast.For, "epoch", "target")
    batch_loop = body.find(ast.For, "enumerate(train_loader)", "iter", within=epoch_loop.body)
    epoch_start = epoch_loop.body[:epoch_loop.body.index(batch_loop)]
    setup = body.assignments("model", "anchor", "v_space", "model_g", "soft_ce", "ce_loss", "kl_loss",
                             "optimizer", "scheduler", "optimizer_g", "scheduler_g")

    cfg = finalize(compose_config([f"method={plugin}", "recipe=paper", "data=cifar10", "arch=resnet18"]))
    recipe, mcfg = paper_trainers(plugin)[plugin], cfg["method"]
    cls = METHODS.get(plugin)
    ours_recipe = cls(**{k: v for k, v in mcfg.items() if k != "name"})
    attack = ours_module.CausalAdvAttack(None, None, cls.variant, **ours_recipe.attack_cfg)  # type: ignore[arg-type]
    g_cfg = ours_recipe.g_optimizer_cfg
    out = [Compared("recipe_epochs", abs(recipe["epochs"] - args.num_epochs), "int"),
           Compared("recipe_batch_size", abs(recipe["batch_size"] - args.batch_size), "int"),
           Compared("recipe_lr_h_and_g", max(abs(recipe["optimizer"]["lr"] - args.base_lr), abs(g_cfg["lr"] - args.base_lr))),
           Compared("recipe_momentum_h_and_g", max(abs(recipe["optimizer"]["momentum"] - args.momentum),
                                                   abs(g_cfg["momentum"] - args.momentum))),
           Compared("recipe_weight_decay_h_and_g", max(abs(recipe["optimizer"]["weight_decay"] - args.weight_decay),
                                                       abs(g_cfg["weight_decay"] - args.weight_decay))),
           Compared("recipe_alpha_beta_r", max(abs(ours_recipe.alpha - args.adv_alpha), abs(ours_recipe.beta - args.adv_beta),
                                               abs(ours_recipe.ratio - args.adv_ratio))),
           Compared("recipe_attack_steps", abs(attack.steps - args.adv_iter), "int"),
           Compared("recipe_step_over_eps", abs(attack.step_size / attack.eps - args.adv_step / args.adv_eps),
                    note=f"eps: ours {attack.eps:.5f} (8/255), the script's {args.adv_eps}")]

    # -- lr per epoch: the script's MultiStepLRs, stepped as its loop steps them
    probe = nn.Linear(1, 1)
    ns: dict[str, Any] = {"optim": optim, "args": args, "model": probe, "model_g": probe}
    body.run(body.assignments("optimizer", "scheduler", "optimizer_g", "scheduler_g"), ns)
    step_statements = [n for n in epoch_loop.body if isinstance(n, ast.Expr)
                       and ast.unparse(n) in ("scheduler.step(epoch=epoch)", "scheduler_g.step(epoch=epoch)")]
    theirs_h, theirs_g = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(epoch) is deprecated: it is what the script calls
        for epoch in range(args.num_epochs):
            theirs_h.append(ns["optimizer"].param_groups[0]["lr"])
            theirs_g.append(ns["optimizer_g"].param_groups[0]["lr"])
            ns["optimizer"].step()
            ns["optimizer_g"].step()
            ns["epoch"] = epoch
            body.run(step_statements, ns)
    ours_lr = lr_at_epochs(recipe)
    from harness.train.batches import epoch_steps
    ours_steps = epoch_steps([N_TRAIN], int(recipe["batch_size"]), bool(recipe.get("drop_last")))[0]
    out += [Compared("steps_per_epoch", abs(N_TRAIN // args.batch_size - ours_steps),
                     "int", note=f"theirs {N_TRAIN // args.batch_size} (DataLoader drop_last=True), ours {ours_steps}"),
            Compared("lr_per_epoch_h", max_abs(theirs_h, ours_lr)),
            Compared("lr_per_epoch_g", max_abs(theirs_g, [lr * g_cfg["lr"] / recipe["optimizer"]["lr"] for lr in ours_lr]))]

    # -- one step at epoch 60 of 120
    x, y = tiny_batch(16)
    base = tiny_model()
    theirs_h_model = copy.deepcopy(base)
    eps, step = args.adv_eps, args.adv_step
    ns = {"np": np, "torch": torch, "nn": nn, "F": F, "optim": optim, "args": args,
          "cnn": lambda num_classes: OfficialInterface(theirs_h_model),
          **{k: getattr(utils, k) for k in ("pgd", "init_anchor", "Basis", "PredYWithS", "get_s_pre", "SoftCrossEntropy")}}
    same_random(0)
    with cuda_on_cpu():
        body.run(setup, ns)
    same_random(1)
    with cuda_on_cpu(), contextlib.redirect_stdout(io.StringIO()):  # its loop prints a log line
        ns.update(epoch=EPOCH, train_loader=[(x, y)], tr_al=[], tr_na=[], tr_aa=[])
        body.run(epoch_start + [batch_loop], ns)

    method = cls({"eps": eps, "steps": args.adv_iter, "step_size": step}, alpha=args.adv_alpha, beta=args.adv_beta,
                 ratio=args.adv_ratio)
    ours_h = copy.deepcopy(base)
    same_random(0)
    module = method.build(ours_h)
    optimizer = build_optimizer({"name": "sgd", "lr": args.base_lr, "momentum": args.momentum,
                                 "weight_decay": args.weight_decay, "nesterov": False}, method.param_groups(module))
    crafted: list[torch.Tensor] = []
    perturb = ours_module.CausalAdvAttack.perturb
    ours_module.CausalAdvAttack.perturb = lambda self, *a: crafted.append(perturb(self, *a)) or crafted[-1]
    try:
        same_random(1)
        logs = our_step(method, module, optimizer, x, y,
                        train_context(module.classifier, epoch=EPOCH, epochs=int(recipe["epochs"])))
    finally:
        ours_module.CausalAdvAttack.perturb = perturb
    g_theirs, g_ours = ns["model_g"], method.g
    orthogonal = ours_module.spurious_basis(module.anchor, (module.feature_cov.cov[0]
                                                            @ base.head.weight.detach().t()).t())
    return out + [
        Compared("anchor", max_abs(ns["anchor"], module.anchor)),
        Compared("feature_covariance", max_abs(ns["v_space"].estimator.CoVariance, module.feature_cov.cov)),
        Compared("spurious_basis", max_abs(ns["basis"], module.basis),
                 note=f"basis=orthogonal differs from it by {max_abs(ns['basis'], orthogonal):.1e}"),
        Compared("adversarial_example", max_abs(ns["x_adv"], crafted[0])),
        Compared("g_loss", max_abs(ns["ce_g"], logs["loss_g"])),
        Compared("align_loss", max_abs(ns["loss_s"], logs["loss_align"])),
        Compared("loss", max_abs(ns["loss"], logs["loss"])),
        Compared("h_parameters_after_one_step", max_param_diff(theirs_h_model, ours_h)),
        Compared("h_batchnorm_statistics_after_one_step", max_param_diff(theirs_h_model, ours_h, buffers=True)),
        Compared("g_parameters_after_one_step", max_abs(_tensors(list(g_theirs.parameters())),
                                                        _tensors(list(g_ours.parameters())))),
        Compared("g_statistics_after_one_step", max_abs(
            _tensors(list(g_theirs.buffers()) + [g_theirs.estimator.CoVariance, g_theirs.estimator.Ave,
                                                 g_theirs.estimator.Amount]),
            _tensors(list(g_ours.pred.buffers()) + [g_ours.estimator.cov, g_ours.estimator.mean,
                                                    g_ours.estimator.amount]))),
    ]


CHECKS = {plugin: (lambda reference, plugin=plugin: check(reference, plugin)) for plugin in VARIANTS}

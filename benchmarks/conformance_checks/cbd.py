"""CBD beside zaixizhang/CBD (train.py, utils/util.py, data_loader.py).

Their own code runs, ours beside it:
  spectral_norm          their `spectral_norm(W)` against ours on the same matrices and bias
                         vectors (theirs returns (u W v) ** 0.5, the divisor; ours returns sigma =
                         u W v and divides by its square root by default), and their
                         `DisenEstimator.spectral_norm()` against our critic's `spectral_normalize`
                         from the same weights (x10)
  critic_bound           their `DisenEstimator.forward` (0.01 x the bound, the shifted pairing of
                         their `shuffle`) against our lambda x `MICritic.bound`, dropout on, the
                         same seed on both sides
  one epoch, mi off/on   their `train_step_clean` on a one-batch loader (--disentangle 0, then 1:
                         a critic pass over the loader, then the clean pass) against ours
                         (`on_epoch_start`, with the MI term our trainer's `pre_pass_step` on the
                         batch, then our trainer's own step): the weighted loss, the critic's
                         bound, f_C's parameters and BatchNorm statistics after its SGD step
                         (lr 0.1, momentum 0.9, nesterov, wd 1e-4), and the critic's parameters
                         after its Adam step and normalisation. Same tiny weights (our test_resnet
                         as f_C, another seed as f_B, called through their (x, True) -> (logits,
                         features) interface), same batch, same critic weights, same seed.
  lr at every epoch      their `train` itself, with model building, data and the two epoch
                         functions replaced by recorders in this process: the lr its loop gives
                         f_B at each of its 5 epochs, f_C and the critic at each of 100 (its
                         StepLR is stepped before each epoch's training), and its optimisers'
                         momentum, wd and nesterov; against recipe=paper's trainers and our
                         critic's `on_epoch_start`
  badnets gridTrigger    their `DatasetBD._gridTriger` (their default trigger) against
                         `backdoor=badnets` with `pattern: checkerboard`, byte for byte
Runs on the CPU (their `opt.cuda = 0`); nothing of theirs is edited.
"""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conformance_checks.common import (Compared, import_file, load_functions, max_abs, max_param_diff,
                                       our_step, paper_trainers, same_random, tiny_batch, tiny_model,
                                       train_context)

REPOSITORY = "zaixizhang/CBD"


class TheirInterface(nn.Module):
    """Our classifier as their models are called: model(x) -> logits, model(x, True) -> (logits, z)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.nChannels = classifier.embedding_dim

    def forward(self, x: torch.Tensor, output_embedding: bool = False) -> Any:
        z, logits = self.classifier.features(x)
        return (logits, z) if output_embedding else logits


def _meters() -> tuple[type, list[Any]]:
    """An AverageMeter that keeps every instance (their train_step_clean: losses, disen_losses, ...)."""
    made: list[Any] = []

    class Meter:
        def __init__(self) -> None:
            self.values: list[float] = []
            made.append(self)

        def update(self, val: float, n: int = 1) -> None:
            self.values.append(float(val))

    return Meter, made


def _copy_critic(ours: nn.Module, theirs: nn.Module) -> None:
    mlp = theirs.disc.disc
    with torch.no_grad():
        for mine, their in ((ours.hidden, mlp.l_in), (ours.out, mlp.l_out)):
            their.weight.copy_(mine.weight)
            their.bias.copy_(mine.bias)


def _critic_diff(ours: nn.Module, theirs: nn.Module) -> float:
    mlp = theirs.disc.disc
    return max(max_abs(ours.hidden.weight, mlp.l_in.weight), max_abs(ours.hidden.bias, mlp.l_in.bias),
               max_abs(ours.out.weight, mlp.l_out.weight), max_abs(ours.out.bias, mlp.l_out.bias))


def _check_spectral(util: Any) -> list[Compared]:
    from methods.cbd import MICritic, spectral_norm

    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 32), (1, 16), (32,), (1,), (8, 8)]
    diff = max(max_abs(util.spectral_norm(w), spectral_norm(w.reshape(w.shape[0], -1) if w.ndim > 1
                                                             else w.reshape(-1, 1)).sqrt())
               for w in (torch.randn(*s, generator=gen) * 3 for s in shapes))
    torch.manual_seed(1)
    ours = MICritic(16, 16)
    theirs = util.DisenEstimator(16, 16, 0.2)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(10)
    _copy_critic(ours, theirs)
    ours.spectral_normalize(5)
    theirs.spectral_norm()
    return [Compared("spectral_norm_divisor", diff),
            Compared("critic_after_spectral_normalisation", _critic_diff(ours, theirs))]


def _check_bound(util: Any) -> list[Compared]:
    from methods.cbd import MICritic

    torch.manual_seed(2)
    ours, theirs = MICritic(16, 16), util.DisenEstimator(16, 16, 0.2)
    _copy_critic(ours, theirs)
    z_b, z_c = torch.randn(12, 16), torch.randn(12, 16)
    out = []
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        same_random(3)
        mine = 0.01 * ours.bound(z_b, z_c)
        same_random(3)
        out.append(Compared(f"critic_bound_{mode}", max_abs(theirs(z_b, z_c), mine)))
    return out


def _one_epoch(reference: Path, util: Any, mi: bool) -> list[Compared]:
    from harness.train.optimizers import build_optimizer
    from methods.cbd import CBD

    meter, made = _meters()
    step = load_functions(reference / "train.py", ["train_step_clean"],
                          {"torch": torch, "nn": nn, "F": F, "AverageMeter": meter, "accuracy": util.accuracy})
    x, y = tiny_batch(16)
    f_c, f_b = tiny_model(0), tiny_model(1)
    method = CBD(mi=mi)
    torch.manual_seed(4)
    module = method.build(copy.deepcopy(f_c))
    module.backdoored.load_state_dict(f_b.state_dict())
    their_c, their_b = TheirInterface(copy.deepcopy(f_c)), TheirInterface(copy.deepcopy(f_b))
    estimator = util.DisenEstimator(their_c.nChannels, their_c.nChannels, dropout=0.2)
    if mi:
        _copy_critic(method.critic, estimator)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    optimizer = torch.optim.SGD(their_c.parameters(), **sgd)
    adv_optimizer = torch.optim.Adam(estimator.parameters(), lr=0.2)
    opt = SimpleNamespace(disentangle=int(mi), cuda=0, print_freq=10**6)
    same_random(5)
    step["train_step_clean"](opt, [(x, y, torch.zeros_like(y))], their_c, their_b, estimator, optimizer,
                             adv_optimizer, nn.CrossEntropyLoss(), 1)
    losses, disen_losses = made[0].values, made[1].values

    ours_opt = build_optimizer({"name": "sgd", **sgd}, method.param_groups(module))
    ctx = train_context(module.clean, epoch=0, epochs=100)
    method.on_epoch_start(ctx)
    same_random(5)
    module.train()  # the trainer's ddp.train() before the epoch
    pre = method.pre_pass_step(module, x, y, ctx) if method.pre_pass(ctx) else {}
    logs = our_step(method, module, ours_opt, x, y, ctx)
    tag = "mi_on" if mi else "mi_off"
    out = [Compared(f"{tag}_loss", max_abs(losses[0], logs["loss"])),
           Compared(f"{tag}_f_C_after_one_step", max_param_diff(their_c.classifier, module.clean)),
           Compared(f"{tag}_f_C_batchnorm_statistics", max_param_diff(their_c.classifier, module.clean, buffers=True),
                    note="two train-mode forwards with the MI term (the critic pass, then the step)" if mi else "")]
    if mi:
        out += [Compared("mi_on_critic_bound", max_abs(disen_losses[0], -0.01 * pre["critic_bound"])),
                Compared("mi_on_critic_after_its_step", _critic_diff(method.critic, estimator))]
    return out


def _their_loop(reference: Path, util: Any) -> dict[str, Any]:
    """Their `train` with recorders for what it builds and runs: the lrs and optimisers it uses."""
    from torch.optim.adam import Adam
    from torch.optim.lr_scheduler import StepLR

    seen: dict[str, Any] = {"f_B": [], "f_C": [], "critic": []}

    def backdoor_epoch(opt: Any, loader: Any, model: Any, optimizer: Any, criterion: Any, epoch: int) -> None:
        seen["f_B"].append(optimizer.param_groups[0]["lr"])
        seen["f_B_optimizer"] = optimizer

    def clean_epoch(opt: Any, loader: Any, model: Any, model_b: Any, estimator: Any, optimizer: Any,
                    adv_optimizer: Any, criterion: Any, epoch: int) -> None:
        seen["f_C"].append(optimizer.param_groups[0]["lr"])
        seen["critic"].append(adv_optimizer.param_groups[0]["lr"])
        seen["f_C_optimizer"] = optimizer

    config = import_file(reference / "config.py")
    opt = config.get_arguments().parse_args([])
    opt.device, opt.cuda = "cpu", 0
    scope = {"torch": torch, "nn": nn, "Adam": Adam, "StepLR": StepLR, "DisenEstimator": util.DisenEstimator,
             "select_model": lambda **kw: (TheirInterface(tiny_model()), None),
             "get_backdoor_loader": lambda opt: (None, []), "get_test_loader": lambda opt: ([], []),
             "train_step_backdoor": backdoor_epoch, "train_step_clean": clean_epoch,
             "test": lambda *a, **k: None, "print": lambda *a, **k: None}
    functions = load_functions(reference / "train.py", ["train", "learning_rate"], scope)
    scope["learning_rate"] = functions["learning_rate"]
    functions["train"](opt)
    seen["opt"] = opt
    return seen


def _check_recipe(reference: Path, util: Any) -> list[Compared]:
    from harness.train.schedule import lr_at_epochs
    from methods.cbd import CBD

    theirs = _their_loop(reference, util)
    trainers = paper_trainers("cbd")
    mine_c, mine_b = trainers["cbd"], trainers["erm"]
    from harness.core.config import compose_config

    method_cfg = {k: v for k, v in compose_config(["method=cbd", "recipe=paper", "data=cifar10"])["method"].items()
                  if k != "name"}
    method = CBD(**{**method_cfg, "mi": True})
    method.build(tiny_model())
    critic = []
    for epoch in range(int(mine_c["epochs"])):
        method.on_epoch_start(train_context(tiny_model(), epoch=epoch, epochs=int(mine_c["epochs"])))
        critic.append(method.critic_opt.param_groups[0]["lr"])
    optimizer_diff = max(
        abs(o.param_groups[0][k] - float(t["optimizer"].get(k, 0)))
        for o, t in ((theirs["f_C_optimizer"], mine_c), (theirs["f_B_optimizer"], mine_b))
        for k in ("momentum", "weight_decay", "nesterov"))
    opt = theirs["opt"]
    return [Compared("epochs_f_B", abs(len(theirs["f_B"]) - int(mine_b["epochs"])), "int"),
            Compared("epochs_f_C", abs(len(theirs["f_C"]) - int(mine_c["epochs"])), "int"),
            Compared("batch_size", abs(opt.batch_size - int(mine_c["batch_size"])) + abs(
                opt.batch_size - int(mine_b["batch_size"])), "int"),
            Compared("optimizer_momentum_wd_nesterov", optimizer_diff),
            Compared("lr_per_epoch_f_B", max_abs(theirs["f_B"], lr_at_epochs(mine_b))),
            Compared("lr_per_epoch_f_C", max_abs(theirs["f_C"], lr_at_epochs(mine_c))),
            Compared("lr_per_epoch_critic", max_abs(theirs["critic"], critic))]


def _check_grid_trigger(reference: Path) -> list[Compared]:
    from harness.backdoor.badnets import BadNets

    loader = import_file(reference / "data_loader.py", search=reference)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    theirs = np.stack([loader.DatasetBD._gridTriger(None, img.copy(), 32, 32, 1, 3, 3) for img in images])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ours = (BadNets(pattern="checkerboard", patch_size=3).trigger(x) * 255).round().to(torch.uint8)
    diff = np.abs(theirs.astype(np.int64) - ours.permute(0, 2, 3, 1).numpy().astype(np.int64)).max()
    return [Compared("badnets_checkerboard_vs_gridTrigger", float(diff), "image")]


def check_cbd(reference: Path) -> list[Compared]:
    util = import_file(reference / "utils" / "util.py")
    return (_check_spectral(util) + _check_bound(util) + _one_epoch(reference, util, mi=False)
            + _one_epoch(reference, util, mi=True) + _check_recipe(reference, util) + _check_grid_trigger(reference))


CHECKS = {"cbd": check_cbd}

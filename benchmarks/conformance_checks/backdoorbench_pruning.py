"""CLP, ANP and Neural Cleanse beside SCLBD/BackdoorBench (its defense/clp.py, defense/anp.py with
utils/defense_utils/anp/anp_model/anp_batchnorm.py, defense/nc.py).

Same weights and data as backdoorbench.py's FP check: our test_resnet trained three epochs on
scikit-learn's digits (16x16), and 300 held-out digits as the clean batch. Their functions are taken
from their files by name (`load_functions`: the script's module-level code is not run) and run on
copies of the same model; nothing of theirs is edited or copied.
  clp  `CLP_prune(net, u)` on our classifier (it walks named_modules, pairing each BatchNorm2d with
       the conv before it, as ours): every channel's bound (their torch.svd, recorded) against
       ours, and the pruned set (the channels whose BatchNorm weight and bias they zero) against
       our gates, at their u = 3 and at u = 1 (more channels pruned).
  anp  their `NoisyBatchNorm2d` (our BatchNorm's state copied in, the same mask and noise) against
       our gated BatchNorm, in train and eval mode; then their `mask_train` for one batch of 128
       (the noise's signed step, the mask's SGD step, the clip) on our model with every BatchNorm
       replaced by theirs, against our `anp_loss` and the trainer's SGD step + clip, from the same
       random state: the masks after the step and the loss.
  nc   their `outlier_detection` on the same 10 norms (flagged labels and the printed anomaly
       index) against `anomaly`; their `RegressionModel` + `Recorder` + `train_step` for 12 epochs of
       one batch for a target class (Adam lr 0.1, betas (0.5, 0.9); dataset 'gtsrb' so that their
       pattern is not normalised: our classifier normalises inside) against our `nc_trigger` (all
       classes side by side; the target's slice compared): the mask, the pattern, the cost and
       best norm their Recorder keeps.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conformance_checks.backdoorbench import digits_model_and_clean_data
from conformance_checks.common import Compared, import_file, load_functions, max_abs, same_random

REPOSITORY = "SCLBD/BackdoorBench"


# ------------------------------------------------------------------------------------------ CLP

def check_clp(reference: Path) -> list[Compared]:
    from methods.backdoor.clp import clp_prune_flags
    from methods.backdoor.masks import batchnorm_layers

    base, _, _ = digits_model_and_clean_data()
    out: list[Compared] = []
    for u in (3.0, 1.0):
        recorded: list[torch.Tensor] = []

        def svd(w: torch.Tensor):
            result = torch.svd(w)
            recorded.append(result[1].max())
            return result

        spy = SimpleNamespace(svd=svd, Tensor=torch.Tensor, where=torch.where)
        theirs = copy.deepcopy(base).eval()
        load_functions(reference / "defense" / "clp.py", ["CLP_prune"], {"torch": spy, "nn": nn})["CLP_prune"](theirs, u)
        bounds, flags = clp_prune_flags(copy.deepcopy(base), u)
        ours_bounds = torch.cat([b.float() for b in bounds])
        their_pruned = torch.cat([(m.weight == 0) & (m.bias == 0) for _, m in batchnorm_layers(theirs)])
        ours_pruned = torch.cat(flags)
        rel = float(((torch.stack(recorded) - ours_bounds).abs() / ours_bounds.abs().clamp_min(1e-12)).max())
        out += [Compared(f"bound_per_channel_relative_u{u:g}", rel, "float", f"{len(recorded)} channels"),
                Compared(f"pruned_set_u{u:g}", int((their_pruned != ours_pruned).sum()), "int",
                         f"{int(ours_pruned.sum())} of {len(ours_pruned)} pruned by ours")]
    cfg = __import__("yaml").safe_load((reference / "config" / "defense" / "clp" / "cifar10.yaml").read_text())
    from methods.backdoor.clp import CLP
    out.append(Compared("default_u", abs(CLP().u - float(cfg["u"]))))
    return out


# ------------------------------------------------------------------------------------------ ANP

def _their_noisy_bn(reference: Path) -> type:
    module = import_file(reference / "utils" / "defense_utils" / "anp" / "anp_model" / "anp_batchnorm.py")
    return module.NoisyBatchNorm2d


def _with_their_batchnorms(model: nn.Module, noisy: type) -> nn.Module:
    """A copy of `model` with every BatchNorm2d replaced by their NoisyBatchNorm2d (state copied)."""
    model = copy.deepcopy(model)
    for name, bn in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        new = noisy(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict(), strict=False)
        setattr(parent, name.rsplit(".", 1)[-1], new)
    return model


def check_anp(reference: Path) -> list[Compared]:
    from methods.backdoor.anp import ANP, PerturbedBatchNorm, anp_loss
    from methods.backdoor.masks import batchnorm_layers

    base, x, y = digits_model_and_clean_data()
    x, y = x[:128], y[:128]
    noisy = _their_noisy_bn(reference)
    cfg = __import__("yaml").safe_load((reference / "config" / "defense" / "anp" / "cifar10.yaml").read_text())
    args = SimpleNamespace(anp_eps=float(cfg["anp_eps"]), anp_steps=int(cfg["anp_steps"]),
                           anp_alpha=float(cfg["anp_alpha"]), device="cpu")

    # the perturbed BatchNorm, one layer, train and eval mode
    ours = PerturbedBatchNorm(copy.deepcopy(base))
    gen = torch.Generator().manual_seed(1)
    i = 3
    bn = ours.batchnorms()[i]
    theirs_bn = noisy(bn.num_features)
    theirs_bn.load_state_dict(bn.state_dict(), strict=False)
    with torch.no_grad():
        mask = torch.rand(bn.num_features, generator=gen)
        noise, noise_bias = (torch.rand(bn.num_features, generator=gen) - 0.5) * 0.8, (torch.rand(bn.num_features, generator=gen) - 0.5) * 0.8
        getattr(ours, f"mask_{i}").copy_(mask), getattr(ours, f"noise_{i}").copy_(noise), getattr(ours, f"noise_bias_{i}").copy_(noise_bias)
        theirs_bn.neuron_mask.copy_(mask), theirs_bn.neuron_noise.copy_(noise), theirs_bn.neuron_noise_bias.copy_(noise_bias)
    feats = torch.randn(8, bn.num_features, 4, 4, generator=gen)
    diffs = []
    for train in (True, False):
        for perturbed in (True, False):
            ours.perturbed = perturbed
            theirs_bn.is_perturbed = perturbed
            bn.train(train), theirs_bn.train(train)
            bn.momentum = theirs_bn.momentum = 0.0  # the running statistics stay equal across the four calls
            with torch.no_grad():
                diffs.append(max_abs(bn(feats), theirs_bn(feats)))

    # one batch of their mask_train against ours
    fns = load_functions(reference / "defense" / "anp.py", ["mask_train", "clip_mask", "sign_grad", "reset",
                                                            "include_noise", "exclude_noise"],
                         {"torch": torch, "nn": nn, "args": args,
                          "anp_model": SimpleNamespace(NoisyBatchNorm2d=noisy, NoisyBatchNorm1d=type("N1", (), {}),
                                                       NoiseLayerNorm2d=type("L2", (), {}),
                                                       NoiseLayerNorm=type("L", (), {}))})
    theirs = _with_their_batchnorms(base, noisy)
    params = list(theirs.named_parameters())
    mask_opt = torch.optim.SGD([v for n, v in params if "neuron_mask" in n], lr=float(cfg["lr"]), momentum=0.9)
    noise_opt = torch.optim.SGD([v for n, v in params if "neuron_noise" in n], lr=args.anp_eps / args.anp_steps)
    same_random(0)
    their_loss, _ = fns["mask_train"](args, theirs, nn.CrossEntropyLoss(), mask_opt, noise_opt, [(x, y)])
    their_masks = torch.cat([m.neuron_mask.detach() for m in theirs.modules() if isinstance(m, noisy)])

    method = ANP()
    module = method.build(copy.deepcopy(base))
    module.train()
    optimizer = torch.optim.SGD(method.param_groups(module), lr=float(cfg["lr"]), momentum=0.9)
    same_random(0)
    loss, _, _ = anp_loss(module, module, x, y, method.eps, method.steps, method.alpha)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    method.after_step(module, None)
    our_masks = torch.cat([m.detach() for m in module.masks()])
    n_layers = len(batchnorm_layers(base))
    return [
        Compared("noisy_batchnorm_forward", max(diffs), "float", "train/eval x perturbed/clean"),
        Compared("mask_after_one_step", max_abs(their_masks, our_masks), "float",
                 f"{our_masks.numel()} masks over {n_layers} BatchNorm layers"),
        Compared("loss", abs(float(their_loss) - float(loss.detach()))),
        Compared("eps_steps_alpha", max_abs([args.anp_eps, args.anp_steps, args.anp_alpha],
                                            [method.eps, method.steps, method.alpha])),
        Compared("mask_lr", abs(float(cfg["lr"]) - ANP().lr)),
    ]


# ----------------------------------------------------------------------------------- Neural Cleanse

def check_nc(reference: Path) -> list[Compared]:
    from methods.backdoor.nc import NCTrigger, anomaly

    # MAD on the same norms
    fns = load_functions(reference / "defense" / "nc.py", ["outlier_detection", "RegressionModel", "Recorder",
                                                           "train_step"],
                         {"torch": torch, "nn": nn, "logging": __import__("logging"), "os": __import__("os"),
                          "np": np})
    norms = torch.tensor([20.0, 21.0, 19.0, 22.0, 3.0, 20.5, 18.0, 21.5, 19.5, 12.0])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        flag_list = fns["outlier_detection"](norms, {k: k for k in range(10)}, SimpleNamespace(to_file=False))
    found = re.search(r"Anomaly index: (?:tensor\()?([0-9.e+-]+)", printed.getvalue())
    assert found is not None, printed.getvalue()
    their_index = float(found.group(1))
    our_index, our_flagged = anomaly(norms)

    # trigger optimisation: 12 epochs of one batch, from the same start, for a target class
    base, x, y = digits_model_and_clean_data()
    x, y = x[:64], y[:64]
    cfg = __import__("yaml").safe_load((reference / "config" / "defense" / "nc" / "cifar10.yaml").read_text())
    epochs, target = 12, 3
    with tempfile.TemporaryDirectory() as log:
        opt = SimpleNamespace(**{**cfg, "dataset": "gtsrb", "device": "cpu", "num_classes": 10, "input_channel": 1,
                                 "log": log + "/", "target_label": target, "model": "ours"})
        their_ns = {"args": opt, "generate_cls_model": lambda name, n: copy.deepcopy(base),
                    "torchvision": SimpleNamespace(utils=SimpleNamespace(save_image=lambda *a, **k: None))}
        fns["train_step"].__globals__.update(their_ns)  # the one scope their definitions were run in
        init_mask = np.ones((1, x.shape[2], x.shape[3]), np.float32)
        init_pattern = np.ones((1, x.shape[2], x.shape[3]), np.float32)
        regression = fns["RegressionModel"](opt, init_mask, init_pattern, {"model": base.state_dict()})
        optimizer = torch.optim.Adam(regression.parameters(), lr=opt.mask_lr, betas=(0.5, 0.9))
        recorder = fns["Recorder"](opt)
        with contextlib.redirect_stdout(io.StringIO()):
            for epoch in range(epochs):
                fns["train_step"](regression, optimizer, [(x, y)], recorder, epoch, opt)

    method = NCTrigger(**{k: cfg[k] for k in ("mask_lr", "init_cost", "atk_succ_threshold", "early_stop_threshold",
                                              "early_stop_patience", "patience", "cost_multiplier")})
    module = method.build(copy.deepcopy(base))
    module.train()
    ours_opt = torch.optim.Adam(method.param_groups(module), lr=cfg["mask_lr"], betas=(0.5, 0.9))
    ctx = SimpleNamespace(device=torch.device("cpu"))
    for _ in range(epochs):
        method.on_epoch_start(ctx)
        logs = method.training_step(module, x, y, ctx)
        ours_opt.zero_grad()
        logs["loss"].backward()
        ours_opt.step()
        method.on_epoch_end(ctx)
    from methods.backdoor.nc import squash
    s = method.state
    return [
        Compared("anomaly_index", abs(their_index - our_index), "float", f"{our_index:.4f} (printed to 4 decimals)"),
        Compared("flagged_labels", int([k for k, _ in flag_list] != our_flagged), "int", f"ours {our_flagged}"),
        Compared("mask_after_12_epochs", max_abs(squash(regression.mask_tanh.detach()), squash(module.mask_tanh.detach()[target])),
                 "float", f"moved up to {max_abs(squash(module.mask_tanh.detach()[target]), squash(torch.ones_like(module.mask_tanh[target]))):.3f} "
                          f"from the start"),
        Compared("pattern_after_12_epochs", max_abs(squash(regression.pattern_tanh.detach()),
                                                    squash(module.pattern_tanh.detach()[target]))),
        Compared("recorder_cost", abs(recorder.cost - float(s["cost"][target])), "float", f"{recorder.cost:g}"),
        Compared("recorder_best_norm_relative",  # theirs averages float32 norms, ours float64
                 abs(float(recorder.reg_best) - float(s["reg_best"][target])) / float(recorder.reg_best)
                 if np.isfinite(float(recorder.reg_best)) else float(np.isfinite(float(s["reg_best"][target]))),
                 "float", f"{float(recorder.reg_best):.4f}"),
        Compared("best_mask", max_abs(recorder.mask_best, s["mask_best"][target])),
    ]




# ------------------------------------------------------------------------------------------ RNP

class _TheirTrainerBase:
    """Stands in for BackdoorBench's PureCleanModelTrainer: only what their Unlearn/RecoverModelTrainer
    `train_one_epoch_on_mix` reads (batches cycled in order, the optimiser, the scheduler)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def set(self, batches: list, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
        self.batches, self.batch_num_per_epoch, self.i = batches, len(batches), 0
        self.optimizer, self.scheduler, self.criterion = optimizer, scheduler, nn.CrossEntropyLoss()
        self.amp, self.non_blocking = False, False

    def get_one_batch(self) -> tuple:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def _rnp_reference(reference: Path) -> dict:
    import logging
    import os
    import time

    import pandas as pd

    stub = type("Stub", (), {})
    return load_functions(reference / "defense" / "rnp.py",
                          ["UnlearnModelTrainer", "RecoverModelTrainer", "clip_mask", "save_mask_scores", "read_data",
                           "pruning", "rnp"],
                          {"torch": torch, "nn": nn, "np": np, "pd": pd, "os": os, "time": time, "copy": copy,
                           "logging": logging, "device": torch.device("cpu"), "PureCleanModelTrainer": _TheirTrainerBase,
                           "defense": object, "Metric_Aggregator": stub})


def _argparse_literals(path: Path) -> dict:
    """Every `add_argument('--name', ..., default=<literal>)` of a file (their class method's parser)."""
    import ast

    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            default = [k.value for k in node.keywords if k.arg == "default"]
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            if default and names:
                out[names[0][2:]] = ast.literal_eval(default[0])
    return out


def _their_pruned(fns: dict, masks_model: nn.Module, original: nn.Module, mode: str, n: float) -> torch.Tensor:
    """Their save_mask_scores -> read_data -> sorted -> evaluate_by_<mode>(max = step = n) on a copy of
    `original` (their final pruning call); the flags of the BatchNorm weights it zeroed."""
    from methods.backdoor.masks import batchnorm_layers

    model = copy.deepcopy(original)
    quiet = SimpleNamespace(test_current_model=lambda *a, **k: (0.0, 0.0, 1.0, 1.0, 0.0),
                            set_with_dataloader=lambda *a, **k: None)
    self = SimpleNamespace(set_trainer=lambda *a, **k: None, trainer=quiet, args=SimpleNamespace(
        device="cpu", amp=False, frequency_save=0, save_path="", prefetch=False, non_blocking=False))
    with tempfile.TemporaryDirectory() as tmp:
        fns["save_mask_scores"](masks_model.state_dict(), tmp + "/mask_values.txt")
        values = sorted(fns["read_data"](tmp + "/mask_values.txt"), key=lambda v: float(v[2]))
    evaluate = getattr(fns["rnp"], f"evaluate_by_{mode}")
    evaluate(self, SimpleNamespace(acc_ratio=0.1, device="cpu"), model, values, pruning_max=n, pruning_step=n,
             criterion=None, test_dataloader_dict={"bd_test_dataloader": None}, best_asr=1.0, acc_ori=1.0, save=False)
    return torch.cat([m.weight.detach() == 0 for _, m in batchnorm_layers(model)])


def check_rnp(reference: Path) -> list[Compared]:
    from harness.train.optimizers import build_optimizer
    from harness.train.schedule import lr_factor
    from methods.backdoor.masks import batchnorm_layers
    from methods.backdoor.rnp import RNP, RNPUnlearn, rnp_prune_flags

    from conformance_checks.common import max_param_diff, our_step, train_context

    base, x, y = digits_model_and_clean_data()
    fns = _rnp_reference(reference)
    batches = [(xb, yb, torch.zeros(len(yb)), torch.zeros(len(yb)), yb) for xb, yb in zip(x.split(100), y.split(100))]
    defaults = _argparse_literals(reference / "defense" / "rnp.py")
    cfg = __import__("yaml").safe_load((reference / "config" / "defense" / "rnp" / "config.yaml").read_text())
    epochs = int(defaults["unlearning_epochs"])

    # 1. unlearning: their train_one_epoch_on_mix per epoch and their stop test (train_mix_acc <= clean_threshold)
    theirs = copy.deepcopy(base)
    opt = torch.optim.SGD(theirs.parameters(), lr=defaults["unlearning_lr"], momentum=0.9, weight_decay=5e-4)
    trainer = fns["UnlearnModelTrainer"](theirs, clean_threshold=defaults["clean_threshold"])
    trainer.set(batches, opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=defaults["schedule"], gamma=0.1))
    their_stop = -1
    for epoch in range(epochs):
        _, pred, label, *_ = trainer.train_one_epoch_on_mix(verbose=1)
        if float((pred == label).float().mean()) <= trainer.clean_threshold:
            their_stop = epoch
            break
    method = RNPUnlearn()
    ours = method.build(copy.deepcopy(base))
    stage = RNPUnlearn.runtime_trainer({}, {})
    optimizer = build_optimizer(stage["optimizer"], method.param_groups(ours))
    for epoch in range(stage["epochs"]):  # every epoch, as our trainer runs them (no-ops after the stop)
        ctx = train_context(ours, epoch, stage["epochs"], steps_per_epoch=len(batches))
        for group in optimizer.param_groups:
            group["lr"] = stage["optimizer"]["lr"] * lr_factor(stage["schedule"], epoch, stage["epochs"])
        method.on_epoch_start(ctx)
        for xb, yb, *_ in batches:
            our_step(method, ours, optimizer, xb, yb, ctx)
        method.on_epoch_end(ctx)
    unlearned = theirs.eval()

    # 2. recovery on the unlearned model: their MaskBatchNorm2d + RecoverModelTrainer against ours
    mask_bn = import_file(reference / "utils" / "defense_utils" / "rnp" / "rnp_model" / "mask_batchnorm.py").MaskBatchNorm2d
    recover_epochs = 5
    their_rec = _with_their_batchnorms(unlearned, mask_bn)
    mask_params = [v for n, v in their_rec.named_parameters() if "neuron_mask" in n]
    mask_opt = torch.optim.SGD(mask_params, lr=defaults["recovering_lr"], momentum=0.9)
    recover = fns["RecoverModelTrainer"](their_rec, alpha=defaults["alpha"])
    recover.set(batches, mask_opt, None)
    their_first = None
    for _ in range(recover_epochs):
        their_loss = recover.train_one_epoch_on_mix()[0]
        their_first = torch.cat([p.detach().clone() for p in mask_params]) if their_first is None else their_first
    their_masks = torch.cat([p.detach() for p in mask_params])
    rnp = RNP()
    module = rnp.build(copy.deepcopy(unlearned))
    rstage = RNP.runtime_trainer({}, {})
    optimizer = build_optimizer(rstage["optimizer"], rnp.param_groups(module))
    losses, our_first = [], None
    for epoch in range(recover_epochs):
        ctx = train_context(module, epoch, recover_epochs, steps_per_epoch=len(batches))
        losses += [float(our_step(rnp, module, optimizer, xb, yb, ctx)["loss"].detach()) for xb, yb, *_ in batches]
        our_first = torch.cat([m.detach().clone() for m in module.masks()]) if our_first is None else our_first
    our_masks = torch.cat([m.detach() for m in module.masks()])
    layer_sizes = [m.numel() for m in module.masks()]
    their_flags = torch.cat(rnp_prune_flags(list(their_masks.split(layer_sizes)), "threshold", 0.7))
    our_flags = torch.cat(rnp_prune_flags(list(our_masks.split(layer_sizes)), "threshold", 0.7))

    # 3. pruning the ORIGINAL model by the masks: their file round trip and final call, both rules
    rng = torch.Generator().manual_seed(3)
    random_masks = copy.deepcopy(their_rec)
    with torch.no_grad():
        for p in [v for n, v in random_masks.named_parameters() if "neuron_mask" in n]:
            p.copy_(torch.rand(p.shape, generator=rng))
    out: list[Compared] = []
    for label, their_model in (("learned", their_rec), ("random", random_masks)):
        masks = [m.neuron_mask.detach() for m in their_model.modules() if isinstance(m, mask_bn)]
        for mode, n in (("threshold", float(defaults["pruning_number"])), ("number", float(defaults["pruning_number"])),
                        ("number", 5.0)):
            if label == "learned" and mode == "number":
                continue
            theirs_pruned = _their_pruned(fns, their_model, base, mode, n)
            ours_pruned = torch.cat(rnp_prune_flags(masks, mode, n))
            out.append(Compared(f"pruned_set_{label}_masks_{mode}_{n:g}", int((theirs_pruned != ours_pruned).sum()), "int",
                                f"{int(ours_pruned.sum())} of {len(ours_pruned)} pruned by ours"))
    n_bn = len(batchnorm_layers(base))
    return [
        Compared("unlearning_stop_epoch", abs(their_stop - method.stopped_epoch), "int",
                 f"theirs {their_stop}, ours {method.stopped_epoch} (of {epochs})"),
        Compared("unlearned_weights", max_param_diff(theirs, ours), "float",
                 f"ours ran all {stage['epochs']} epochs, no-ops after the stop"),
        Compared("unlearned_batchnorm_statistics", max_param_diff(theirs, ours, buffers=True)),
        Compared("masks_after_1_recovery_epoch", max_abs(their_first, our_first), "float",
                 f"{our_masks.numel()} masks over {n_bn} layers, {len(batches)} steps"),
        Compared(f"pruned_set_after_{recover_epochs}_recovery_epochs", int((their_flags != our_flags).sum()), "int",
                 f"{int(our_flags.sum())} of {len(our_flags)} pruned (threshold 0.7), each side's own masks; "
                 f"the masks differ by {max_abs(their_masks, our_masks):.1e} (float32 rounding: their weight * mask "
                 f"inside F.batch_norm, our gate on its output, grown by lr 0.2 + momentum)"),
        Compared("recovery_loss_last_epoch", abs(float(their_loss) - float(np.mean(losses[-len(batches):])))),
        *out,
        Compared("defaults", max_abs([defaults[k] for k in ("alpha", "clean_threshold", "unlearning_lr", "recovering_lr",
                                                            "unlearning_epochs", "recovering_epochs", "pruning_number")]
                                     + list(defaults["schedule"]) + [float(cfg["ratio"]), float(cfg["batch_size"])],
                                     [rnp.alpha, 0.2, 0.01, 0.2, 20, 20, rnp.pruning_number, 10, 20, 0.01, 256.0]),
                 "float", f"pruning_by {defaults['pruning_by']} (ours {rnp.pruning_by})"),
    ]


# ------------------------------------------------------------------------------------------ BNP

class _Loader:
    """One batch, behind the `iter(loader).next()` their bnp_defense calls (an old torch iterator's)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.batch = (x, y)

    def __iter__(self) -> "_Loader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch

    next = __next__


def check_bnp(reference: Path) -> list[Compared]:
    from methods.backdoor.bnp import BNP, bnp_prune_flags, pre_activation_stats
    from methods.backdoor.masks import batchnorm_layers

    base, x, y = digits_model_and_clean_data()
    fns = load_functions(reference / "defense" / "bnp.py", ["bnp_defense"], {"torch": torch, "nn": nn})
    mbns = import_file(reference / "utils" / "defense_utils" / "mbns" / "mbns_model" / "mbns_batchnorm.py").BatchNorm2d_MBNS
    poisoned = x[:256].clone()  # a poisoned training batch: a 3x3 white patch on 10% of it, labelled 0
    poisoned[:26, :, -3:, -3:] = 1.0
    labels = y[:256].clone()
    labels[:26] = 0
    cfg = __import__("yaml").safe_load((reference / "config" / "defense" / "bnp" / "cifar10.yaml").read_text())
    out: list[Compared] = []
    for u in (float(cfg["u"]), 1.0):
        theirs = copy.deepcopy(base)
        for name, bn in [(n, m) for n, m in theirs.named_modules() if isinstance(m, nn.BatchNorm2d)]:
            parent = theirs.get_submodule(name.rsplit(".", 1)[0]) if "." in name else theirs
            new = mbns(bn.num_features)
            new.load_state_dict(bn.state_dict())
            setattr(parent, name.rsplit(".", 1)[-1], new)
        loaders = {"clean_train": _Loader(x[-44:], y[-44:]), "bd_train": _Loader(poisoned, labels)}
        fns["bnp_defense"](theirs, u, loaders, SimpleNamespace(device="cpu"))
        their_bns = [m for m in theirs.modules() if isinstance(m, mbns)]
        their_pruned = torch.cat([(m.weight == 0) & (m.bias == 0) for m in their_bns])
        _, flags = bnp_prune_flags(copy.deepcopy(base), poisoned, u)
        ours_pruned = torch.cat(flags)
        out.append(Compared(f"pruned_set_u{u:g}", int((their_pruned != ours_pruned).sum()), "int",
                            f"{int(ours_pruned.sum())} of {len(ours_pruned)} pruned by ours"))
    stats = pre_activation_stats(copy.deepcopy(base), poisoned)
    their_mean = torch.cat([m.batch_mean for m in their_bns])
    their_var = torch.cat([m.batch_var for m in their_bns])
    return [
        Compared("batch_mean_per_channel", max_abs(their_mean, torch.cat([s[0] for s in stats])), "float",
                 f"{len(their_mean)} channels over {len(batchnorm_layers(base))} layers"),
        Compared("batch_var_per_channel", max_abs(their_var, torch.cat([s[1] for s in stats]))),
        *out,
        Compared("default_u_batch_size", max_abs([float(cfg["u"]), float(cfg["batch_size"])], [BNP().u, BNP().batch_size])),
    ]


CHECKS = {"clp": check_clp, "anp": check_anp, "nc": check_nc, "rnp": check_rnp, "bnp": check_bnp}

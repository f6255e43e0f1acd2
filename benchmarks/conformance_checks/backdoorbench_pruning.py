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


CHECKS = {"clp": check_clp, "anp": check_anp, "nc": check_nc}

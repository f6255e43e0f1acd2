"""IAD beside SCLBD/BackdoorBench's attack/inputaware.py (its re-implementation of VinAIResearch/
input-aware-backdoor-attack-release, not fetched here).

Their classes and methods are taken from the script's syntax tree (`load_functions`: Conv2dBlock,
DownSampleBlock, UpSampleBlock, Normalize, Denormalize, InputAwareGenerator, Threshold and the
InputAware class, its BadNet base replaced by `object`; the module-level argument parsing and
training are not run); their normalisation comes from their own get_dataset_normalization. Their
`progress_bar` (a terminal display) and `all_acc` (an epoch metric) are given as a no-op and a plain
accuracy: neither enters a compared quantity. Two settings: dataset 'mnist' at 8x8 grey (their 16 /
2-level networks, at our digits' size) and 'cifar10' at 32x32 RGB (their 32 / 3-level networks).

  structure       their G and M state dicts load into ours (strict): names and shapes
  forward         G and M outputs on the same normalised batch, train and eval mode (float)
  bd / cross      their create_bd and create_cross (normalised space, denormalised) vs our blend in
                  [0, 1] (float), and the images as their set_one_bd_sample stores them (ToPILImage)
                  vs ours (bytes that differ, of all)
  losses          the statements of their train_mask_step and train_step that compute the diversity
                  and norm losses, run as written on the same tensors, vs ours (float)
  mask step       their train_mask_step on one pair of batches vs our mask_step: M's gradients (read
                  at the optimiser's step), parameters and BatchNorm statistics after it
  joint steps     their train_step on two pairs of batches of 40 (4 poisoned, 4 cross each) vs two of
                  our joint_step, from the same C (ours, behind their Denormalize on their side: their
                  C sees normalised images, ours normalises inside), G and frozen M: G's gradients at
                  step 1 (relative), C's parameters and BatchNorm statistics and G's BatchNorm variances
                  after both; then the second step alone from their state after the first (ours set to
                  it: C, G, G's accumulated gradients, both optimisers), G's gradients, G's and C's
                  parameters. Unsynced, step 1's float noise grows through Adam (reported in a note). G's conv biases feed BatchNorm: their gradient is 0 up
                  to float noise, which Adam turns into +-lr moves; they (and the running means that
                  follow them) are reported in a note, not compared
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conformance_checks.backdoorbench import _stub_missing
from conformance_checks.common import Compared, import_file, load_functions, max_abs, max_param_diff, \
    run_statements, tiny_model

REPOSITORY = "SCLBD/BackdoorBench"
CLASSES = ["Conv2dBlock", "DownSampleBlock", "UpSampleBlock", "Normalize", "Denormalize", "InputAwareGenerator",
           "Threshold", "generalize_to_lower_pratio", "InputAware"]


def _theirs(reference: Path) -> dict[str, Any]:
    _stub_missing()
    normalization = import_file(reference / "utils" / "aggregate_block" / "dataset_and_transform_generate.py",
                                search=reference)
    namespace = {"nn": nn, "torch": torch, "F": F, "np": np, "logging": logging, "BadNet": object,
                 "get_dataset_normalization": normalization.get_dataset_normalization,
                 "get_dataset_denormalization": normalization.get_dataset_denormalization,
                 "progress_bar": lambda *args, **kwargs: None,
                 "all_acc": lambda preds, labels: float((preds == labels).float().mean()) if len(labels) else 0.0}
    return load_functions(reference / "attack" / "inputaware.py", CLASSES, namespace)


def _args(dataset: str, channels: int) -> SimpleNamespace:
    """Their config/attack/inputaware/default.yaml values the compared code reads."""
    return SimpleNamespace(dataset=dataset, input_channel=channels, lambda_div=1.0, lambda_norm=100.0,
                           mask_density=0.032, EPSILON=1e-7, pratio=0.1, attack_label_trans="all2one",
                           attack_target=0, num_classes=10, non_blocking=False, C_lr_scheduler="MultiStepLR")


class _Recorder:
    """Wraps an optimiser's step to keep each parameter's gradient as it is at the step."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.grads: list[list[torch.Tensor]] = []
        step = opt.step

        def recorded(*args, **kwargs):
            self.grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                               if p.grad is not None])
            return step(*args, **kwargs)

        opt.step = recorded  # type: ignore[method-assign]


def _setting(reference: Path, ref: dict[str, Any], dataset: str, shape: tuple[int, int, int]) -> list[Compared]:
    from harness.backdoor.iad import IADNet, InputAware, architecture, blend, diversity_loss, normalise, stored
    from harness.backdoor.iad import threshold as our_threshold

    tag = f"{dataset}_{shape[1]}"
    channels = shape[0]
    args = _args(dataset, channels)
    norm = ref["InputAwareGenerator"](args)._normalizer  # their Normalize with their dataset's statistics
    mean = torch.tensor(norm.expected_values, dtype=torch.float32)
    std = torch.tensor(norm.variance, dtype=torch.float32)
    torch.manual_seed(0)
    their_g, their_m = ref["InputAwareGenerator"](args), ref["InputAwareGenerator"](args, out_channels=1)
    width, depth = architecture(*shape)
    our_g, our_m = IADNet(channels, channels, width, depth), IADNet(channels, 1, width, depth)
    out: list[Compared] = []
    try:
        our_g.load_state_dict(their_g.state_dict())
        our_m.load_state_dict(their_m.state_dict())
        out.append(Compared(f"{tag}_structure", 0.0, "int", f"width {width}, depth {depth}"))
    except RuntimeError as err:
        return [Compared(f"{tag}_structure", float("inf"), "int", str(err)[:200])]

    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(40, *shape, generator=gen), torch.rand(40, *shape, generator=gen)
    x1 = torch.floor(x1 * 255) / 255  # images on the uint8 grid, as loaded
    x2 = torch.floor(x2 * 255) / 255
    y1 = torch.randint(0, 10, (40,), generator=gen)
    n1, n2 = norm(x1), norm(x2)
    out.append(Compared(f"{tag}_normalise", max_abs(n1, normalise(x1, mean, std))))
    for mode in ("train", "eval"):
        for net in (their_g, their_m, our_g, our_m):
            net.train(mode == "train")
        with torch.no_grad():
            out.append(Compared(f"{tag}_G_{mode}", max_abs(their_g(n1), our_g(n1))))
            out.append(Compared(f"{tag}_M_{mode}", max_abs(their_m(n1), our_m(n1))))
    their_g.load_state_dict(our_g.state_dict())  # back to equal BatchNorm statistics after the train-mode forwards
    their_m.load_state_dict(our_m.state_dict())

    # the poisoned and cross images (eval mode: how the stored datasets are made)
    attack = ref["InputAware"]()
    attack.device, attack.normalizer, attack.threshold = torch.device("cpu"), norm, ref["Threshold"]()
    denorm = ref["Denormalize"](args, norm.expected_values, norm.variance)
    for net in (their_g, their_m, our_g, our_m):
        net.eval()
    poison = InputAware()
    poison.use_artifact({**{f"G.{k}": v.numpy() for k, v in our_g.state_dict().items()},
                         **{f"M.{k}": v.numpy() for k, v in our_m.state_dict().items()},
                         "norm_mean": mean.numpy(), "norm_std": std.numpy(), "shape": np.asarray(shape),
                         "net": np.asarray([width, depth])})
    poison._loaded = "conformance"
    from torchvision.transforms import ToPILImage

    def pil_bytes(images: torch.Tensor) -> np.ndarray:
        return np.stack([np.array(ToPILImage()(t)) for t in images]).reshape(len(images), -1)

    def our_bytes(images: torch.Tensor) -> np.ndarray:
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(len(images), -1).numpy()

    with torch.no_grad():
        bd_n, _, _, _ = attack.create_bd(n1, y1, their_g, their_m, args, "train")
        cross_n, _, _ = attack.create_cross(n1, n2, their_g, their_m, args)
        bd_ours = blend(x1, our_g(n1), our_threshold(our_m(n1)))
        cross_ours = blend(x1, our_g(n2), our_threshold(our_m(n2)))
        out.append(Compared(f"{tag}_threshold", max_abs(attack.threshold(their_m(n1)), our_threshold(our_m(n1)))))
        out.append(Compared(f"{tag}_bd_images", max_abs(denorm(bd_n), bd_ours)))
        out.append(Compared(f"{tag}_cross_images", max_abs(denorm(cross_n), cross_ours)))
        for name, theirs, ours in (("bd", denorm(bd_n), poison.apply(x1, x1)),
                                   ("cross", denorm(cross_n), poison.apply(x1, x2))):
            a, b = pil_bytes(theirs), our_bytes(ours)
            differ = int((a != b).sum())
            out.append(Compared(f"{tag}_{name}_stored_bytes", float(np.abs(a.astype(int) - b.astype(int)).max()),
                                "image", f"{differ} of {a.size} bytes differ"))

    # the loss statements as written, on the same tensors
    masks1, masks2 = our_threshold(our_m(n1)), our_threshold(our_m(n2))
    scope = run_statements(reference / "attack" / "inputaware.py", "train_mask_step",
                           _assigning("distance_images", "distance_patterns", "loss_div", "loss_norm", "total_loss"),
                           {"inputs1": n1, "inputs2": n2, "masks1": masks1, "masks2": masks2, "args": args,
                            "criterion_div": nn.MSELoss(reduction="none"), "torch": torch, "F": F})
    div = diversity_loss(n1, n2, masks1, masks2, 1e-7) * 1.0
    norm_loss = torch.mean(F.relu(masks1 - 0.032))
    out.append(Compared(f"{tag}_mask_diversity_loss", max_abs(scope["loss_div"], div)))
    out.append(Compared(f"{tag}_mask_norm_loss", max_abs(scope["loss_norm"], norm_loss)))
    out.append(Compared(f"{tag}_mask_total_loss", max_abs(scope["total_loss"], 100.0 * norm_loss + div)))
    with torch.no_grad():
        p1, p2 = normalise(our_g(n1[:4]), mean, std), normalise(our_g(n2[4:8]), mean, std)
    scope = run_statements(reference / "attack" / "inputaware.py", "train_step",
                           _assigning("distance_images", "distance_patterns", "loss_div"),
                           {"inputs1": n1, "inputs2": n2, "patterns1": p1, "patterns2": p2, "num_bd": 4,
                            "args": args, "criterion_div": nn.MSELoss(reduction="none"), "torch": torch})
    out.append(Compared(f"{tag}_pattern_diversity_loss", max_abs(scope["loss_div"],
                                                                 diversity_loss(n1[:4], n2[4:8], p1, p2, 1e-7))))
    out += _mask_step(ref, attack, args, their_m, our_m, poison, n1, n2, tag)
    out += _joint_steps(ref, attack, args, their_g, their_m, our_g, our_m, poison, x1, y1, x2, mean, std, denorm, tag)
    return out


def _assigning(*names: str):
    import ast

    return lambda node, _: isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id in names for t in node.targets)


def _mask_step(ref, attack, args, their_m, our_m, poison, n1, n2, tag) -> list[Compared]:
    theirs, ours = copy.deepcopy(their_m).train(), copy.deepcopy(our_m).train()
    opt_t = torch.optim.Adam(theirs.parameters(), 0.01, betas=(0.5, 0.9))
    opt_o = torch.optim.Adam(ours.parameters(), 0.01, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt_t, [10, 20], 0.1)  # before the recorder: it patches step
    rec_t, rec_o = _Recorder(opt_t), _Recorder(opt_o)
    labels = torch.zeros(len(n1), dtype=torch.long)  # read by their loop, unused
    attack.train_mask_step(theirs, opt_t, sched, [(n1, labels)], [(n2, labels)], args)
    poison.mask_step(ours, opt_o, n1, n2)
    return [Compared(f"{tag}_mask_step_gradients", max_abs(rec_t.grads[0], rec_o.grads[0])),
            Compared(f"{tag}_mask_step_parameters", max_param_diff(theirs, ours)),
            Compared(f"{tag}_mask_step_batchnorm", max_param_diff(theirs, ours, buffers=True))]


def _joint_steps(ref, attack, args, their_g, their_m, our_g, our_m, poison, x1, y1, x2, mean, std, denorm,
                 tag) -> list[Compared]:
    from harness.backdoor.iad import normalise

    channels, size = x1.shape[1], x1.shape[-1]
    model = tiny_model(in_chans=channels, img_size=size)
    (their_c, tg, tm, (t_c, t_g, t_rec, t_sc, t_sg)), (our_c, og, om, (o_c, o_g, o_rec, _, _)) = \
        _paired_joint_state(their_g, their_m, our_g, our_m, model, denorm)
    halves = [(x1[:20], y1[:20], x2[:20]), (x1[20:], y1[20:], x2[20:])]
    loader1 = [(normalise(a, mean, std), y) for a, y, _ in halves]
    loader2 = [(normalise(b, mean, std), y) for _, y, b in halves]
    args.pratio = 0.2  # 4 poisoned and 4 cross of 20 in both batches
    attack.train_step(their_c, tg, tm, t_c, t_g, t_sc, t_sg, loader1, loader2, args)
    args.pratio = 0.1
    poison.rate = 0.2
    gen = torch.Generator()
    our_c.train()
    og.train()
    for a, y, b in halves:
        poison.joint_step(our_c, og, om, o_c, o_g, a, y, b, mean, std, 10, gen)
    poison.rate = 0.1
    names = [n for n, _ in og.named_parameters()]
    kept = [i for i, n in enumerate(names) if not n.endswith("conv2d.bias")]
    biases = [i for i, n in enumerate(names) if n.endswith("conv2d.bias")]
    bias_grad = max(float(t_rec.grads[k][i].abs().max()) for k in (0, 1) for i in biases)
    bias_note = (f"conv biases before BatchNorm left out: their gradient is 0 up to float noise (|g| <= {bias_grad:.1e} "
                 f"here), which Adam's normalised step turns into +-lr moves on either side (they differ by "
                 f"{_named_diff(tg, og, 'conv2d.bias'):.3f}), and the running means follow them")
    drift = (f"unsynced, after two steps: G parameters {_named_diff(tg, og, 'conv2d.bias', keep=False):.1e}, G's "
             f"accumulated gradients {_relative(t_rec.grads[1], o_rec.grads[1], kept):.1e} (relative): step 1's float "
             f"noise amplified by Adam's normalised step, each step itself equal")
    synced = _synced_second_step(attack, args, their_g, their_m, our_g, our_m, poison, model, denorm, halves,
                                 mean, std, kept, tag, drift)
    return synced + [Compared(f"{tag}_joint_G_gradients_step1", _relative(t_rec.grads[0], o_rec.grads[0], kept), "float",
                              "relative to the largest gradient of each tensor"),
                     Compared(f"{tag}_joint_C_parameters", max_param_diff(their_c[1], our_c), "float",
                              "after two steps, unsynced"),
                     Compared(f"{tag}_joint_C_batchnorm", max_param_diff(their_c[1], our_c, buffers=True)),
                     Compared(f"{tag}_joint_G_batchnorm_var", _named_diff(tg, og, "running_var", buffers=True), "float",
                              bias_note)]


def _synced_second_step(attack, args, their_g, their_m, our_g, our_m, poison, model, denorm, halves, mean, std,
                        kept, tag, drift: str) -> list[Compared]:
    """Their train_step on the first pair, ours likewise; then ours set to their state (C, G, G's
    accumulated gradients, both optimisers' states) and the second step compared on its own."""
    from harness.backdoor.iad import normalise

    (their_c, tg, tm, (t_c, t_g, t_rec, t_sc, t_sg)), (our_c, og, om, (o_c, o_g, o_rec, _, _)) = \
        _paired_joint_state(their_g, their_m, our_g, our_m, model, denorm)
    args.pratio, poison.rate = 0.2, 0.2
    gen = torch.Generator()
    for step, (a, y, b) in enumerate(halves):
        attack.train_step(their_c, tg, tm, t_c, t_g, t_sc, t_sg, [(normalise(a, mean, std), y)],
                          [(normalise(b, mean, std), y)], args)
        our_c.train()
        og.train()
        poison.joint_step(our_c, og, om, o_c, o_g, a, y, b, mean, std, 10, gen)
        if step == 0:  # ours := theirs
            our_c.load_state_dict(their_c[1].state_dict())
            og.load_state_dict(tg.state_dict())
            for p_o, p_t in zip(og.parameters(), tg.parameters()):
                p_o.grad = p_t.grad.detach().clone()
            o_c.load_state_dict(copy.deepcopy(t_c.state_dict()))  # load_state_dict shares same-device tensors
            o_g.load_state_dict(copy.deepcopy(t_g.state_dict()))
    args.pratio, poison.rate = 0.1, 0.1
    return [Compared(f"{tag}_joint_step2_synced_G_gradients", _relative(t_rec.grads[1], o_rec.grads[1], kept),
                     "float", "the second step from their state after the first (relative)"),
            Compared(f"{tag}_joint_step2_synced_G_parameters", _named_diff(tg, og, "conv2d.bias", keep=False), "float",
                     drift),
            Compared(f"{tag}_joint_step2_synced_C_parameters", max_param_diff(their_c[1], our_c))]


def _paired_joint_state(their_g, their_m, our_g, our_m, model: nn.Module, denorm: Any) -> list[tuple]:
    """Both sides' joint-training state from the same weights: [(C, G copy, frozen M copy, (C's SGD,
    G's Adam, G's gradient recorder, C's and G's MultiStepLR)) for theirs, then ours]. Their C sees
    normalised images (their Denormalize in front), ours [0, 1] ones."""
    sides = []
    for c, g, m in ((nn.Sequential(_Denorm(denorm), copy.deepcopy(model)), their_g, their_m),
                    (copy.deepcopy(model), our_g, our_m)):
        g, m = copy.deepcopy(g), copy.deepcopy(m).eval().requires_grad_(False)
        opt_c = torch.optim.SGD(c.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(g.parameters(), 0.01, betas=(0.5, 0.9))
        sched_c = torch.optim.lr_scheduler.MultiStepLR(opt_c, [100], 0.1)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, [200], 0.1)  # before the recorder: it patches step
        sides.append((c, g, m, (opt_c, opt_g, _Recorder(opt_g), sched_c, sched_g)))
    return sides


def _relative(a: list[torch.Tensor], b: list[torch.Tensor], kept: list[int]) -> float:
    """Largest |a - b| / max |a| over the kept tensors."""
    return max(float((a[i] - b[i]).abs().max()) / max(float(a[i].abs().max()), 1e-12) for i in kept)


def _named_diff(a: nn.Module, b: nn.Module, suffix: str, keep: bool = True, buffers: bool = False) -> float:
    """Largest difference over the parameters (buffers) whose name ends with `suffix` (keep) or does not."""
    na = dict(a.named_buffers() if buffers else a.named_parameters())
    nb = dict(b.named_buffers() if buffers else b.named_parameters())
    return max(max_abs(na[k], nb[k]) for k in na if k.endswith(suffix) == keep and na[k].is_floating_point())


class _Denorm(nn.Module):
    """Their Denormalize as a module: their C sees normalised images, ours [0, 1] ones."""

    def __init__(self, denorm: Any) -> None:
        super().__init__()
        self.denorm = denorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.denorm(x)


def check_iad(reference: Path) -> list[Compared]:
    ref = _theirs(reference)
    return _setting(reference, ref, "mnist", (1, 8, 8)) + _setting(reference, ref, "cifar10", (3, 32, 32))


CHECKS = {"iad": check_iad}

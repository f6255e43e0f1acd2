"""FT-SAM, I-BAU and SAU beside SCLBD/BackdoorBench (the reference compared; the authors' own
repositories are not fetched here, so each row is against BackdoorBench's implementation).

Same weights and data on both sides: backdoorbench.py's digits model (our test_resnet trained 3
epochs on scikit-learn's digits at 16x16) and its 300 held-out digits as the clean set, one batch
of all 300. Their code runs as it is, on the CPU, read from the checkout (nothing copied):
  ft_sam  utils/defense_utils/sam (their SAM optimiser, ProportionScheduler, smooth_crossentropy)
          wrapped around SGD(lr 0.01, momentum 0.9, wd 5e-4) as defense/ft-sam.py builds it; one
          `SAM.step` against one step of our trainer (`_step` + `after_step`): the loss at w, the
          perturbation e per parameter, the parameters and BatchNorm statistics after the step
          (adaptive, their default, and the plain SAM of `adaptive: false`).
  i_bau   defense/i-bau.py's `fixed_point` and `GradientDescent` (hypertorch's) and the nested
          `loss_inner` / `loss_outer` and round loop of its `mitigation()`, run with n_rounds 1 on
          the one batch: the universal perturbation after its pass, the hypergradient set on the
          parameters (recorded when their Adam steps), the parameters after the step. Their
          `random.sample` of the patched samples draws from torch.randperm here, so both sides
          patch the same 3 samples.
  sau     defense/sau.py's `Shared_PGD` and the round loop of its `mitigation()` (n_rounds 1):
          the shared perturbation, the loss (recorded at their `backward`), the gradient at their
          Adam step and the parameters after it.
Their `args` come from config/defense/<name>/cifar10.yaml with device cpu. Settings rows compare
the yaml with our configs/method/<name>.yaml and the trainer our runtime_trainer builds.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, List

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conformance_checks.backdoorbench import CLEAN_SAMPLES, digits_model_and_clean_data
from conformance_checks.common import (Compared, ScriptBody, load_functions, max_abs, max_param_diff, our_step,
                                       same_random, train_context, twins)

REPOSITORY = "SCLBD/BackdoorBench"


def _cfg(reference: Path, name: str) -> dict[str, Any]:
    return yaml.safe_load((reference / "config" / "defense" / name / "cifar10.yaml").read_text())


def _ours_cfg(name: str) -> dict[str, Any]:
    from harness.core.config import compose_config

    return {k: v for k, v in compose_config([f"method={name}"])["method"].items() if k != "name"}


def _sam_package(reference: Path) -> types.ModuleType:
    """utils/defense_utils/sam imported as a package of its own (its files use relative imports)."""
    folder = reference / "utils" / "defense_utils" / "sam"
    name = "backdoorbench_sam"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _opt_sched(reference: Path) -> Callable:
    return load_functions(reference / "utils" / "aggregate_block" / "train_settings_generate.py",
                          ["argparser_opt_scheduler"], {"torch": torch})["argparser_opt_scheduler"]


@contextlib.contextmanager
def _recording_steps(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], into: list) -> Iterator[None]:
    """Record every parameter's gradient each time `optimizer.step` runs (the update's input)."""
    step = optimizer.step

    def recorded(*args: Any, **kwargs: Any) -> Any:
        into.append([None if p.grad is None else p.grad.detach().clone() for p in params])
        return step(*args, **kwargs)

    optimizer.step = recorded  # type: ignore[method-assign]
    try:
        yield
    finally:
        optimizer.step = step  # type: ignore[method-assign]


@contextlib.contextmanager
def _recording_backward(into: list) -> Iterator[None]:
    """Record the value of every tensor `.backward()` is called on (their losses are loop locals)."""
    backward = torch.Tensor.backward

    def recorded(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        into.append(self.detach().clone())
        return backward(self, *args, **kwargs)

    torch.Tensor.backward = recorded  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]


def _grads_diff(a: list, b: list) -> float:
    return max_abs([torch.zeros(0) if g is None else g for g in a], [torch.zeros(0) if g is None else g for g in b])


# ----------------------------------------------------------------------------------------- FT-SAM

def _sam_once(reference: Path, adaptive: bool) -> list[Compared]:
    from harness.train.optimizers import build_optimizer
    from methods.ft_sam import FTSAM

    sam = _sam_package(reference)
    cfg = _cfg(reference, "ft-sam")
    base, x, y = digits_model_and_clean_data()
    theirs_model, ours_model = twins(base)

    theirs_model.train()
    base_opt = torch.optim.SGD(theirs_model.parameters(), lr=cfg["lr"], momentum=cfg["sgd_momentum"],
                               weight_decay=cfg["wd"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base_opt, T_max=100)
    rho = sam.ProportionScheduler(pytorch_lr_scheduler=scheduler, max_lr=cfg["lr"], min_lr=0.0,
                                  max_value=cfg["rho_max"], min_value=cfg["rho_min"])
    opt = sam.SAM(params=theirs_model.parameters(), base_optimizer=base_opt, model=theirs_model,
                  sam_alpha=cfg["alpha"], rho_scheduler=rho, adaptive=adaptive)
    opt.set_closure(lambda p, t: sam.smooth_crossentropy(p, t, smoothing=cfg["label_smoothing"]).mean(), x, y)
    same_random(0)
    _, their_loss = opt.step()
    their_e = [opt.state[p].get("e_w") for p in theirs_model.parameters()]

    settings = _ours_cfg("ft_sam")
    method = FTSAM(**{**settings, "adaptive": adaptive})
    module = method.build(ours_model)
    trainer = FTSAM.runtime_trainer(settings, {})
    optimizer = build_optimizer(trainer["optimizer"], method.param_groups(module))
    ours_e: list[torch.Tensor] = []
    after = method.after_step

    def keep(module_: nn.Module, ctx: Any) -> None:
        ours_e.extend(e.clone() for _, e in method._applied)
        after(module_, ctx)

    method.after_step = keep  # type: ignore[method-assign]
    same_random(0)
    logs = our_step(method, module, optimizer, x, y, train_context(module))
    tag = "adaptive" if adaptive else "plain"
    weights = [p.detach().double() for p in base.parameters()]  # w before the step (twins copied it)
    norm = torch.stack([(e.double() / w.abs() if adaptive else e.double()).norm() for e, w in zip(ours_e, weights)]).norm()
    return [
        Compared(f"{tag}_loss_at_w", abs(float(their_loss) - float(logs["loss_at_w"]))),
        Compared(f"{tag}_perturbation", max_abs(their_e, ours_e), note=f"{len(ours_e)} tensors, rho {cfg['rho_max']}"),
        Compared(f"{tag}_perturbation_radius_minus_rho", abs(float(norm) - cfg["rho_max"]),
                 note="||e / |w|||, float64 (ASAM's radius)" if adaptive else "||e||"),
        Compared(f"{tag}_parameters_after_one_step", max_param_diff(theirs_model, module)),
        Compared(f"{tag}_batchnorm_statistics_after_one_step", max_param_diff(theirs_model, module, buffers=True)),
    ]


def check_ft_sam(reference: Path) -> list[Compared]:
    from harness.train.schedule import lr_factor, schedule_position
    from methods.ft_sam import FTSAM

    cfg, ours = _cfg(reference, "ft-sam"), _ours_cfg("ft_sam")
    trainer = FTSAM.runtime_trainer(ours, {})
    steps = -(-CLEAN_SAMPLES // cfg["batch_size"])  # their loader keeps the last partial batch, as ours
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    theirs_lr, ours_lr = [], []
    for epoch in range(cfg["epochs"]):  # their _train_sam steps the scheduler once per batch
        for step in range(steps):
            theirs_lr.append(opt.param_groups[0]["lr"])
            ours_lr.append(trainer["optimizer"]["lr"] * lr_factor(
                trainer["schedule"], schedule_position(trainer["schedule"], epoch, step, steps), trainer["epochs"],
                steps))
            opt.step()
            sched.step()
    return [
        *_sam_once(reference, adaptive=True),
        *_sam_once(reference, adaptive=False),
        Compared("settings", max_abs([ours["epochs"], ours["batch_size"], ours["lr"], ours["momentum"],
                                      ours["weight_decay"], ours["rho_max"], ours["rho_min"], ours["label_smoothing"],
                                      ours["alpha"], ours["clean_subset"]],
                                     [cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["sgd_momentum"], cfg["wd"],
                                      cfg["rho_max"], cfg["rho_min"], cfg["label_smoothing"], cfg["alpha"],
                                      cfg["ratio"]])),
        Compared("lr_per_batch", max_abs(theirs_lr, ours_lr),
                 note=f"{len(ours_lr)} batches ({steps} an epoch on 2,500): CosineAnnealingLR(T_max 100) stepped "
                      f"per batch, rising again after 100"),
    ]


# ----------------------------------------------------------------------------------------- I-BAU

class _TorchOnCpu(types.ModuleType):
    """torch, with `device=` dropped from zeros_like (their loss_outer asks for 'cuda')."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros_like(t: torch.Tensor, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(t, *args, **kwargs)


class _Stub:
    """Their logging/plotting/evaluation objects: anything called returns a stub; eval_step six zeros."""

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":
        return self

    def __getattr__(self, name: str) -> Any:
        if name == "eval_step":
            return lambda *a, **k: (0.0,) * 6
        return _Stub()


def _torch_sample(population: Any, k: int) -> list[int]:
    """random.sample drawn from torch.randperm (what our patch_some draws)."""
    return torch.randperm(len(population))[:k].tolist()


def _their_round(reference: Path, script: str, args: SimpleNamespace, namespace: dict[str, Any],
                 definitions: tuple[str, ...], assigned: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the nested definitions, the named assignments and the `for round in range(args.n_rounds)`
    loop of their `mitigation()` in `namespace`."""
    body = ScriptBody(reference / "defense" / script, "mitigation")
    nodes = body.select(lambda node, src: (node.__class__.__name__ == "FunctionDef" and node.name in definitions)
                        or (node.__class__.__name__ == "Assign" and any(getattr(t, "id", None) in assigned
                                                                        for t in node.targets))
                        or src.startswith("for round in range(args.n_rounds)"))
    stub = _Stub()
    ns = {"args": args, "self": stub, "agg": stub, "general_plot_for_epoch": stub, "logging": stub, "F": F, "nn": nn,
          "np": np, "random": SimpleNamespace(sample=_torch_sample), **{f"{k}_list": [] for k in (
              "train_loss", "train_mix_acc", "train_clean_acc", "train_asr", "train_ra", "clean_test_loss",
              "bd_test_loss", "ra_test_loss", "test_acc", "test_asr", "test_ra")},
          "data_clean_loader": None, "data_bd_loader": None, **namespace}
    with contextlib.redirect_stdout(io.StringIO()):
        return body.run(nodes, ns)


def check_i_bau(reference: Path) -> list[Compared]:
    from harness.train.optimizers import build_optimizer
    from methods.i_bau import IBAU

    cfg, ours = _cfg(reference, "i-bau"), _ours_cfg("i_bau")
    hyper = load_functions(reference / "defense" / "i-bau.py",
                           ["DifferentiableOptimizer", "GradientDescent", "gd_step", "grad_unused_zero",
                            "get_outer_gradients", "update_tensor_grads", "fixed_point", "cat_list_to_tensor"],
                           {"torch": torch, "torch_grad": torch.autograd.grad, "repeat": __import__("itertools").repeat,
                            "List": List, "Callable": Callable, "Tensor": torch.Tensor})
    base, x, y = digits_model_and_clean_data()
    theirs_model, ours_model = twins(base)
    args = SimpleNamespace(**{**cfg, "device": "cpu", "n_rounds": 1, "input_channel": x.shape[1],
                              "input_height": x.shape[2], "input_width": x.shape[3], "save_path": "", "log": ""})
    outer_opt, _ = _opt_sched(reference)(theirs_model, args)
    theirs_model.eval()
    their_grads: list = []
    same_random(0)
    with _recording_steps(outer_opt, list(theirs_model.parameters()), their_grads):
        ns = _their_round(reference, "i-bau.py", args, {
            "torch": _TorchOnCpu(), "model": theirs_model, "outer_opt": outer_opt, **hyper,
            "trainloader": [(x, y, None, None, None)], "images_list": [x], "labels_list": [y]},
            ("loss_inner", "loss_outer"), ("inner_opt",))
    their_delta = ns["batch_pert"].detach()

    method = IBAU(**ours)
    module = method.build(ours_model)
    trainer = IBAU.runtime_trainer(ours, {})
    optimizer = build_optimizer(trainer["optimizer"], method.param_groups(module))
    ctx = train_context(module)
    our_grads: list = []
    same_random(0)
    module.train()
    method.on_epoch_start(ctx)
    method.pre_pass_step(module, x, y, ctx)
    with _recording_steps(optimizer, list(module.parameters()), our_grads):
        our_step(method, module, optimizer, x, y, ctx)
    return [
        Compared("perturbation_after_its_pass", max_abs(their_delta, method.delta)),
        Compared("hypergradient", _grads_diff(their_grads[0], our_grads[0]),
                 note=f"largest |g| {max(float(g.abs().max()) for g in our_grads[0]):.3g}"),
        Compared("parameters_after_one_step", max_param_diff(theirs_model, module)),
        Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs_model, module, buffers=True)),
        Compared("settings", max_abs([ours["n_rounds"], ours["batch_size"], ours["lr"], *ours["betas"],
                                      ours["weight_decay"], ours["K"], ours["clean_subset"]],
                                     [cfg["n_rounds"], cfg["batch_size"], cfg["lr"], *cfg["adam_betas"], cfg["wd"],
                                      cfg["K"], cfg["ratio"]])),
    ]


# ------------------------------------------------------------------------------------------- SAU

def check_sau(reference: Path) -> list[Compared]:
    import methods.sau as sau_module
    from harness.train.optimizers import build_optimizer

    cfg, ours = _cfg(reference, "sau"), _ours_cfg("sau")
    shared = load_functions(reference / "defense" / "sau.py", ["Shared_PGD"], {"torch": torch, "F": F})
    base, x, y = digits_model_and_clean_data()
    theirs_model, ours_model = twins(base)
    theirs_ref = twins(base)[0]
    args = SimpleNamespace(**{**cfg, "device": "cpu", "n_rounds": 1, "num_classes": 10, "train_mode": False,
                              "save_path": ""})
    outer_opt, _ = _opt_sched(reference)(theirs_model, args)
    theirs_model.eval()
    theirs_ref.eval()
    their_grads: list = []
    losses: list = []
    same_random(0)
    with _recording_steps(outer_opt, list(theirs_model.parameters()), their_grads), _recording_backward(losses):
        ns = _their_round(reference, "sau.py", args, {
            "torch": torch, "model": theirs_model, "model_ref": theirs_ref, "outer_opt": outer_opt, **shared,
            "normalization": lambda t: t, "denormalization": lambda t: t,
            "trainloader": [(x, y, None, None, None)]}, ("get_perturbed_image",), ("Shared_PGD_Attacker",))
    their_pert = ns["batch_pert"]

    method = sau_module.SAU(**ours)
    module = method.build(ours_model)
    trainer = sau_module.SAU.runtime_trainer(ours, {})
    optimizer = build_optimizer(trainer["optimizer"], method.param_groups(module))
    perts: list = []
    pgd = sau_module.shared_pgd
    sau_module.shared_pgd = lambda *a, **k: perts.append(pgd(*a, **k)) or perts[-1]
    our_grads: list = []
    try:
        same_random(0)
        with _recording_steps(optimizer, list(module.parameters()), our_grads):
            logs = our_step(method, module, optimizer, x, y, train_context(module))
    finally:
        sau_module.shared_pgd = pgd
    return [
        Compared("shared_perturbation", max_abs(their_pert, perts[0]), note=f"{len(losses) - 1} PGD steps ran"),
        Compared("loss", abs(float(losses[-1]) - float(logs["loss"].detach())),
                 note=f"shared-loss term {float(logs['loss_shared']):.4f}, {float(logs['shared_fraction']):.2f} of "
                      f"the batch fools h_0"),
        Compared("gradient", _grads_diff(their_grads[0], our_grads[0])),
        Compared("parameters_after_one_step", max_param_diff(theirs_model, module)),
        Compared("settings", max_abs([ours["n_rounds"], ours["batch_size"], ours["lr"], *ours["betas"],
                                      ours["weight_decay"], ours["trigger_norm"], ours["adv_lr"], ours["adv_steps"],
                                      ours["beta_1"], ours["beta_2"], ours["lmd_1"], ours["lmd_2"], ours["lmd_3"],
                                      ours["clean_subset"]],
                                     [cfg["n_rounds"], cfg["batch_size"], cfg["lr"], *cfg["adam_betas"], cfg["wd"],
                                      cfg["trigger_norm"], cfg["adv_lr"], cfg["adv_steps"], cfg["beta_1"],
                                      cfg["beta_2"], cfg["lmd_1"], cfg["lmd_2"], cfg["lmd_3"], cfg["ratio"]])),
    ]


# ------------------------------------------------------------------------------------------- D-BR

class _FeatureNet(nn.Module):
    """Their `drop_linear`'d model: forward is the classifier's pooled features."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)[0]


def _their_transformed(reference: Path, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[tuple[float, int, int]]]:
    """Their transform3 (get_transform_br: RandomRotation(180) then RandomAffine(translate 0.2), PIL)
    on each image, torch's global generator seeded per image; with the draws it made, replayed."""
    from torchvision import transforms

    get = load_functions(reference / "utils" / "defense_utils" / "dbr" / "dataloader_bd.py", ["get_transform_br"],
                         {"transforms": transforms})["get_transform_br"]
    opt = SimpleNamespace(input_height=x.shape[-2], input_width=x.shape[-1], dataset="gtsrb", trans1="rotate",
                          trans2="affine")
    transform3 = get(opt, train=True)[2]
    out, draws = [], []
    for i in range(x.shape[0]):
        torch.manual_seed(seed + i)
        out.append(transform3(transforms.ToPILImage()(x[i])))
        torch.manual_seed(seed + i)  # the same draws again: the rotation's angle, then the affine's (0, tx, ty)
        angle = float(torch.empty(1).uniform_(-180.0, 180.0).item())
        torch.empty(1).uniform_(0.0, 0.0)
        tx = int(round(torch.empty(1).uniform_(-0.2 * x.shape[-1], 0.2 * x.shape[-1]).item()))
        ty = int(round(torch.empty(1).uniform_(-0.2 * x.shape[-2], 0.2 * x.shape[-2]).item()))
        draws.append((angle, tx, ty))
    return torch.stack(out), draws


class _Scored:
    """Our TrainSamples over one in-memory batch (split indices 0..n-1, nothing planted)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.device, self.poisoned = x, y, torch.device("cpu"), np.zeros(0, np.int64)

    def score(self, fn: Callable) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            return np.arange(len(self.y)), fn(self.x, self.y).double().numpy()


def check_d_br(reference: Path) -> list[Compared]:
    import tempfile

    import methods.d_br as dbr
    from harness.train.optimizers import build_optimizer
    from harness.train.trainer import _step

    cfg, ours = _cfg(reference, "d-br"), _ours_cfg("d_br")
    sd = load_functions(reference / "utils" / "defense_utils" / "dbr" / "sd.py",
                        ["calculate_consistency", "calculate_gamma", "separate_samples"],
                        {"os": __import__("os"), "np": np, "torch": torch, "logging": __import__("logging"),
                         "normalization": lambda args, t: t.clone()})  # their gtsrb branch: no normalisation
    utils_br = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        "backdoorbench_utils_br", reference / "utils" / "defense_utils" / "dbr" / "utils_br.py"))
    utils_br.__spec__.loader.exec_module(utils_br)  # type: ignore[union-attr]
    their_cls = load_functions(reference / "defense" / "d-br.py", ["d_br", "finetune_epoch"],
                               {"defense": object, "torch": torch, "nn": nn, "F": F, "np": np, "sys": sys,
                                "logging": __import__("logging"), "normalization": lambda args, t: t.clone(),
                                "progress_bar": lambda *a, **k: None, "AverageMeter": utils_br.AverageMeter,
                                "accuracy": utils_br.accuracy})
    base, x, y = digits_model_and_clean_data()
    base.eval()
    x = torch.floor(x * 255) / 255  # what PIL holds (ToPILImage: mul(255).byte())
    out: list[Compared] = []

    # their transform3 on PIL images against ours on tensors, with the same draws
    theirs_t, draws = _their_transformed(reference, x, 1000)
    ours_t = torch.stack([dbr.transform_one(x[i], *d) for i, d in enumerate(draws)])
    differ = int((theirs_t != ours_t).sum())
    out.append(Compared("fct_transform", max_abs(theirs_t, ours_t), "image",
                        note=f"{differ} of {theirs_t.numel()} pixels differ (PIL's nearest rotation against "
                             f"torchvision's on tensors); FCT from ours vs theirs differs by "
                             f"{max_abs(dbr.fct(base, x, theirs_t), dbr.fct(base, x, ours_t)):.2e}"))
    second_t, _ = _their_transformed(reference, x, 5000)  # the separating pass draws afresh

    # FCT scores, thresholds and the split: their sd.py on the same model and transformed images
    with tempfile.TemporaryDirectory() as tmp:
        args = SimpleNamespace(save_path=tmp, device="cpu", dataset="gtsrb", batch_size=len(y), debug=False,
                               clean_ratio=cfg["clean_ratio"], poison_ratio=cfg["poison_ratio"])
        index = torch.arange(len(y))
        net = _FeatureNet(copy.deepcopy(base))
        with contextlib.redirect_stdout(io.StringIO()):
            sd["calculate_consistency"](args, [([x, x, theirs_t], y, index, torch.zeros(len(y), dtype=torch.bool), y)],
                                        net)
            args.gamma_low, args.gamma_high = sd["calculate_gamma"](args)
            sd["separate_samples"](args, [([x, x, second_t], y, index, torch.zeros(len(y)), y)], net)
        their_scores = np.loadtxt(Path(tmp) / "data_produce" / "all.txt")
        their_clean = np.sort(np.load(Path(tmp) / "data_produce" / "clean_samples.npy", allow_pickle=True).astype(int))
        their_poison = np.sort(np.load(Path(tmp) / "data_produce" / "poison_samples.npy",
                                       allow_pickle=True).astype(int))
    method = dbr.DBR(**ours)
    method.scorer = copy.deepcopy(base)
    fed = iter([theirs_t, second_t])
    real = dbr.random_transform
    dbr.random_transform = lambda batch, gen, *a, **k: next(fed)
    try:
        clean, poisoned, _ = method.separate(_Scored(x, y))
    finally:
        dbr.random_transform = real
    ours_scores = dbr.fct(base, x, theirs_t).detach().numpy()
    out += [
        Compared("fct_scores", max_abs(their_scores, ours_scores),
                 note=f"scores {their_scores.min():.2e}..{their_scores.max():.2e}"),
        Compared("thresholds", max_abs([args.gamma_low, args.gamma_high], [method.stats["gamma_c"],
                                                                           method.stats["gamma_p"]])),
        Compared("separated_samples", len(set(their_clean) ^ set(clean.tolist()))
                 + len(set(their_poison) ^ set(poisoned.tolist())), "int",
                 note=f"D_c {len(clean)}, D_p {len(poisoned)} of {len(y)}"),
    ]

    # one removal step: unlearn D_p (one batch), then relearn D_c (one batch), one SGD, train mode
    theirs_model, ours_model = twins(base)
    args = SimpleNamespace(device="cpu", dataset="gtsrb", print_freq=10, debug=False, **{k: cfg[k] for k in ("batch_size",)})
    args = their_cls["d_br"].set_new_args(None, args, "unlearn_relearn")
    optimizer = torch.optim.SGD(theirs_model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    xp, yp = x[torch.as_tensor(poisoned)], y[torch.as_tensor(poisoned)]
    xc, yc = x[torch.as_tensor(clean)], y[torch.as_tensor(clean)]
    with contextlib.redirect_stdout(io.StringIO()):
        their_cls["d_br"].train_step_unlearning(None, args, [(xp, yp)], theirs_model, optimizer, criterion, 1)
        their_cls["d_br"].train_step_relearning(None, args, [(xc, yc)], theirs_model, optimizer, criterion, 1)
    trainer = dbr.DBR.runtime_trainer(ours, {})
    module = ours_model.train()
    our_opt = build_optimizer(trainer["optimizer"], method.param_groups(module))
    ctx = train_context(module)
    _step(method, module, our_opt, {}, xp, yp, ctx, torch.device("cpu"), "fp32", pre=True)
    _step(method, module, our_opt, {}, xc, yc, ctx, torch.device("cpu"), "fp32")
    out += [
        Compared("parameters_after_unlearn_relearn", max_param_diff(theirs_model, module)),
        Compared("batchnorm_after_unlearn_relearn", max_param_diff(theirs_model, module, buffers=True)),
    ]

    # one L_intra step of the FCT model (their finetune_epoch, SGD lr 0.01 momentum 0.9 wd 5e-4)
    their_net, our_base = _FeatureNet(copy.deepcopy(base)), copy.deepcopy(base)
    sd_args = SimpleNamespace(**{**cfg, "device": "cpu", "dataset": "gtsrb", "num_classes": 10})
    sd_opt, sd_sched = _opt_sched(reference)(their_net, sd_args)
    losses: list = []
    with _recording_backward(losses):
        their_cls["finetune_epoch"](sd_args, [([x], y, None, torch.zeros(len(y), dtype=torch.bool), y)], their_net,
                                    sd_opt, None, 0)
    sd_method = dbr.DBRSeparationModel(**{k: v for k, v in ours.items() if k in dbr.SD})
    sd_module = sd_method.build(our_base)
    sd_trainer = dbr.DBRSeparationModel.runtime_trainer(dbr.DBR.sd_config(ours), {})
    sd_our_opt = build_optimizer(sd_trainer["optimizer"], sd_method.param_groups(sd_module))
    sd_module.train()
    logs = _step(sd_method, sd_module, sd_our_opt, {}, x, y, train_context(sd_module, epoch=sd_method.sd_epochs),
                 torch.device("cpu"), "fp32")
    out += [
        Compared("intra_loss", abs(float(losses[-1]) - float(logs["loss"].detach()))),
        Compared("parameters_after_intra_step", max_abs([p.detach() for p in their_net.parameters()],
                                                        [p.detach() for p in sd_module.parameters()])),
    ]

    # settings: their yaml and set_new_args beside our defaults
    steps = {step: their_cls["d_br"].set_new_args(None, SimpleNamespace(**cfg, debug=False), step)
             for step in ("train_notrans", "finetune_notrans", "unlearn_relearn")}
    out.append(Compared("settings", max_abs(
        [ours["clean_ratio"], ours["poison_ratio"], ours["sd_epochs"], ours["intra_epochs"], ours["sd_lr"],
         ours["sd_momentum"], ours["sd_weight_decay"], ours["sd_batch_size"], ours["epochs"], ours["batch_size"],
         ours["lr"], ours["momentum"], ours["weight_decay"]],
        [cfg["clean_ratio"], cfg["poison_ratio"], steps["train_notrans"].epochs, steps["finetune_notrans"].epochs,
         cfg["lr"], cfg["sgd_momentum"], cfg["wd"], cfg["batch_size"], steps["unlearn_relearn"].epochs,
         steps["unlearn_relearn"].batch_size, steps["unlearn_relearn"].lr, 0.9, 5e-4]),
        note="SD lr: theirs CosineAnnealingLR(T_max 100) per epoch, ours constant (1.0 to 0.970 over 12 epochs)"))
    return out


CHECKS = {"ft_sam": check_ft_sam, "i_bau": check_i_bau, "sau": check_sau, "d_br": check_d_br}

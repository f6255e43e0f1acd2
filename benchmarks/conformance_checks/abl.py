"""ABL's three stages beside bboylyg/ABL (backdoor_isolation.py, backdoor_unlearning.py,
data_loader.py, utils/util.py), each official function taken from its script with
`load_functions` (their module level imports `models.selector` and argument parsing) and run on
the CPU (`opt.cuda = 0`: their own switch). Given to them in this process, never edited in their
files: `utils.util.accuracy` (console top-1/top-5 only; it calls .view on a non-contiguous
tensor, which current torch refuses) returns zeros; `np.save` writes their ragged list of
(image, label) pairs as the object array numpy < 1.24 built from it; tqdm is the identity; the
CIFAR10 dataset is a 64-image stand-in (no download).

Same weights (our tiny test_resnet: their functions take any model), the same CIFAR-shaped batch:
  abl_lga       the LGA loss (train_step, gradient_ascent_type='LGA', read from its loss meter)
                with CE above and below gamma; parameters and BatchNorm statistics after one
                step (SGD lr 0.1, momentum 0.9, wd 1e-4, nesterov), and after one step of
                config.py's default 'Flooding' (same gradient); the isolation loader
                (get_backdoor_loader on a stand-in CIFAR10: shuffling, transforms beyond
                ToTensor) vs our stage data; epochs and lr per epoch (adjust_learning_rate)
  abl_finetune  the other 99% (isolate_data's saved 'other' examples vs our selection, integers);
                steps per epoch on CIFAR-10-sized scores (49,500 at 128); lr per epoch
                (learning_rate_finetuning); Cutout (data_loader.Cutout(1, 3) fed our centres)
                vs our augmentation; parameters and BatchNorm statistics after one step
  abl           the isolated set (compute_loss_value + isolate_data vs our selection, same
                isolation weights, the same poisoned data: our synthetic CIFAR shards poisoned
                by our BadNets plan), steps per epoch (500 at 128), epochs that ascend and lr per
                epoch (learning_rate_unlearning), the unlearning CE and the parameters and
                BatchNorm statistics after one ascent step, from a fresh optimiser and from the
                optimiser one fine-tuning step left (one SGD across both stages, as theirs)
"""
from __future__ import annotations

import math
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler

from conformance_checks.common import (Compared, load_functions, max_abs, max_param_diff, official_lrs, our_step,
                                       paper_trainers, same_random, tiny_batch, tiny_model, train_context, twins)

REPOSITORY = "bboylyg/ABL"
CIFAR_TRAIN = 50_000


class _Meters:
    """utils.util.AverageMeter, keeping every value: how a check reads the loss a train step
    computes (each step function's first meter is its loss meter)."""

    def __init__(self, base: type) -> None:
        self.made: list[Any] = []
        meters = self

        class Recording(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.values: list[float] = []
                meters.made.append(self)

            def update(self, val: float, n: int = 1) -> None:
                self.values.append(val)
                super().update(val, n)

        self.cls = Recording


class _Numpy(types.ModuleType):
    """numpy as their functions see it: numpy itself, but for `save` (_ragged_save)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _ragged_save(path: str, rows: list[Any], *args: Any, **kwargs: Any) -> None:
    """np.save of their list of (image, label) pairs as the (n, 2) object array numpy < 1.24 built
    from it implicitly (numpy now refuses a ragged list without dtype=object)."""
    np.save(path, np.array(rows, dtype=object), *args, **kwargs)


def _official(reference: Path) -> tuple[dict[str, Any], _Meters]:
    """Their step, lr, isolation and data functions, in one namespace with their utilities."""
    import torchvision.transforms as transforms

    util = load_functions(reference / "utils" / "util.py", ["AverageMeter"], {"torch": torch})
    meters = _Meters(util["AverageMeter"])
    # utils.util.accuracy (their console's top-1/top-5 only) calls .view on a non-contiguous tensor,
    # which current torch refuses: replaced by zeros; it touches neither the loss nor the step
    numpy = _Numpy("numpy")
    numpy.save = _ragged_save  # type: ignore[attr-defined]
    space: dict[str, Any] = {"torch": torch, "nn": nn, "np": numpy, "os": __import__("os"), "DataLoader": DataLoader,
                             "tqdm": lambda it, *a, **k: it, "AverageMeter": meters.cls,
                             "accuracy": lambda output, target, topk=(1,): [torch.zeros(()) for _ in topk],
                             "transforms": transforms, "Dataset": torch.utils.data.Dataset, "random_split": None,
                             "time": SimpleNamespace(sleep=lambda s: None)}
    data = load_functions(reference / "data_loader.py", ["DatasetBD", "Cutout", "get_backdoor_loader"], space)
    space.update(data)
    fns = {**data,
           **load_functions(reference / "backdoor_isolation.py",
                            ["compute_loss_value", "isolate_data", "train_step", "adjust_learning_rate"], space),
           **load_functions(reference / "backdoor_unlearning.py",
                            ["train_step_finetuing", "train_step_unlearning", "learning_rate_finetuning",
                             "learning_rate_unlearning"], space)}
    return fns, meters


def _opt(**extra: Any) -> SimpleNamespace:
    """config.py's defaults (CPU: cuda=0), plus `extra`."""
    base = dict(cuda=0, device="cpu", print_freq=10_000, lr=0.1, momentum=0.9, weight_decay=1e-4, tuning_epochs=10,
                finetuning_epochs=60, unlearning_epochs=5, lr_finetuning_init=0.1, lr_unlearning_init=5e-4,
                isolation_ratio=0.01, gradient_ascent_type="Flooding", gamma=0.5, flooding=0.5, batch_size=128,
                save=1, model_name="tiny", inject_portion=0.1, target_label=0, trigger_type="gridTrigger",
                target_type="all2one", trig_w=3, trig_h=3, dataset="CIFAR10")
    return SimpleNamespace(**{**base, **extra})


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Their optimiser (backdoor_isolation.py / backdoor_unlearning.py)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)


def _ours_sgd(model: nn.Module, method: Any, stage: str) -> torch.optim.Optimizer:
    """Our optimiser for `stage` of the paper recipe (its lr at epoch 0)."""
    from harness.train.optimizers import build_optimizer

    return build_optimizer(paper_trainers("abl")[stage]["optimizer"], method.param_groups(model))


def _lrs(stage: str) -> list[float]:
    from harness.train.schedule import lr_at_epochs

    return lr_at_epochs(paper_trainers("abl")[stage])


# ------------------------------------------------------------------------------- the isolation


class _Scores:
    """A TrainSamples stand-in with given per-sample values (CIFAR-10-sized counts without data)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.poisoned, self.device = values, np.zeros(0, np.int64), torch.device("cpu")

    def score(self, fn: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(len(self.values)), self.values


def _our_selection(method_name: str, samples: Any, model: nn.Module) -> np.ndarray:
    from methods.base import build_method

    stages = {n["name"]: n for n in _stage_methods()}
    method = build_method({**stages[method_name], "isolation_checkpoint": None})
    method.build(model)  # no checkpoint: the isolation model is `model` as it is
    return np.asarray(method.select_train_samples(samples))


def _stage_methods() -> list[dict[str, Any]]:
    """The method config of every train node of a `recipe=paper` ABL cell."""
    from harness.core.config import compose_config, finalize
    from harness.run.plan import build_plan

    cfg = finalize(compose_config(["method=abl", "recipe=paper", "data=cifar10", "arch=resnet18"]))
    return [n.cfg["method"] for n in build_plan([cfg]) if n.kind == "train"]


def _official_split(fns: dict[str, Any], data: list[tuple[torch.Tensor, int]], losses_idx: np.ndarray,
                    ratio: float, folder: Path) -> tuple[list[Any], list[Any]]:
    """isolate_data's saved isolation and other examples (their file names, in `folder`)."""
    fns["isolate_data"](_opt(isolate_data_root=str(folder), isolation_ratio=ratio), data, losses_idx)
    name = f"tiny_{{}}{{}}%_examples.npy"
    isolation = np.load(folder / name.format("isolation", ratio * 100), allow_pickle=True)
    other = np.load(folder / name.format("other", 100 - ratio * 100), allow_pickle=True)
    return list(isolation), list(other)


def _isolation_case(reference: Path) -> dict[str, Any]:
    """Both sides isolate (ratio 0.01) on the same poisoned data with the same isolation weights."""
    from harness.core.config import compose_config, finalize
    from harness.data.loader import make_loader
    from harness.train.selection import TrainSamples
    from methods.abl import ABLIsolation
    from synthetic import synthetic_cifar  # benchmarks/ is on the path (benchmarks/conformance.py)

    fns, _ = _official(reference)
    folder = Path(tempfile.mkdtemp(prefix="abl-conformance-"))
    synthetic_cifar(folder, n_train=2000, n_test=16)
    cfg = finalize(compose_config([f"data.root={folder}", "data=cifar10", "backdoor=badnets", "arch=test_resnet",
                                   f"results_dir={folder / 'results'}"]))
    samples = TrainSamples(cfg, torch.device("cpu"), 0, 1)
    xs, ys, keys = [], [], []
    for x, y, k in make_loader(Path(cfg["data"]["dir"]), "train", 256, return_keys=True,
                               poison=samples.poison.for_epoch(0)):
        xs.append(x), ys.append(y), keys.extend(int(i) for i in k)
    order = torch.as_tensor(np.argsort(keys))
    x_all, y_all = torch.cat(xs)[order], torch.cat(ys)[order]  # index order, as their dataset
    data = [(x_all[i], int(y_all[i])) for i in range(len(y_all))]

    model = tiny_model()  # an isolation model that has started to learn the trigger: 2 LGA epochs
    method, opt = ABLIsolation(), torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    same_random(0)
    for _ in range(2):
        for i in torch.randperm(len(data)).split(64):
            our_step(method, model, opt, x_all[i], y_all[i], train_context(model))
    model.eval()

    losses_idx = fns["compute_loss_value"](_opt(), data, model)
    isolation, other = _official_split(fns, data, losses_idx, 0.01, folder)
    by_bytes = {np.transpose((x * 255).numpy(), (1, 2, 0)).astype("uint8").tobytes(): i
                for i, (x, _) in enumerate(data)}  # their saved images (uint8 H x W x C) -> our indices
    theirs_isolated = {by_bytes[img.tobytes()] for img, _ in isolation}
    theirs_other = {by_bytes[img.tobytes()] for img, _ in other}
    ours_isolated = set(_our_selection("abl", samples, model).tolist())
    ours_other = set(_our_selection("abl_finetune", samples, model).tolist())
    precision = np.isin(sorted(ours_isolated), samples.poisoned).mean()
    return {"isolated": (theirs_isolated, ours_isolated), "other": (theirs_other, ours_other),
            "note": f"{len(ours_isolated)} of {len(data)} isolated, {precision:.0%} of them poisoned"}


def _set_difference(pair: tuple[set[int], set[int]]) -> float:
    return float(len(pair[0] ^ pair[1]))


def _cifar_sized_steps(reference: Path) -> dict[str, tuple[int, int]]:
    """Steps per epoch of unlearning and fine-tuning with CIFAR-10's 50,000 training samples:
    their isolate_data on 50,000 stand-in samples and DataLoader at batch 128, ours from our
    selection on the same 50,000 scores and the recipe's batch (the trainer's ceil(n / batch))."""
    fns, _ = _official(reference)
    values = np.random.default_rng(0).random(CIFAR_TRAIN)
    stand_in = [(torch.zeros(3, 2, 2), 0)] * CIFAR_TRAIN  # their isolate_data squeezes, then wants C x H x W
    with tempfile.TemporaryDirectory() as folder:
        isolation, other = _official_split(fns, stand_in, np.argsort(values), 0.01, Path(folder))
    trainers = paper_trainers("abl")
    out = {}
    for stage, official_set, selecting in (("abl", isolation, "abl"), ("abl_finetune", other, "abl_finetune")):
        theirs = len(DataLoader(official_set, batch_size=_opt().batch_size))
        n = len(_our_selection(selecting, _Scores(values), tiny_model()))
        out[stage] = (theirs, math.ceil(n / int(trainers[stage]["batch_size"])))
    return out


# ---------------------------------------------------------------------------------- the checks


def check_isolation_model(reference: Path) -> list[Compared]:
    from harness.run.plan import planned_data
    from harness.core.config import compose_config, finalize
    from harness.data.loader import BatchTransform
    from harness.run.plan import build_plan
    from methods.abl import ABLIsolation

    fns, meters = _official(reference)
    x, y = tiny_batch(16)
    out: list[Compared] = []
    for gamma in (0.5, 5.0):  # CE of the tiny model ~2.3: above gamma 0.5 (descent), below 5 (ascent)
        theirs, ours = twins(tiny_model())
        meters.made.clear()
        fns["train_step"](_opt(gradient_ascent_type="LGA", gamma=gamma), [(x, y)], theirs, _sgd(theirs, 0.1),
                          nn.CrossEntropyLoss(), 1)
        method = ABLIsolation(gamma=gamma)
        logs = our_step(method, ours, _ours_sgd(ours, method, "abl_lga"), x, y, train_context(ours))
        out += [Compared(f"lga_loss_gamma_{gamma:g}", max_abs(meters.made[0].values[0], logs["loss"])),
                Compared(f"parameters_after_one_step_gamma_{gamma:g}", max_param_diff(theirs, ours)),
                Compared(f"batchnorm_statistics_after_one_step_gamma_{gamma:g}", max_param_diff(theirs, ours, True))]
        flooding = tiny_model()
        fns["train_step"](_opt(gradient_ascent_type="Flooding", flooding=gamma), [(x, y)], flooding,
                          _sgd(flooding, 0.1), nn.CrossEntropyLoss(), 1)
        out.append(Compared(f"parameters_after_one_flooding_step_{gamma:g}", max_param_diff(flooding, ours),
                            note="config.py's default loss: the same gradient as LGA"))

    class StandInCIFAR10(list):  # datasets.CIFAR10(root, train, download): 64 uint8 images, no download
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            gen = np.random.default_rng(0)
            super().__init__((gen.integers(0, 256, (32, 32, 3), dtype=np.uint8), int(gen.integers(10)))
                             for _ in range(64))

    fns["get_backdoor_loader"].__globals__["datasets"] = SimpleNamespace(CIFAR10=StandInCIFAR10)
    _, loader = fns["get_backdoor_loader"](_opt())
    import torchvision.transforms as transforms

    their_extra = [t for t in loader.dataset.transform.transforms if not isinstance(t, transforms.ToTensor)]
    cfg = finalize(compose_config(["method=abl", "recipe=paper", "data=cifar10", "arch=resnet18"]))
    data = next(planned_data(n.cfg) for n in build_plan([cfg]) if n.kind == "train"
                and n.cfg["method"]["name"] == "abl_lga")
    ours_augments = BatchTransform.from_args(None, data["augment"]) != BatchTransform()
    out += [Compared("isolation_loader_shuffles", abs(int(not isinstance(loader.sampler, SequentialSampler))
                                                      - int(data.get("shuffle", True))), "int"),
            Compared("isolation_augmentations", abs(len(their_extra) - int(ours_augments)), "int")]

    recipe = paper_trainers("abl")["abl_lga"]
    opt = _opt()
    theirs_lr = official_lrs(lambda o, e: fns["adjust_learning_rate"](o, e, opt), range(opt.tuning_epochs), opt.lr)
    out += [Compared("epochs", abs(int(recipe["epochs"]) - opt.tuning_epochs), "int"),
            Compared("batch_size", abs(int(recipe["batch_size"]) - opt.batch_size), "int"),
            Compared("lr_per_epoch", max_abs(theirs_lr, _lrs("abl_lga")))]
    return out


def check_finetune(reference: Path) -> list[Compared]:
    from harness.data.loader import BatchTransform
    from methods.abl import ABLFinetune

    fns, _ = _official(reference)
    case = _isolation_case(reference)
    steps = _cifar_sized_steps(reference)["abl_finetune"]
    opt = _opt()
    theirs_lr = official_lrs(lambda o, e: fns["learning_rate_finetuning"](o, e, opt), range(opt.finetuning_epochs),
                             opt.lr)
    recipe = paper_trainers("abl")["abl_finetune"]

    x, y = tiny_batch(16)
    theirs, ours = twins(tiny_model())
    fns["train_step_finetuing"](opt, [(x, y)], theirs, _sgd(theirs, 0.1), nn.CrossEntropyLoss(), 1)
    method = ABLFinetune()
    our_step(method, ours, _ours_sgd(ours, method, "abl_finetune"), x, y, train_context(ours))

    # Cutout: their Cutout(1, 3) on each image at the centres our augmentation draws
    length = dict(next(m for m in _stage_methods() if m["name"] == "abl_finetune"))["cutout_length"]
    images = torch.rand(64, 3, 32, 32) + 0.5
    cut_ours = BatchTransform.from_args(None, {"cutout": {"holes": 1, "length": length}})(
        images, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    cy, cx = torch.randint(0, 32, (64,), generator=replay), torch.randint(0, 32, (64,), generator=replay)
    queue = [int(v) for pair in zip(cy, cx) for v in pair]
    shim = types.SimpleNamespace(ones=np.ones, float32=np.float32, clip=np.clip,
                                 random=SimpleNamespace(randint=lambda n: queue.pop(0)))
    cutout = fns["Cutout"](1, 3)
    saved = cutout.__call__.__globals__["np"]
    cutout.__call__.__globals__["np"] = shim
    try:
        cut_theirs = torch.stack([cutout(img) for img in images])
    finally:
        cutout.__call__.__globals__["np"] = saved
    return [Compared("other_set", _set_difference(case["other"]), "int", note=case["note"]),
            Compared("steps_per_epoch_cifar10", abs(steps[0] - steps[1]), "int", note=f"{steps[0]} vs {steps[1]}"),
            Compared("epochs", abs(int(recipe["epochs"]) - opt.finetuning_epochs), "int"),
            Compared("lr_per_epoch", max_abs(theirs_lr, _lrs("abl_finetune"))),
            Compared("cutout", max_abs(cut_theirs, cut_ours), "image", note="Cutout(1, 3) at the same centres"),
            Compared("parameters_after_one_step", max_param_diff(theirs, ours)),
            Compared("batchnorm_statistics_after_one_step", max_param_diff(theirs, ours, buffers=True))]


def check_unlearning(reference: Path) -> list[Compared]:
    from harness.train.checkpointing import load_optimizer_state, save_checkpoint
    from methods.abl import ABL, ABLFinetune

    fns, meters = _official(reference)
    case = _isolation_case(reference)
    steps = _cifar_sized_steps(reference)["abl"]
    opt = _opt()
    trained = range(1, opt.unlearning_epochs)  # their loop's epoch 0 only evaluates
    theirs_lr = official_lrs(lambda o, e: fns["learning_rate_unlearning"](o, e, opt), trained, opt.lr)
    recipe = paper_trainers("abl")["abl"]
    out = [Compared("isolated_set", _set_difference(case["isolated"]), "int", note=case["note"]),
           Compared("steps_per_epoch_cifar10", abs(steps[0] - steps[1]), "int", note=f"{steps[0]} vs {steps[1]}"),
           Compared("epochs_that_ascend", abs(int(recipe["epochs"]) - len(trained)), "int"),
           Compared("lr_per_epoch", max_abs(theirs_lr, _lrs("abl"))),
           Compared("optimizer_continues_finetuning", abs(int(bool(recipe.get("init_optimizer"))) - 1), "int")]

    x_ft, y_ft = tiny_batch(16, seed=1)
    x, y = tiny_batch(16, seed=2)
    for carried in (False, True):
        theirs, ours = twins(tiny_model())
        optimizer = _sgd(theirs, opt.lr)
        method = ABL()
        if carried:  # one fine-tuning step first, then the same optimiser unlearns (theirs)
            fns["learning_rate_finetuning"](optimizer, 0, opt)
            fns["train_step_finetuing"](opt, [(x_ft, y_ft)], theirs, optimizer, nn.CrossEntropyLoss(), 1)
            finetune = ABLFinetune()
            first = _ours_sgd(ours, finetune, "abl_finetune")
            our_step(finetune, ours, first, x_ft, y_ft, train_context(ours))
        fns["learning_rate_unlearning"](optimizer, 1, opt)
        meters.made.clear()
        fns["train_step_unlearning"](opt, [(x, y)], theirs, optimizer, nn.CrossEntropyLoss(), 2)
        second = _ours_sgd(ours, method, "abl")
        if carried:  # our unlearning node continues the fine-tuning node's optimiser from its checkpoint
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "checkpoint.pt"
                save_checkpoint(path, 0, ours, first, {}, finetune, {})
                load_optimizer_state(path, second)
        logs = our_step(method, ours, second, x, y, train_context(ours))
        tag = "after_finetuning_step" if carried else "fresh_optimizer"
        out += [Compared(f"unlearning_ce_{tag}", max_abs(meters.made[0].values[0], logs["isolated_ce"])),
                Compared(f"parameters_after_one_ascent_step_{tag}", max_param_diff(theirs, ours)),
                Compared(f"batchnorm_statistics_after_one_ascent_step_{tag}", max_param_diff(theirs, ours, True))]
    return out


CHECKS = {"abl_lga": check_isolation_model, "abl_finetune": check_finetune, "abl": check_unlearning}

"""Poisons and FP beside SCLBD/BackdoorBench (one module per repository).

BadNets, Blended and SIG: its reference implementations of the three triggers and their defaults
(10% all-to-one, target 0).

Its own pipeline runs: `bd_attack_img_trans_generate(args)` (utils/aggregate_block/
bd_attack_generate.py) builds the transform its attack scripts apply to each selected training
image (PIL in: Resize to the image size, np.array, the trigger, np.clip(.., 0, 255).astype(uint8),
PIL out), and `generate_poison_index_from_label_transform` picks the poisoned samples. Both sides
get the same uint8 images (32x32 RGB, seeded, plus an all-0 and an all-255 image for the clipping);
ours read them as the loader does (k / 255, float32), and our poisoned images are compared at the
uint8 level (x * 255 rounded, exact for ours, whose triggers return k / 255).
  badnets   BackdoorBench's resource/badnet/trigger_image.png (white 3x3, bottom right) against
            `backdoor=badnets` (white, patch 3)
  blended   alpha 0.2 with OUR pattern image on both sides (BackdoorBench blends Hello Kitty; we
            use a fixed noise image): it is written to a PNG that its pipeline reads
  sig       delta 40, f 6 against `backdoor=sig` (delta 40/255, frequency null -> 6 at 32 wide)
  poisoned count  how many of 1000 samples its index rule and ours poison (which ones differ by
            construction: each side draws with its own generator)
Where rounding happens: BackdoorBench computes the trigger in float (float64, the blend pattern
and SIG's signal in float32) on uint8 levels and truncates to uint8 when it stores the image;
ours computes the same in pixel levels and truncates (harness/backdoor/base.py `from_levels`).
Modules its file imports for other attacks and that are not installed here (cv2, kornia,
pytorch_wavelets, matplotlib) are stubbed in this process, and imageio.imread reads with PIL
(np.array(Image.open(path)), what imageio returns for a PNG); nothing of theirs is edited.

FP (Fine-Pruning): defense/fp.py's `FinePrune.defense`, the optimiser and scheduler of
utils/aggregate_block/train_settings_generate.py, the step of utils/trainer_cls.py,
config/defense/fp/cifar10.yaml and config/attack/prototype/cifar10.yaml.

Why this reference: the authors' code (kangliucn/Fine-pruning-defense, Caffe) prunes a fixed 48 of
60 channels of its face network and has no fine-tuning, and VinAIResearch's fine_pruning scripts
prune on the test set and never fine-tune; BackdoorBench's FinePrune is the published method
(rank by mean activation on clean data, prune until clean accuracy drops by a set fraction, then
fine-tune) in PyTorch.

Same weights: our test_resnet trained for three epochs on scikit-learn's digits (16x16, so the last
stage is 2x2), the same clean data (300 held-out digits) on both sides. Their `defense()` runs as
it is, on the CPU (`args.device = "cpu"`), with its data plumbing (BackdoorBench datasets,
index files, plots, result files) replaced by stand-ins here; the model is handed to it as
(features, linear) children sharing our weights, so it hooks the pooled last-stage channels and
masks `linear`'s columns, as it does with its PreActResNet-18. Its stop rule reads its "test"
loaders: here the clean data, which is what ours reads (BackdoorBench reads the test split).
  ranking                 the channel order (`torch.argsort` of their mean activations) vs ours
  accuracy per count      their clean accuracy at each pruned count (their mask at step n prunes
                          n - 1 channels) vs ours with as many channels pruned
  first count that fails  the first pruned count whose accuracy breaks the rule, both sides (we
                          keep one channel fewer: the last count that passes; their loop goes on
                          pruning the model it keeps, so it fine-tunes the failing one)
  update                  one fine-tuning step on the clean data with their optimiser (lr 0.01,
                          momentum 0.9, wd 5e-4) and their `one_forward_backward`, vs our trainer's
                          step, with their final mask on both sides; parameters and BatchNorm stats
  lr per epoch            their CosineAnnealingLR(T_max 100) stepped per epoch over the defense's
                          100 epochs and the attack's 100 vs `lr_at_epochs` of our recipe=paper nodes
  settings                epochs, batch, lr, momentum, wd, clean ratio, accuracy tolerance
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import sys
import tempfile
import types
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conformance_checks.common import (Compared, import_file, load_functions, max_abs, our_step, paper_trainers,
                                       same_random, tiny_model, train_context, twins)

REPOSITORY = "SCLBD/BackdoorBench"
MISSING_MODULES = ("cv2", "kornia", "pytorch_wavelets", "matplotlib", "matplotlib.pyplot")


class _Absent:
    """Stands in for a name of a module that is not installed (never called by these checks)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} is a stub in the conformance check")

    def __getattr__(self, item: str) -> "_Absent":
        return _Absent(f"{self.name}.{item}")


def _stub_module(name: str) -> types.ModuleType:
    """A module whose every public name is an `_Absent` (dunder lookups fail as usual)."""
    module = types.ModuleType(name)

    def absent(item: str) -> _Absent:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Absent(f"{name}.{item}")

    module.__getattr__ = absent  # type: ignore[attr-defined]
    return module


def _stub_missing() -> None:
    for name in MISSING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _stub_module(name)
    try:
        importlib.import_module("imageio")
    except ImportError:
        from PIL import Image

        imageio = types.ModuleType("imageio")
        imageio.imread = lambda path: np.array(Image.open(path))  # type: ignore[attr-defined]
        sys.modules["imageio"] = imageio


def _their_generator(reference: Path) -> types.ModuleType:
    _stub_missing()
    return import_file(reference / "utils" / "aggregate_block" / "bd_attack_generate.py", search=reference)


def _images(n: int = 14, seed: int = 0) -> np.ndarray:
    """uint8 (n + 2, 32, 32, 3): seeded random images, then all-0 and all-255 (clipping)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return np.concatenate([images, np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 32, 32, 3), 255, np.uint8)])


def _theirs(transform: Any, images: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.stack([np.array(transform(Image.fromarray(img), target=0, image_serial_id=i))
                     for i, img in enumerate(images)])


def _ours(poison: Any, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0  # as our loader reads them
    out = poison.trigger(x)
    return (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _byte_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) if a.shape == b.shape else float("inf")


def _count_check(reference: Path, name: str, clean_label: bool, ours: Any) -> Compared:
    from harness.backdoor.plan import select_indices

    _their_generator(reference)
    index = import_file(reference / "utils" / "backdoor_generate_poison_index.py", search=reference)
    labels_mod = importlib.import_module("utils.bd_label_transform.backdoor_label_transform")
    labels = np.arange(1000) % 10
    np.random.seed(0)
    theirs = index.generate_poison_index_from_label_transform(labels, labels_mod.AllToOne_attack(0), train=True,
                                                               pratio=0.1, clean_label=clean_label)
    picked, _ = select_indices(labels, ours, seed=0, num_classes=10)
    note = "" if not clean_label else "both from the target class only"
    return Compared(f"{name}_poisoned_count", abs(int(theirs.sum()) - len(picked)), "int", note)


def check_badnets(reference: Path) -> list[Compared]:
    from harness.backdoor.badnets import BadNets

    generate = _their_generator(reference)
    args = SimpleNamespace(attack="badnet", img_size=(32, 32, 3),
                           patch_mask_path=str(reference / "resource" / "badnet" / "trigger_image.png"))
    train_t, test_t = generate.bd_attack_img_trans_generate(args)
    images = _images()
    ours = BadNets(patch_size=3, pattern="white")
    return [Compared("badnets_train_images", _byte_diff(_theirs(train_t, images), _ours(ours, images)), "image"),
            Compared("badnets_test_images", _byte_diff(_theirs(test_t, images), _ours(ours, images)), "image"),
            _count_check(reference, "badnets", False, ours)]


def check_blended(reference: Path) -> list[Compared]:
    from PIL import Image

    from harness.backdoor.blended import Blended

    generate = _their_generator(reference)
    ours = Blended(alpha=0.2)
    levels = (ours.pattern(3, 32, 32) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pattern.png"
        Image.fromarray(levels).save(path)
        args = SimpleNamespace(attack="blended", img_size=(32, 32, 3), attack_trigger_img_path=str(path),
                               attack_train_blended_alpha=0.2, attack_test_blended_alpha=0.2)
        train_t, test_t = generate.bd_attack_img_trans_generate(args)
        images = _images()
        theirs_train, theirs_test = _theirs(train_t, images), _theirs(test_t, images)
    mine = _ours(ours, images)
    return [Compared("blended_train_images", _byte_diff(theirs_train, mine), "image",
                     "the same pattern image (ours) on both sides"),
            Compared("blended_test_images", _byte_diff(theirs_test, mine), "image"),
            _count_check(reference, "blended", False, ours)]


def check_sig(reference: Path) -> list[Compared]:
    from harness.backdoor.sig import SIG

    generate = _their_generator(reference)
    args = SimpleNamespace(attack="sig", img_size=(32, 32, 3), sig_delta=40, sig_f=6)
    train_t, test_t = generate.bd_attack_img_trans_generate(args)
    images = _images()
    ours = SIG()  # defaults: delta 40/255, f 6 at 32 wide
    return [Compared("sig_train_images", _byte_diff(_theirs(train_t, images), _ours(ours, images)), "image"),
            Compared("sig_test_images", _byte_diff(_theirs(test_t, images), _ours(ours, images)), "image"),
            _count_check(reference, "sig", True, ours)]


# ---------------------------------------------------------------------------------------------- FP

SIZE, CLEAN, EPOCHS = 16, 300, 3
CLEAN_SAMPLES = 2500  # 5% of CIFAR-10's training split


def digits_model_and_clean_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A test_resnet trained 3 epochs (seeded) on all digits but the last 300, and those 300."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    model = tiny_model(in_chans=1, img_size=SIZE)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    train_x, train_y = x[:-CLEAN], y[:-CLEAN]
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(train_y), generator=gen).split(64):
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), x[-CLEAN:], y[-CLEAN:]


class Flat(nn.Module):
    """A classifier as BackdoorBench's PreActResNet-18 presents it: children (features, linear),
    the last being the linear head it hooks and masks (our weights, shared)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # first child: everything up to the pooled features
        self.linear = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.model.body
        return self.linear(body.forward_head(body.forward_features(self.model.normalize(x)), pre_logits=True))


class Clean(torch.utils.data.Dataset):
    """The clean data as BackdoorBench's dataset wrappers are used by `defense()` (stand-in)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.wrapped_dataset = self
        self.getitem_all_switch = False

    def subset(self, idx: Any) -> None:
        self.x, self.y = self.x[torch.as_tensor(np.asarray(idx))], self.y[torch.as_tensor(np.asarray(idx))]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Samples:
    """The clean data as our trainer hands it to `select_train_samples` (harness/train/selection.py's
    contract: (indices, values) over every sample, sorted by index)."""

    poisoned = np.zeros(0, dtype=np.int64)

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> None:
        self.x, self.y, self.batch = x, y, batch

    def score(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = [fn(self.x[i:i + self.batch], self.y[i:i + self.batch]).double().numpy()
                   for i in range(0, len(self.y), self.batch)]
        return np.arange(len(self.y)), np.concatenate(out)


class _Recorder:
    """Metric_Aggregator stand-in: keeps each pruning step's metrics (theirs also writes CSVs)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def __call__(self, metric: dict[str, Any]) -> None:
        self.history.append(metric)

    def to_dataframe(self):
        return SimpleNamespace(to_csv=lambda *a, **k: None)

    def summary(self):
        return SimpleNamespace(to_csv=lambda *a, **k: None)


def _torch_spy(argsorts: list[tuple[torch.Tensor, torch.Tensor]]) -> types.ModuleType:
    """`torch` for their module namespace, recording what `torch.argsort` ranks (their seq_sort)."""
    class Spy(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    spy = Spy("torch")

    def argsort(values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        order = torch.argsort(values, *args, **kwargs)
        argsorts.append((values.detach().clone(), order.clone()))
        return order

    spy.argsort = argsort  # type: ignore[attr-defined]
    return spy


def run_theirs(reference: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: SimpleNamespace,
               ) -> SimpleNamespace:
    """Their FinePrune.defense() on `model` (a Flat view) and the clean data; one fine-tuning step."""
    trainer_cls = reference / "utils" / "trainer_cls.py"
    # the class body's defaults and annotations name these (their module imports them)
    helpers = load_functions(trainer_cls, ["given_dataloader_test", "ModelTrainerCLS_v2"],
                             {**vars(typing), "torch": torch, "logging": logging, "np": np,
                              "DataLoader": torch.utils.data.DataLoader, "seed_worker": None})
    opt_sched = load_functions(reference / "utils" / "aggregate_block" / "train_settings_generate.py",
                               ["argparser_opt_scheduler"], {"torch": torch})["argparser_opt_scheduler"]
    seen: dict[str, Any] = {}
    argsorts: list[tuple[torch.Tensor, torch.Tensor]] = []
    recorder = _Recorder()

    class OneStep:  # BackdoorModelTrainer stand-in: their own step, once, on the first batch
        def __init__(self, net: nn.Module) -> None:
            self.net = net

        def train_with_test_each_epoch_on_mix(self, trainloader, _clean, _bd, epochs, criterion, optimizer,
                                              scheduler, amp, device, *rest, **kwargs) -> None:
            step = object.__new__(helpers["ModelTrainerCLS_v2"])
            step.model, step.criterion, step.optimizer, step.non_blocking, step.amp = (
                self.net, criterion, optimizer, False, amp)
            step.scaler = torch.amp.GradScaler("cuda", enabled=False)
            xb, yb = next(iter(trainloader))
            seen.update(loss=step.one_forward_backward(xb, yb, device)[0], optimizer=optimizer, scheduler=scheduler,
                        epochs=epochs, net=self.net)

    def prepro(dataset: Clean) -> Clean:
        return dataset

    namespace = {
        "torch": _torch_spy(argsorts), "nn": nn, "np": np, "math": math, "os": __import__("os"),
        "logging": logging, "prune": importlib.import_module("torch.nn.utils.prune"),
        "deepcopy": __import__("copy").deepcopy,
        "defense": object, "prepro_cls_DatasetBD_v2": prepro, "choose_index": lambda a, n: np.arange(n),
        "given_dataloader_test": helpers["given_dataloader_test"], "Metric_Aggregator": lambda: recorder,
        "general_plot_for_epoch": lambda *a, **k: None, "argparser_opt_scheduler": opt_sched,
        "BackdoorModelTrainer": OneStep, "save_defense_result": lambda **k: None,
    }
    cls = load_functions(reference / "defense" / "fp.py", ["FinePrune"], namespace)["FinePrune"]
    fp = cls()
    model.eval()
    model.requires_grad_(False)  # as their prepare() leaves it
    fp.netC, fp.args = model, args
    fp.attack_result = {"clean_train": Clean(x, y), "clean_test": Clean(x, y), "bd_test": Clean(x, y)}
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fp.defense()
    finally:
        logging.disable(logging.NOTSET)
    activation, order = argsorts[0]
    return SimpleNamespace(activation=activation, order=order.numpy(), history=recorder.history, **seen)


def _args(reference: Path, save: str, batch: int) -> SimpleNamespace:
    cfg = yaml.safe_load((reference / "config" / "defense" / "fp" / "cifar10.yaml").read_text())
    return SimpleNamespace(**{**cfg, "device": "cpu", "num_workers": 0, "pin_memory": False, "non_blocking": False,
                              "amp": False, "defense_save_path": save, "batch_size": batch, "model": "preactresnet18"})


def _lrs_of(opt_sched: Callable, args: SimpleNamespace, epochs: int) -> list[float]:
    """The lr their optimiser has at the start of each epoch, its scheduler stepped once per epoch."""
    optimizer, scheduler = opt_sched(nn.Linear(1, 1), args)
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def check_fp(reference: Path) -> list[Compared]:
    from harness.train.optimizers import build_optimizer
    from harness.train.schedule import lr_at_epochs
    from methods.fp import FinePruning

    base, x, y = digits_model_and_clean_data()
    theirs_model, ours_model = twins(base)
    with tempfile.TemporaryDirectory() as save:
        args = _args(reference, save, batch=CLEAN)  # one batch: the fine-tuning step sees all 300
        same_random(0)
        theirs = run_theirs(reference, Flat(theirs_model), x, y, args)

    recipe = paper_trainers("fp")
    method = FinePruning(**{k: v for k, v in _paper_method("fp").items() if k != "name"})
    module = method.build(ours_model).eval()
    method.select_train_samples(Samples(x, y))
    ours = method.report

    # accuracy at each count they evaluated (their mask at step n prunes n - 1 channels)
    pairs = [(h["test_acc"], ours["accuracies"][max(h["num_pruned"] - 1, 0)]) for h in theirs.history
             if max(h["num_pruned"] - 1, 0) < len(ours["accuracies"])]
    their_kept = int((theirs.net.linear.weight_mask == 0).all(0).sum())  # pruned columns of their linear
    step = math.ceil(len(theirs.order) * args.once_prune_ratio)

    # one fine-tuning step with their final mask on both sides
    module.mask.fill_(1.0)
    module.mask[torch.as_tensor(theirs.order[:their_kept].copy())] = 0.0
    optimizer = build_optimizer(recipe["fp"]["optimizer"], method.param_groups(module))
    same_random(0)
    logs = our_step(method, module, optimizer, x, y, train_context(module))
    params = _param_diff(theirs_model, module.model)
    buffers = _param_diff(theirs_model, module.model, buffers=True)

    opt_sched = load_functions(reference / "utils" / "aggregate_block" / "train_settings_generate.py",
                               ["argparser_opt_scheduler"], {"torch": torch})["argparser_opt_scheduler"]
    attack_yaml = reference / "config" / "attack" / "prototype" / "cifar10.yaml"
    attack = SimpleNamespace(**yaml.safe_load(attack_yaml.read_text()))
    defense_cfg = yaml.safe_load((reference / "config" / "defense" / "fp" / "cifar10.yaml").read_text())
    steps = len(torch.utils.data.DataLoader(range(CLEAN_SAMPLES), batch_size=defense_cfg["batch_size"], shuffle=True))
    fp_cfg = _paper_method("fp")
    ties = len(theirs.activation) - len(torch.unique(theirs.activation))
    return [
        Compared("ranking", int((theirs.order != ours["order"]).sum()), "int",
                 f"{len(theirs.order)} channels, {ties} tied activations"),
        Compared("accuracy_per_pruned_count", max(abs(a - b) for a, b in pairs), "float",
                 f"{len(pairs)} counts compared"),
        Compared("first_count_breaking_the_rule", abs(their_kept - (ours["pruned"] + 1)), "int",
                 f"theirs fine-tunes {their_kept} pruned (prune step {step}), we keep {ours['pruned']}"),
        Compared("loss", abs(theirs.loss - float(logs["loss"].detach()))),
        Compared("parameters_after_one_step", params),
        Compared("batchnorm_statistics_after_one_step", buffers),
        Compared("epochs", abs(recipe["fp"]["epochs"] - defense_cfg["epochs"]), "int"),
        Compared("lr_per_epoch", max_abs(_lrs_of(opt_sched, SimpleNamespace(**defense_cfg), defense_cfg["epochs"]),
                                         lr_at_epochs(recipe["fp"]))),
        Compared("batch_size", abs(recipe["fp"]["batch_size"] - defense_cfg["batch_size"]), "int"),
        Compared("steps_per_epoch_2500", abs(math.ceil(CLEAN_SAMPLES / recipe["fp"]["batch_size"]) - steps), "int"),
        Compared("momentum_weight_decay", max_abs([recipe["fp"]["optimizer"]["momentum"],
                                                   recipe["fp"]["optimizer"]["weight_decay"]],
                                                  [defense_cfg["sgd_momentum"], defense_cfg["wd"]])),
        Compared("clean_fraction_and_tolerance", max_abs([fp_cfg["clean_subset"], fp_cfg["max_acc_drop"]],
                                                         [defense_cfg["ratio"], defense_cfg["acc_ratio"]])),
        Compared("upstream_erm_epochs", abs(recipe["erm"]["epochs"] - attack.epochs), "int"),
        Compared("upstream_erm_lr_per_epoch", max_abs(_lrs_of(opt_sched, attack, attack.epochs),
                                                      lr_at_epochs(recipe["erm"]))),
        Compared("upstream_erm_batch_size", abs(recipe["erm"]["batch_size"] - attack.batch_size), "int"),
    ]


def _param_diff(theirs: nn.Module, ours: nn.Module, buffers: bool = False) -> float:
    """Largest difference of our parameters (or floating buffers) and theirs, by our names (their
    masked head holds its raw weight as `weight_orig`: compared raw, as both sides update it)."""
    mine = dict(ours.named_buffers() if buffers else ours.named_parameters())
    other = {**dict(theirs.named_buffers()), **dict(theirs.named_parameters())}
    diffs = []
    for name, value in mine.items():
        if not value.is_floating_point():
            continue
        match = other.get(name, other.get(name + "_orig"))
        diffs.append(float("inf") if match is None else max_abs(match, value))
    return max(diffs, default=0.0)


def _paper_method(method: str) -> dict[str, Any]:
    from harness.core.config import compose_config

    return compose_config([f"method={method}", "recipe=paper", "data=cifar10", "arch=resnet18"])["method"]


CHECKS = {"badnets": check_badnets, "blended": check_blended, "sig": check_sig, "fp": check_fp}

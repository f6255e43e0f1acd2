"""Small builders the tests share."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.classifier import Classifier
from architectures.presets import build_classifier
from harness.backdoor.artifacts import poison_artifacts
from harness.core.config import compose_config, finalize
from harness.data.loader import make_loader
from harness.data.shards import load_manifest


def digits_classifier(digits_dir: Path, arch: str = "test_resnet", seed: int = 0) -> Classifier:
    manifest = load_manifest(digits_dir)
    torch.manual_seed(seed)
    return build_classifier({"name": arch, "kwargs": {}}, num_classes=manifest["num_classes"],
                            in_chans=manifest["channels"], img_size=manifest["image_size"][0],
                            mean=manifest["mean"], std=manifest["std"])


def train_erm(model: Classifier, digits_dir: Path, epochs: int = 6, lr: float = 0.05) -> Classifier:
    """Plain single-process ERM training, for tests that need a model that classifies well."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        for x, y in make_loader(digits_dir, "train", 64, shuffle=True, epoch=epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def digits_batch(digits_dir: Path, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader(digits_dir, "test", n)))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


UPSTREAM_CHECKPOINTS = ("backdoored_checkpoint", "teacher_checkpoint", "isolation_checkpoint",
                        "unlearned_checkpoint", "sd_checkpoint")  # FT, FP, NAD, CBD, ABL; RNP; D-BR


def method_cell(name: str, data_root: Path, results: Path, upstream: str | None, epochs: int = 2,
                extra: tuple[str, ...] = ()) -> dict:
    """A tiny cell of method `name` (2 steps of 64 per epoch, 2-step attacks) that trains from
    `upstream` (a checkpoint) wherever the method starts from one (its upstream args, ADML's init)."""
    import inspect

    from harness.core.config import compose_config, finalize
    from harness.core.registry import METHODS

    cfg = finalize(compose_config([f"data.root={data_root}", f"results_dir={results}", "trainer=tiny",
                                   f"trainer.epochs={epochs}", "data.train_limit=128", f"method={name}", *extra]))
    for part in (cfg["method"], cfg["method"].get("base") or {}):  # fewer attack steps: seconds, not minutes
        if "steps" in (part.get("attack") or {}):
            part["attack"]["steps"] = 2
    accepted = inspect.signature(METHODS.get(name).__init__).parameters
    if "isolation_ratio" in accepted:  # ABL's 1% of 128 would isolate one sample: too few for train-mode BatchNorm
        cfg["method"]["isolation_ratio"] = 0.05
    if upstream is not None:
        for arg in UPSTREAM_CHECKPOINTS:
            if arg in accepted:
                cfg["method"][arg] = upstream
        if name.startswith("adml_"):
            cfg["trainer"]["init_from"] = upstream
    return cfg


def fit_until(rank: int, world_size: int, device: torch.device, cfg: dict, work_dir: Path, last_epoch: int) -> None:
    """A rank's training that dies right after epoch `last_epoch`'s checkpoint, as a killed
    process would (every rank leaves at that epoch's closing barrier; nothing is cleaned up)."""
    import os

    import torch.distributed as dist

    from harness.train import trainer

    real, done = dist.barrier, [0]

    def barrier(*args, **kwargs):
        real(*args, **kwargs)
        done[0] += 1
        if done[0] == last_epoch + 1:  # _fit waits at one barrier per epoch, after its checkpoint
            if world_size > 1 and rank == 0:  # spawned ranks: their parent (run_ranks) dies too
                import signal

                os.kill(os.getppid(), signal.SIGKILL)
            os._exit(0)

    dist.barrier = barrier
    trainer._fit_and_write_summary(rank, world_size, device, cfg, work_dir)


def killed_run(cfg: dict, work_dir: Path, world_size: int, last_epoch: int) -> None:
    """Train `cfg` in a separate process (its ranks under it) that dies after `last_epoch`."""
    import torch.multiprocessing as mp

    process = mp.get_context("spawn").Process(target=_killed_run_main, args=(cfg, work_dir, world_size, last_epoch))
    process.start()
    process.join()


def _killed_run_main(cfg: dict, work_dir: Path, world_size: int, last_epoch: int) -> None:
    from harness.train.ranks import run_ranks

    run_ranks(fit_until, world_size, cfg, cfg, work_dir, last_epoch, store_dir=work_dir)


@functools.lru_cache(maxsize=8)
def _composed_poison_cell(data_root: Path, extra: tuple[str, ...]) -> dict:
    return compose_config([f"data.root={data_root}", "trainer=tiny", "data.train_limit=256", "eval.limit=64",
                           "attack=[fgsm]", *extra])


def tiny_poison_cell(data_root: Path, results: Path, *extra: str, seed: int = 0) -> dict:
    """A tiny digits cell with `extra` overrides (a learned poison's settings), composed once per
    override set (Hydra takes seconds on a loaded machine)."""
    return finalize({**copy.deepcopy(_composed_poison_cell(data_root, tuple(extra))), "results_dir": str(results),
                     "seed": seed})


def build_poison_artifacts(cfg: dict) -> str:
    """Build the cell's poison artifacts in order (a surrogate first, where one is needed); the
    poison's key, the last built."""
    key = ""
    for artifact in poison_artifacts(cfg):
        key = artifact.build(device="cpu")
    return key

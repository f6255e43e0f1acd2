"""Checks a driver makes before any work: the training split's size, the results store's writability.

Both read or touch the outside world (the dataset manifest, the store), so they live here, above the
pure config checks of harness.core.validate.
"""
from __future__ import annotations

import functools
import json
import os
import uuid
from pathlib import Path
from typing import Any

from harness.backdoor.plan import split_labels
from harness.core.config import ConfigError, trains_on_poison
from harness.core.errors import DataError
from harness.core.locations import is_uri
from harness.data.shards import MANIFEST, load_manifest
from harness.data.loader import split_count
from harness.data.validation import (carve, check_validation_settings, emptied_classes, empty_class_message,
                                     validation_settings, validation_size)
from harness.store.storage import STAGING, open_store
from harness.train.best_epoch import check_select


def train_split_size(cfg: dict[str, Any]) -> int | None:
    """Images one epoch of the cell trains on (data.train_limit applied, the validation split held
    out), wherever the dataset lives (a folder or a URI); None until it is prepared. Counted once per
    (dataset, limit, manifest version): a 10,000-cell grid reads each manifest once (a remote one
    once per process)."""
    n_split = _split_size(cfg)
    if n_split is None:
        return None
    try:
        fraction, cap = validation_settings(cfg.get("trainer") or {})
    except (TypeError, ValueError):
        return n_split  # check_trainer_config names the bad trainer.validation
    return n_split - min(validation_size(n_split, fraction, cap), n_split - 1)


def check_validation(cfg: dict[str, Any]) -> None:
    """The validation split fits the training split and leaves every class in it, and a selection
    rule has the probes it needs: ConfigError with the numbers and the fix. Labels are read only
    when a class could be emptied (a class no larger than the split, or data.train_limit set) and
    the data is local; otherwise the trainer checks before its first step."""
    tcfg = cfg.get("trainer") or {}
    if (cfg.get("method") or {}).get("clean_subset") is not None:  # trains on its clean subset, all of it
        if str(tcfg.get("select", "last") or "last") != "last":
            raise ConfigError(f"trainer.select={tcfg['select']}: method={cfg['method'].get('name')} fine-tunes on "
                              f"the defender's clean subset (method.clean_subset), which holds out no validation "
                              f"split to select on. Fix: trainer.select=last")
        return
    n_split = _split_size(cfg)
    try:
        check_validation_settings(tcfg)
        check_select(tcfg, validation_size(max(n_split or 1, 1), *validation_settings(tcfg)) > 0,
                     trains_on_poison(cfg))
        held = carve(n_split, tcfg, int(cfg["seed"])) if n_split is not None else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    data = cfg.get("data") or {}
    location = str(data.get("dir", ""))
    if held is None or is_uri(location):
        return
    counts = load_manifest(location)["splits"]["train"].get("label_counts")
    if data.get("train_limit") is None and counts and min(c for c in counts if c > 0) > held.size:
        return  # no class is small enough to be held out whole
    emptied = emptied_classes(split_labels(Path(location), "train")[:n_split], held)
    if emptied:
        raise ConfigError(empty_class_message(emptied, held))


def _split_size(cfg: dict[str, Any]) -> int | None:
    """Images of the training split after data.train_limit (before the validation split)."""
    data = cfg.get("data") or {}
    limit = data.get("train_limit")
    try:
        limit = None if limit is None else int(limit)
    except (TypeError, ValueError):
        return None  # validate_numbers names the bad data.train_limit
    if limit is not None and limit < 1:
        return None  # validate_numbers names the bad data.train_limit
    location = str(data.get("dir", ""))
    if is_uri(location):
        return _remote_train_split_size(location, limit)
    manifest = Path(location) / MANIFEST
    if not manifest.is_file():
        return None
    return _train_split_size(location, limit, manifest.stat().st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _train_split_size(data_dir: str, limit: int | None, manifest_mtime_ns: int) -> int:
    return split_count(data_dir, "train", 0, 1, limit=limit)


_REMOTE_SIZES: dict[tuple[str, int | None], int] = {}


def _remote_train_split_size(location: str, limit: int | None) -> int | None:
    """Cached once known (a manifest not there yet is looked for again after preparing)."""
    if (location, limit) not in _REMOTE_SIZES:
        try:
            load_manifest(location)
        except DataError:
            return None  # not prepared there (yet): the numbers that need it are checked after preparing
        _REMOTE_SIZES[(location, limit)] = split_count(location, "train", 0, 1, limit=limit)
    return _REMOTE_SIZES[(location, limit)]


@functools.lru_cache(maxsize=None)
def check_results_writable(location: str) -> None:
    """Write and remove a probe object in the results store; ConfigError naming the location if that fails.
    Once per store and process (cached on success): a 10,000-cell grid probes its store once."""
    probe = f"{STAGING}/probe-{uuid.uuid4().hex}.txt"
    try:
        store = open_store(location)
        store.write_bytes(probe, b"robustgrid write probe", durable=False)
        store.delete(probe)
    except Exception as err:  # any store (local, NFS, s3://) says "no" in its own way
        raise ConfigError(f"results_dir={location} is not writable ({type(err).__name__}: {err}); "
                          f"set results_dir to a folder or bucket you can write to") from None


def check_folder_writable(folder: str | os.PathLike, what: str) -> None:
    """Create `folder` and a probe file in it; ConfigError naming it (and `what` sets it) if that fails."""
    path = Path(folder).expanduser()
    probe = path / f".robustgrid-probe-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"robustgrid write probe")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{what}={folder} is not writable ({type(err).__name__}: {err}); "
                          f"set {what} to a folder you can write to") from None


def check_arch(cfg: dict[str, Any]) -> None:
    """The cell's architecture builds with its settings (architectures.presets.check_architecture),
    for the dataset's shape when its manifest is at hand (else a CIFAR-like placeholder); once per
    distinct (architecture, shape): a 10,000-cell grid builds each architecture once."""
    channels, classes, size = _dataset_shape(str((cfg.get("data") or {}).get("dir", "")))
    size = int((cfg.get("data") or {}).get("img_size") or size)
    _check_arch(json.dumps(cfg["arch"], sort_keys=True), classes, channels, size)


@functools.lru_cache(maxsize=256)
def _check_arch(arch_json: str, classes: int, channels: int, size: int) -> None:
    from architectures.presets import check_architecture

    try:
        check_architecture(json.loads(arch_json), num_classes=classes, in_chans=channels, img_size=size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_clean_subset(cfg: dict[str, Any]) -> None:
    """A post-training defense's clean fraction (`method.clean_subset`) in (0, 1], before any work
    (the train node's run_config would refuse it only when the node runs)."""
    fraction = (cfg.get("method") or {}).get("clean_subset")
    if fraction is None:
        return
    try:
        ok = 0 < float(fraction) <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"method.clean_subset must be in (0, 1], got {fraction!r}: it is the share of the "
                          f"training split the defender holds as clean data (BackdoorBench: 0.05, RNP 0.01). "
                          f"Fix: method.clean_subset=0.05")


def check_method_arch(cfg: dict[str, Any]) -> None:
    """A method that prunes BatchNorm neurons (`Method.needs_batchnorm`: CLP, ANP) on an architecture
    without BatchNorm2d (a ViT) is refused before any work, naming both and the fix; once per
    distinct architecture (built on the meta device, like check_arch)."""
    from harness.core.registry import METHODS

    check_clean_subset(cfg)
    method = (cfg.get("method") or {}).get("name")
    if cfg.get("model") or not method or not getattr(METHODS.get(method), "needs_batchnorm", False):
        return
    channels, classes, size = _dataset_shape(str((cfg.get("data") or {}).get("dir", "")))
    size = int((cfg.get("data") or {}).get("img_size") or size)
    if not _arch_has_batchnorm(json.dumps(cfg["arch"], sort_keys=True), classes, channels, size):
        from methods.backdoor.masks import no_batchnorm_message

        arch = cfg["arch"].get("model") or cfg["arch"].get("name")
        raise ConfigError(no_batchnorm_message(method, str(arch)))


@functools.lru_cache(maxsize=256)
def _arch_has_batchnorm(arch_json: str, classes: int, channels: int, size: int) -> bool:
    import torch
    from torch import nn

    from architectures.presets import build_classifier

    with torch.device("meta"):
        model = build_classifier(json.loads(arch_json), num_classes=classes, in_chans=channels, img_size=size,
                                 mean=[0.5] * channels, std=[0.5] * channels)
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _dataset_shape(data_dir: str) -> tuple[int, int, int]:
    """(channels, classes, image size) from the manifest; (3, 10, 32) before the data exists."""
    if (data_dir, None) in _SHAPES:
        return _SHAPES[(data_dir, None)]
    try:
        manifest = load_manifest(data_dir)
    except DataError:
        return 3, 10, 32
    _SHAPES[(data_dir, None)] = (int(manifest["channels"]), int(manifest["num_classes"]), int(manifest["image_size"][0]))
    return _SHAPES[(data_dir, None)]


_SHAPES: dict[tuple[str, None], tuple[int, int, int]] = {}

"""Poisons whose trigger is computed first (LF's universal perturbation, LC's adversarial images).

A `LearnedPoison` declares an artifact: arrays built once per key from the training split (and,
for most, a clean surrogate model, harness/backdoor/surrogate.py), before any training that uses
them. In a plan it is an artifact node `artifact/poison/<key>` (harness/backdoor/artifacts.py),
an input of the cell's train and eval nodes; `ensure_poison_artifact` builds it (a no-op when the
store has it). The loader's poison plan (harness/backdoor/plan.py) then loads the arrays from the
store at construction, for training and for the triggered test set alike, so both see one trigger.

Stored under `<results_dir>/artifacts/poison/<key>/`: `arrays.npz` (plain arrays, read with
allow_pickle=False: never code) first, `meta.json` last, each atomically; a folder with a meta
holds whole arrays. The key hashes the poison's name and artifact settings, the surrogate's key
(its settings and the cell's architecture), the dataset's sha256 and native image size, and the
source of the files that build it (a fix there rebuilds). Triggers are built and applied at the
dataset's native resolution (the loader poisons before resizing), so `data.img_size` does not
enter the key.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from harness.backdoor.base import Poison, build_poison, to_levels
from harness.store.storage import open_store

ARRAYS = "arrays.npz"
META = "meta.json"


def progress(message: str) -> None:
    """An artifact's progress line: on stderr, flushed (Ray forwards it to the driver)."""
    print(message, file=sys.stderr, flush=True)


class LearnedPoison(Poison):
    """A poison whose trigger needs an artifact: subclasses set `artifact_fields` (the settings the
    artifact depends on) and implement `build_artifact` and `use_artifact`."""

    artifact_fields: ClassVar[tuple[str, ...]] = ()
    needs_surrogate: ClassVar[bool] = True
    trigger_needs_artifact: ClassVar[bool] = True  # False: only training variants read it (LC)

    def __init__(self, surrogate: dict[str, Any] | None = None, **common) -> None:
        super().__init__(**common)
        from harness.backdoor.surrogate import SurrogateConfig

        self.surrogate = SurrogateConfig.from_dict(surrogate or {})
        self._loaded: str | None = None  # the key of the artifact in use

    def artifact_settings(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.artifact_fields}
        return {"name": self.name, "target": self.target, **out}

    def build_artifact(self, data_dir: str | Path, model: torch.nn.Module | None, device: torch.device | str,
                       log: Callable[[str], None]) -> dict[str, np.ndarray]:
        """The arrays of the artifact, from the dataset's splits at native resolution (harness.backdoor.
        surrogate.load_native_split) and the clean surrogate `model` (None unless `needs_surrogate`)."""
        raise NotImplementedError

    def use_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the stored arrays as this poison's trigger state."""
        raise NotImplementedError

    def require_loaded(self) -> None:
        if self._loaded is None:
            raise RuntimeError(f"backdoor {self.name}: its trigger is an artifact that is not loaded. Fix: build the "
                               f"poison through harness.backdoor.plan.train_plan/test_plan (they load it from the "
                               f"results store), after the plan's artifact/poison/<key> node has run")

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["surrogate"] = vars(self.surrogate)
        return out


class StoredTriggerPoison(LearnedPoison):
    """A learned poison whose artifact is one trigger image in pixel levels (`trigger`, uint8, C x H x W
    at the dataset's native resolution), added to each image in levels (LF, TrojanNN)."""

    _levels: torch.Tensor | None = None

    def use_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        self._levels = torch.from_numpy(arrays["trigger"].astype(np.float64))

    def trigger_levels(self) -> torch.Tensor:
        """The stored trigger (C, H, W) in pixel levels, float64."""
        self.require_loaded()
        assert self._levels is not None
        return self._levels

    def levels_plus_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """x in pixel levels plus the trigger (float64, not yet clipped); x must be at native resolution."""
        levels = self.trigger_levels()
        if tuple(levels.shape) != tuple(x.shape[1:]):
            raise ValueError(f"{self.name} trigger is {tuple(levels.shape)}, the images {tuple(x.shape[1:])}: the "
                             f"trigger is built at the dataset's native resolution")
        return to_levels(x) + levels.to(x.device)


def _code_hash(poison: LearnedPoison) -> str:
    files = [Path(__file__), Path(sys.modules[type(poison).__module__].__file__ or "")]
    from harness.backdoor import surrogate

    files.append(Path(surrogate.__file__))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def poison_artifact_key(poison: LearnedPoison, data_dir: str | Path, arch_cfg: dict[str, Any]) -> str:
    """The key of the poison's artifact for this dataset (and the cell's architecture, when a
    surrogate model is trained)."""
    from harness.backdoor.surrogate import surrogate_key
    from harness.data.integrity import dataset_sha256
    from harness.data.shards import load_manifest

    manifest = load_manifest(Path(data_dir))
    ident = {"poison": poison.artifact_settings(), "data": dataset_sha256(manifest),
             "image_size": list(manifest["image_size"]), "code": _code_hash(poison),
             "surrogate": surrogate_key(data_dir, arch_cfg, poison.surrogate) if poison.needs_surrogate else None}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def artifact_rel(key: str) -> str:
    """The artifact's folder, relative to the results store's root."""
    return f"artifacts/poison/{key}"


def learned_poison(cfg: dict[str, Any]) -> LearnedPoison | None:
    """The cell's poison when it is a learned one (None otherwise)."""
    bcfg = {k: v for k, v in (cfg.get("backdoor") or {}).items() if k != "clean_train"}
    poison = build_poison(bcfg)
    return poison if isinstance(poison, LearnedPoison) else None


def ensure_poison_artifact(bcfg: dict[str, Any], data_dir: str, results_dir: str, arch_cfg: dict[str, Any], *,
                           device: torch.device | str = "cpu", log: Callable[[str], None] = progress) -> str:
    """The artifact's key, building and storing it first when the store lacks it (the node's build)."""
    from harness.backdoor.surrogate import ensure_surrogate

    poison = build_poison(dict(bcfg))
    assert isinstance(poison, LearnedPoison), f"{bcfg.get('name')} has no artifact"
    key = poison_artifact_key(poison, data_dir, arch_cfg)
    store = open_store(results_dir)
    if store.exists(f"{artifact_rel(key)}/{META}"):
        return key
    started = time.time()
    model = None
    if poison.needs_surrogate:
        model = ensure_surrogate(data_dir, results_dir, arch_cfg, poison.surrogate, device=device, log=log)
    log(f"{poison.name} artifact {key}: building")
    arrays = poison.build_artifact(data_dir, model, device, log)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.write_bytes(f"{artifact_rel(key)}/{ARRAYS}", buf.getvalue())
    meta = {"poison": poison.artifact_settings(), "seconds": time.time() - started,
            "arrays": {k: list(v.shape) for k, v in arrays.items()}}
    store.write_bytes(f"{artifact_rel(key)}/{META}", json.dumps(meta, indent=1, sort_keys=True, default=str).encode())
    log(f"{poison.name} artifact {key}: done in {meta['seconds']:.1f}s")
    return key


def load_poison_artifact(poison: LearnedPoison, cfg: dict[str, Any]) -> None:
    """Load the cell's artifact from its results store into `poison`; FileNotFoundError naming the fix."""
    key = poison_artifact_key(poison, cfg["data"]["dir"], cfg["arch"])
    if poison._loaded == key:
        return
    store = open_store(cfg["results_dir"])
    raw = store.read_bytes(f"{artifact_rel(key)}/{ARRAYS}") if store.exists(f"{artifact_rel(key)}/{META}") else None
    if raw is None:
        raise FileNotFoundError(f"backdoor {poison.name}: its trigger artifact {key} is not in "
                                f"{store.uri(artifact_rel(key))}. Fix: run the cell through `robustgrid run` or "
                                f"`robustgrid grid` (the plan builds artifact/poison/{key} before training), or point "
                                f"results_dir at the store that holds it")
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        poison.use_artifact({k: npz[k] for k in npz.files})
    poison._loaded = key

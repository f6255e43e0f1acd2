"""Multi-stage cells: a method that starts from another cell's trained model.

A method class may declare

    @classmethod
    def prerequisites(cls, method_cfg, trainer_cfg) -> list[Prerequisite]

each naming a cell derived from the current one (another method config, trainer overrides) whose
final checkpoint path is passed to the method as the keyword `arg`. CBD's frozen backdoored
model is ERM trained for a few epochs on the same poisoned data; FT/FP/NAD start from the ERM cell
itself (same trainer settings, so the same train key and the same checkpoint as the grid's ERM
cell: it is trained once). A prerequisite lives in `results/checkpoints/<its train key>` and is
trained there if not yet done (recursively), under a file lock, so two cells of a grid needing it
never train it twice at once.

A method class may also declare `clean_subset: float` (a method setting): the defender's small
clean split. The cell then trains on the first ceil(clean_subset * n) training samples with
poisoning switched off (`backdoor.clean_train`), as post-training defenses assume.

A method class may declare `runtime_trainer(method_cfg, trainer_cfg) -> dict`: overrides of the
cell's own trainer settings (post-training defenses fine-tune briefly at a small lr, while their
prerequisite keeps the grid's trainer, so it stays the grid's ERM cell). With
`needs_train_data = True` the method also gets `train_data` = the cell's data/backdoor/seed
config, to read the (poisoned) training split itself (ABL's isolation).

These rewrites happen at run time on a copy of the cell config: keys were computed before and
already cover everything that decides the result (method settings, trainer, backdoor, data).
"""
from __future__ import annotations

import copy
import fcntl
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.core.config import train_key
from harness.core.registry import METHODS


@dataclass(frozen=True)
class Prerequisite:
    arg: str  # method keyword that receives the checkpoint path
    method: dict[str, Any]  # the prerequisite cell's method config
    trainer: dict[str, Any] = field(default_factory=dict)  # overrides of the trainer config


def derive(cfg: dict[str, Any], pre: Prerequisite) -> dict[str, Any]:
    """The prerequisite cell's config: this cell with another method and trainer settings."""
    out = copy.deepcopy(cfg)
    out["method"] = copy.deepcopy(pre.method)
    out["trainer"] = {**out["trainer"], **pre.trainer}
    out["train_key"] = train_key(out)
    out["label"] = f"{cfg.get('label', '')}<-{pre.method['name']}"
    return out


def checkpoint_dir(cfg: dict[str, Any]) -> Path:
    """The prerequisite's training folder: the same place a grid cell with its train key uses
    (a node-local cache synced to the store when results_dir is a URI)."""
    from harness.store.checkpoint_sync import local_work_dir

    return local_work_dir(cfg)


@contextmanager
def training_lock(work_dir: Path) -> Iterator[None]:
    """Exclusive lock on a checkpoint folder while a process trains into it."""
    work_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(work_dir.parent / f".{work_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def runtime_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config a cell trains with: prerequisite checkpoints trained and injected, clean subset set."""
    cls = METHODS.get(cfg["method"]["name"])
    out = copy.deepcopy(cfg)
    for pre in getattr(cls, "prerequisites", lambda _m, _t: [])(cfg["method"], cfg["trainer"]):
        pcfg = derive(cfg, pre)
        work_dir = checkpoint_dir(pcfg)
        train_in_place(pcfg, work_dir)
        out["method"][pre.arg] = str(work_dir / "checkpoint.pt")
    runtime_trainer = getattr(cls, "runtime_trainer", None)
    if runtime_trainer is not None:
        out["trainer"] = {**out["trainer"], **runtime_trainer(cfg["method"], cfg["trainer"])}
    if getattr(cls, "needs_train_data", False):
        out["method"]["train_data"] = {"data": cfg["data"], "backdoor": cfg.get("backdoor"),
                                       "seed": cfg["seed"]}
    fraction = cfg["method"].get("clean_subset")
    if fraction is not None:
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"method.clean_subset must be in (0, 1], got {fraction}")
        from harness.data.loader import split_count

        n = split_count(Path(cfg["data"]["dir"]), "train", 0, 1, limit=cfg["data"].get("train_limit"))
        out["data"]["train_limit"] = max(1, math.ceil(float(fraction) * n))
        out["backdoor"] = {**(out.get("backdoor") or {"name": "none"}), "clean_train": True}
    return out


def train_in_place(cfg: dict[str, Any], work_dir: Path, train_fn: Callable[[dict[str, Any], Path], Any] | None = None):
    """Train a (prerequisite or grid) cell into `work_dir` under its lock; returns the TrainSummary.
    `train_fn` (default harness.train.trainer.train) is what trains; the Ray Train launcher passes its own."""
    if train_fn is None:
        from harness.train.trainer import train as train_fn

    run_cfg = runtime_config(cfg)
    with training_lock(work_dir):
        return train_fn(run_cfg, work_dir)

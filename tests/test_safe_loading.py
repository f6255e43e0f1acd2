"""No checkpoint a store hands us can run code: a planted pickle is refused at every load site.

The planted file is a pickle whose `__reduce__` writes a marker file when unpickled. Each load
site must raise UnsafeCheckpointError naming the file, and the marker must never appear.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import digits_classifier

from harness.core.config import compose_config, finalize
from harness.store.checkpoint_sync import local_work_dir as checkpoint_dir
from harness.store.checkpoints import UnsafeCheckpointError, load_checkpoint, save_checkpoint
from harness.train.trainer import CHECKPOINT, load_trained_classifier, train


class _Planted:
    """Unpickling this calls os.system: what an attacker with write access to the store would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":  # the zip format torch.save writes, with the payload under "model"
        torch.save({"epoch": 0, "model": _Planted(marker)}, path)
    else:  # a bare pickle stream (torch's legacy format)
        path.write_bytes(pickle.dumps({"model": _Planted(marker)}, protocol=2))
    return path


def _cfg(tiny: list[str], extra: list[str] = ()) -> dict:
    return finalize(compose_config(tiny + ["trainer.epochs=1", *extra]))


def _site_resume(tiny, tmp, plant):
    cfg = _cfg(tiny)
    plant(checkpoint_dir(cfg) / CHECKPOINT)
    return lambda: train(cfg, checkpoint_dir(cfg))


def _site_init_from(tiny, tmp, plant):
    base = plant(tmp / "base" / CHECKPOINT)
    cfg = _cfg(tiny)
    cfg["trainer"] = dict(cfg["trainer"], init_from=str(base))
    return lambda: train(cfg, checkpoint_dir(cfg))


def _site_trained_classifier(tiny, tmp, plant):
    cfg = _cfg(tiny)
    plant(checkpoint_dir(cfg) / CHECKPOINT)
    return lambda: load_trained_classifier(cfg, checkpoint_dir(cfg))


def _site_ft(tiny, tmp, plant):
    from methods.ft import load_weights

    path = plant(tmp / "backdoored.pt")
    return lambda: load_weights(digits_classifier(Path(_cfg(tiny)["data"]["dir"])), str(path))


def _site_cbd(tiny, tmp, plant):
    from methods.cbd import CBD

    path = plant(tmp / "backdoored.pt")
    method = CBD(backdoored_checkpoint=str(path))
    return lambda: method.build(digits_classifier(Path(_cfg(tiny)["data"]["dir"])))


def _site_aux(tiny, tmp, plant):
    from harness.eval.analysis.aux_models import AUX_FILE, aux_folder, ensure_aux

    data_dir = Path(_cfg(tiny)["data"]["dir"])
    plant(aux_folder("oracle", data_dir, tmp / "results") / AUX_FILE)
    return lambda: ensure_aux("oracle", data_dir, tmp / "results")


def _site_ddpm(tiny, tmp, plant):
    from harness.eval.analysis.diffusion import DDPM_FILE, META_FILE, DDPMConfig, load_ddpm

    folder = tmp / "ddpm"
    plant(folder / DDPM_FILE)
    meta = {"config": dataclasses.asdict(DDPMConfig()), "channels": 1, "image_size": 8}
    (folder / META_FILE).write_text(json.dumps(meta))
    return lambda: load_ddpm(folder)


SITES: dict[str, Callable] = {
    "trainer resume": _site_resume, "trainer init_from": _site_init_from,
    "load_trained_classifier": _site_trained_classifier, "methods.ft": _site_ft, "methods.cbd": _site_cbd,
    "aux classifier cache": _site_aux, "ddpm cache": _site_ddpm,
}


def test_planted_pickle_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    """The fixture is a real attack: the old `weights_only=False` load runs it."""
    marker = tmp_path / "ran"
    path = _plant(tmp_path / "ck.pt", marker, "torch")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch", "raw"])
@pytest.mark.parametrize("site", list(SITES))
def test_every_load_site_refuses_a_planted_pickle(site: str, fmt: str, tiny: list[str], tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    planted: list[Path] = []

    def plant(path: Path) -> Path:
        planted.append(_plant(path, marker, fmt))
        return path

    load = SITES[site](tiny, tmp_path, plant)
    with pytest.raises(UnsafeCheckpointError) as info:
        load()
    message = str(info.value)
    assert str(planted[0]) in message and "refused" in message
    assert "system" in message, "the error says what the file tried to build"
    assert not marker.exists(), f"{site}: the planted pickle ran"


def test_a_real_checkpoint_round_trips_with_optimizer_and_rng(tiny: list[str]) -> None:
    """What the trainer saves (model, optimizer, method and RNG state) loads under weights_only."""
    cfg = _cfg(tiny, ["trainer.schedule.name=constant"])
    train(cfg, checkpoint_dir(cfg))
    state = load_checkpoint(checkpoint_dir(cfg) / CHECKPOINT)
    assert state["epoch"] == 0 and state["optimizer"]["state"] and state["rng_cpu"].dtype == torch.uint8
    torch.set_rng_state(state["rng_cpu"])


def test_save_checkpoint_is_atomic_and_loadable(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(2), "curve": [{"loss": 1.0}], "note": None})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))


def test_a_damaged_checkpoint_is_a_clear_data_error(tmp_path: Path) -> None:
    from harness.core.errors import DataError

    path = tmp_path / "c.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=str(path)):
        load_checkpoint(path)


def test_ddpm_cache_round_trips_under_weights_only(tmp_path: Path) -> None:
    from harness.eval.analysis.diffusion import DDPM, DDPMConfig, build_unet, load_ddpm, save_ddpm

    cfg = DDPMConfig(channels=(8, 16), layers_per_block=1, attention=False, train_steps=1)
    unet = build_unet(cfg, 1, 8)
    save_ddpm(DDPM(unet, torch.linspace(0.99, 0.01, cfg.train_timesteps), cfg, {"channels": 1, "image_size": 8}),
              tmp_path, {})
    loaded = load_ddpm(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), loaded.unet.state_dict().values()))

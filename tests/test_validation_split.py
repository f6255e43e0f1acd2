"""The validation split (harness/data/validation.py): carved deterministically from train, never
streamed by training (nor by a method's scoring pass), clean on poisoned cells, recorded with its
hash; bad sizes refused before work with the numbers; and no training decision opens the test split."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

import harness.train.trainer as trainer_module
from harness.core.config import ConfigError, compose_config, finalize
from harness.data.location import DataLocation
from harness.data.validation import carve, indices_sha256, validation_size, validation_split
from harness.run.grid import validate_cell
from harness.store.checkpoint_sync import local_work_dir
from harness.train.trainer import train
from methods.erm import ERM

ON = ["trainer.validation.fraction=0.05"]


def _cfg(tiny: list[str], *extra: str) -> dict:
    return finalize(compose_config([*tiny, *ON, *extra]))


def test_the_split_is_a_pure_function_of_size_seed_and_settings(tiny) -> None:
    held = validation_split(_cfg(tiny))
    again = validation_split(_cfg(tiny, "method=pgd_at"))  # any cell of the same dataset and seed
    assert held is not None and again is not None
    assert held.size == validation_size(256, 0.05, 1000) == 13
    assert np.array_equal(held.indices, again.indices) and held.sha256 == indices_sha256(held.indices)
    assert not np.array_equal(held.indices, validation_split(_cfg(tiny, "seed=1")).indices)
    assert validation_split(_cfg(tiny, "trainer.validation.fraction=0")) is None
    assert carve(50_000, {"validation": {"fraction": 0.02, "max": 1000}}, 0).size == 1000  # the cap
    assert sorted(set(held.indices)) == list(held.indices) and held.indices.max() < 256


def test_training_never_streams_the_validation_split(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """n_train counts what was trained on; every loader the trainer opens on the training split
    selects the complement; the probe's numbers land in the curve with the split's hash."""
    cfg = _cfg(tiny, "trainer.epochs=1")
    held = validation_split(cfg)
    streamed: list[np.ndarray] = []
    real = trainer_module.make_loader

    def spy(dataset_dir, split, *args, **kwargs):
        assert split == "train"
        streamed.append(kwargs["select"])
        return real(dataset_dir, split, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "make_loader", spy)
    summary = train(cfg, local_work_dir(cfg))
    assert streamed and all(s is not None and not np.isin(s, held.indices).any() for s in streamed)
    assert summary.n_train == 256 - held.size == summary.samples_per_epoch[0]
    assert summary.validation == held.describe()
    probe = summary.curve[0]
    assert probe["val_n"] == held.size and 0 <= probe["val_clean_acc"] <= 1 and "val_top_class_share" in probe


def test_a_methods_scoring_pass_never_sees_the_validation_split(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A method that scores the split to select from it (ABL, FP) is shown only the training part."""
    shown: list[np.ndarray] = []

    def select_half(self, samples):
        indices, _ = samples.score(lambda x, y: x.flatten(1).mean(1))
        shown.append(indices)
        return indices[: len(indices) // 2]

    monkeypatch.setattr(ERM, "select_train_samples", select_half)
    cfg = _cfg(tiny, "trainer.epochs=1")
    held = validation_split(cfg)
    summary = train(cfg, local_work_dir(cfg))
    assert len(shown[0]) == 256 - held.size and not np.isin(shown[0], held.indices).any()
    assert summary.n_train == (256 - held.size) // 2


def test_a_poisoned_cell_probes_a_clean_split_and_asr_on_its_triggered_copy(tiny) -> None:
    from harness.backdoor.plan import train_plan
    from harness.eval.backdoor_metrics import backdoor_columns
    from harness.train.trainer import load_trained_classifier

    cfg = _cfg(tiny, "backdoor=badnets", "trainer.epochs=1", "trainer.validation.fraction=0.2")
    held = validation_split(cfg)
    plan = train_plan(cfg)
    assert np.isin(plan.poisoned, held.indices).any(), "the test needs poisoned samples in the split"
    summary = train(cfg, local_work_dir(cfg))
    entry = summary.curve[-1]
    assert "val_asr" in entry and "val_robust_acc" not in entry and 0 <= entry["val_asr"] <= 1
    model = load_trained_classifier(cfg, local_work_dir(cfg))
    columns = backdoor_columns(cfg, model, 10)
    trained_on = np.setdiff1d(plan.poisoned, held.indices)
    assert columns["poison_indices"] == trained_on.tolist() and columns["n_poisoned"] == len(trained_on)


def test_training_opens_no_test_shard_even_when_selecting(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: selection never touches the test split. Every file a training reads goes through
    DataLocation (shards, manifest, sizes) or tarfile (the poison plan's labels): none is a test shard."""
    opened: list[str] = []
    for name in ("open_stream", "read_bytes", "size"):
        real = getattr(DataLocation, name)
        monkeypatch.setattr(DataLocation, name, lambda self, file, *a, _real=real, **k: opened.append(str(file))
                            or _real(self, file, *a, **k))
    real_tar = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name=None, *a, **k: opened.append(str(name)) or real_tar(name, *a, **k))
    cfg = _cfg(tiny, "method=pgd_at", "method.attack.steps=2", "trainer.select=best_val_robust",
               "trainer.probe_budget=1.0")
    summary = train(cfg, local_work_dir(cfg))
    assert summary.selection["rule"] == "best_val_robust" and summary.selection["metric"] == "val_robust_acc"
    assert any("train-" in f for f in opened), "the spy must see the training shards"
    assert not [f for f in opened if "test-" in Path(f).name], "a training opened a test shard"


def test_bad_validation_sizes_are_refused_before_work_with_the_numbers(tiny) -> None:
    with pytest.raises(ConfigError, match=r"holds out 10 of the 10 training images.*Fix"):
        validate_cell(_cfg(tiny, "data.train_limit=10", "trainer.batch_size=2", "trainer.validation.fraction=0.95"))
    with pytest.raises(ConfigError, match=r"takes every training image of class 3 \(1 of 1 images\)"):
        validate_cell(_cfg(tiny, "data.train_limit=10", "trainer.batch_size=2", "trainer.validation.fraction=0.3"))
    with pytest.raises(ConfigError, match=r"trainer.validation.fraction=1.5 must be in \[0, 1\)"):
        validate_cell(_cfg(tiny, "trainer.validation.fraction=1.5"))
    with pytest.raises(ConfigError, match="trainer.probe_every=0 is out of range"):
        validate_cell(_cfg(tiny, "trainer.probe_every=0"))
    with pytest.raises(ConfigError, match="trainer.select=best_val_robust selects on the validation probes"):
        validate_cell(_cfg(tiny, "trainer.validation.fraction=0", "trainer.select=best_val_robust"))
    with pytest.raises(ConfigError, match="a backdoor cell probes C-Acc and ASR"):
        validate_cell(_cfg(tiny, "backdoor=badnets", "trainer.select=best_val_robust"))
    with pytest.raises(ConfigError, match="not a selection rule"):
        validate_cell(_cfg(tiny, "trainer.select=best"))
    validate_cell(_cfg(tiny))  # the defaults pass


def test_a_clean_subset_defense_holds_out_nothing_of_its_clean_data(tiny) -> None:
    """FT / FP / NAD fine-tune on the defender's clean 5%: all of it, as their official recipes
    (a 2% split of it would be one digit); selecting on a validation split it lacks is refused."""
    from harness.run.plan import run_config

    cfg = _cfg(tiny, "backdoor=badnets", "method=ft")
    planned = run_config(cfg, {})
    assert planned["data"]["train_limit"] == 13 and planned["trainer"]["validation"]["fraction"] == 0
    assert validation_split(planned) is None
    validate_cell(cfg)
    with pytest.raises(ConfigError, match=r"trainer.select=best_val_clean: method=ft fine-tunes on the defender's"):
        validate_cell(_cfg(tiny, "backdoor=badnets", "method=ft", "trainer.select=best_val_clean"))

"""Learned poisons (LF, LC): their artifacts are plan nodes built once per key, resumed from the
store, deterministic; training and the triggered test set load the same trigger; a missing
artifact is refused with the fix; LC's poisoned samples are its stored PGD images plus the trigger;
and a tiny LF cell runs end to end and reports ASR."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.backdoor.artifacts import poison_artifacts
from harness.backdoor.learned import LearnedPoison, artifact_rel, ensure_poison_artifact, poison_artifact_key
from harness.backdoor import plan as poison_plan
from harness.backdoor.plan import train_plan
from helpers import build_poison_artifacts as _build, tiny_poison_cell as _cell

LF_TINY = ["backdoor=lf", "backdoor.surrogate.epochs=1", "backdoor.surrogate.batch_size=256", "backdoor.images=8",
           "backdoor.max_passes=1", "backdoor.max_iter_df=20"]
LC_TINY = ["backdoor=lc", "backdoor.surrogate.epochs=1", "backdoor.surrogate.batch_size=256", "backdoor.steps=2"]


@pytest.fixture(scope="module")
def lf_cfg(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = _cell(data_root, tmp_path_factory.mktemp("lf") / "results", *LF_TINY)
    _build(cfg)
    return cfg


def test_the_plan_builds_each_artifact_once_for_many_cells(data_root: Path, tmp_path: Path) -> None:
    """Two seeds of LF and of LC: one shared clean surrogate, one trigger node per poison, each an
    input of its cells' train and eval nodes."""
    from harness.run.plan import build_plan, eval_node_id, train_node_id

    cells = [_cell(data_root, tmp_path, *tiny, seed=s) for tiny in (LF_TINY, LC_TINY) for s in (0, 1)]
    plan = build_plan(cells)
    artifacts = [n.id for n in plan.of_kind("artifact")]
    assert len(artifacts) == 3 and sum(a.startswith("artifact/clean_model/") for a in artifacts) == 1, artifacts
    for cfg in cells:
        (trigger,) = [a for a in poison_artifacts(cfg) if a.key.startswith("poison/")]
        node = f"artifact/{trigger.key}"
        assert node in plan.nodes[train_node_id(cfg)].inputs and node in plan.nodes[eval_node_id(cfg)].inputs
        assert plan.nodes[node].inputs == (f"artifact/{poison_artifacts(cfg)[0].key}",)  # its surrogate first
    assert poison_artifacts(_cell(data_root, tmp_path, "backdoor=badnets")) == []


def test_the_key_follows_the_settings_not_the_seed(data_root: Path, tmp_path: Path) -> None:
    a, b = (_cell(data_root, tmp_path, *LF_TINY, seed=s) for s in (0, 1))
    from harness.backdoor.base import build_poison

    key = lambda cfg: poison_artifact_key(build_poison(dict(cfg["backdoor"])), cfg["data"]["dir"], cfg["arch"])
    assert key(a) == key(b)
    c = _cell(data_root, tmp_path, *LF_TINY, "backdoor.amplitude=0.1")
    d = _cell(data_root, tmp_path, *LF_TINY, "arch=test_vit")
    assert len({key(a), key(c), key(d)}) == 3


def test_lf_artifact_resumes_from_the_store_and_is_deterministic(lf_cfg: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.backdoor.lf import LowFrequency

    stored = Path(lf_cfg["results_dir"]) / artifact_rel(_build(lf_cfg))
    meta = (stored / "meta.json").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt an artifact the store holds")

    monkeypatch.setattr(LowFrequency, "build_artifact", refuse)
    assert _build(lf_cfg) == stored.name and (stored / "meta.json").stat().st_mtime_ns == meta
    monkeypatch.undo()
    again = {**lf_cfg, "results_dir": str(tmp_path / "other")}  # the same surrogate, the trigger rebuilt
    surrogate = poison_artifacts(lf_cfg)[0].key
    shutil.copytree(Path(lf_cfg["results_dir"]) / "artifacts" / surrogate, tmp_path / "other" / "artifacts" / surrogate)
    _build(again)
    with np.load(stored / "arrays.npz") as one, np.load(tmp_path / "other" / artifact_rel(stored.name) / "arrays.npz") as two:
        assert one["trigger"].dtype == np.uint8 and one["trigger"].shape == (1, 8, 8)
        assert np.array_equal(one["trigger"], two["trigger"])
        assert 0 < int(one["trigger"].max()) <= 51  # floor(0.2 * 255): the shipped npy files' range


def test_training_and_the_triggered_test_set_see_one_trigger(lf_cfg: dict) -> None:
    from harness.data.loader import make_loader

    train, test = train_plan(lf_cfg), poison_plan.test_plan(lf_cfg)
    assert isinstance(train.poison, LearnedPoison) and len(train.poisoned) == round(0.1 * 256)
    assert torch.equal(train.poison.trigger_levels(), test.poison.trigger_levels())
    x, _ = next(iter(make_loader(Path(lf_cfg["data"]["dir"]), "test", 16)))
    triggered, _ = next(iter(make_loader(Path(lf_cfg["data"]["dir"]), "test", 16, poison=test)))
    expected = torch.floor((x * 255).round().double() + train.poison.trigger_levels()).clamp(0, 255) / 255
    assert torch.equal(triggered, expected.float())
    hit = torch.zeros(1, 1, 8, 8)
    assert torch.equal(train.poison.train_variant(hit, np.array([0])), test.poison.trigger(hit))


def test_a_missing_artifact_is_refused_naming_the_fix(lf_cfg: dict, tmp_path: Path) -> None:
    elsewhere = {**lf_cfg, "results_dir": str(tmp_path / "empty")}
    with pytest.raises(FileNotFoundError, match="Fix: run the cell through `robustgrid run`"):
        train_plan(elsewhere)
    with pytest.raises(FileNotFoundError, match="artifact/poison/"):
        poison_plan.test_plan(elsewhere)
    from harness.backdoor.lf import LowFrequency

    with pytest.raises(RuntimeError, match="not loaded"):
        LowFrequency().trigger(torch.zeros(1, 1, 8, 8))


def test_lc_poisons_with_its_stored_pgd_images_plus_the_corner_trigger(data_root: Path, tmp_path: Path) -> None:
    from harness.backdoor.lc import corner_mask
    from harness.backdoor.plan import split_labels

    cfg = _cell(data_root, tmp_path, *LC_TINY)
    key = _build(cfg)
    with np.load(Path(cfg["results_dir"]) / artifact_rel(key) / "arrays.npz") as arrays:
        indices, images = arrays["indices"], arrays["images"]
    labels = split_labels(Path(cfg["data"]["dir"]), "train")
    assert np.array_equal(indices, np.flatnonzero(labels == 0)) and images.dtype == np.uint8
    plan = train_plan(cfg)
    assert plan.poison.clean_label and set(plan.poisoned) <= set(indices.tolist()) and len(plan.poisoned) > 0
    picked = plan.poisoned[:3]
    out = plan.poison.train_variant(torch.zeros(3, 1, 8, 8), picked)
    adversarial = torch.from_numpy(images[np.searchsorted(indices, picked)]).float() / 255
    mask = corner_mask(8, 8) != 0
    assert torch.equal(out[..., ~mask], adversarial[..., ~mask])  # the PGD image outside the trigger
    assert mask.sum() == 1 and set(out[..., mask].unique().tolist()) <= {0.0, 1.0}  # 8x8: one pixel survives
    with pytest.raises(ValueError, match="no adversarial image"):
        plan.poison.train_variant(torch.zeros(1, 1, 8, 8), np.flatnonzero(labels != 0)[:1])
    test = poison_plan.test_plan(cfg)
    x = torch.full((2, 1, 8, 8), 128 / 255)
    assert torch.equal(test.poison.trigger(x)[..., ~mask], x[..., ~mask])


@pytest.mark.slow
def test_a_tiny_lf_cell_runs_end_to_end_and_reports_asr(data_root: Path, tmp_path: Path) -> None:
    from harness.run.cell import run_cell
    from harness.store.index import read_results

    cfg = _cell(data_root, tmp_path / "results", *LF_TINY, "trainer.epochs=2", "trainer.progress=false")
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    row = read_results(cfg["results_dir"]).to_pylist()[0]
    assert row["backdoor"] == "lf" and row["n_poisoned"] == round(0.1 * 256)
    assert 0 <= row["asr"] <= 1 and 0 <= row["clean_acc"] <= 1
    assert (tmp_path / "results" / "artifacts" / "poison").is_dir()


def test_trojannn_optimises_only_inside_its_mask_and_wraps_as_backdoorbench(data_root: Path, tmp_path: Path) -> None:
    from harness.backdoor.trojannn import TrojanNN, square_mask

    cfg = _cell(data_root, tmp_path, "backdoor=trojannn", "backdoor.surrogate.epochs=1",
                "backdoor.surrogate.batch_size=256", "backdoor.mask_update_iters=5")
    _build(cfg)
    poison = train_plan(cfg).poison
    levels = poison.trigger_levels()
    mask = square_mask(1, 8, 8)
    assert levels.shape == (1, 8, 8) and (levels[mask == 0] == 0).all() and (levels > 0).any()  # only inside
    assert not torch.equal(levels / 255, (mask * 255).floor() / 255), "the optimisation moved nothing"
    assert torch.equal(poison_plan.test_plan(cfg).poison.trigger_levels(), levels)
    white = torch.ones(1, 1, 8, 8)
    wrapped = poison.trigger(white) * 255
    on = levels > 0
    assert torch.equal(wrapped[0][on], (255 + levels[on] - 256).float())  # 255 + t wraps to t - 1
    clipped = TrojanNN(overflow="clip")
    clipped.use_artifact({"trigger": levels.to(torch.uint8).numpy()})
    clipped._loaded = "test"
    assert (clipped.trigger(white) == 1).all()
    with pytest.raises(ValueError, match="overflow must be one of"):
        TrojanNN(overflow="saturate")

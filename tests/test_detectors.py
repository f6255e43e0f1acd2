"""Backdoor detectors (harness/eval/analysis/detectors/): on a tiny digits model that learned a strong
BadNets backdoor, each separates poisoned from clean, STRIP's threshold holds its FPR on clean
data, and the columns land on the cell's rows; a clean cell gets none."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.backdoor.plan import train_plan
from harness.core.config import compose_config, finalize
from harness.core.registry import ANALYSES
from harness.data.loader import make_loader
from harness.data.shards import load_manifest
from harness.eval.analysis.detectors import ac, common, mmbd, spectral, strip
from harness.eval.analysis.detectors.common import detector_values
from harness.eval.stage import EvalContext, cell_analyses
from tests.helpers import digits_classifier

DETECTORS = ("strip", "spectral", "ac", "mmbd")


def backdoor_cfg(data_root: Path, *extra: str) -> dict:
    return finalize(compose_config([f"data.root={data_root}", "backdoor=badnets", "backdoor.rate=0.03",
                                    "eval.limit=200", *extra]))


@pytest.fixture(scope="module")
def backdoored(data_root: Path, digits_dir: Path):
    """test_resnet trained 8 epochs on digits with 3% BadNets (all-to-one, target 0): at 10% the
    poisoned samples are half the target class, AC's minority rule then misses them (docs/detectors.md)."""
    cfg = backdoor_cfg(data_root)
    plan = train_plan(cfg)
    model = digits_classifier(digits_dir)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(8):
        for x, y in make_loader(digits_dir, "train", 64, shuffle=True, epoch=epoch, poison=plan.for_epoch(epoch)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return cfg, model.eval()


def context(cfg: dict, model: torch.nn.Module) -> EvalContext:
    return EvalContext(cfg, model, torch.device("cpu"), load_manifest(Path(cfg["data"]["dir"])), None)


def test_metrics_are_sklearns_and_rates_count_the_decision() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.95])
    assert common.auroc(scores, truth) == pytest.approx(7 / 8)
    assert common.tpr_at_fpr(scores, truth, 0.05) == pytest.approx(0.5)  # 0.95 above every clean score
    assert common.decision_rates(scores > 0.5, truth) == (1.0, 0.25)
    assert np.isnan(common.auroc(scores, np.zeros(6, dtype=bool)))


def test_spectral_scores_a_planted_direction_and_flags_per_class_percentile() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16))
    feats[:20, 3] += 8.0  # 10% carry a planted feature
    labels = np.zeros(200, dtype=np.int64)
    scores = spectral.spectral_scores(feats, labels)
    truth = np.arange(200) < 20
    assert common.auroc(scores, truth) > 0.95
    flagged = spectral.spectral_flags(scores, labels, 85)
    assert flagged.sum() == 30 and flagged[:20].mean() > 0.9


def test_ac_flags_the_planted_minority_cluster_only_under_35_percent() -> None:
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(6, 32))  # features of low rank, as a network's are (ICA keeps 10 components)
    feats = rng.normal(size=(300, 6)) @ mix + 0.05 * rng.normal(size=(300, 32))
    feats[:30] += 6.0
    labels = np.zeros(300, dtype=np.int64)
    scores, flagged, n_classes = ac.ac_detect(feats, labels)
    truth = np.arange(300) < 30
    assert n_classes == 1 and common.auroc(scores, truth) > 0.95 and flagged[:30].all() and not flagged[30:].any()
    balanced = rng.normal(size=(300, 6)) @ mix + 0.05 * rng.normal(size=(300, 32))
    balanced[:150] += 6.0  # two halves: no minority under 35%, nothing flagged (the detector's rule)
    assert not ac.ac_detect(balanced, labels)[1].any()
    assert ac.ac_detect(balanced, labels, reduce="pca", max_share=1.0)[1].sum() == 150  # the defense's "smaller"


def test_mmbd_pvalue_is_small_for_one_outlying_margin() -> None:
    normal = np.array([5.1, 4.8, 5.3, 5.0, 4.9, 5.2, 5.05, 4.95, 5.15, 5.0])
    spiked = normal.copy()
    spiked[0] = 40.0
    p_spiked, top = mmbd.mmbd_pvalue(spiked)
    assert top == 0 and p_spiked < 0.05
    assert mmbd.mmbd_pvalue(normal)[0] > p_spiked


@pytest.mark.slow
def test_every_detector_separates_poisoned_from_clean_on_a_backdoored_model(backdoored) -> None:
    cfg, model = backdoored
    ctx = context(cfg, model)
    timings = {}
    for name in DETECTORS:
        analysis = ANALYSES.get(name)(name, {})
        assert analysis.always and analysis.applies(cfg)
        t0 = time.perf_counter()
        analysis.run(ctx)
        timings[name] = time.perf_counter() - t0
    c = detector_values(ctx.columns)  # every detector's values, in the row's detectors_json
    print("detector seconds:", {k: round(v, 2) for k, v in timings.items()},
          {k: round(c[f"det_{k}_auroc"], 3) for k in ("strip", "spectral", "ac")}, "mmbd p", c["det_mmbd_pvalue"])
    assert c["det_strip_auroc"] > 0.9, c
    assert c["det_spectral_auroc"] > 0.8, c
    assert c["det_ac_auroc"] > 0.8, c
    assert c["det_strip_tpr"] > 0.5
    assert c["det_strip_fpr"] < 0.2  # the threshold fixed at 5% on the clean pool (29 held-out images)
    assert c["det_mmbd_target"] == 0 and c["det_mmbd_detected"], c["det_mmbd_margins"]
    for name in DETECTORS:
        assert c[f"det_{name}_seconds"] >= 0


@pytest.mark.slow
def test_strip_threshold_gives_its_fpr_on_the_clean_pool(backdoored) -> None:
    cfg, model = backdoored
    pool, source = strip.clean_pool(cfg, 0.05)
    assert source == "validation" and len(pool) >= 20
    gen = torch.Generator().manual_seed(0)
    ent = strip.strip_scores(model, pool, pool, 100, 1.0, 128, gen)
    threshold = strip.threshold_low(ent, 0.05)
    assert float((ent < threshold).float().mean()) <= 0.05 + 1 / len(ent)


def test_clean_cells_get_no_detector_and_null_switches_one_off(data_root: Path) -> None:
    clean = finalize(compose_config([f"data.root={data_root}"]))
    assert not [a for a in cell_analyses(clean) if a.label in DETECTORS]
    bad = backdoor_cfg(data_root, "eval.detectors.mmbd=null")
    assert sorted(a.label for a in cell_analyses(bad) if a.label in DETECTORS) == ["ac", "spectral", "strip"]
    wanet = finalize(compose_config([f"data.root={data_root}", "backdoor=wanet"]))
    assert sorted(a.label for a in cell_analyses(wanet) if a.label in DETECTORS) == ["mmbd", "strip"]  # no fixed set


def test_bad_detector_settings_are_refused_before_work(data_root: Path) -> None:
    from harness.eval.stage import check_analyses

    cfg = backdoor_cfg(data_root)
    cfg["eval"]["detectors"]["strip"]["fpr"] = 1.5
    with pytest.raises(ValueError, match="fpr"):
        check_analyses(cfg)
    cfg = backdoor_cfg(data_root)
    cfg["eval"]["detectors"]["ac"]["nosuch"] = 1
    with pytest.raises(ValueError, match="unknown settings"):
        check_analyses(cfg)


class _Planted(torch.nn.Module):
    """A 'model' whose embedding is its input, flattened (the features a planted test controls)."""

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1), x.flatten(1)[:, :2]


class _Samples:
    """TrainSamples as select_train_samples sees it, over in-memory (x, y) (harness/train/selection.py)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, poisoned: np.ndarray) -> None:
        self.x, self.y, self.poisoned, self.device = x, y, poisoned, torch.device("cpu")

    def score(self, fn):
        return np.arange(len(self.y)), fn(self.x, self.y).double().numpy()


@pytest.mark.parametrize("name", ["spectral", "ac"])
def test_the_defenses_remove_what_the_detectors_flag_and_keep_the_rest(name) -> None:
    from harness.core.registry import METHODS

    rng = np.random.default_rng(2)
    mix = rng.normal(size=(6, 32))
    x = rng.normal(size=(400, 6)) @ mix + 0.05 * rng.normal(size=(400, 32))
    y = np.repeat(np.arange(2), 200)
    x[:30] += 6.0  # class 0's first 30: the poisoned ones
    method = METHODS.get(name)(layer="embedding", **({"reduce": "ica", "max_share": 0.35} if name == "ac" else {}))
    method.scorer = _Planted()
    kept = method.select_train_samples(_Samples(torch.tensor(x, dtype=torch.float32).view(400, 2, 4, 4),
                                                torch.tensor(y), np.arange(30)))
    assert not np.isin(np.arange(30), kept).any()  # every poisoned sample removed
    assert method.stats["removed_recall"] == 1.0
    if name == "ac":  # only the planted minority: nothing else goes
        assert len(kept) == 370 and method.stats["removed_precision"] == 1.0
    else:  # 15% of each class above its 85th percentile
        assert len(kept) == 400 - 60


def test_a_defense_without_its_backdoored_checkpoint_is_refused() -> None:
    from harness.core.registry import METHODS

    method = METHODS.get("spectral")()
    with pytest.raises(ValueError, match="backdoored_checkpoint"):
        method.select_train_samples(_Samples(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), np.zeros(0)))


@pytest.mark.slow
def test_a_backdoor_cell_commits_the_detector_columns_and_their_seconds(tiny) -> None:
    import json

    from harness.run.cell import run_cell
    from harness.store.index import read_results

    cfg = finalize(compose_config([o for o in tiny if not o.startswith("attack.")] + ["backdoor=badnets",
                                                                                      "attack=[fgsm]"]))
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    row = read_results(cfg["results_dir"]).to_pylist()[0]
    stages = json.loads(row["eval_stage_seconds"])
    values = detector_values(row)
    for name in DETECTORS:
        assert name in stages and values[f"det_{name}_seconds"] >= 0
    assert 0 <= values["det_strip_auroc"] <= 1 and 0 <= values["det_spectral_auroc"] <= 1
    assert isinstance(values["det_mmbd_detected"], bool) and len(values["det_mmbd_margins"]) == 10
    print("eval seconds by stage:", {k: round(v, 2) for k, v in stages.items()})


def test_degenerate_features_and_a_failing_detector_never_fail_the_cell() -> None:
    """Constant features (a dead tiny model) make FastICA whiten NaN: AC leaves the class unflagged;
    a detector that raises records det_<name>_error in detectors_json instead of failing the cell."""
    result = ac.cluster_class(np.zeros((40, 16)), "ica", 10, 0.35, 0)
    assert not result.flagged

    class Broken(common.Detector):
        def detect(self, ctx, options):
            raise np.linalg.LinAlgError("singular")

    ctx = EvalContext.__new__(EvalContext)
    ctx.cfg, ctx.columns = {"key": "k", "backdoor": {"name": "badnets"}}, {}
    Broken("broken", {}).run(ctx)
    values = detector_values(ctx.columns)
    assert values["det_broken_error"] == "LinAlgError: singular" and values["det_broken_seconds"] >= 0

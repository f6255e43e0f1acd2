"""LR schedules are pure functions of the fractional epoch (so resume continues them exactly)."""
from __future__ import annotations

import pytest

from harness.train.schedule import lr_factor


def test_multistep_matches_the_pgd_at_recipe() -> None:
    cfg = {"name": "multistep", "milestones": [100, 105], "gamma": 0.1}
    assert lr_factor(cfg, 99.9, 110) == 1.0
    assert lr_factor(cfg, 100.0, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 106.0, 110) == pytest.approx(0.01)


def test_cosine_with_warmup_and_cyclic() -> None:
    cos = {"name": "cosine", "warmup_epochs": 1}
    assert lr_factor(cos, 0.5, 10) == pytest.approx(0.5, abs=1e-6)
    assert lr_factor(cos, 1.0, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 5.5, 10) == pytest.approx(0.5)
    cyc = {"name": "cyclic", "peak_epoch": 4}
    assert lr_factor(cyc, 0.0, 10) == 0.0
    assert lr_factor(cyc, 4.0, 10) == pytest.approx(1.0)
    assert lr_factor(cyc, 7.0, 10) == pytest.approx(0.5)


def test_unknown_schedule_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Known schedules: constant, cosine, cyclic, multistep"):
        lr_factor({"name": "exp", "warmup_epochs": 1}, 0.0, 10)

"""A method that trains on part of the split (ABL's isolated 1%) declares it with
`select_train_samples`: the trainer scores the split on every rank, streams only the selection,
and the epoch is as long as the selection implies."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import harness.train.trainer as trainer
from harness.core.config import compose_config, finalize
from harness.store.checkpoint_sync import local_work_dir
from harness.train.ranks import run_ranks
from harness.train.selection import TrainSamples
from methods.erm import ERM


class LowestLossTenth(ERM):
    """ERM on the 10% of the split its initial model finds easiest (what ABL's unlearning does)."""

    def __init__(self) -> None:
        super().__init__()
        self.scored: tuple[np.ndarray, np.ndarray] | None = None
        self.seen: list[int] = []

    def build(self, model):
        self.model = model
        return model

    def select_train_samples(self, samples: TrainSamples) -> np.ndarray:
        self.scored = samples.score(lambda x, y: F.cross_entropy(self.model(x), y, reduction="none"))
        indices, losses = self.scored
        return indices[np.argsort(losses, kind="stable")[: len(indices) // 10]]

    def training_step(self, module, x, y, ctx):
        self.seen.append(int(y.shape[0]))
        return super().training_step(module, x, y, ctx)


def _cfg(data_root: Path, results: Path, *extra: str) -> dict[str, Any]:
    return finalize(compose_config([f"data.root={data_root}", f"results_dir={results}", "trainer=tiny",
                                    "trainer.epochs=2", "data.train_limit=256", "trainer.batch_size=8", *extra]))


def test_the_trainer_streams_what_the_method_selects(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    built: list[LowestLossTenth] = []
    monkeypatch.setattr(trainer, "build_method", lambda cfg: built.append(LowestLossTenth()) or built[-1])
    cfg = _cfg(data_root, tmp_path)
    summary = trainer.train(cfg, local_work_dir(cfg))

    indices, losses = built[0].scored
    assert indices.tolist() == list(range(256))  # every training sample scored once, by index
    assert np.isfinite(losses).all() and losses.std() > 0
    assert summary.samples_per_epoch == [25, 25] and summary.n_train == 25
    assert built[0].seen == [7, 6, 6, 6] * 2  # 25 samples in ceil(25 / 8) steps (even_batches), each epoch


def _score_on_ranks(rank: int, world_size: int, device: torch.device, cfg: dict[str, Any]):
    samples = TrainSamples(cfg, device, rank, world_size)
    return samples.score(lambda x, y: x.flatten(1).sum(1) * 100 + y)


def test_scores_are_gathered_from_every_rank(data_root: Path, tmp_path: Path) -> None:
    """Two ranks each score their own shards; both get the whole split's scores, equal to one rank's."""
    cfg = _cfg(data_root, tmp_path, "backdoor=badnets")
    one = run_ranks(_score_on_ranks, 1, cfg, cfg)
    two = run_ranks(_score_on_ranks, 2, cfg, cfg)
    assert one[0].tolist() == two[0].tolist() == list(range(256))
    np.testing.assert_allclose(one[1], two[1], rtol=1e-12)
    poisoned = TrainSamples(cfg, torch.device("cpu"), 0, 1).poisoned
    assert len(poisoned) == round(0.1 * 256)  # the scores are of the poisoned data the cell trains on


def test_a_score_may_be_one_row_per_sample(data_root: Path, tmp_path: Path) -> None:
    """FP scores each sample's channel means: rows come back (N, K), sorted by index like values."""
    import pytest

    cfg = _cfg(data_root, tmp_path)
    samples = TrainSamples(cfg, torch.device("cpu"), 0, 1)
    idx, one = samples.score(lambda x, y: x.flatten(1).sum(1))
    idx2, rows = samples.score(lambda x, y: torch.stack([x.flatten(1).sum(1), y.double()], 1))
    assert rows.shape == (256, 2) and idx.tolist() == idx2.tolist()
    np.testing.assert_allclose(rows[:, 0], one)
    with pytest.raises(ValueError, match="one value \\(or one row\\) per sample"):
        samples.score(lambda x, y: x.sum())

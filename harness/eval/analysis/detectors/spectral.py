"""Spectral Signatures (Tran, Li & Madry, NeurIPS 2018) as a detector of the poisoned training samples.

Per class c (the label trained on): F = the class's features (n_c x D), v = the top right singular
vector of F - mean(F), score_i = |<v, F_i>|, and the samples above the class's `percentile`-th
score are flagged (BackdoorBench defense/spectral.py and detection_pretrain/spectral.py, from
MadryLab's code: percentile 85, i.e. 1.5 x an assumed 10% poison rate). As theirs, the score
projects the UNcentred features on v (`corrs = eigs @ full_cov.T`); `centered: true` projects
the centred ones, the paper's formula. Features: BackdoorBench's defense hooks PreAct-R18's
`layer4` before pooling, flattened: our `last_stage` (the default); `embedding` is the pooled one.

Columns (backdoor cells with a fixed poisoned set): det_spectral_auroc / _tpr_at_5fpr over every
training sample's score (poisoned vs clean, validation split left out), and the decision's
det_spectral_tpr / _fpr / _n_flagged. `methods/spectral.py` removes the flagged samples and
retrains with the same functions. Cost: one forward pass over the training split and one SVD per
class (n_c x D; ImageNet at D = 2048: 1,300 x 2048 per class, about a second each).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from harness.core.registry import ANALYSES
from harness.eval.analysis.detectors.common import TrainingSetDetector

DEFAULTS = {"percentile": 85.0, "layer": "last_stage", "centered": False, "batch_size": 256}


def class_scores(feats: np.ndarray, centered: bool = False) -> np.ndarray:
    """|<top singular vector of the centred features, feature>| for one class's (n, D) features."""
    feats = np.asarray(feats, dtype=np.float64)
    centred = feats - feats.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return np.abs((centred if centered else feats) @ vt[0])


def spectral_scores(feats: np.ndarray, labels: np.ndarray, centered: bool = False) -> np.ndarray:
    """Every sample's score within its class (classes of fewer than 2 samples score 0)."""
    scores = np.zeros(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) >= 2:
            scores[members] = class_scores(feats[members], centered)
    return scores


def spectral_flags(scores: np.ndarray, labels: np.ndarray, percentile: float = 85.0) -> np.ndarray:
    """Per class, the samples whose score is above the class's `percentile` (numpy's, as theirs)."""
    flagged = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        flagged[members] = scores[members] > np.percentile(scores[members], percentile)
    return flagged


def check_options(options: dict[str, Any]) -> None:
    if not 0 <= float(options["percentile"]) < 100:
        raise ValueError(f"spectral percentile must be in [0, 100), got {options['percentile']}")


@ANALYSES.register("spectral")
class SpectralDetector(TrainingSetDetector):
    """Spectral Signatures over the poisoned training split (module doc)."""

    order = 52
    default_config = DEFAULTS

    def validate(self, options: dict[str, Any]) -> None:
        check_options(options)

    def decide(self, feats: np.ndarray, labels: np.ndarray, options: dict[str, Any],
               seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        scores = spectral_scores(feats, labels, bool(options["centered"]))
        return scores, spectral_flags(scores, labels, float(options["percentile"])), {}

"""Activation Clustering (Chen et al., 2018) as a detector of the poisoned training samples.

Per class (the label trained on): the class's penultimate features, reduced to `dims` (10)
dimensions, split by 2-means (sklearn KMeans); the cluster that is not the majority is suspect,
and flagged when it holds less than `max_share` of the class. Two official variants, one function:
  * detector (default; BackdoorBench detection_pretrain/ac.py): features centred, FastICA(10,
    whiten='unit-variance', random_state=seed), KMeans(2); the minority cluster is flagged if
    under 35% of the class;
  * defense (methods/ac.py; BackdoorBench defense/ac.py, "smaller"): PCA(10), KMeans(2), the
    smaller cluster always flagged (`max_share: 1.0`, `reduce: pca`).
  * `reduce: first` keeps the first `dims` feature columns: what BackdoorBench's defense/ac.py
    actually runs. Its `cluster_activations` tests `nb_activations > nb_dims & n > nb_dims`, which
    Python reads as the chain `nb_activations > (nb_dims & n) > nb_dims`, never true, so its
    PCA branch never runs and it clusters `activation[:, 0:nb_dims]`. Our defense's default is the
    PCA it intends (and ART's AC, which it ports, runs); `first` reproduces theirs.
Features: the pooled embedding (their avgpool hook). A continuous score for the ranking metrics:
in the reduced space, |z - c_majority| - |z - c_minority| (positive: nearer the suspect cluster),
shifted below every flagged class's in the classes AC leaves alone (so the ranking follows the
decision: a class whose minority is over `max_share` is judged clean). Note the rule's blind spot,
as in BackdoorBench's tables: at 10% all-to-one on 10 classes the poisoned samples are about half
of the target class, so its minority cluster is often the clean one.
KMeans gets `random_state=seed` (theirs: none, numpy's global state after fix_random) and n_init=10
(the default of the scikit-learn their code ran on: install.sh pins 0.24.2; 1.4+ defaults to 1 init).

Columns (backdoor cells with a fixed poisoned set): det_ac_auroc / _tpr_at_5fpr over that score,
det_ac_tpr / _fpr / _n_flagged of the decision, det_ac_n_classes_flagged. Cost: one forward pass
over the training split, then per class FastICA + KMeans on n_c x D (CIFAR-10: 5,000 x 512).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA

from harness.core.registry import ANALYSES
from harness.eval.analysis.detectors.common import TrainingSetDetector

REDUCE = ("ica", "pca", "first")
UNFLAGGED = 1e6  # unflagged classes' scores are shifted below every flagged class's (the ranking follows the decision)
DEFAULTS = {"reduce": "ica", "dims": 10, "max_share": 0.35, "layer": "embedding", "batch_size": 256}


@dataclass
class ClassClusters:
    """One class's clustering: each member's cluster, which is suspect, whether it is flagged."""

    clusters: np.ndarray  # (n,) cluster id per member
    suspect: int  # the minority cluster's id
    flagged: bool  # whether the suspect cluster is removed
    score: np.ndarray  # (n,) distance margin, positive nearer the suspect cluster
    reduced: np.ndarray  # (n, dims) the reduced features KMeans saw


def reduce_features(feats: np.ndarray, reduce: str = "ica", dims: int = 10, seed: int = 0) -> np.ndarray:
    """The class's features in `dims` dimensions: FastICA of the centred features (detector) or PCA
    (defense); as theirs, left as they are when there are too few samples or dimensions."""
    if reduce not in REDUCE:
        raise ValueError(f"ac reduce must be one of {REDUCE}, got {reduce!r}")
    feats = np.asarray(feats, dtype=np.float64)
    if reduce == "first":  # BackdoorBench's defense as it runs (module doc)
        return feats[:, :dims]
    if feats.shape[1] <= dims:
        return feats
    if feats.shape[0] <= dims:
        return feats[:, :dims]
    if reduce == "pca":
        return PCA(n_components=dims, random_state=seed).fit_transform(feats)
    with warnings.catch_warnings():  # FastICA warns when it stops at max_iter; theirs runs the same
        warnings.simplefilter("ignore")
        return FastICA(n_components=dims, random_state=seed, whiten="unit-variance").fit_transform(
            feats - feats.mean(axis=0, keepdims=True))


def cluster_class(feats: np.ndarray, reduce: str = "ica", dims: int = 10, max_share: float = 0.35,
                  seed: int = 0) -> ClassClusters:
    """2-means on one class's reduced features; the minority cluster, flagged if under `max_share`."""
    try:
        z = reduce_features(feats, reduce, dims, seed)
    except (ValueError, np.linalg.LinAlgError):  # FastICA / PCA on degenerate features (NaN whitening)
        z = np.full((len(feats), 1), np.nan)
    if not np.isfinite(z).all() or len(np.unique(z, axis=0)) < 2:  # degenerate features: nothing to split
        zeros = np.zeros(len(z))
        return ClassClusters(zeros.astype(np.int64), 1, False, zeros, z)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)  # n_init: 10, their sklearn 0.24-1.3 default
    clusters = km.labels_.astype(np.int64)
    clean = 1 if clusters.sum() >= len(clusters) / 2.0 else 0  # detection_pretrain/ac.py's majority rule
    suspect = 1 - clean
    share = float((clusters == suspect).mean())
    d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None, :, :], axis=2)
    return ClassClusters(clusters, suspect, share < max_share, d[:, clean] - d[:, suspect], z)


def ac_detect(feats: np.ndarray, labels: np.ndarray, reduce: str = "ica", dims: int = 10,
              max_share: float = 0.35, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(score, flagged, classes flagged) over every sample, clustering each class of >= 2 samples."""
    scores = np.zeros(len(labels), dtype=np.float64)
    flagged = np.zeros(len(labels), dtype=bool)
    n_classes = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:  # theirs: "no need to perform clustering"
            continue
        result = cluster_class(feats[members], reduce, dims, max_share, seed)
        scores[members] = result.score if result.flagged else result.score - UNFLAGGED
        if result.flagged:
            flagged[members[result.clusters == result.suspect]] = True
            n_classes += 1
    return scores, flagged, n_classes


def check_options(options: dict[str, Any]) -> None:
    if options["reduce"] not in REDUCE:
        raise ValueError(f"ac reduce must be one of {REDUCE}, got {options['reduce']!r}")
    if int(options["dims"]) < 1 or not 0 < float(options["max_share"]) <= 1:
        raise ValueError("ac dims must be >= 1 and max_share in (0, 1]")


@ANALYSES.register("ac")
class ActivationClusteringDetector(TrainingSetDetector):
    """Activation Clustering over the poisoned training split (module doc)."""

    order = 53
    default_config = DEFAULTS

    def validate(self, options: dict[str, Any]) -> None:
        check_options(options)

    def decide(self, feats: np.ndarray, labels: np.ndarray, options: dict[str, Any],
               seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        scores, flagged, n_classes = ac_detect(feats, labels, str(options["reduce"]), int(options["dims"]),
                                               float(options["max_share"]), seed)
        return scores, flagged, {"det_ac_n_classes_flagged": n_classes}

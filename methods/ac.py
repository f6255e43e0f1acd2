"""Activation Clustering as a defense (Chen et al., 2018; BackdoorBench defense/ac.py): cluster each
class's activations of the poisoned training split under the backdoored ERM model, remove the
suspect cluster, retrain a fresh model on the rest with the ERM recipe
(methods/filtered_retrain.py). Clustering and flags are the detector's own function
(harness/eval/analysis/detectors/ac.py `ac_detect`: one implementation).

Defaults as their defense (config/defense/ac/cifar10.yaml, `mitigation`): pooled features (their
avgpool hook), PCA to 10 dimensions, KMeans(2), cluster_analysis 'smaller': the smaller cluster of
every class is removed (`max_share: 1.0`; the detector's 35% rule is `max_share: 0.35`).
Where we differ: theirs clusters each shuffled BATCH of each class separately and concatenates the
cluster ids across batches (ids of different KMeans fits do not correspond), then maps the verdicts
back through a second, reshuffled pass of the loader (so they land on other samples), and takes the
features through the training transform; ours clusters each whole class once, without
augmentation, and removes exactly the samples it flagged.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from harness.core.registry import METHODS
from harness.eval.analysis.detectors.ac import ac_detect, check_options
from methods.filtered_retrain import FilteredRetrain


@METHODS.register("ac")
class ActivationClustering(FilteredRetrain):
    name = "ac"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Detecting Backdoor Attacks on Deep Neural Networks by Activation "
                                                "Clustering", "venue": "AAAI SafeAI workshop", "year": "2019"}

    def __init__(self, reduce: str = "pca", dims: int = 10, max_share: float = 1.0, layer: str = "embedding",
                 seed: int = 0, backdoored_checkpoint: str | None = None) -> None:
        check_options({"reduce": reduce, "dims": dims, "max_share": max_share})
        super().__init__(layer, backdoored_checkpoint)
        self.reduce, self.dims, self.max_share, self.seed = reduce, int(dims), float(max_share), int(seed)

    def flag(self, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return ac_detect(feats, labels, self.reduce, self.dims, self.max_share, self.seed)[1]

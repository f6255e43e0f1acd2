"""Spectral Signatures as a defense (Tran, Li & Madry, NeurIPS 2018; BackdoorBench defense/spectral.py):
score the poisoned training split with the backdoored ERM model, remove per class the samples
above the 85th percentile of the spectral score, retrain a fresh model on the rest with the ERM
recipe (methods/filtered_retrain.py). The scores and the flags are the detector's own functions
(harness/eval/analysis/detectors/spectral.py: one implementation).

Defaults as theirs: percentile 85 (config/defense/spectral/cifar10.yaml), every class inspected
(the defender does not know the target), features of the last stage before pooling (their
`layer4` hook on PreAct-R18, flattened), the score projecting the uncentred features (theirs and
MadryLab's: `corrs = eigs @ full_cov.T`; `centered: true` is the paper's formula).
Where we differ: their features are taken through the TRAINING transform (random crop + flip, one
sample at a time); ours without augmentation, as the model is evaluated.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from harness.core.registry import METHODS
from harness.eval.analysis.detectors.spectral import check_options, spectral_flags, spectral_scores
from methods.filtered_retrain import FilteredRetrain


@METHODS.register("spectral")
class SpectralSignatures(FilteredRetrain):
    name = "spectral"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Spectral Signatures in Backdoor Attacks", "venue": "NeurIPS",
                                       "year": "2018"}

    def __init__(self, percentile: float = 85.0, layer: str = "last_stage", centered: bool = False,
                 backdoored_checkpoint: str | None = None) -> None:
        check_options({"percentile": percentile})
        super().__init__(layer, backdoored_checkpoint)
        self.percentile, self.centered = float(percentile), bool(centered)

    def flag(self, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return spectral_flags(spectral_scores(feats, labels, self.centered), labels, self.percentile)

"""The backdoor detectors (harness/eval/analysis/detectors/) and the AC / SS defenses beside
SCLBD/BackdoorBench's own code, on the same model, inputs and features.

Model and data: backdoorbench.py's digits test_resnet (3 seeded epochs) and its 300 held-out digits;
"poisoned" inputs are those digits with our BadNets patch (`backdoor=badnets`, 2 x 2 at 16 x 16).
Their functions run on our weights: their model sees normalised tensors (their transforms end in
Normalize), ours the pixels (the normalisation is inside our model).

  strip     detection_infer/strip.py's `STRIP` class (its `check`, `superimpose`, `entropy` and
            `cleanse`), alpha 1.0 as its `filtering` builds it, N 20 (theirs 100: the blends are the
            same per partner, and their one-forward-per-partner loop is slow on a shared CPU), fpr
            0.05 (its class default; `filtering` passes 0.1): partner pool the first 50 digits,
            inspected the next 50 clean + the same 50 patched. Their partner draws (python `random.shuffle`) are
            recorded and handed to ours, batch by batch, so both blend with the same partners.
              entropy_per_input   their `check` (mean entropy over the partners) vs our strip_entropy
              threshold           their threshold_low vs ours, from the pool's entropies
              flagged             inputs flagged by one side only (their `cleanse` vs our decision)
  spectral  defense/spectral.py's scoring statements (full_mean .. top_scores, run as written inside
            `mitigation`), percentile 85 as config/defense/spectral/cifar10.yaml, on the last-stage
            features of each class of the 600 inputs (the patched ones labelled 0, as trained on)
              scores              |<v, features>| per sample, theirs vs spectral_scores
              flagged             samples above the percentile on one side only
  ac        detection_pretrain/ac.py's clustering statements of `cleanser` (centre, FastICA(10,
            unit-variance, random_state 0), KMeans(2), majority rule, the 35% rule) and
            defense/ac.py's `cluster_activations` + `ClusteringAnalyzer.analyze_by_size` (PCA(10),
            KMeans(2), 'smaller'), both on the pooled features of each whole class. Their KMeans has
            no random_state and relies on the n_init=10 of the scikit-learn they pin (0.24.2): it is
            given n_init=10 and random_state=0 here, as ours has.
              detector_flagged    samples flagged by one side only (detection_pretrain rule)
              defense_flagged     samples removed by one side only (defense 'smaller' rule)
MM-BD is not in this checkout of BackdoorBench: no check (docs/detectors.md).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from conformance_checks.backdoorbench import digits_model_and_clean_data
from conformance_checks.common import Compared, ScriptBody, load_functions, max_abs

REPOSITORY = "SCLBD/BackdoorBench"
POOL, N, ALPHA, FPR = 50, 20, 1.0, 0.05  # N 20 (theirs 100): their per-partner loop is slow on a shared CPU


class Normalised(nn.Module):
    """Our model as theirs is called: on normalised tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.body(x)


def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, clean pixels, labels, patched pixels, patched labels: the target 0)."""
    from harness.backdoor.base import build_poison

    model, x, y = digits_model_and_clean_data()
    poison = build_poison({"name": "badnets", "target": 0, "rate": 0.1, "pattern": "white"})
    patched = poison.trigger(x)
    return model, x, y, patched, torch.zeros_like(y)


def check_strip(reference: Path) -> list[Compared]:
    from harness.eval.analysis.detectors import strip as ours

    model, x, y, patched, _ = _data()
    norm = lambda t: model.normalize(t)  # noqa: E731
    pool, inspected = x[:POOL], torch.cat([x[POOL:2 * POOL], patched[POOL:2 * POOL]])
    draws: list[list[int]] = []

    def shuffle(seq: list[int]) -> None:
        random.shuffle(seq)
        draws.append(list(seq))

    namespace: dict[str, Any] = {"torch": torch, "np": np, "random": SimpleNamespace(shuffle=shuffle),
                                 "DataLoader": torch.utils.data.DataLoader, "args": SimpleNamespace(device="cpu")}
    their_cls = load_functions(reference / "detection_infer" / "strip.py", ["STRIP"], namespace)["STRIP"]
    clean_set = torch.utils.data.TensorDataset(norm(pool), y[:POOL])
    inspection_set = torch.utils.data.TensorDataset(norm(inspected), torch.zeros(len(inspected), dtype=torch.long))
    worker = their_cls(SimpleNamespace(device="cpu"), inspection_set, clean_set, Normalised(model).eval(),
                       strip_alpha=ALPHA, N=N, defense_fpr=FPR)
    random.seed(0)
    with torch.no_grad():
        their_flagged = set(worker.cleanse().tolist())
        their_pool_entropy = torch.cat([worker.check(norm(pool[i:i + 128]), None, clean_set)
                                        for i in range(0, POOL, 128)])
        their_test_entropy = torch.cat([worker.check(norm(inspected[i:i + 128]), None, clean_set)
                                        for i in range(0, len(inspected), 128)])
    their_threshold = float(their_pool_entropy.sort()[0][int(FPR * len(their_pool_entropy))])
    # ours, with the partners their calls drew: cleanse (pool batches, inspection batches), then the two re-checks
    n_pool_batches, n_test_batches = -(-POOL // 128), -(-len(inspected) // 128)
    partners = [pool[torch.as_tensor(d[:N])] for d in draws]

    def entropies(images: torch.Tensor, first: int) -> torch.Tensor:
        return torch.cat([ours.strip_entropy(model, images[i * 128:(i + 1) * 128], partners[first + i], ALPHA)
                          for i in range(-(-len(images) // 128))])

    pool_entropy = entropies(pool, 0)
    test_entropy = entropies(inspected, n_pool_batches)
    threshold = ours.threshold_low(pool_entropy, FPR)
    flagged = set(torch.nonzero(test_entropy < threshold).flatten().tolist())
    rechecked_pool = entropies(pool, n_pool_batches + n_test_batches)
    rechecked_test = entropies(inspected, 2 * n_pool_batches + n_test_batches)
    return [
        Compared("entropy_per_input", max(max_abs(their_pool_entropy, rechecked_pool),
                                          max_abs(their_test_entropy, rechecked_test)),
                 note=f"{POOL} pool + {len(inspected)} inspected inputs, N {N}, alpha {ALPHA}"),
        Compared("threshold", abs(their_threshold - threshold), note=f"fpr {FPR}"),
        Compared("flagged", len(their_flagged ^ flagged), "int",
                 f"theirs flags {len(their_flagged)}, ours {len(flagged)}"),
    ]


def _features(model: nn.Module, x: torch.Tensor, layer: str) -> np.ndarray:
    from harness.eval.analysis.detectors.common import embed

    return embed(model.eval(), x, layer).double().numpy()


def check_spectral(reference: Path) -> list[Compared]:
    from harness.eval.analysis.detectors.spectral import spectral_flags, spectral_scores

    model, x, y, patched, target = _data()
    feats = _features(model, torch.cat([x, patched]), "last_stage")
    labels = torch.cat([y, target]).numpy()
    body = ScriptBody(reference / "defense" / "spectral.py", "mitigation")
    steps = ("full_mean =", "centered_cov =", "u,s,v =", "u, s, v =", "eigs =", "p = total_p", "corrs =",
             "scores =", "p_score =", "top_scores =")
    nodes = body.select(lambda node, src: src.startswith(steps))
    ours = spectral_scores(feats, labels)
    flagged = spectral_flags(ours, labels, 85.0)
    score_diff, flag_diff = 0.0, 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ns = body.run(nodes, {"np": np, "full_cov": feats[members], "total_p": 85})
        score_diff = max(score_diff, float(np.abs(ns["scores"] - ours[members]).max()))
        theirs = np.zeros(len(members), dtype=bool)
        theirs[ns["top_scores"]] = True
        flag_diff += int((theirs != flagged[members]).sum())
    return [Compared("scores", score_diff, note=f"{len(labels)} samples, {len(np.unique(labels))} classes, "
                                                f"D {feats.shape[1]}"),
            Compared("flagged", flag_diff, "int", f"ours flags {int(flagged.sum())}")]


class _KMeans:
    """sklearn KMeans with their pinned version's n_init=10 and a fixed random_state (module doc)."""

    def __new__(cls, n_clusters: int = 2, **kwargs: Any) -> Any:
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=n_clusters, n_init=10, random_state=0, **kwargs)


def check_ac(reference: Path) -> list[Compared]:
    from sklearn.metrics import silhouette_score

    from harness.eval.analysis.detectors.ac import ac_detect

    model, x, y, patched, target = _data()
    feats = _features(model, torch.cat([x, patched[:40]]), "embedding")  # 40 patched: a minority of class 0
    labels = torch.cat([y, target[:40]]).numpy()
    # detection_pretrain/ac.py: the per-class statements of `cleanser`, run as written
    body = ScriptBody(reference / "detection_pretrain" / "ac.py", "cleanser")
    steps = ("temp_feats = temp_feats - ", "from sklearn.decomposition import FastICA", "X = ", "transformer = ",
             "X_transformed = ", "projected_feats = ", "kmeans = ", "if kmeans.labels_.sum()", "outliers = []",
             "for (bool, idx) in", "score = silhouette_score", "if len(outliers) <")
    nodes = body.select(lambda node, src: src.startswith(steps))
    classes = np.unique(labels)
    class_indices = [np.flatnonzero(labels == c) for c in range(int(classes.max()) + 1)]
    suspicious: list[int] = []
    for c in classes:
        body.run(nodes, {"np": np, "torch": torch, "KMeans": _KMeans, "silhouette_score": silhouette_score, "logging": logging,
                         "self": SimpleNamespace(args=SimpleNamespace(nb_dims=10, random_seed=0, nb_clusters=2)),
                         "temp_feats": torch.as_tensor(feats[class_indices[c]]), "class_indices": class_indices,
                         "target_class": int(c), "suspicious_indices": suspicious})
    theirs = np.zeros(len(labels), dtype=bool)
    theirs[np.asarray(suspicious, dtype=np.int64)] = True
    _, ours, _ = ac_detect(feats, labels, "ica", 10, 0.35, 0)
    # defense/ac.py: cluster_activations (PCA) + ClusteringAnalyzer.analyze_by_size, one "batch" = every class whole
    import sklearn.cluster
    fns = load_functions(reference / "defense" / "ac.py",
                         ["cluster_activations", "reduce_dimensionality", "ClusteringAnalyzer"],
                         {"np": np, "KMeans": _KMeans, "List": list, "Tuple": tuple, "Dict": dict, "Any": Any,
                          "sklearn": sklearn.cluster})
    clusters, _ = fns["cluster_activations"]([feats[i] for i in class_indices], nb_clusters=2, nb_dims=10,
                                             reduce="PCA", clustering_method="KMeans")
    analyzer = fns["ClusteringAnalyzer"]()
    their_removed = np.zeros(len(labels), dtype=bool)
    for c, members in enumerate(class_indices):  # one class per call: its np.asarray of ragged classes fails on numpy >= 1.24
        clean, _, _ = analyzer.analyze_by_size([clusters[c]])
        their_removed[members] = np.asarray(clean[0]) == 0
    _, our_removed, _ = ac_detect(feats, labels, "first", 10, 1.0, 0)  # their chained comparison: no PCA (ac.py doc)
    return [Compared("detector_flagged", int((theirs != ours).sum()), "int",
                     f"theirs {int(theirs.sum())}, ours {int(ours.sum())} of {len(labels)} (40 patched)"),
            Compared("defense_flagged", int((their_removed != our_removed).sum()), "int",
                     f"theirs removes {int(their_removed.sum())}, ours {int(our_removed.sum())}")]


CHECKS = {"strip": check_strip, "spectral": check_spectral, "ac": check_ac}

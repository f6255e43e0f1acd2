"""What the backdoor detectors share: AUROC and TPR at a fixed FPR (sklearn.metrics), the columns
they write, their settings (`eval.detectors.<name>`), and the features they read.

Scores are "higher = more suspicious" everywhere. Two kinds of numbers per detector:
  * ranking metrics over the labelled pool (poisoned vs clean), for evaluation only:
    `det_<name>_auroc` and `det_<name>_tpr_at_5fpr` (the ROC curve's TPR where its FPR is <= 5%);
  * the detector's own decision, taken without the labels: `det_<name>_tpr`, `det_<name>_fpr`
    and `det_<name>_n_flagged`.
Features: "embedding" is the classifier's penultimate embedding (`Classifier.features`, BackdoorBench's
avgpool hook for PreAct-R18), "last_stage" the last feature stage's output flattened (their
`layer4` hook, before pooling).
"""
from __future__ import annotations

import json
import sys

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from harness.backdoor.base import build_poison
from harness.backdoor.plan import train_plan
from harness.data.loader import make_loader
from harness.data.validation import validation_split
from harness.eval.stage import Analysis, EvalContext

LAYERS = ("embedding", "last_stage")


def auroc(scores: np.ndarray, is_poison: np.ndarray) -> float:
    """Area under the ROC curve of `scores` separating poisoned (True) from clean; NaN when one
    side is empty (a clean cell, a per-batch poison)."""
    is_poison = np.asarray(is_poison, dtype=bool)
    if is_poison.all() or not is_poison.any():
        return float("nan")
    return float(roc_auc_score(is_poison, np.asarray(scores, dtype=np.float64)))


def tpr_at_fpr(scores: np.ndarray, is_poison: np.ndarray, fpr: float = 0.05) -> float:
    """The largest TPR of the ROC curve at an FPR <= `fpr` (an evaluation metric: it looks at the labels)."""
    is_poison = np.asarray(is_poison, dtype=bool)
    if is_poison.all() or not is_poison.any():
        return float("nan")
    fprs, tprs, _ = roc_curve(is_poison, np.asarray(scores, dtype=np.float64))
    return float(tprs[fprs <= fpr + 1e-12].max())


def decision_rates(flagged: np.ndarray, is_poison: np.ndarray) -> tuple[float, float]:
    """(TPR, FPR) of a decision (flagged) against the truth; NaN for an empty side."""
    flagged, is_poison = np.asarray(flagged, dtype=bool), np.asarray(is_poison, dtype=bool)
    tpr = float(flagged[is_poison].mean()) if is_poison.any() else float("nan")
    fpr = float(flagged[~is_poison].mean()) if (~is_poison).any() else float("nan")
    return tpr, fpr


def detection_columns(name: str, scores: np.ndarray, is_poison: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    """The columns every sample-level detector writes."""
    tpr, fpr = decision_rates(flagged, is_poison)
    return {f"det_{name}_auroc": auroc(scores, is_poison), f"det_{name}_tpr_at_5fpr": tpr_at_fpr(scores, is_poison),
            f"det_{name}_tpr": tpr, f"det_{name}_fpr": fpr, f"det_{name}_n_flagged": int(np.sum(flagged)),
            f"det_{name}_n": int(len(is_poison)), f"det_{name}_n_poisoned": int(np.sum(is_poison))}


def is_backdoor_cell(cfg: dict[str, Any]) -> bool:
    return (cfg.get("backdoor") or {}).get("name", "none") != "none"


def static_poison(cfg: dict[str, Any]) -> bool:
    """Whether the cell's poison has a fixed set of poisoned training samples (not WaNet's per-batch)."""
    bcfg = {k: v for k, v in (cfg.get("backdoor") or {}).items() if k != "clean_train"}
    poison = build_poison(bcfg)
    return poison is not None and poison.poisoning != "per_batch"


@contextmanager
def tapped(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """While open, the output of the model's last feature stage lands in the yielded list."""
    names = model.layer_names() if hasattr(model, "layer_names") else []
    if not names:
        raise ValueError("detector features: layer 'last_stage' needs Classifier.layer_names(); use 'embedding'")
    out: list[torch.Tensor] = []
    handle = dict(model.named_modules())[names[-1]].register_forward_hook(
        lambda _m, _i, o: out.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        yield out
    finally:
        handle.remove()


def embed(model: nn.Module, x: torch.Tensor, layer: str = "embedding") -> torch.Tensor:
    """(B, D) features of a batch at `layer` ("embedding" or "last_stage", module doc), no grad."""
    if layer not in LAYERS:
        raise ValueError(f"detector layer must be one of {LAYERS}, got {layer!r}")
    with torch.no_grad():
        if layer == "embedding":
            return model.features(x)[0].flatten(1)
        with tapped(model, layer) as out:
            model(x)
        return out[-1].flatten(1)


def train_features(cfg: dict[str, Any], model: nn.Module, device: torch.device | str, layer: str,
                   batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(split indices, labels as trained on, features, poisoned?) over the cell's poisoned training
    split as the model saw it (poisoned, no augmentation, the validation split left out), sorted
    by index. A defended cell's run-time `clean_train` is ignored: the poisoned set is what is
    inspected."""
    bcfg = {k: v for k, v in (cfg.get("backdoor") or {}).items() if k != "clean_train"}
    plan = train_plan({**cfg, "backdoor": bcfg})
    held = validation_split(cfg)
    data = cfg["data"]
    loader = make_loader(Path(data["dir"]), "train", batch_size, img_size=data.get("img_size"),
                         limit=data.get("train_limit"), cache_dir=data.get("cache"), return_keys=True,
                         select=held.train_indices() if held is not None else None,
                         poison=plan.for_epoch(0) if plan is not None else None)
    model.eval()
    idx, ys, feats = [], [], []
    for x, y, keys in loader:
        feats.append(embed(model, x.to(device), layer).double().cpu().numpy())
        ys.append(y.numpy())
        idx.append(np.asarray([int(k) for k in keys], dtype=np.int64))
    indices, labels, features = np.concatenate(idx), np.concatenate(ys), np.concatenate(feats)
    order = np.argsort(indices, kind="stable")
    poisoned = plan.poisoned if plan is not None else np.zeros(0, np.int64)
    return indices[order], labels[order], features[order], np.isin(indices[order], poisoned)


def detector_values(row: dict[str, Any]) -> dict[str, Any]:
    """The `det_<name>_*` values of a result row (or an eval context's columns): its detectors_json."""
    return json.loads(row.get("detectors_json") or "{}")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Detector(Analysis):
    """A backdoor detector: on by default on every backdoor cell (`always`), off where
    `eval.detectors.<name>` is null; its settings are `default_config` updated by that block."""

    always = True
    detector = True  # `robustgrid list analyses` marks it
    order = 50
    default_config: ClassVar[dict[str, Any]] = {}
    needs_static_poison: ClassVar[bool] = False  # a training-set detector needs the poisoned indices

    def options(self, cfg: dict[str, Any]) -> dict[str, Any] | None:
        """The detector's settings for this cell; None when switched off."""
        block = (cfg.get("eval") or {}).get("detectors")
        if block is None:  # a config without the block (older, or built by hand): every detector at its defaults
            return dict(self.default_config)
        if self.label not in block or block[self.label] is None:
            return None
        mine = dict(block[self.label] or {})
        unknown = set(mine) - set(self.default_config)
        if unknown:
            raise ValueError(f"eval.detectors.{self.label}: unknown settings {sorted(unknown)}; "
                             f"known: {sorted(self.default_config)}")
        return {**self.default_config, **mine}

    def applies(self, cfg: dict[str, Any]) -> bool:
        if not is_backdoor_cell(cfg) or self.options(cfg) is None:
            return False
        return static_poison(cfg) if self.needs_static_poison else True

    def check(self, cfg: dict[str, Any]) -> None:
        options = self.options(cfg)
        if options is not None:
            self.validate(options)

    def validate(self, options: dict[str, Any]) -> None:
        """Raise ValueError naming a bad setting of this detector (before work, and again at run)."""

    def run(self, ctx: EvalContext) -> None:
        """Adds this detector's `det_<name>_*` values to the cell's `detectors_json` column (one JSON
        object for every detector: the result schema stays fixed whatever detectors are installed)."""
        started = time.perf_counter()
        options = self.options(ctx.cfg)
        assert options is not None, "applies() said it runs"
        self.validate(options)
        try:
            found = self.detect(ctx, options)
        except Exception as err:  # a detector that cannot score this model never fails the cell's results
            found = {f"det_{self.label}_error": f"{type(err).__name__}: {err}"}
            print(f"warning: detector {self.label} failed on {ctx.cfg.get('key')}: {type(err).__name__}: {err}",
                  file=sys.stderr)
        found[f"det_{self.label}_seconds"] = time.perf_counter() - started
        ctx.columns["detectors_json"] = json.dumps({**detector_values(ctx.columns), **found},
                                                   sort_keys=True, default=_plain)

    def detect(self, ctx: EvalContext, options: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class TrainingSetDetector(Detector):
    """A detector of poisoned TRAINING samples from the model's features on the poisoned split
    (Spectral Signatures, Activation Clustering): `decide` scores and flags them; the AUROC, TPR
    and the flags' precision against the known poisoned indices are computed here alike."""

    needs_static_poison = True

    def detect(self, ctx: EvalContext, options: dict[str, Any]) -> dict[str, Any]:
        _, labels, feats, is_poison = train_features(ctx.cfg, ctx.model, ctx.device, str(options["layer"]),
                                                     int(options["batch_size"]))
        scores, flagged, extra = self.decide(feats, labels, options, int(ctx.cfg["seed"]))
        return detection_columns(self.label, scores, is_poison, flagged) | extra

    def decide(self, feats: np.ndarray, labels: np.ndarray, options: dict[str, Any],
               seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(score per sample, higher = more suspect; flagged per sample; extra det_* values)."""
        raise NotImplementedError

"""Training health on the site: what each training-integrity flag means, and a row's health word.

The flags themselves are computed by harness/train/health.py (docs/training_health.md); here they
get the sentence a badge's tooltip and the flagged page show, beside each cell's evidence. A row
is `flagged` (ranked after every unflagged row, as with evaluation flags) when any of its cells
carries an evaluation or a training flag.
"""
from __future__ import annotations

import json
from typing import Any

from leaderboard.format import finite

EXPLANATIONS = {
    "catastrophic_overfitting": "training flag: validation PGD accuracy collapsed between two probes while the "
                                "train-time attack's accuracy rose (catastrophic overfitting of a single-step "
                                "attack): the model is robust only to its own training attack",
    "robust_overfitting": "training flag: the last probe's validation robust accuracy is well below the best "
                          "probe's (robust overfitting, Rice et al. 2020): an earlier epoch was more robust",
    "collapsed": "training flag: one class takes most validation predictions, or clean accuracy is at chance: "
                 "the model collapsed",
    "weak_train_attack": "training flag: train-time robust accuracy far above validation PGD-10 accuracy at "
                         "most probes: the training attack is weaker than the evaluation's",
    "diverged": "training flag: the loss became NaN or infinite; the cell failed",
}
HEALTH_WORDS = {"flagged": "training flagged", "healthy": "healthy", "unprobed": "not probed",
                "partial": "partly probed"}


def explain(flag: str) -> str:
    return EXPLANATIONS.get(flag, f"training flag: {flag}")


def health(cell_train_flags: dict[str, list[str]], validation_n: list[Any]) -> str:
    """One word for a row: `flagged` (a cell has a training flag), `healthy` (every cell probed,
    none flagged), `unprobed` (no cell probed: trained before probes, elsewhere, or with
    trainer.validation off) or `partial`."""
    if cell_train_flags:
        return "flagged"
    probed = [bool(n) for n in validation_n]
    if probed and all(probed):
        return "healthy"
    return "partial" if any(probed) else "unprobed"


def _details(details_json: str | None) -> dict[Any, Any]:
    """A row's train_flag_details JSON as {flag: evidence}; {} when missing or malformed."""
    try:
        details = json.loads(details_json or "{}")
    except (TypeError, ValueError):
        return {}
    return details if isinstance(details, dict) else {}


def evidence(details_json: str | None) -> dict[str, str]:
    """{flag: 'flag at epoch E: explanation (evidence)'} from a row's train_flag_details JSON."""
    out = {}
    for flag, found in _details(details_json).items():
        found = found if isinstance(found, dict) else {"evidence": found}
        epoch = found.get("epoch")
        rest = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in found.items() if k != "epoch"}
        where = f" at epoch {epoch}" if epoch is not None else ""
        out[str(flag)] = f"{flag}{where}: {explain(str(flag))} ({json.dumps(rest, sort_keys=True)})"
    return out


def flag_epochs(details_json: str | None) -> dict[str, int]:
    """{flag: the epoch it fired at}, for marking the validation curves."""
    out = {}
    for flag, found in _details(details_json).items():
        epoch = finite(found.get("epoch")) if isinstance(found, dict) else None
        if epoch is not None and abs(epoch) < 1e9:
            out[str(flag)] = int(epoch)
    return out

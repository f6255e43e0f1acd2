"""The backdoor track as one attack x defense matrix (BackdoorBench's view): per (dataset, arch,
poison rate, target), a heatmap per metric (CA, ASR, RA, DER) with poisons as rows and defenses as
columns, each square linking to its cell; the defenses ranked by their mean DER over every
(attack, seed) with a 95% interval; and the detectors' mean AUROC (from the rows' `detectors_json`) per attack, on the undefended (poisoned ERM) model of that attack, as
BackdoorBench's detection track measures them.

Built from `backdoor_tables` (leaderboard/backdoor.py), which already holds each (attack, arch,
defense) row's means over seeds, its per-seed DERs and its detectors' AUROC; nothing is read twice.

"Beats no defense": the undefended model's DER is 0.5 by definition (nothing changed), so a defense
beats it when its interval's lower end is above 0.5: it lowered ASR by more than it cost in CA, beyond
the seed-to-seed spread. The interval is Student's t over the defense's cells (attacks x seeds); with
one cell there is none.
"""
from __future__ import annotations

import math
from typing import Any

from scipy import stats

from leaderboard.backdoor import UNDEFENDED
from leaderboard.format import base_method

# metric -> (row field, True when higher is better, label)
METRICS: dict[str, tuple[str, bool, str]] = {
    "ca": ("clean_acc_mean", True, "CA (clean accuracy)"),
    "asr": ("asr_mean", False, "ASR (attack success rate)"),
    "ra": ("ra_mean", True, "RA (robust accuracy under the trigger)"),
    "der": ("der_mean", True, "DER (defense effectiveness rating)"),
}
NO_DEFENSE_DER = 0.5


def heat(value: float | None, higher_is_better: bool) -> str:
    """A square's background: red (bad) through yellow to green (good), for a value in [0, 1]."""
    if value is None or not math.isfinite(value):
        return "#eeeeee"
    good = min(1.0, max(0.0, value if higher_is_better else 1.0 - value))
    return f"hsl({round(120 * good)}, 65%, 78%)"


def interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """Student's t interval of the mean; None with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def backdoor_matrices(tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One matrix per (dataset, arch, poison rate, target) from the backdoor tables (data.json shape)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for table in tables:
        for row in table["rows"]:
            group = groups.setdefault((table["dataset"], row["arch"], table["poison_rate"], table["target_class"]), {
                "dataset": table["dataset"], "arch": row["arch"], "poison_rate": table["poison_rate"],
                "target_class": table["target_class"], "rows": {}})
            group["rows"][(table["backdoor"], row["method"])] = row
    return [_matrix(group) for _, group in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))]


def _matrix(group: dict[str, Any]) -> dict[str, Any]:
    rows: dict[tuple[str, str], dict[str, Any]] = group.pop("rows")
    attacks = sorted({a for a, _ in rows})
    methods = {m for _, m in rows}
    defenses = sorted(methods, key=lambda m: (base_method(m) != UNDEFENDED, m))  # no defense first
    heatmaps = []
    for metric, (field, higher, label) in METRICS.items():
        grid = []
        for attack in attacks:
            line = []
            for defense in defenses:
                row = rows.get((attack, defense))
                value = None if row is None else row.get(field)
                line.append({"value": value, "color": heat(value, higher), "n_seeds": row and row["n_seeds"],
                             "key": row["keys"][0] if row and row["keys"] else None,
                             "flagged": bool(row and row["flagged"])})
            grid.append({"attack": attack, "squares": line})
        heatmaps.append({"metric": metric, "label": label, "higher_is_better": higher, "grid": grid})
    ranking = []
    for defense in defenses:
        if base_method(defense) == UNDEFENDED:
            continue
        values = [v for attack in attacks for v in (rows.get((attack, defense)) or {}).get("der_values", [])]
        mean = sum(values) / len(values) if values else None
        ci = interval(values)
        seconds = [rows[(a, defense)]["train_seconds_mean"] for a in attacks
                   if (a, defense) in rows and rows[(a, defense)].get("train_seconds_mean") is not None]
        ranking.append({"method": defense, "der_mean": mean, "der_ci": ci, "n": len(values),
                        "train_seconds": sum(seconds) / len(seconds) if seconds else None,
                        "attacks": sum(1 for a in attacks if (a, defense) in rows),
                        "beats_no_defense": bool(ci and ci[0] > NO_DEFENSE_DER)})
    ranking.sort(key=lambda r: (r["der_mean"] is None, -(r["der_mean"] or 0.0), r["method"]))
    undefended = [row["train_seconds_mean"] for (_, m), row in rows.items()
                  if base_method(m) == UNDEFENDED and row.get("train_seconds_mean") is not None]
    erm_seconds = sum(undefended) / len(undefended) if undefended else None
    for r in ranking:  # a defense's own training beside the poisoned ERM's (post-training ones start from it)
        r["cost_ratio"] = r["train_seconds"] / erm_seconds if r["train_seconds"] is not None and erm_seconds else None
    detectors = sorted({d for row in rows.values() for d in row.get("detectors", {})})
    detector_rows = []
    for name in detectors:
        per_attack = {}
        for attack in attacks:
            seen = [row["detectors"][name] for (a, m), row in rows.items()
                    if a == attack and base_method(m) == UNDEFENDED and name in row.get("detectors", {})]
            per_attack[attack] = sum(seen) / len(seen) if seen else None
        detector_rows.append({"detector": name, "auroc": per_attack,
                              "colors": {a: heat(v, True) for a, v in per_attack.items()}})
    return {**group, "attacks": attacks, "defenses": defenses, "heatmaps": heatmaps, "erm_seconds": erm_seconds,
            "ranking": ranking, "detectors": detector_rows}

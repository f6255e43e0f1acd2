"""Per-cell records for the cell pages: every Parquet row of a cell, plus parsed config and curve.

Cells come straight from pyarrow (to_pylist), not from the aggregation, so a cell page shows
its rows exactly as committed: the numbers a reader checks against the Parquet file.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from leaderboard.format import cell_file
from leaderboard.health import evidence, flag_epochs

# Cell-level fields shown as provenance (same on every row of a cell; the first non-null wins).
PROVENANCE = [
    "grid", "dataset", "arch", "method", "seed", "norm", "eps", "git_commit", "code_version",
    "data_sha256", "checkpoint_sha256", "device", "hardware", "hostname", "world_size",
    "replicas_in_sync", "n_train", "n_eval", "epochs", "final_train_loss", "train_seconds",
    "eval_seconds", "images_per_second", "started_at", "finished_at",
    "neuron_sensitivity", "neuron_sensitivity_layers",
    "validation_n", "validation_sha256", "selection", "selected_epoch", "selection_reason",
    "val_clean_acc", "val_robust_acc", "val_asr",
]
# Cost of the cell (issue 15's columns, written by the GPU path): (column, label, formatter name).
COST_FIELDS = [
    ("device_name", "device", "display"), ("device_count", "devices", "display"),
    ("train_seconds", "train time (s)", "sig"), ("eval_seconds", "eval time (s)", "sig"),
    ("device_hours", "device-hours", "sig"), ("flops_per_image", "FLOPs / image", "si"),
    ("train_flops", "training FLOPs", "si"), ("peak_memory_bytes", "peak device memory", "bytes"),
    ("mfu", "model FLOPs utilisation", "pct"),
]


@dataclass
class Cell:
    """One cell (one trained model, one seed) and all its result rows."""

    key: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def page(self) -> str:
        return cell_file(self.key)

    @property
    def ok(self) -> bool:
        return all(r.get("status") == "ok" for r in self.rows)

    @property
    def status(self) -> str:
        return "ok" if self.ok else "failed"

    def first(self, name: str) -> Any:
        """The first non-null value of a column over the cell's rows."""
        for row in self.rows:
            if row.get(name) is not None:
                return row[name]
        return None

    @property
    def errors(self) -> list[str]:
        return list(dict.fromkeys(r["error"] for r in self.rows if r.get("error")))

    @property
    def flags(self) -> list[str]:
        return sorted({f for r in self.rows for f in (r.get("flags") or [])})

    @property
    def method_summary(self) -> dict[str, str]:
        """What the method decided (Method.summary: a defense's pruned channels, flagged classes), each
        value as compact JSON text; {} when the method recorded nothing or the row predates the column."""
        text = self.first("method_summary")
        try:
            record = json.loads(text) if text else {}
        except ValueError:  # a malformed value never breaks the page
            return {}
        if not isinstance(record, dict):
            return {}
        return {str(k): v if isinstance(v, str) else json.dumps(v, separators=(", ", ": ")) for k, v in record.items()}

    @property
    def flag_details(self) -> dict[str, str]:
        """Each flag's evidence (harness/eval/integrity.py's flag_details JSON), as text for tooltips."""
        out: dict[str, str] = {}
        for row in self.rows:
            try:
                details = json.loads(row.get("flag_details") or "{}")
            except (TypeError, ValueError):
                continue
            for flag, evidence in details.items():
                text = evidence if isinstance(evidence, str) else json.dumps(evidence, sort_keys=True)
                out.setdefault(flag, f"{flag}: {text}")
        return out

    @property
    def train_flags(self) -> list[str]:
        return sorted({f for r in self.rows for f in (r.get("train_flags") or [])})

    @property
    def train_flag_details(self) -> dict[str, str]:
        """Each training flag's epoch, meaning and evidence (leaderboard/health.py), for tooltips."""
        out: dict[str, str] = {}
        for row in self.rows:
            for flag, text in evidence(row.get("train_flag_details")).items():
                out.setdefault(flag, text)
        return out

    @property
    def train_flag_epochs(self) -> dict[str, int]:
        """{training flag: the epoch it fired at}, to mark on the validation curves."""
        out: dict[str, int] = {}
        for row in self.rows:
            for flag, epoch in flag_epochs(row.get("train_flag_details")).items():
                out.setdefault(flag, epoch)
        return out

    @property
    def package_versions(self) -> list[tuple[str, str]]:
        value = self.first("package_versions") or []
        return sorted(value.items()) if isinstance(value, dict) else [tuple(kv) for kv in value]

    @functools.cached_property
    def config(self) -> str | None:
        """The resolved config as pretty JSON (the raw text when it is not valid JSON); computed
        once per cell (a page reads it twice, and a 10,000-cell site has 10,000 of them)."""
        text = self.first("config_json")
        if text is None:
            return None
        try:
            return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
        except ValueError:
            return text

    @functools.cached_property
    def train_key(self) -> str | None:
        """The checkpoint folder's name (the config's train_key), when the config records it."""
        try:
            value = json.loads(self.first("config_json") or "{}").get("train_key")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and value.isalnum() else None

    @property
    def train_curve(self) -> list[dict[str, Any]]:
        """Per-epoch dicts from train_curve JSON; [] when missing or malformed."""
        try:
            curve = json.loads(self.first("train_curve") or "[]")
        except ValueError:
            return []
        return [p for p in curve if isinstance(p, dict)] if isinstance(curve, list) else []

    @property
    def cost_hours(self) -> float | None:
        """(train_seconds + eval_seconds) * world_size / 3600, as in the tables."""
        train, ev = self.first("train_seconds"), self.first("eval_seconds")
        if train is None and ev is None:
            return None
        return ((train or 0.0) + (ev or 0.0)) * (self.first("world_size") or 1) / 3600.0

    def headline_row(self, headline_attack: str | None) -> dict[str, Any] | None:
        """The row behind the cell's headline: the named attack, else the attack with the lowest
        robust accuracy (the cell's worst case)."""
        rows = [r for r in self.rows if r.get("attack") is not None and r.get("robust_acc") is not None]
        if headline_attack is not None:
            rows = [r for r in rows if r["attack"] == headline_attack]
        return min(rows, key=lambda r: r["robust_acc"]) if rows else None


def group_cells(results: pa.Table) -> dict[str, Cell]:
    """All cells by key, rows sorted by attack (failed rows without attack first)."""
    cells: dict[str, Cell] = {}
    for row in results.to_pylist():
        cells.setdefault(row["key"], Cell(row["key"])).rows.append(row)
    for cell in cells.values():
        cell.rows.sort(key=lambda r: (r.get("attack") is not None, str(r.get("attack"))))
    return dict(sorted(cells.items()))

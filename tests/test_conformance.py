"""Every method, poison and analysis checked has its conformance row, and the benchmark that
measures it runs.

The measurement itself needs the official repositories (fetched outside this repository, never
committed; CI has no GitHub): set CONFORMANCE_REFS to a folder of checkouts named like
`yaodongyu+TRADES` and the slow test runs every check and requires it at its goal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.registry import ANALYSES, METHODS, POISONS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conformance.md"
sys.path.insert(0, str(ROOT / "benchmarks"))

from conformance_checks import modules  # noqa: E402

TRAINER_OPTIONS = ("ema",)  # checked trainer features every method can use (trainer.ema: harness/train/ema.py)
POISON_OPTIONS = ("all_to_all",)  # checked poison settings every dirty-label poison can use (backdoor.label_mode)


def doc_rows() -> dict[str, str]:
    """plugin name -> its row in the "Methods and poisons" table."""
    section = DOC.read_text().split("## Methods and poisons", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            for name in line.split("|")[1].strip().replace("`", "").split(","):
                rows[name.strip()] = line
    return rows


def test_every_checked_plugin_is_registered_and_has_a_row() -> None:
    rows = doc_rows()
    for module in modules():
        assert "/" in module.REPOSITORY
        for name in module.CHECKS:
            assert name in METHODS.names() or name in POISONS.names() or name in ANALYSES.names() \
                or name in TRAINER_OPTIONS or name in POISON_OPTIONS, name
            assert name in rows, f"docs/conformance.md has no row for {name}"


def test_every_method_and_poison_has_its_row() -> None:
    """A plugin in the tables without a conformance row is a claim nobody checked."""
    rows = doc_rows()
    missing = sorted((set(METHODS.names()) | set(POISONS.names())) - set(rows))
    assert not missing, f"docs/conformance.md has no row for {missing}"


def test_the_benchmark_lists_its_checks() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conformance.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout
    assert "yaodongyu/TRADES" in out and "trades" in out


REFS = os.environ.get("CONFORMANCE_REFS")


@pytest.mark.slow
@pytest.mark.skipif(not REFS, reason="set CONFORMANCE_REFS to a folder of official checkouts (owner+name)")
@pytest.mark.parametrize("name", sorted(n for m in modules() for n in m.CHECKS))
def test_conformance_at_its_goal(name: str) -> None:
    module = next(m for m in modules() if name in m.CHECKS)
    reference = Path(REFS) / module.REPOSITORY.replace("/", "+")
    if not reference.is_dir():
        pytest.skip(f"no checkout of {module.REPOSITORY} at {reference}")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conformance.py"), "--method", name,
                          "--reference", str(reference)], capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"], out.stdout

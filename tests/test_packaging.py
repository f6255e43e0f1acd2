"""Packaging: the heavy ACE dependencies stay optional (nothing outside the ACE analysis imports
them at import time), and the extras the README's commands rely on exist."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_core_imports_without_ace_dependencies() -> None:
    """diffusers blocked: the CLI, grid, cell, every method and the site still import (scipy stays
    core: harness/data reads SVHN's .mat files with it)."""
    code = (
        "import sys\n"
        "for name in ('diffusers',):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "import harness.cli, harness.run.grid, harness.run.cell, leaderboard, leaderboard.report\n"
        "from harness.core.registry import METHODS, ATTACKS\n"
        "[METHODS.get(n) for n in METHODS.names()]; [ATTACKS.get(n) for n in ATTACKS.names()]\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_extras() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "diffusers" not in core
    extras = project["optional-dependencies"]
    assert {"ace", "cluster", "torchattacks", "test"} <= set(extras)
    assert any(d.startswith("ray[default]") for d in extras["cluster"])
    assert any(d.startswith("robustgrid[") and "ace" in d and "cluster" in d for d in extras["test"])
    assert (REPO / "LICENSE").read_text().startswith("Apache License") and project["license"]["text"] == "Apache-2.0"

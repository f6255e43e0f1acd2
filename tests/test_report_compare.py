"""`robustgrid report --format markdown|latex` and `robustgrid compare A B` (subprocess: the
real entry point)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.store.results import write_cell_result


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=300)


def _store(root: Path, robust: dict[str, float]) -> Path:
    for key, acc in robust.items():
        write_cell_result(root, key, [{"key": key, "status": "ok", "dataset": "digits", "arch": "cnn",
                                       "method": key.rstrip("0123456789"), "seed": 0, "attack": "pgd", "norm": "linf",
                                       "eps": 0.1, "clean_acc": 0.9, "robust_acc": acc, "n_eval": 1000,
                                       "flags": ["grad_masking"] if key.startswith("trades") else []}])
    return root


def test_report_latex_and_markdown(tmp_path: Path) -> None:
    results = _store(tmp_path / "r", {"pgd_at0": 0.5, "erm0": 0.0, "trades0": 0.6})
    latex = _cli("report", "--format", "latex", "--results", str(results))
    assert latex.returncode == 0, latex.stderr
    text = latex.stdout
    assert r"\begin{tabular}" in text and r"\toprule" in text and r"\bottomrule" in text
    assert r"pgd\_at (ICLR, 2018)" in text and r"50.00" in text and r"$^\dagger$" in text
    lines = [line for line in text.splitlines() if line.endswith(r"\\") and "&" in line]
    assert [line.split(" & ")[2].split(" ")[0] for line in lines[1:]] == [r"pgd\_at", "erm", "trades"]  # flagged last
    md = _cli("report", "--results", str(results), "--format", "markdown")
    assert md.returncode == 0 and "| # | arch | method | clean | pgd |" in md.stdout
    assert "| 1 | cnn | pgd_at (ICLR, 2018) | 90.00 | 50.00 |" in md.stdout


def test_compare_lists_cells_beyond_their_intervals(tmp_path: Path) -> None:
    a = _store(tmp_path / "a", {"pgd_at0": 0.50, "erm0": 0.10, "mart0": 0.30})
    b = _store(tmp_path / "b", {"pgd_at0": 0.51, "erm0": 0.02, "sns0": 0.40})  # 1 point: noise; 8 points: real
    proc = _cli("compare", str(a), str(b))
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "2 cells in both stores; 1 numbers differ" in out
    assert "erm0" in out and "robust_acc: 10.00%" in out and "-> 2.00%" in out
    assert "pgd_at0" not in out
    assert "mart0  only in A" in out and "sns0  only in B" in out
    same = _cli("compare", str(a), str(a))
    assert same.returncode == 0 and "0 numbers differ" in same.stdout

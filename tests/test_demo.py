"""The demo grid as a user runs it (slow: about 4 minutes on 2 cores; `pytest -m slow`)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from harness.store.index import read_results


@pytest.mark.slow
def test_demo_grid_adversarial_training_beats_erm_and_rerun_is_instant(tmp_path, data_root) -> None:
    cmd = [sys.executable, "-m", "harness.cli", "grid", "grid=demo", f"data.root={data_root}",
           f"results_dir={tmp_path / 'results'}", f"leaderboard_dir={tmp_path / 'site'}", "trainer.progress=false"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    index = tmp_path / "site" / "index.html"
    assert first.stdout.strip().splitlines()[-1] == str(index.resolve())

    rows = read_results(tmp_path / "results").to_pylist()
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    pgd = {(r["arch"], r["method"]): r["robust_acc"] for r in rows if r["attack"] == "pgd"}
    for arch in ("test_resnet", "test_vit"):
        assert pgd[(arch, "erm")] < 0.2
        assert pgd[(arch, "pgd_at")] > pgd[(arch, "erm")] + 0.3
        assert pgd[(arch, "trades")] > pgd[(arch, "erm")] + 0.3
    html = index.read_text()
    assert all(r["key"][:10] in html for r in rows)

    t0 = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "6 already committed, 0 to run" in again.stderr
    assert time.perf_counter() - t0 < 60

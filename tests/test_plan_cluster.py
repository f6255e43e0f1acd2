"""The plan on a two-node Ray cluster (ray.cluster_utils.Cluster on loopback): a grid with ADML,
CBD and FT trains every model, prerequisites included, exactly once, as its own task (no lock),
and adding an attack to the finished grid trains nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_runs(results: Path) -> dict[str, int]:
    """Trainings actually run, per train key (each train node logs one file per run)."""
    runs = results / "_train_runs"
    return {d.name: len(list(d.glob("*.json"))) for d in runs.iterdir()} if runs.exists() else {}


def _grid(overrides: list[str], env: dict[str, str], tmp_path: Path, name: str) -> str:
    cmd = [sys.executable, "-m", "harness.cli", "grid", "--no-leaderboard", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / f"{name}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return " ".join((done.stdout + done.stderr).split())  # rich may wrap lines


@pytest.mark.slow  # ~2 min on 2 cores: CI runs it after the default suite
def test_two_node_grid_trains_each_prerequisite_once_and_new_attacks_train_nothing(data_root, tmp_path) -> None:
    from ray.cluster_utils import Cluster

    results = tmp_path / "results"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        base = ["grid=backdoor", "grid.axes.backdoor=[badnets]", "grid.axes.method=[adml_pgd_at,cbd,ft]",
                f"data.root={data_root}", f"results_dir=file://{results}", "trainer=tiny", "data.train_limit=128",
                "eval.limit=32", "eval.neuron_sensitivity.enabled=false", "eval.integrity_points=8",
                f"ray.address={cluster.address}"]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "ROBUSTGRID_CACHE": str(tmp_path / "cache")}
        log = _grid(base, env, tmp_path, "first")
        assert "plan: 6 trainings, 0 artifacts, 3 evaluations" in log, log[-3000:]
        runs = _train_runs(results)
        # pgd_at (ADML's base), adml, erm for T epochs (CBD's f_B), cbd, erm (FT's), ft: once each
        assert len(runs) == 6 and set(runs.values()) == {1}, runs
        assert not list((results / "checkpoints").glob(".*.lock")), "no training waits on a lock"
        committed = sorted(p.name for p in (results / "_commits").glob("*.json"))
        assert len(committed) == 3

        log = _grid(base + ["attack=[fgsm,pgd]", "attack.pgd.steps=2"], env, tmp_path, "second")
        assert "plan: 0 trainings, 0 artifacts, 3 evaluations" in log, log[-3000:]
        assert _train_runs(results) == runs, "adding an attack to a finished grid must train nothing"
        assert len(list((results / "_commits").glob("*.json"))) == 6
    finally:
        cluster.shutdown()

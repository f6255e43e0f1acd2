"""resources.launcher=ray_train: a 2-rank DDP cell on Ray Train workers; a killed worker is restarted
by Ray Train's FailureConfig and the cell resumes from its last epoch checkpoint."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from harness.run.grid import expand_grid, run_grid
from harness.store.index import read_results
from harness.run.status import attempt_count

pytestmark = pytest.mark.slow


def _overrides(tiny: list[str], tmp_path, epochs: int) -> list[str]:
    return ["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]",
            f"results_dir=file://{tmp_path / 'store'}", "resources.launcher=ray_train",
            "trainer.world_size=2", f"trainer.epochs={epochs}", "attack=[fgsm]"] + [
        o for o in tiny if not o.startswith(("results_dir", "attack."))]


def _kill_a_train_worker_after_first_epoch(meta_path, killed: list[int], stop: threading.Event) -> None:
    """Once epoch 0's checkpoint is in the store, SIGKILL one Ray Train worker process (its
    process title is `ray::RayTrainWorker...`; only workers started by this test are considered)."""
    import psutil

    started = time.time()
    while not stop.is_set():
        if meta_path.exists():
            for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if "RayTrainWorker" in cmdline and proc.info["create_time"] >= started - 1:
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.1)


def test_ray_train_cell_survives_a_killed_worker(tiny, tmp_path, ray_session) -> None:
    cells = expand_grid(_overrides(tiny, tmp_path, epochs=3))
    assert len(cells) == 1
    cfg = cells[0]
    meta = tmp_path / "store" / "checkpoints" / cfg["train_key"] / "checkpoint.json"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_train_worker_after_first_epoch, args=(meta, killed, stop), daemon=True)
    killer.start()
    try:
        report = run_grid(cells)
    finally:
        stop.set()
        killer.join(10)
    assert [o.status for o in report.outcomes] == ["ok"], [o.error for o in report.outcomes]
    assert killed, "a Ray Train worker must have been killed mid-training"
    rows = read_results(cfg["results_dir"]).to_pylist()
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["replicas_in_sync"]
    assert [p["epoch"] for p in json.loads(rows[0]["train_curve"])] == [0, 1, 2]
    assert json.loads(meta.read_text())["epoch"] == 2
    assert attempt_count(cfg["results_dir"], cfg["key"]) == 1, "Ray Train restarted the workers, not Ray the cell"
    # the evaluation ran on the cell's 2 Ray Train workers too, with exactly one rank's results
    assert (tmp_path / "store" / "_ray_train" / f"eval-{cfg['key']}").is_dir()
    from harness.run.nodes import evaluate_cell
    from harness.store.rows import now

    cfg["trainer"]["world_size"] = 1
    one = evaluate_cell(cfg, now())
    keys = ("attack", "clean_acc", "robust_acc", "per_class_robust_acc", "n_eval")
    assert [{k: r[k] for k in keys} for r in one] == [{k: rows[0][k] for k in keys}]

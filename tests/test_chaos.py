"""Chaos on a simulated two-node Ray cluster (ray.cluster_utils.Cluster, one machine).

A grid runs from a driver subprocess against the cluster; in its middle we SIGKILL a cell's
worker process, kill the second node (its raylet and workers) and add a fresh one, then SIGKILL
the driver and run the same command again. Every cell must end committed exactly once with a
verified file, nothing corrupt may be trusted, and cells committed before the restart must not
run again. The store is a file:// URI, so checkpoints go through the store sync too.
A second test SIGKILLs one DDP rank process of a 2-rank cell: Ray must retry the cell, not fail it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.store.index import read_results
from harness.run.status import ATTEMPTS, running_cells
from harness.run.submit import QUEUE_SLACK
from harness.store.storage import COMMITS, open_store

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow
# what a row says about the model (the rest is where, when and how long)
COMPARED = ("clean_acc", "robust_acc", "per_class_clean_acc", "per_class_robust_acc", "flags", "flag_details",
            "final_train_loss", "neuron_sensitivity", "n_eval", "n_train")  # not checkpoint_sha256: the file holds timings


def _stamp_seconds(name: str) -> float:
    """An attempt file's start stamp (`20261207T043012.123456Z-<attempt>.json`) in epoch seconds."""
    import datetime as dt

    stamp = name.split("-", 1)[0]
    return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def _wait(predicate, timeout: float, what: str, driver: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"driver exited ({driver.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def _committed(store) -> dict[str, str]:
    """key -> marker text, for markers that verify."""
    out = {}
    for name in store.list(COMMITS):
        key = name[: -len(".json")]
        if store.verified(key) is not None:
            out[key] = store.read_bytes(f"{COMMITS}/{name}").decode()
    return out


def _attempts(store, keys) -> dict[str, list[str]]:
    return {k: store.list(f"{ATTEMPTS}/{k}") for k in keys}


def test_grid_survives_killed_workers_node_and_driver(data_root: Path, tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    results = f"file://{tmp_path / 'results'}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        node = cluster.add_node(num_cpus=1)
        grid = [
            "grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm,pgd_at,trades]",
            "grid.axes.seed=[0,1]", f"data.root={data_root}", "trainer=tiny",
            "trainer.epochs=3", "data.train_limit=384", "eval.limit=64", "attack.pgd.steps=3",
            "resources.max_retries=4", f"ray.address={cluster.address}",
        ]
        cmd = [sys.executable, "-m", "harness.cli", "grid", "--no-leaderboard", *grid, f"results_dir={results}"]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "ROBUSTGRID_CACHE": str(tmp_path / "cache")}
        store = open_store(results)
        log1 = tmp_path / "driver1.log"
        with open(log1, "w") as out:
            driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            # 1. a worker process dies mid-cell (SIGKILL, as the OOM killer would)
            victim = _wait(lambda: next(iter(running_cells(results).values()), None), 240, "a running cell",
                           driver, log1)
            os.kill(int(victim["pid"]), signal.SIGKILL)
            killed_at = time.time()
            # 2. the second node dies with whatever runs on it; a fresh node joins
            _wait(lambda: len(_committed(store)) >= 1, 240, "a first commit", driver, log1)
            cluster.remove_node(node, allow_graceful=False)
            cluster.add_node(num_cpus=1)
            # 3. the driver dies while cells are still running
            _wait(lambda: len(_committed(store)) >= 3, 240, "three commits", driver, log1)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        time.sleep(3)  # let the dead job's workers be reaped; anything they committed counts as done
        before = _committed(store)
        assert 0 < len(before) < 6, "the driver must be killed mid-grid"
        attempts_before = _attempts(store, before)

        # 4. the same command again: only unfinished cells run
        log2 = tmp_path / "driver2.log"
        with open(log2, "w") as out:
            rerun = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=420)
        text = log2.read_text()
        assert rerun.returncode == 0, text[-3000:]
        match = re.search(r"grid: 6 cells, (\d+) already committed, (\d+) to run", text)
        assert match and int(match.group(1)) == len(before), text[-3000:]

        # 5. the same grid, uninterrupted, into another store: the reference the faults must not move
        baseline = f"file://{tmp_path / 'baseline'}"
        clean = subprocess.run([*cmd[:-1], f"results_dir={baseline}"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=420)
        assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    finally:
        cluster.shutdown()

    after = _committed(store)
    assert len(after) == 6, "every cell committed"
    for key, marker in before.items():
        assert after[key] == marker, f"cell {key} was committed before the restart and must not be rewritten"
    assert _attempts(store, before) == attempts_before, "a cell done before the restart ran again"
    table = read_results(results)
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == 6 and len(keys) == 12, "each cell exactly once (2 attacks each)"
    assert set(table.column("status").to_pylist()) == {"ok"}
    root = tmp_path / "results"
    files = sorted(p.stem for p in root.glob("*.parquet"))
    assert files == sorted(after), "no stray or duplicate result files"
    for key in after:
        assert json.loads(after[key])["status"] == "ok"
    # the killed worker ran an eval node (key) or a train node (train-<train key>): that node was retried
    nodes = [d.name for d in (root / ATTEMPTS).iterdir() if d.is_dir()]
    retried = {k: len(v) for k, v in _attempts(store, nodes).items() if len(v) > 1}
    assert retried, "the killed worker's node must have been retried"
    # the retry of the killed node is not starved: few nodes start between the kill and the retry
    victim_key = victim["key"]
    starts = {k: sorted(_stamp_seconds(name) for name in v) for k, v in _attempts(store, nodes).items()}
    retry_at = next(t for t in starts[victim_key][1:] if t >= killed_at - 1)
    overtook = sorted(k for k, ts in starts.items() if k != victim_key and killed_at <= ts[0] < retry_at)
    assert len(overtook) <= 2 * 2 + QUEUE_SLACK, f"{len(overtook)} nodes started before the retry: {overtook}"
    print(f"chaos: {len(before)} cells committed before the driver restart, attempts per retried cell {retried}; "
          f"the killed node's retry started {retry_at - killed_at:.1f} s after the kill, "
          f"after {len(overtook)} newer node(s)")
    # 6. the faults changed no number: every row equals the uninterrupted run's (bitwise, CPU)
    clean_rows = {(r["key"], r["attack"]): r for r in read_results(baseline).to_pylist()}
    def losses(row: dict) -> list:  # every epoch's mean loss and lr (the curve's other entries are timings)
        return [(e["loss"], e["lr"]) for e in json.loads(row["train_curve"])]

    for row in table.to_pylist():
        ref = clean_rows[(row["key"], row["attack"])]
        differ = [c for c in COMPARED if row.get(c) != ref.get(c)]
        differ += ["train_curve losses"] if losses(row) != losses(ref) else []
        assert not differ, f"{row['key']} {row['attack']} differs from the uninterrupted run in {differ}"


def test_a_killed_ddp_rank_makes_ray_retry_the_cell_which_resumes(tiny, tmp_path: Path, ray_session) -> None:
    """SIGKILL one of a 2-rank cell's DDP processes after its first epoch: torch raises
    ProcessExitedException, Ray retries the cell (retry_exceptions), the retry resumes."""
    import threading

    import psutil

    from harness.run.grid import expand_grid, run_grid
    from harness.run.status import attempt_count

    cells = expand_grid(["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]",
                         "trainer.world_size=2", "trainer.epochs=4", "attack=[fgsm]"]
                        + [o for o in tiny if not o.startswith("attack.")])
    cfg = cells[0]
    checkpoint = Path(cfg["results_dir"]) / "checkpoints" / cfg["train_key"] / "checkpoint.json"
    train_node = f"train-{cfg['train_key']}"  # its running/attempt marker (harness/run/nodes.py)
    killed: list[int] = []

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            running = running_cells(cfg["results_dir"])
            if checkpoint.exists() and train_node in running:  # the train node's task holds the ranks
                ranks = psutil.Process(int(running[train_node]["pid"])).children()
                ranks = [p for p in ranks if "spawn_main" in " ".join(p.cmdline())]
                if len(ranks) == 2:
                    ranks[-1].kill()
                    killed.append(ranks[-1].pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    report = run_grid(cells)
    killer.join(5)
    assert killed, "a DDP rank must have been killed mid-training"
    assert [o.status for o in report.outcomes] == ["ok"], [o.error for o in report.outcomes]
    assert attempt_count(cfg["results_dir"], train_node) == 2, "Ray retried the train node once"
    assert attempt_count(cfg["results_dir"], cfg["key"]) == 1, "the eval node ran once, after the training"
    row = read_results(cfg["results_dir"]).to_pylist()[0]
    assert row["world_size"] == 2 and [p["epoch"] for p in json.loads(row["train_curve"])] == [0, 1, 2, 3]

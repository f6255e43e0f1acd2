"""Any number of drivers on one results store train each train key once (issue 24, item 1).

Two `robustgrid grid` drivers started together, each on its own embedded Ray, on overlapping sweeps
(seeds 0-1 and 1-2) of one store: the shared cell's model is trained once (counted from the
`_train_runs/<train key>/` records the train node writes per real training), and every cell is
committed once. On a local store and on an S3 server (moto on 127.0.0.1). Then a driver is
SIGKILLed while it holds a training's lease: another driver finds the lease fresh, takes it over
once it expires and resumes the training from its last epoch checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.run.sweep import expand_sweep
from harness.store.storage import COMMITS, open_store

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _driver(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "harness.cli", "grid", "--no-leaderboard", *args], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the driver's session at once, as a machine losing power would: its
    embedded Ray's workers sit in their own process groups and outlive a killpg by a second or
    so, long enough for a tiny training to finish (and leave nothing to take over)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _common(data_root: Path, results: str) -> list[str]:
    return [f"data.root={data_root}", f"results_dir='{results}'", "trainer=tiny", "trainer.epochs=3",
            "data.train_limit=256", "attack=[fgsm]", "eval.limit=64", "eval.neuron_sensitivity.enabled=false",
            "eval.integrity_points=0", "ray.num_cpus=2"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overlapping_grids_train_each_key_once(where: str, data_root: Path, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    results = str(tmp_path / "results") if where == "local" else f"s3://bkt/overlap-{time.time_ns()}?{request.getfixturevalue('s3')}"
    common = _common(data_root, results)
    first = _driver(["-m", "seed=0,1", *common], tmp_path / "a.log")
    second = _driver(["-m", "seed=1,2", *common], tmp_path / "b.log")
    for driver, log in ((first, "a.log"), (second, "b.log")):
        assert driver.wait(timeout=600) == 0, (tmp_path / log).read_text()[-3000:]

    cells = expand_sweep(["seed=0,1,2", *common])
    store = open_store(results)
    trainings = {c["train_key"]: store.list(f"_train_runs/{c['train_key']}") for c in cells}
    assert all(len(runs) == 1 for runs in trainings.values()), trainings  # the shared seed 1: once
    markers = {name[: -len(".json")] for name in store.list(COMMITS)}
    assert markers == {c["key"] for c in cells}
    assert all(store.committed_status(c["key"]) == "ok" for c in cells)
    assert not store.list("_leases"), "every lease released"


def test_a_killed_driver_s_lease_is_taken_over_and_the_training_resumes(data_root: Path, tmp_path: Path) -> None:
    results = str(tmp_path / "results")
    args = ["seed=0", *_common(data_root, results), "trainer.epochs=6"]
    (cell,) = expand_sweep(args)
    checkpoint = Path(results) / "checkpoints" / cell["train_key"] / "checkpoint.json"
    first = _driver(args, tmp_path / "a.log")
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # the first epoch is done: the lease's holder has something to resume
        assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        time.sleep(0.2)
    _kill_session(first.pid)  # the driver, its embedded Ray and its workers die; the lease file stays
    first.wait()
    assert open_store(results).list("_leases") == [f"train-{cell['train_key']}.json"]

    second = _driver(args, tmp_path / "b.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    log = (tmp_path / "b.log").read_text()
    assert "resuming from the epoch" in log, log[-3000:]
    store = open_store(results)
    assert len(store.list(f"_train_runs/{cell['train_key']}")) == 2  # the killed one and the takeover
    assert store.committed_status(cell["key"]) == "ok" and not store.list("_leases")

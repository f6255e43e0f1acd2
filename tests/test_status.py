"""`robustgrid status`: dead cells are not shown as running, the cells a dead driver left are
named, and it takes the same arguments as `robustgrid grid` (-m sweeps included). Issue 27, items
3 and 5."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.run.status import DRIVERS, FRESH_SECONDS, RUNNING, grid_status
from harness.run.sweep import expand_sweep
from harness.store.results import write_cell_result


def _marker(root: Path, key: str, age: float, driver: str | None) -> None:
    (root / RUNNING).mkdir(parents=True, exist_ok=True)
    info = {"key": key, "attempt": "a", "host": "h", "pid": 1, "driver": driver, "heartbeat": time.time() - age}
    (root / RUNNING / f"{key}.json").write_text(json.dumps(info))


def _driver(root: Path, job: str, age: float) -> None:
    (root / DRIVERS).mkdir(parents=True, exist_ok=True)
    (root / DRIVERS / f"{job}.json").write_text(json.dumps({"token": "t", "job": job, "heartbeat": time.time() - age}))


def test_a_stopped_heartbeat_is_stale_running_and_a_dead_driver_is_named(tmp_path: Path) -> None:
    root = tmp_path / "results"
    _marker(root, "beating", 1.0, "job-live")
    _marker(root, "orphan", FRESH_SECONDS + 1, "job-dead")  # its driver was SIGKILLed: no driver marker beats
    _marker(root, "retrying", FRESH_SECONDS + 1, "job-live")  # a dead worker under a live driver (Ray retries)
    _driver(root, "job-live", 1.0)
    _driver(root, "job-dead", FRESH_SECONDS + 30)
    status = grid_status(str(root), ["beating", "orphan", "retrying", "never"])
    assert status.running == ["beating"]
    assert status.stale_running == ["orphan", "retrying"] and status.dead_driver == ["orphan"]
    assert status.pending == ["never"]
    assert status.counts()["stale-running"] == 2
    assert set(grid_status(str(root)).stale_running) == {"orphan", "retrying"}  # no grid given: the store's cells


def test_status_takes_the_grid_s_own_arguments_sweeps_included(data_root: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    args = ["-m", "method=erm,pgd_at", "seed=0,1", f"results_dir={results}", f"data.root={data_root}"]
    cells = expand_sweep(args[1:])
    assert len(cells) == 4
    write_cell_result(str(results), cells[0]["key"], [{"key": cells[0]["key"], "status": "ok", "attack": "pgd"}])
    assert main(["status", *args, "--list"]) == 0
    out = capsys.readouterr().out
    assert "done" in out and cells[0]["label"] in out
    assert sum(line.startswith("pending") for line in out.splitlines()) == 3
    assert main(["status", *args[1:]]) == 2  # a sweep without -m: refused, as `grid` refuses it
    assert "-m" in capsys.readouterr().err


def test_status_on_a_wrong_bucket_or_endpoint_fails_naming_it(s3: str, capsys: pytest.CaptureFixture) -> None:
    """Not "0 cells" with exit 0: the URI and the reason, in seconds (issue 24, item 3)."""
    started = time.monotonic()
    assert main(["status", "--results", f"s3://no-such-bucket/results?{s3}"]) == 2
    assert "no bucket 'no-such-bucket'" in "".join(capsys.readouterr().err.splitlines())
    assert main(["status", "--results", "s3://bkt/results?endpoint_override=127.0.0.1:1&scheme=http"]) == 2
    err = "".join(capsys.readouterr().err.splitlines())  # the console wraps long lines
    assert "cannot read the results store s3://bkt/results?endpoint_override=127.0.0.1:1" in err
    assert time.monotonic() - started < 20
    assert main(["status", "--results", f"s3://bkt/not-yet-written?{s3}"]) == 0  # an empty store is fine

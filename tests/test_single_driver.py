"""One driver per grid and store: a second driver says so and exits before Ray starts."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.run.grid import expand_grid
from harness.run.single_driver import DRIVERS, AnotherDriverError, grid_id, single_driver

GRID = ["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]"]
HOLD = """
import sys, time
from harness.run.single_driver import _DriverMarker
with _DriverMarker(sys.argv[1], sys.argv[2]):
    print("holding", flush=True)
    time.sleep(120)
"""


def _marker(cells: list[dict]) -> Path:
    location = cells[0]["results_dir"]
    return Path(location) / DRIVERS / f"{grid_id(location, [c['key'] for c in cells])}.json"


def test_second_driver_on_the_same_grid_exits_2_naming_the_first(tiny: list[str], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from harness.cli import main

    cells = expand_grid(GRID + tiny)
    location = cells[0]["results_dir"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, location,
                               grid_id(location, [c["key"] for c in cells])], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        code = main(["grid", *GRID, *tiny, "--no-leaderboard"])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2, err
        assert "another driver is already running this grid" in err and f"pid {holder.pid}" in err
        assert not list(Path(location).glob("*.parquet")), "the second driver ran cells"
    finally:
        holder.kill()
        holder.wait()


def test_marker_is_removed_after_the_driver_and_other_grids_are_not_blocked(tiny: list[str]) -> None:
    cells = expand_grid(GRID + tiny)
    other = expand_grid(GRID[:2] + ["grid.axes.method=[pgd_at]"] + tiny)
    with single_driver(cells):
        assert _marker(cells).exists()
        with pytest.raises(AnotherDriverError, match="results_dir="):
            with single_driver(cells):
                pass
        with single_driver(other):  # same store, another grid
            pass
    assert not _marker(cells).exists()


def test_a_killed_drivers_marker_does_not_block_a_restart(tiny: list[str]) -> None:
    cells = expand_grid(GRID + tiny)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = _marker(cells)
    marker.parent.mkdir(parents=True, exist_ok=True)
    import socket

    marker.write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": int(dead.stdout),
                                  "started_at": "earlier", "heartbeat": time.time()}))
    with single_driver(cells):  # the pid is gone: taken over at once
        pass
    marker.write_text(json.dumps({"token": "x", "host": "elsewhere", "pid": 1, "started_at": "earlier",
                                  "heartbeat": time.time() - 3600}))
    with single_driver(cells):  # another host, heartbeat stale
        pass

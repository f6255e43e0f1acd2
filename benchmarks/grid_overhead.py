"""The grid's overhead per cell: `run_grid` on Ray vs the same cells one after another in one process.

    python -m benchmarks.grid_overhead [--cells 1 4 16] [--data-root DIR]

For each N, N tiny digits cells (distinct seeds) run twice, each time into a fresh results store:
  serial: harness.run.cell.run_cell in this process, one after another;
  grid:   harness.run.grid.run_grid on an embedded Ray with ONE CPU, so cells also run one after
          another and the difference is pure overhead (validation, commit checks, task
          submission, result transfer, heartbeats, progress), not parallel speed-up.
Ray's own start (ray.init) and its worker start (a fresh worker process importing torch and the
harness, paid once per worker; GPU tasks pay it per cell unless workers are reused) are timed
separately and are not in the per-cell overhead. A warm-up cell runs first in both modes.
A cell is two nodes of the plan (train, then eval: harness/run/plan.py), so on Ray it is two tasks.
Each N is measured --repeats times (serial and grid back to back, fresh seeds each time) and the
median is printed, since a shared machine's load moves single runs by tenths of a second.
Prints per-cell overhead in seconds and as a share of the mean serial cell time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _cells(data_root: Path, results: Path, seeds: list[int]) -> list[dict]:
    from harness.run.grid import expand_grid

    return expand_grid([
        "grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]",
        f"grid.axes.seed=[{','.join(map(str, seeds))}]", "trainer=tiny", "trainer.epochs=1",
        "data.train_limit=512", "eval.limit=128", "attack=[fgsm]", f"data.root={data_root}",
        f"results_dir={results}",
    ])


def _warm_worker() -> float:
    """Time for Ray to start a worker and import what a cell needs (paid once per worker)."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> None:
        import harness.run.cell  # noqa: F401  (torch, timm, the trainer)

    t0 = time.perf_counter()
    ray.get(warm.remote())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()

    import ray
    import torch

    from harness.run.cell import run_cell
    from harness.data.prepare import prepare_digits
    from harness.run.grid import run_grid

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rg-overhead-"))
    data_root = args.data_root or work / "data"
    if not (data_root / "digits" / "manifest.json").exists():
        prepare_digits(data_root)

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_init = time.perf_counter() - t0
    worker_start = _warm_worker()
    run_cell(_cells(data_root, work / "warm-serial", [999])[0])  # imports + caches, this process
    run_grid(_cells(data_root, work / "warm-grid", [999]))  # the Ray worker's first cell

    print(f"ray.init: {ray_init:.2f} s; Ray worker start (process + imports): {worker_start:.2f} s "
          f"(both paid once, not counted below)")
    print(f"{'cells':>5} {'serial s':>9} {'grid s':>8} {'cell s (mean)':>13} {'overhead s/cell':>15} "
          f"{'share':>7} {'(min..max over repeats)':>24}")
    seed0 = 0
    for n in args.cells:
        runs = []  # (serial s, grid s, mean cell s, overhead s/cell)
        for _ in range(args.repeats):
            seeds = list(range(seed0, seed0 + n))
            seed0 += n
            times = []
            t0 = time.perf_counter()
            for cfg in _cells(data_root, work / f"serial-{seeds[0]}", seeds):
                t = time.perf_counter()
                outcome = run_cell(cfg)
                times.append(time.perf_counter() - t)
                assert outcome.status == "ok", outcome.error
            serial = time.perf_counter() - t0
            grid_cells = _cells(data_root, work / f"grid-{seeds[0]}", seeds)
            t0 = time.perf_counter()
            report = run_grid(grid_cells)
            grid = time.perf_counter() - t0
            assert len(report.outcomes) == n and not report.failed, [o.error for o in report.failed]
            runs.append((serial, grid, statistics.mean(times), (grid - serial) / n))
        serial, grid, mean_cell, overhead = (statistics.median(r[i] for r in runs) for i in range(4))
        spread = f"{min(r[3] for r in runs):.3f}..{max(r[3] for r in runs):.3f}"
        print(f"{n:>5} {serial:>9.2f} {grid:>8.2f} {mean_cell:>13.2f} {overhead:>15.3f} {overhead / mean_cell:>7.1%} "
              f"{spread:>24}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()

"""The driver's cost per node when a grid's plan goes through Ray: N cells on a local multi-node cluster.

    python benchmarks/submit_scale.py [--cells 200 1000] [--nodes 3]

A Ray cluster of --nodes local nodes (ray.cluster_utils.Cluster, one CPU each) runs, for each N, a
fresh driver process: it expands N digits cells (the grid axes: seeds of ERM on test_resnet at the
smallest real sizes: 16 training images, one epoch, FGSM on 16 test images, no analyses, no
validation probe), then times `run_grid` on the cluster. Every real code path runs: plan,
resources, one Ray task per node with its inputs as ObjectRefs, the train key's lease and its
heartbeat, the eval node's commit, the driver's window and its live status. The cells are real
but as cheap as a real cell gets, so the driver's share is what shows.

Printed per N: wall seconds to drain, the driver's CPU seconds per node (user + system of the
driver process, which holds Ray's core worker threads; fixed costs such as the preflight's shard
check included), its peak RSS, and the throughput in nodes/s; then, between the smallest and the
largest N, the cost of each added node and cell (the fixed costs cancel). Goals (issue 29):
<= 5 ms of driver CPU per node, RSS growth <= 100 KiB per cell, linear in N.
SUBMIT_SCALE_PROFILE=1 prints the driver's cProfile; SUBMIT_SCALE_TRACE=1 the Python allocations
it still holds after the grid, per cell (tracemalloc; both slow the driver down).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def one_driver(cells: int, address: str, data_root: str, results: str) -> dict:
    """Runs in the driver subprocess: expand, then run_grid timed."""
    from harness.run.expand import expand_grid
    from harness.run.grid import run_grid

    overrides = ["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]",
                 f"grid.axes.seed=[{','.join(map(str, range(cells)))}]", f"data.root={data_root}",
                 f"results_dir={results}", "trainer=tiny", "trainer.epochs=1", "data.train_limit=16",
                 "trainer.batch_size=16", "trainer.validation.fraction=0", "attack=[fgsm]", "eval.limit=16",
                 "eval.neuron_sensitivity.enabled=false", "eval.integrity_points=0", "resources.cpus=1"]
    grid = expand_grid(overrides)
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rss_before = _rss_kib()
    cpu0, t0 = os.times(), time.perf_counter()
    if os.environ.get("SUBMIT_SCALE_TRACE"):  # where the driver's Python memory goes (slower)
        import tracemalloc

        tracemalloc.start(8)
        report = run_grid(grid, ray_address=address, leaderboard=False)
        snapshot = tracemalloc.take_snapshot()
        for stat in snapshot.statistics("traceback")[:8]:
            print(f"{stat.size / cells / 1024:7.1f} KiB/cell {stat.count / cells:6.1f} blocks/cell",
                  " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in list(stat.traceback)[-4:]),
                  file=sys.stderr)
    elif os.environ.get("SUBMIT_SCALE_PROFILE"):  # where the driver's Python time goes
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        report = profiler.runcall(run_grid, grid, ray_address=address, leaderboard=False)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
    else:
        report = run_grid(grid, ray_address=address, leaderboard=False)
    cpu1, wall = os.times(), time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    nodes = 2 * cells
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    assert len(report.outcomes) == cells and not report.failed, [o.error for o in report.failed][:3]
    return {"cells": cells, "nodes": nodes, "wall_s": wall, "driver_cpu_s": cpu, "cpu_ms_per_node": 1000 * cpu / nodes,
            "rss_before_mib": rss_before / 1024, "rss_peak_mib": peak / 1024,
            "rss_growth_kib_per_cell": (peak - rss_before) / cells, "nodes_per_s": nodes / wall}


def window_alone(cells: int) -> float:
    """Microseconds of the driver's window (harness/run/submit.py) per node, on a plan of `cells`
    train + eval nodes drained one finished node per round, as a grid of short nodes drains it."""
    from harness.run.plan import Node, Plan
    from harness.run.submit import Window

    plan = Plan()
    for i in range(cells):
        plan.add(Node(f"train/{i}", "train", f"t{i}"))
        plan.add(Node(f"eval/{i}", "eval", f"e{i}", inputs=(f"train/{i}",)))
    window = Window(plan, lambda node, inputs: node.id, lambda node: {"num_cpus": 1})
    totals, in_flight = {"CPU": 64.0}, []
    t0 = time.perf_counter()
    while not window.exhausted:
        in_flight += [ref for ref, _ in window.fill(totals)]
        window.finished(in_flight.pop(0))
    return 1e6 * (time.perf_counter() - t0) / len(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--window-cells", type=int, nargs="*", default=[1_000, 10_000, 50_000],
                        help="plan sizes for the window alone (none: skip it)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--data-root", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_driver(args.one, args.address, args.data_root, args.results)), flush=True)
        return

    for n in args.window_cells:
        print(f"window alone: {n:6d} cells, {window_alone(n):5.1f} us per node (one finished node per round)")

    from ray.cluster_utils import Cluster

    from harness.data.prepare import prepare_digits

    work = Path(tempfile.mkdtemp(prefix="submit_scale_"))
    prepare_digits(work / "data")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rows = []
        for n in args.cells:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--address", cluster.address,
                                  "--data-root", str(work / "data"), "--results", str(work / f"results-{n}")],
                                 capture_output=True, text=True)
            if os.environ.get("SUBMIT_SCALE_PROFILE") or os.environ.get("SUBMIT_SCALE_TRACE"):
                print(out.stderr[-12000:])
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"driver for {n} cells failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            r = rows[-1]
            print(f"{r['cells']:6d} cells {r['nodes']:6d} nodes: {r['wall_s']:8.1f} s wall, {r['nodes_per_s']:5.1f} "
                  f"nodes/s, driver CPU {r['cpu_ms_per_node']:6.2f} ms/node, RSS {r['rss_before_mib']:.0f} -> "
                  f"{r['rss_peak_mib']:.0f} MiB ({r['rss_growth_kib_per_cell']:.1f} KiB/cell)", flush=True)
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            extra_nodes, extra_cells = b["nodes"] - a["nodes"], b["cells"] - a["cells"]
            print(f"from {a['cells']} to {b['cells']} cells, per added node: driver CPU "
                  f"{1000 * (b['driver_cpu_s'] - a['driver_cpu_s']) / extra_nodes:.2f} ms (goal <= 5), wall "
                  f"{(b['wall_s'] - a['wall_s']) / extra_nodes:.3f} s; per added cell: driver peak RSS "
                  f"{1024 * (b['rss_peak_mib'] - a['rss_peak_mib']) / extra_cells:.1f} KiB (goal <= 100); "
                  f"wall per node x{(b['wall_s'] / b['nodes']) / (a['wall_s'] / a['nodes']):.2f} (1.00 = linear)")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()

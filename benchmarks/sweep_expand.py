"""A `-m` sweep against the same cells as grid axes: seconds to expand, compositions, equal cells.

    python benchmarks/sweep_expand.py [--seeds 50] [--methods erm pgd_at trades mart fgsm_rs]

The same (method x seed) cells three ways, in one run: the sweep as it is expanded now (one Hydra
composition per method, the seeds set on it: harness/run/sweep.py), the sweep composed once per
cell (the old way, each cell's `compose_config` + `finalize`), and the grid axes
(harness/run/expand.py). Prints each one's seconds, compositions and per-cell milliseconds, the
speedup over composing every cell, and checks the three give equal cells.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from harness.core.config import compose_config, finalize  # noqa: E402
from harness.run import expand, sweep  # noqa: E402


def counted(module, fn):
    """Time fn() with module.compose_config counted."""
    real, calls = module.compose_config, []
    module.compose_config = lambda o: calls.append(1) or real(o)
    try:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, len(calls)
    finally:
        module.compose_config = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=["erm", "pgd_at", "trades", "mart", "fgsm_rs"])
    args = parser.parse_args()
    results = tempfile.mkdtemp()
    common = [f"results_dir={results}", "data=digits", "trainer=demo", "attack=[fgsm,pgd]", "arch=test_resnet"]
    overrides = [f"method={','.join(args.methods)}", f"seed=range(0,{args.seeds})", *common]
    compose_config(common)  # Hydra's first initialisation, out of every timing

    swept, sweep_s, sweep_n = counted(sweep, lambda: sweep.expand_sweep(overrides))
    plain, sweeps = sweep.split_sweeps(overrides)
    once_each, each_s, each_n = counted(sys.modules[__name__], lambda: [
        finalize(compose_config(expand.last_wins(plain + list(c)))) for c in itertools.product(*(s.texts for s in sweeps))])
    grid = ["grid=demo", f"grid.axes.method=[{','.join(args.methods)}]",
            f"grid.axes.seed=[{','.join(map(str, range(args.seeds)))}]", "grid.axes.arch=[test_resnet]", f"results_dir={results}"]
    gridded, grid_s, grid_n = counted(expand, lambda: expand.expand_grid(grid))

    n = len(swept)
    assert n == len(args.methods) * args.seeds == len(once_each) == len(gridded)
    by_key = {c["key"]: c for c in swept}
    assert all(by_key[c["key"]] == c for c in once_each), "sweep cells differ from composing each cell"
    assert {c["key"] for c in gridded} == set(by_key), "sweep and grid axes give different cells"
    print(f"{n} cells ({len(args.methods)} methods x {args.seeds} seeds)")
    print(f"{'how':32s} {'seconds':>8s} {'composes':>9s} {'ms/cell':>8s}")
    for name, secs, calls in (("sweep (composed per method)", sweep_s, sweep_n),
                              ("sweep composed per cell (old)", each_s, each_n),
                              ("grid axes", grid_s, grid_n)):
        print(f"{name:32s} {secs:8.2f} {calls:9d} {1000 * secs / n:8.2f}")
    print(f"speedup over composing each cell: {each_s / sweep_s:.1f}x; sweep / grid axes: {sweep_s / grid_s:.2f}; "
          f"every sweep cell equals its own composition")


if __name__ == "__main__":
    main()

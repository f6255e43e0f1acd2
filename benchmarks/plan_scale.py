"""What planning a large grid costs: a plan of no-op cells, measured at growing sizes.

    python -m benchmarks.plan_scale [--cells 1000 10000] [--composed 100]

Three steps of `robustgrid grid` before any cell runs, timed per cell:
  compose:  Hydra composition + finalize of real cells (expand_grid), on --composed cells;
  validate: validate_cell on each of the N cells (the checks `robustgrid grid` makes before any
            work: settings, resources, plugins, the training split's size from the manifest);
  plan:     build_plan (train/eval nodes, dedup, upstream derivation) on N cells made from
            composed ones by varying the seed (keys recomputed, as expand_grid would);
  prune:    pending_plan against an empty results store (one listing of the commit markers,
            one stat per train node).
Grid: every method x 2 archs x seeds, so ADML/CBD/FT/NAD/ABL upstream nodes are derived too.
Memory: tracemalloc peak of the plan per cell. Prints one JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--composed", type=int, default=60)
    args = parser.parse_args()

    from harness.core.config import cell_identity, cell_key, train_key
    from harness.core.registry import METHODS
    from harness.data.prepare import prepare_digits
    from harness.run.grid import validate_cell
    from harness.run.grid import expand_grid
    from harness.run.plan import build_plan, pending_plan

    results = tempfile.mkdtemp(prefix="rg-plan-")
    methods = [m for m in METHODS.names() if m not in ("abl_lga", "abl_finetune")]  # ABL's stages: nodes of abl
    seeds = max(1, args.composed // (2 * len(methods)))
    prepare_digits(Path(results) / "data")  # prepared data: validation reads its manifest
    t0 = time.perf_counter()
    composed = expand_grid(["grid=demo", f"grid.axes.method=[{','.join(methods)}]",
                            f"grid.axes.seed=[{','.join(map(str, range(seeds)))}]", "backdoor=badnets",
                            f"results_dir={results}", f"data.root={Path(results) / 'data'}"])
    compose_ms = (time.perf_counter() - t0) * 1000 / len(composed)
    out: dict = {"methods": len(methods), "compose_ms_per_cell": round(compose_ms, 2),
                 "composed_cells": len(composed), "sizes": []}
    for n in args.cells:
        cells = []
        for i in range(n):
            cfg = copy.deepcopy(composed[i % len(composed)])
            cfg["seed"] = 1000 + i // len(composed)
            cfg["key"], cfg["train_key"], cfg["cell_id"] = cell_key(cfg), train_key(cfg), cell_identity(cfg)
            cells.append(cfg)
        t0 = time.perf_counter()
        for cfg in cells:
            validate_cell(cfg)
        validate_s = time.perf_counter() - t0
        tracemalloc.start()
        t0 = time.perf_counter()
        plan = build_plan(cells)
        plan_s = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.perf_counter()
        pending = pending_plan(cells)
        prune_s = time.perf_counter() - t0
        out["sizes"].append({"cells": n, "nodes": plan.counts(), "pending_nodes": len(pending),
                             "validate_ms_per_cell": round(validate_s * 1000 / n, 3),
                             "plan_ms_per_cell": round(plan_s * 1000 / n, 3),
                             "prune_ms_per_cell": round(prune_s * 1000 / n, 3),
                             "plan_kib_per_cell": round(peak / 1024 / n, 1)})
        print(json.dumps(out["sizes"][-1]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

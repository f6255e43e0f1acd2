"""What checking a config costs: `compose_config` (plugin names, struct-mode keys, each plugin
group's keys and types against its class) vs Hydra's bare compose of the same overrides.

    python -m benchmarks.config_checks [--cells 50] [--repeats 3]

Both sides compose the same --cells override lists (distinct seeds and methods, as a grid's
cells), one after another in this process, after a warm-up pass over all cells (imports, registry
loading, ConfigStore registration, and the one cached compose per distinct set of group choices
that the type and key checks use: 5 here, once per grid in real use). Each side is timed --repeats times, alternating, and the median is
printed: per cell in milliseconds, and the ratio checked / bare. A grid composes once per cell,
so this is the planning cost per cell that the checks add.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _overrides(n: int) -> list[list[str]]:
    methods = ["erm", "pgd_at", "trades", "mart", "cbd"]
    return [[f"method={methods[i % len(methods)]}", f"seed={i}", "attack=[fgsm,pgd]", "attack.pgd.steps=3",
             "trainer=tiny"] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from harness.core.config import _compose, compose_config

    def bare(overrides: list[str]) -> dict:
        return OmegaConf.to_container(_compose(overrides), resolve=True)

    cells = _overrides(args.cells)
    sides = {"bare hydra compose": bare, "compose_config (checked)": compose_config}
    for fn in sides.values():
        for overrides in cells:  # warm-up
            fn(overrides)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            for overrides in cells:
                fn(overrides)
            times[name].append((time.perf_counter() - t0) / len(cells))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, value in medians.items():
        print(f"{name:28s} {1000 * value:8.1f} ms/cell")
    base, checked = medians.values()
    print(f"ratio checked / bare: {checked / base:.2f}  ({args.cells} cells, median of {args.repeats})")


if __name__ == "__main__":
    main()

"""Run a method's (or poison's) own official code and ours on the same weights and batch.

    python benchmarks/conformance.py --method trades --reference /tmp/ref/TRADES
    python benchmarks/conformance.py --list

`--reference` is a checkout of the official repository named by the check (`--list` prints them),
fetched outside this repository: e.g. `git clone https://github.com/yaodongyu/TRADES /tmp/ref/TRADES`.
Nothing of it is copied here. Prints one line per compared quantity (largest absolute difference,
goal, ok) and, last, one JSON object: method, reference_commit, each quantity's difference, ok.
Exit status 0 when every quantity is at its goal, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from conformance_checks import check_for, modules  # noqa: E402
from conformance_checks.common import reference_commit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", help="plugin name (a method or a poison)")
    ap.add_argument("--reference", type=Path, help="checkout of the official repository")
    ap.add_argument("--list", action="store_true", help="list every checked plugin and its repository")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.list:
        for module in modules():
            print(f"{module.REPOSITORY:55s} {', '.join(sorted(module.CHECKS))}")
        return 0
    if not args.method or not args.reference:
        ap.error("--method and --reference are required (or --list)")
    if not args.reference.is_dir():
        ap.error(f"--reference {args.reference} is not a folder: clone the official repository there")
    torch.set_num_threads(args.threads)
    module, check = check_for(args.method)
    commit = reference_commit(args.reference)
    print(f"{args.method}: ours vs {module.REPOSITORY}@{commit} ({args.reference})")
    t0 = time.perf_counter()
    results = check(args.reference.resolve())
    for r in results:
        print(f"  {r.name:40s} {r.difference:12.3e}  goal <= {r.goal:g} ({r.kind})  {'ok' if r.ok else 'OFF'}"
              + (f"  {r.note}" if r.note else ""))
    ok = all(r.ok for r in results)
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    print(json.dumps({"method": args.method, "reference": module.REPOSITORY, "reference_commit": commit,
                      **{r.name: r.difference for r in results}, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

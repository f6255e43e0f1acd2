"""One tiny poisoned ERM cell per poison on digits 8x8 (test_resnet, trainer=backdoor, 6 epochs,
seed 0): clean accuracy, ASR and RA, and the cell's wall time; the issue-26 poisons by default.

    python benchmarks/poisons_digits.py [--data-root DIR] [--epochs 6] [--cell "backdoor=bpp" ...]

Each --cell is one space-separated list of overrides. Results go to a temporary folder.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CELLS = ["backdoor=bpp", "backdoor=refool", "backdoor=adaptive_blend backdoor.rate=0.1",
         "backdoor=adaptive_patch backdoor.rate=0.1", "backdoor=badnets backdoor.label_mode=all_to_all",
         "backdoor=ftrojan"]


def main() -> None:
    from harness.core.config import compose_config, finalize
    from harness.run.cell import run_cell
    from harness.store.index import read_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--cell", action="append", help="overrides of one cell (default: the issue-26 poisons)")
    args = ap.parse_args()
    for cell in args.cell or CELLS:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = finalize(compose_config([f"data.root={args.data_root}", f"results_dir={tmp}/r",
                                           f"leaderboard_dir={tmp}/s", "trainer=backdoor",
                                           f"trainer.epochs={args.epochs}", "trainer.progress=false",
                                           "attack=[fgsm]", *cell.split()]))
            t0 = time.time()
            out = run_cell(cfg)
            if out.status != "ok":
                print(f"{cell}: {out.status} {out.error}")
                continue
            row = read_results(cfg["results_dir"]).to_pylist()[0]
            print(f"{cell}: CA {row['clean_acc']:.4f} ASR {row['asr']:.4f} RA {row['backdoor_robust_acc']:.4f} "
                  f"n_poisoned {row['n_poisoned']} target_class {row['target_class']} "
                  f"n_triggered {row['n_triggered']} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

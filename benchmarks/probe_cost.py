"""The validation probe's share of training time, per method, at 8x8 (digits) and 32x32 (CIFAR-shaped).

    python benchmarks/probe_cost.py [--epochs 3] [--n32 4096] [--methods erm fgsm_rs pgd_at] [--threads 1]

Each cell trains through the real trainer with the probe at its defaults (validation 2% of the
training split, at most 1,000 images; PGD-10 at data.eps on as many images as trainer.probe_budget
0.05 of the training FLOPs pays for; one probe per epoch). Printed per cell: the images trained on,
held out and attacked by the probe's PGD, the seconds of the training passes and of the probes over
epochs 1.. (epoch 0 alone counts FLOPs and warms up), and the probe's share of the training time
(goal <= 5%). 8x8: digits (1,437 training images, prepared here); 32x32: benchmarks/synthetic.py's
noise images (--n32 of them; the probe's share depends on the held-out fraction, not the split's size,
until the 1,000-image cap).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.core.config import compose_config, finalize  # noqa: E402
from harness.data.prepare import prepare_digits  # noqa: E402
from harness.train.trainer import train  # noqa: E402
from synthetic import synthetic_cifar  # noqa: E402

SETTINGS = {
    "8x8": ["data=digits", "trainer=demo"],
    "32x32": ["data=cifar10", "data.augment=null", "trainer=cifar_at", "trainer.num_workers=0"],
}


def measure(root: Path, work: Path, setting: str, method: str, epochs: int, threads: int) -> dict:
    """Train one cell; the probe's seconds against the training passes' over epochs 1.."""
    shutil.rmtree(work, ignore_errors=True)
    cfg = finalize(compose_config([
        f"data.root={root}", *SETTINGS[setting], f"method={method}", f"trainer.epochs={epochs}",
        f"trainer.threads_per_rank={threads}", "trainer.progress=false", "trainer.device=cpu",
        f"results_dir={work}",
    ]))
    summary = train(cfg, work / "cell")
    steady = summary.curve[1:] or summary.curve
    trained = sum(e["seconds"] for e in steady)
    probed = sum(e.get("probe_seconds", 0.0) for e in steady)
    last = summary.curve[-1]
    return {"setting": setting, "method": method, "n_train": summary.n_train, "val": int(last.get("val_n", 0)),
            "pgd_images": int(last.get("val_robust_n", 0)), "train_s": trained, "probe_s": probed,
            "share": probed / (trained + probed) if trained + probed else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n32", type=int, default=4096, help="training images of the 32x32 synthetic split")
    parser.add_argument("--methods", nargs="+", default=["erm", "fgsm_rs", "pgd_at"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="rg-probe-cost-"))
    try:
        prepare_digits(tmp / "data")
        synthetic_cifar(tmp / "data", n_train=args.n32)
        print(f"{'setting':7s} {'method':8s} {'trained':>7s} {'held':>5s} {'PGD':>5s} {'train s':>8s} "
              f"{'probe s':>8s} {'share':>6s}", flush=True)
        for setting in args.settings:
            for method in args.methods:
                r = measure(tmp / "data", tmp / "work", setting, method, args.epochs, args.threads)
                print(f"{r['setting']:7s} {r['method']:8s} {r['n_train']:7d} {r['val']:5d} {r['pgd_images']:5d} "
                      f"{r['train_s']:8.2f} {r['probe_s']:8.3f} {100 * r['share']:5.2f}%", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

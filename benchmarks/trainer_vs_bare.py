"""The trainer's images/s vs a bare PyTorch loop doing the same PGD-AT, side by side.

    python benchmarks/trainer_vs_bare.py [--threads 1] [--repeats 3] [--profile]

Same model (built by architectures.presets with the same seed), same method (PGD-AT: PGD-10,
step eps/4, uniform random start, crafted in eval mode, then one SGD step on CE of the
adversarial batch), same batch, threads and data shape (3x32x32, 10 classes). The trainer reads
a synthetic CIFAR-shaped dataset through its real data path (shards, PNG decode, loader, DDP at
world size 1) and reports its own images/s (samples over the epoch loop's seconds, its first step
left out: that step alone counts FLOPs and pays one-time warm-up); the bare loop reads in-memory
tensors and is timed around its steps, its first step left out alike. Runs alternate trainer, bare, trainer,
bare... so machine load hits both alike; each side's best of --repeats is compared (and, as a
check on noise, their medians).
Prints one line per model and the ratio trainer/bare (goal: >= 0.95 on a CPU).
--profile prints cProfile's top functions of one trainer run (where the time goes).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from architectures.presets import build_classifier  # noqa: E402
from harness.core.config import compose_config, finalize  # noqa: E402
from harness.data.shards import load_manifest  # noqa: E402
from harness.train.trainer import train  # noqa: E402
from synthetic import synthetic_cifar  # noqa: E402

EPS = 8 / 255
SETUPS = {"test_resnet": {"batch": 64, "steps": 4}, "resnet18": {"batch": 16, "steps": 4}}


def cell_config(root: Path, work: Path, arch: str, batch: int, steps: int, threads: int) -> dict:
    return finalize(compose_config([
        f"data.root={root}", "data=cifar10", "data.augment=null", f"data.train_limit={batch * steps}",
        f"arch={arch}", "method=pgd_at", "trainer=cifar_at", "trainer.epochs=1", f"trainer.batch_size={batch}",
        "trainer.num_workers=0", f"trainer.threads_per_rank={threads}", "trainer.progress=false",
        "trainer.device=cpu", f"results_dir={work}",
    ]))


def run_trainer(cfg: dict, work: Path) -> float:
    """The trainer's own images/s on a fresh work dir (nothing to resume)."""
    shutil.rmtree(work, ignore_errors=True)
    return train(cfg, work).images_per_second


def run_bare(cfg: dict, x_all: torch.Tensor, y_all: torch.Tensor, threads: int) -> float:
    """Images/s of a plain PGD-AT loop over in-memory tensors (the trainer's recipe, nothing else),
    its first step left out as the trainer leaves out its own."""
    torch.set_num_threads(threads)
    manifest = load_manifest(Path(cfg["data"]["dir"]))
    torch.manual_seed(int(cfg["seed"]))
    model = build_classifier(cfg["arch"], num_classes=10, in_chans=3, img_size=32,
                             mean=manifest["mean"], std=manifest["std"])
    ocfg = {k: v for k, v in cfg["trainer"]["optimizer"].items() if k != "name"}
    opt = torch.optim.SGD(model.parameters(), **ocfg)
    batch = int(cfg["trainer"]["batch_size"])
    step_size = EPS / 4
    t0, timed = time.perf_counter(), len(x_all)
    for i in range(0, len(x_all), batch):
        if i == batch:  # the first step was warm-up
            t0, timed = time.perf_counter(), len(x_all) - batch
        x, y = x_all[i:i + batch], y_all[i:i + batch]
        model.eval()
        lo, hi = (x - EPS).clamp(min=0), (x + EPS).clamp(max=1)
        x_adv = torch.max(torch.min(x + torch.empty_like(x).uniform_(-EPS, EPS), hi), lo)
        for _ in range(10):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
            x_adv = torch.max(torch.min(x_adv.detach() + step_size * grad.sign(), hi), lo)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=list(SETUPS))
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="rg-bench-"))
    try:
        n = max(s["batch"] * s["steps"] for s in SETUPS.values())
        synthetic_cifar(tmp / "data", n_train=n)
        for arch in args.archs:
            setup = SETUPS[arch]
            cfg = cell_config(tmp / "data", tmp / "results", arch, setup["batch"], setup["steps"], args.threads)
            from harness.data.loader import make_loader
            xs, ys = zip(*make_loader(Path(cfg["data"]["dir"]), "train", 1024, limit=setup["batch"] * setup["steps"]))
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            work = tmp / "work"
            if args.profile:
                prof = cProfile.Profile()
                prof.runcall(run_trainer, cfg, work)
                pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
            trainer, bare = [], []
            for _ in range(args.repeats):  # interleaved: load changes hit both sides alike
                trainer.append(run_trainer(cfg, work))
                bare.append(run_bare(cfg, x_all, y_all, args.threads))
            print(f"{arch:12s} 32x32 batch {setup['batch']:3d} x {setup['steps']} steps, PGD-10 AT, "
                  f"{args.threads} thread(s): trainer {max(trainer):7.1f} img/s, bare {max(bare):7.1f} img/s, "
                  f"ratio {max(trainer) / max(bare):.3f} (of medians {statistics.median(trainer) / statistics.median(bare):.3f})"
                  f"  (runs: trainer {[round(t, 1) for t in trainer]}, "
                  f"bare {[round(b, 1) for b in bare]})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

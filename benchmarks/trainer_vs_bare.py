"""The trainer's images/s vs a bare PyTorch loop doing the same PGD-AT, side by side, per image size.

    python benchmarks/trainer_vs_bare.py [--sizes 8 16 32] [--archs test_resnet] [--threads 1]
                                         [--repeats 5] [--profile]

Same model (built by architectures.presets with the same seed), same method (PGD-AT: PGD-10,
step eps/4, uniform random start, crafted in eval mode, then one SGD step on CE of the
adversarial batch; the trainer runs pgd_at with `clean_bn_forwards=false`, so neither side runs
the two no-grad BatchNorm forwards of the official loop), same batch, threads and data (a
synthetic CIFAR-shaped dataset, 3 x size x size, 10 classes; no validation split, so both sides
train on the same samples). The trainer reads it through its real data path (shards, PNG decode,
loader, DDP at world size 1, checkpoint) and reports its own images/s (samples over the epoch
loop's seconds, its first batch and step left out: that step alone counts FLOPs and pays one-time
warm-up, and its batch waits for the loader's shuffle buffer to fill, which here is the whole
epoch's decoding); the bare loop reads tensors decoded beforehand and is timed around its steps,
its first step left out alike. So neither side's number holds the decoding: the line prints it
apart (the trainer's loader over the epoch, alone, in ms per batch: what a step would wait for
with `num_workers=0` once the buffer is full; loader workers take it off the step's path).
Small images make a step short, so per-step overheads show: 8x8 is the hard case.

Runs are paired, each pair's order alternating (trainer, bare / bare, trainer ...) so machine
load and drift hit both sides alike; the line printed per (arch, size) gives the median of the
pairs' ratios trainer/bare (goal: >= 0.97 on a CPU), their spread, and each side's median.
--profile prints cProfile's top functions of one trainer run per (arch, size).
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
BATCH = {"test_resnet": 64, "resnet18": 16}
STEPS = {8: 16, 16: 8, 32: 4}  # per run: a run lasts a few seconds at each size on one CPU thread


def cell_config(root: Path, work: Path, arch: str, batch: int, steps: int, threads: int) -> dict:
    return finalize(compose_config([
        f"data.root={root}", "data=cifar10", "data.augment=null", f"data.train_limit={batch * steps}",
        f"arch={arch}", "method=pgd_at", "method.clean_bn_forwards=false", "trainer=cifar_at",
        "trainer.epochs=1", f"trainer.batch_size={batch}", "trainer.validation.fraction=0",
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
    model = build_classifier(cfg["arch"], num_classes=10, in_chans=3, img_size=int(manifest["image_size"][0]),
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


def paired_runs(cfg: dict, work: Path, x_all: torch.Tensor, y_all: torch.Tensor, threads: int,
                repeats: int) -> tuple[list[float], list[float]]:
    """`repeats` pairs (trainer img/s, bare img/s), the order within a pair alternating."""
    trainer, bare = [], []
    for i in range(repeats):
        if i % 2 == 0:
            trainer.append(run_trainer(cfg, work))
            bare.append(run_bare(cfg, x_all, y_all, threads))
        else:
            bare.append(run_bare(cfg, x_all, y_all, threads))
            trainer.append(run_trainer(cfg, work))
    return trainer, bare


def decode_ms_per_batch(cfg: dict, batch: int, repeats: int = 3) -> float:
    """The trainer's loader alone over the epoch (shuffled, as the trainer reads it): ms per batch, median."""
    from harness.data.loader import make_loader
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(int(y.shape[0]) for _, y in make_loader(Path(cfg["data"]["dir"]), "train", batch, shuffle=True,
                                                        limit=cfg["data"]["train_limit"]))
        times.append((time.perf_counter() - t0) * 1000 * batch / n)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="paired runs per (arch, size)")
    parser.add_argument("--archs", nargs="+", default=["test_resnet"], choices=sorted(BATCH))
    parser.add_argument("--sizes", nargs="+", type=int, default=sorted(STEPS), choices=sorted(STEPS),
                        help="image sizes (square, 3 channels)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from harness.data.loader import make_loader
    tmp = Path(tempfile.mkdtemp(prefix="rg-bench-"))
    try:
        for size in args.sizes:
            steps = STEPS[size]
            root = tmp / f"data{size}"
            synthetic_cifar(root, n_train=max(BATCH[a] for a in args.archs) * steps, size=size)
            for arch in args.archs:
                batch = BATCH[arch]
                cfg = cell_config(root, tmp / "results", arch, batch, steps, args.threads)
                xs, ys = zip(*make_loader(Path(cfg["data"]["dir"]), "train", 1024, limit=batch * steps))
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                work = tmp / "work"
                if args.profile:
                    prof = cProfile.Profile()
                    prof.runcall(run_trainer, cfg, work)
                    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
                trainer, bare = paired_runs(cfg, work, x_all, y_all, args.threads, args.repeats)
                ratios = sorted(t / b for t, b in zip(trainer, bare))
                decode = decode_ms_per_batch(cfg, batch)
                print(f"{arch:12s} {size:2d}x{size:<2d} batch {batch:3d} x {steps:2d} steps, PGD-10 AT, "
                      f"{args.threads} thread(s): ratio trainer/bare {statistics.median(ratios):.3f} "
                      f"(median of {len(ratios)} pairs, range {ratios[0]:.3f}-{ratios[-1]:.3f}); "
                      f"img/s medians trainer {statistics.median(trainer):.1f}, bare {statistics.median(bare):.1f} "
                      f"(a step {1000 * batch / statistics.median(bare):.0f} ms; decoding apart: "
                      f"{decode:.0f} ms per batch)"
                      f"  (runs: trainer {[round(t, 1) for t in trainer]}, bare {[round(b, 1) for b in bare]})",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

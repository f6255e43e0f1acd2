"""Our attacks vs. torchattacks: wall time and robust accuracy on the same model and inputs.

    python benchmarks/attacks_vs_torchattacks.py [--n 512] [--repeats 3] [--batch-size 128]

Prepares sklearn's 8x8 digits (cached under --data-root), trains a fixed tiny ResNet
(`test_resnet`, seeded, a few epochs of SGD), then times FGSM, PGD-L-inf (20 steps) and PGD-L2
(20 steps), ours against torchattacks' with identical settings: both sides see the same batches
and the same torch seed before each pass, so their random starts are the same draws. Each time
is the best of --repeats passes over the --n inputs, on one CPU thread (torch.set_num_threads).
Robust accuracy follows harness.evaluate: a sample counts when both its clean and its attacked
image are classified correctly. The digits test split has 360 images; a larger --n tiles it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import harness.attacks.fgsm  # noqa: E402,F401  (register the attacks this script builds)
import harness.attacks.pgd  # noqa: E402,F401
import harness.attacks.pgd_l2  # noqa: E402,F401
from harness.attacks.base import build_attack  # noqa: E402
from harness.data.loader import make_loader  # noqa: E402
from harness.data.prepare import prepare_digits  # noqa: E402
from digits_model import train_digits_model  # noqa: E402  (benchmarks/ is on sys.path)

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]




def inputs(digits_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first n test images (the split tiled when n exceeds it) and the unique count."""
    x, y = next(iter(make_loader(digits_dir, "test", 10_000)))
    unique = min(n, len(y))
    reps = -(-n // len(y))
    return x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n], unique


def run_pass(fn: AttackFn, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(seed)
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(y), batch_size):
        outs.append(fn(x[i:i + batch_size], y[i:i + batch_size]))
    return time.perf_counter() - t0, torch.cat(outs)


def robust_acc(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="number of inputs attacked per pass")
    p.add_argument("--repeats", type=int, default=3, help="passes per attack; the best time counts")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4, help="training epochs of the fixed model")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps-linf", type=float, default=0.1)
    p.add_argument("--eps-l2", type=float, default=0.5)
    p.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "robustgrid-bench-data")
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1 or args.batch_size < 1:
        p.error("--n, --repeats and --batch-size must be >= 1")

    import torchattacks  # the reference; only this script and the tests need it

    torch.set_num_threads(args.threads)
    digits_dir = prepare_digits(args.data_root)
    t0 = time.perf_counter()
    model = train_digits_model(digits_dir, epochs=args.epochs, seed=args.seed)
    x, y, unique = inputs(digits_dir, args.n)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    print(f"model: test_resnet on digits, {args.epochs} epochs ({time.perf_counter() - t0:.1f} s); "
          f"clean acc {clean:.4f} on n={args.n} ({unique} unique test images); "
          f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, "
          f"{args.threads} thread(s), batch {args.batch_size}, best of {args.repeats}")

    el, e2 = args.eps_linf, args.eps_l2
    cases: list[tuple[str, AttackFn, AttackFn]] = []
    ours = build_attack({"name": "fgsm", "eps": el})
    cases.append((f"FGSM eps={el:g}", lambda a, b, o=ours: o(model, a, b), torchattacks.FGSM(model, eps=el)))
    ours = build_attack({"name": "pgd", "eps": el, "steps": 20, "step_size": el / 4})
    cases.append((f"PGD-Linf eps={el:g} 20x{el / 4:g}", lambda a, b, o=ours: o(model, a, b),
                  torchattacks.PGD(model, eps=el, alpha=el / 4, steps=20, random_start=True)))
    ours = build_attack({"name": "pgd_l2", "eps": e2, "steps": 20, "step_size": e2 / 4})
    cases.append((f"PGD-L2 eps={e2:g} 20x{e2 / 4:g}", lambda a, b, o=ours: o(model, a, b),
                  torchattacks.PGDL2(model, eps=e2, alpha=e2 / 4, steps=20, random_start=True)))

    header = (f"{'attack':<26} {'ours s':>8} {'ta s':>8} {'ta/ours':>8} "
              f"{'ours rob':>9} {'ta rob':>8} {'max|diff|':>10}")
    print(header)
    print("-" * len(header))
    for label, ours_fn, ta_fn in cases:
        best = {"ours": float("inf"), "ta": float("inf")}
        adv: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
            for side, fn in (("ours", ours_fn), ("ta", ta_fn)):
                seconds, adv[side] = run_pass(fn, x, y, args.batch_size, args.seed)
                best[side] = min(best[side], seconds)
        diff = float((adv["ours"] - adv["ta"]).abs().max())
        print(f"{label:<26} {best['ours']:>8.3f} {best['ta']:>8.3f} {best['ta'] / best['ours']:>8.2f} "
              f"{robust_acc(model, x, adv['ours'], y):>9.4f} {robust_acc(model, x, adv['ta'], y):>8.4f} "
              f"{diff:>10.2e}")


if __name__ == "__main__":
    main()

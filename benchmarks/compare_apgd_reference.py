"""Side by side: our APGD-CE / APGD-T against the reference AutoAttack implementation.

    python benchmarks/compare_apgd_reference.py --reference /tmp/autoattack-ref [--n 200]

`--reference` is a checkout of https://github.com/fra31/auto-attack (the directory holding the
`autoattack` package); it is put on sys.path for this run only and never copied into the repo.
A tiny test_resnet is trained deterministically (seeded, single-threaded) on sklearn digits, the
first `--n` test points are attacked by both implementations with the same settings and seed
(eps 0.15 L-inf, 100 iterations, 1 restart, 9 target classes by default), and the script prints
robust accuracy, the difference in points, the agreement of the per-sample outcome and the time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.attacks.apgd import APGDCE, APGDT  # noqa: E402
from harness.data.loader import make_loader  # noqa: E402
from harness.data.prepare import prepare_digits  # noqa: E402
from digits_model import train_digits_model  # noqa: E402  (benchmarks/ is on sys.path)




def robust_acc(model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).max(1)[1] == y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="auto-attack checkout (holds autoattack/)")
    ap.add_argument("--n", type=int, default=200, help="number of test points (digits has 360)")
    ap.add_argument("--norm", choices=["linf", "l2"], default="linf")
    ap.add_argument("--eps", type=float, default=None, help="default 0.15 (linf) / 1.0 (l2)")
    ap.add_argument("--n-iter", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="attack seed (both implementations)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", type=Path, default=None, help="default: a temporary directory")
    args = ap.parse_args()
    eps = args.eps if args.eps is not None else (0.15 if args.norm == "linf" else 1.0)
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(args.reference.resolve()))
    from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # the reference

    with tempfile.TemporaryDirectory() as tmp:
        digits_dir = prepare_digits(args.data_root or Path(tmp))
        model = train_digits_model(digits_dir, epochs=args.epochs, seed=0)
        x, y = next(iter(make_loader(digits_dir, "test", args.n)))
    clean = robust_acc(model, x, y)
    ref_norm = {"linf": "Linf", "l2": "L2"}[args.norm]
    print(f"model: test_resnet on digits, clean accuracy {100 * clean.float().mean():.2f}% on {len(y)} "
          f"test points; {args.norm} eps={eps}, n_iter={args.n_iter}, 1 restart, seed={args.seed}\n")

    runs = {
        "apgd-ce": (APGDCE(eps, norm=args.norm, n_iter=args.n_iter, seed=args.seed),
                    APGDAttack(model, n_iter=args.n_iter, norm=ref_norm, n_restarts=1, eps=eps,
                               seed=args.seed, loss="ce", rho=0.75, device="cpu")),
        "apgd-t": (APGDT(eps, norm=args.norm, n_iter=args.n_iter, seed=args.seed),
                   APGDAttack_targeted(model, n_iter=args.n_iter, norm=ref_norm, n_restarts=1, eps=eps,
                                       seed=args.seed, n_target_classes=9, rho=0.75, device="cpu")),
    }
    header = (f"{'attack':8} {'ours %':>8} {'ref %':>8} {'diff pts':>9} {'same outcome':>13} "
              f"{'max |dx|':>9} {'ours s':>8} {'ref s':>8}")
    print(header)
    print("-" * len(header))
    for name, (ours, ref) in runs.items():
        t0 = time.perf_counter()
        x_ours = ours(model, x, y)
        t1 = time.perf_counter()
        x_ref = ref.perturb(x, y)
        t2 = time.perf_counter()
        ok_ours, ok_ref = robust_acc(model, x_ours, y), robust_acc(model, x_ref, y)
        a_ours, a_ref = 100 * ok_ours.float().mean().item(), 100 * ok_ref.float().mean().item()
        same = (ok_ours == ok_ref).float().mean().item() * 100
        max_dx = (x_ours - x_ref).abs().max().item()
        print(f"{name:8} {a_ours:8.2f} {a_ref:8.2f} {a_ours - a_ref:+9.2f} {same:12.1f}% "
              f"{max_dx:9.2e} {t1 - t0:8.1f} {t2 - t1:8.1f}")


if __name__ == "__main__":
    main()

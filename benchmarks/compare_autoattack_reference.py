"""Side by side: our APGD-CE, APGD-T, FAB-T, Square and standard AutoAttack vs the reference.

    python benchmarks/compare_autoattack_reference.py --reference /tmp/autoattack_ref [--n 100]

`--reference` is a checkout of https://github.com/fra31/auto-attack (the directory holding the
`autoattack` package); it is put on sys.path for this run only and never copied into the repo.
A tiny test_resnet is trained deterministically (seeded, single-threaded) on sklearn's 8x8
digits, the first `--n` test points are attacked by both implementations with the same settings
(AutoAttack's standard ones) and seed, and the script prints each robust accuracy, the
difference in points, how often the per-sample outcome agrees, and the time of each side.
Each single attack runs on all n points (both sides attack only the clean-correct ones); the
AutoAttack row runs the whole standard chain (the reference's `run_standard_evaluation`).
--fold-bn: ours attack the BatchNorm-folded copy, as evaluation does (harness/eval/fold.py); the
reference always attacks the model, and both are judged by the model.
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
from harness.attacks.autoattack import AutoAttack  # noqa: E402
from harness.attacks.fab import FABT  # noqa: E402
from harness.attacks.square import Square  # noqa: E402
from harness.data.loader import make_loader  # noqa: E402
from harness.data.prepare import prepare_digits  # noqa: E402
from harness.eval.fold import folded_for_attacks  # noqa: E402
from digits_model import train_digits_model  # noqa: E402  (benchmarks/ is on sys.path)

TOLERANCE_POINTS = 0.5


def correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).max(1)[1] == y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="auto-attack checkout (holds autoattack/)")
    ap.add_argument("--n", type=int, default=100, help="number of test points (digits has 360)")
    ap.add_argument("--eps", type=float, default=0.05, help="L-inf radius")
    ap.add_argument("--seed", type=int, default=0, help="attack seed (both implementations)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of: apgd-ce apgd-t fab-t square autoattack")
    ap.add_argument("--data-root", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--fold-bn", action="store_true", help="ours attack the BatchNorm-folded copy (as evaluation)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(args.reference.resolve()))
    from autoattack import AutoAttack as RefAutoAttack  # the reference
    from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from autoattack.fab_pt import FABAttack_PT
    from autoattack.square import SquareAttack

    with tempfile.TemporaryDirectory() as tmp:
        digits_dir = prepare_digits(args.data_root or Path(tmp))
        model = train_digits_model(digits_dir, epochs=args.epochs, seed=0)
        x, y = next(iter(make_loader(digits_dir, "test", args.n)))
    eps, seed = args.eps, args.seed
    net = folded_for_attacks(model, x[:16]) if args.fold_bn else model
    clean = correct(model, x, y)
    print(f"model: test_resnet on digits ({args.epochs} epochs), clean accuracy "
          f"{100 * clean.float().mean():.2f}% on n={len(y)} test points; Linf eps={eps}, seed={seed}, "
          f"{args.threads} thread(s); ours attack the {'BatchNorm-folded copy' if net is not model else 'model'}\n")

    def ref_fab_t():
        fab = FABAttack_PT(model, n_restarts=1, n_iter=100, eps=eps, seed=seed, norm="Linf",
                           verbose=False, device="cpu", targeted=True, n_target_classes=9)
        return fab.perturb

    def ref_autoattack():
        aa = RefAutoAttack(model, norm="Linf", eps=eps, seed=seed, version="standard",
                           verbose=False, device="cpu")
        return lambda a, b: aa.run_standard_evaluation(a, b, bs=len(b))

    runs = {
        "apgd-ce": (APGDCE(eps, seed=seed),
                    lambda: APGDAttack(model, n_iter=100, norm="Linf", n_restarts=1, eps=eps, seed=seed,
                                       loss="ce", rho=0.75, device="cpu").perturb),
        "apgd-t": (APGDT(eps, seed=seed),
                   lambda: APGDAttack_targeted(model, n_iter=100, norm="Linf", n_restarts=1, eps=eps,
                                               seed=seed, n_target_classes=9, rho=0.75,
                                               device="cpu").perturb),
        "fab-t": (FABT(eps, seed=seed), ref_fab_t),
        "square": (Square(eps, seed=seed),
                   lambda: SquareAttack(model, p_init=0.8, n_queries=5000, eps=eps, norm="Linf",
                                        n_restarts=1, seed=seed, verbose=False, device="cpu",
                                        resc_schedule=False).perturb),
        "autoattack": (AutoAttack(eps, seed=seed), ref_autoattack),
    }
    header = (f"{'attack':11} {'ours %':>8} {'ref %':>8} {'diff pts':>9} {'same outcome':>13} "
              f"{'max |dx|':>9} {'ours s':>8} {'ref s':>8}  within {TOLERANCE_POINTS} pts")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, (ours, make_ref) in runs.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        x_ours = ours(net, x, y)
        t1 = time.perf_counter()
        x_ref = make_ref()(x.clone(), y.clone())
        t2 = time.perf_counter()
        ok_ours, ok_ref = correct(model, x_ours, y) & clean, correct(model, x_ref, y) & clean
        a_ours, a_ref = 100 * ok_ours.float().mean().item(), 100 * ok_ref.float().mean().item()
        same = (ok_ours == ok_ref).float().mean().item() * 100
        max_dx = (x_ours - x_ref).abs().max().item()
        worst = max(worst, abs(a_ours - a_ref))
        print(f"{name:11} {a_ours:8.2f} {a_ref:8.2f} {a_ours - a_ref:+9.2f} {same:12.1f}% "
              f"{max_dx:9.2e} {t1 - t0:8.1f} {t2 - t1:8.1f}  "
              f"{'yes' if abs(a_ours - a_ref) <= TOLERANCE_POINTS else 'NO'}", flush=True)
    print(f"\nlargest difference: {worst:.2f} points (tolerance {TOLERANCE_POINTS})")
    sys.exit(0 if worst <= TOLERANCE_POINTS else 1)


if __name__ == "__main__":
    main()

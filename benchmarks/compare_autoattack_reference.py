"""Side by side: our APGD-CE, APGD-T, FAB-T, Square and standard AutoAttack vs the reference.

    python benchmarks/compare_autoattack_reference.py --reference /tmp/autoattack_ref [--n 100]

`--reference` is a checkout of https://github.com/fra31/auto-attack (the directory holding the
`autoattack` package); it is put on sys.path for this run only and never copied into the repo.
A classifier is trained deterministically (seeded, single-threaded) on sklearn's digits
(test_resnet at 8x8 by default; `--arch resnet18 --img-size 32` trains timm's ResNet-18 with the
3x3 stem on the digits upsampled to 32x32), the first `--n` test points are attacked by both
implementations with the same settings (AutoAttack's standard ones unless `--n-iter` /
`--n-queries` lower them on both sides) and seed, and the script prints each robust accuracy,
the difference in points, how often the per-sample outcome agrees, and the time of each side.
Each single attack runs on all n points (both sides attack only the clean-correct ones); the
AutoAttack row runs the whole standard chain (the reference's `run_standard_evaluation`), and a
second table gives each component's time on both sides (ours: the component and its check
forward; the reference: its `perturb` call) with the number of points it attacked.
--fold-bn: ours attack the copy evaluation attacks (harness/eval/fold.py: BatchNorm folded into
the convs, on the CPU stored channels_last); the reference always attacks the model, and both
are judged by the model. --no-skip: ours keep fooled points in APGD's and FAB-T's batches to
the end of each run, as the reference does (`skip_fooled=False`).
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
from digits_model import resize, train_digits_model  # noqa: E402  (benchmarks/ is on sys.path)

TOLERANCE_POINTS = 0.5
COMPONENTS = (("apgd-ce", "apgd_ce", "apgd"), ("apgd-t", "apgd_t", "apgd_targeted"),
              ("fab-t", "fab_t", "fab"), ("square", "square", "square"))  # (row, ours, reference attribute)


def correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).max(1)[1] == y


class Clock:
    """Wall and CPU (process) seconds since start. With one thread the CPU time is what the
    work costs, whatever else the shared machine runs; the wall time is what a user waits."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed(seconds: dict[str, list[float]], points: dict[str, int], name: str, fn):
    """fn, adding its [wall, cpu] seconds and the number of points it got (its last positional
    argument is y) to seconds[name] / points[name]."""
    def call(*args, **kwargs):
        clock = Clock()
        out = fn(*args, **kwargs)
        wall, cpu = clock.read()
        spent = seconds.setdefault(name, [0.0, 0.0])
        spent[0] += wall
        spent[1] += cpu
        points[name] = points.get(name, 0) + len(args[-1])
        return out
    return call


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def get_model(args: argparse.Namespace, digits_dir: Path) -> torch.nn.Module:
    """The trained model (loaded from --model-file when it exists, saved there otherwise)."""
    if args.model_file and args.model_file.exists():
        return torch.load(args.model_file, weights_only=False).eval()
    model = train_digits_model(digits_dir, epochs=args.epochs, seed=0, arch=args.arch,
                               img_size=args.img_size, lr=args.lr)
    if args.model_file:
        torch.save(model, args.model_file)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="auto-attack checkout (holds autoattack/)")
    ap.add_argument("--n", type=int, default=100, help="number of test points (digits has 360)")
    ap.add_argument("--eps", type=float, default=0.05, help="L-inf radius")
    ap.add_argument("--seed", type=int, default=0, help="attack seed (both implementations)")
    ap.add_argument("--arch", default="test_resnet", help="architecture preset (test_resnet, resnet18, ...)")
    ap.add_argument("--img-size", type=int, default=None, help="upsample the 8x8 digits to this size")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--model-file", type=Path, default=None, help="load/save the trained model here")
    ap.add_argument("--n-iter", type=int, default=100, help="APGD / FAB-T iterations (both sides)")
    ap.add_argument("--n-queries", type=int, default=5000, help="Square queries (both sides)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of: apgd-ce apgd-t fab-t square autoattack")
    ap.add_argument("--data-root", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--fold-bn", action="store_true", help="ours attack the copy evaluation attacks (folded BN)")
    ap.add_argument("--no-skip", action="store_true", help="ours keep fooled points to the end of each run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(args.reference.resolve()))
    from autoattack import AutoAttack as RefAutoAttack  # the reference
    from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from autoattack.fab_pt import FABAttack_PT
    from autoattack.square import SquareAttack

    with tempfile.TemporaryDirectory() as tmp:
        digits_dir = prepare_digits(args.data_root or Path(tmp))
        model = get_model(args, digits_dir)
        x, y = next(iter(make_loader(digits_dir, "test", args.n)))
    x = resize(x, args.img_size)
    eps, seed, n_iter, n_queries, skip = args.eps, args.seed, args.n_iter, args.n_queries, not args.no_skip
    net = folded_for_attacks(model, x[:16]) if args.fold_bn else model
    clean = correct(model, x, y)
    print(f"model: {args.arch} on digits at {x.shape[-1]}x{x.shape[-1]} ({args.epochs} epochs), clean accuracy "
          f"{100 * clean.float().mean():.2f}% on n={len(y)} test points; Linf eps={eps}, seed={seed}, "
          f"n_iter={n_iter}, n_queries={n_queries}, {args.threads} thread(s); ours attack the "
          f"{'BatchNorm-folded copy' if net is not model else 'model'}"
          f"{' (channels_last)' if net is not model and x.device.type == 'cpu' else ''}, "
          f"skip_fooled={skip}\n")

    def ref_fab_t():
        fab = FABAttack_PT(model, n_restarts=1, n_iter=n_iter, eps=eps, seed=seed, norm="Linf",
                           verbose=False, device="cpu", targeted=True, n_target_classes=9)
        return fab.perturb

    ref_seconds: dict[str, list[float]] = {}
    ref_points: dict[str, int] = {}
    ours_seconds: dict[str, list[float]] = {}
    ours_points: dict[str, int] = {}

    def ref_autoattack():
        aa = RefAutoAttack(model, norm="Linf", eps=eps, seed=seed, version="standard",
                           verbose=False, device="cpu")
        for apgd in (aa.apgd, aa.apgd_targeted):  # its checkpoint schedule is fixed at construction
            apgd.n_iter, apgd.n_iter_2 = n_iter, max(int(0.22 * n_iter), 1)
            apgd.n_iter_min, apgd.size_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
        aa.fab.n_iter = n_iter
        aa.square.n_queries = n_queries
        for row, _, attr in COMPONENTS:
            attack = getattr(aa, attr)
            attack.perturb = timed(ref_seconds, ref_points, row, attack.perturb)
        return lambda a, b: aa.run_standard_evaluation(a, b, bs=len(b))

    ours_aa = AutoAttack(eps, seed=seed, n_iter=n_iter, n_queries=n_queries, skip_fooled=skip)
    build = ours_aa.build_components

    def timed_components():
        made = build()
        rows = {ours: row for row, ours, _ in COMPONENTS}
        for attack in made:
            attack.perturb_with_mask = timed(ours_seconds, ours_points, rows[attack.name], attack.perturb_with_mask)
        return made

    ours_aa.build_components = timed_components

    def ours_autoattack(m, a, b):
        return ours_aa.perturb_with_log(m, a, b)[0]

    runs = {
        "apgd-ce": (APGDCE(eps, seed=seed, n_iter=n_iter, skip_fooled=skip),
                    lambda: APGDAttack(model, n_iter=n_iter, norm="Linf", n_restarts=1, eps=eps, seed=seed,
                                       loss="ce", rho=0.75, device="cpu").perturb),
        "apgd-t": (APGDT(eps, seed=seed, n_iter=n_iter, skip_fooled=skip),
                   lambda: APGDAttack_targeted(model, n_iter=n_iter, norm="Linf", n_restarts=1, eps=eps,
                                               seed=seed, n_target_classes=9, rho=0.75,
                                               device="cpu").perturb),
        "fab-t": (FABT(eps, seed=seed, n_iter=n_iter, skip_fooled=skip), ref_fab_t),
        "square": (Square(eps, seed=seed, n_queries=n_queries),
                   lambda: SquareAttack(model, p_init=0.8, n_queries=n_queries, eps=eps, norm="Linf",
                                        n_restarts=1, seed=seed, verbose=False, device="cpu",
                                        resc_schedule=False).perturb),
        "autoattack": (ours_autoattack, ref_autoattack),
    }
    header = (f"{'attack':11} {'ours %':>8} {'ref %':>8} {'diff pts':>9} {'same outcome':>13} "
              f"{'max |dx|':>9} {'ours s':>8} {'ref s':>8} {'ours/ref':>8} {'cpu ours/ref':>12}"
              f"  within {TOLERANCE_POINTS} pts")
    print(header)
    print("-" * len(header))
    worst, disagree = 0.0, 0
    for name, (ours, make_ref) in runs.items():
        if args.only and name not in args.only:
            continue
        clock = Clock()
        x_ours = ours(net, x, y)
        (w_ours, c_ours), clock = clock.read(), Clock()
        x_ref = make_ref()(x.clone(), y.clone())
        w_ref, c_ref = clock.read()
        ok_ours, ok_ref = correct(model, x_ours, y) & clean, correct(model, x_ref, y) & clean
        a_ours, a_ref = 100 * ok_ours.float().mean().item(), 100 * ok_ref.float().mean().item()
        same = (ok_ours == ok_ref).float().mean().item() * 100
        disagree += int((ok_ours != ok_ref).sum())
        max_dx = (x_ours - x_ref).abs().max().item()
        worst = max(worst, abs(a_ours - a_ref))
        print(f"{name:11} {a_ours:8.2f} {a_ref:8.2f} {a_ours - a_ref:+9.2f} {same:12.1f}% "
              f"{max_dx:9.2e} {w_ours:8.1f} {w_ref:8.1f} {ratio(w_ours, w_ref):8.2f} {ratio(c_ours, c_ref):12.2f}  "
              f"{'yes' if abs(a_ours - a_ref) <= TOLERANCE_POINTS else 'NO'}", flush=True)
    if ref_seconds:
        print(f"\nAutoAttack per component (its perturb call; each on the points the earlier ones left robust)\n"
              f"{'component':11} {'pts ours':>8} {'pts ref':>8} {'ours s':>8} {'ref s':>8} {'ours/ref':>8} "
              f"{'cpu ours s':>10} {'cpu ref s':>10} {'cpu o/r':>8}")
        total_o, total_r = [0.0, 0.0], [0.0, 0.0]
        for row, _, _ in COMPONENTS:
            o, r = ours_seconds.get(row, [0.0, 0.0]), ref_seconds.get(row, [0.0, 0.0])
            total_o, total_r = [a + b for a, b in zip(total_o, o)], [a + b for a, b in zip(total_r, r)]
            print(f"{row:11} {ours_points.get(row, 0):8d} {ref_points.get(row, 0):8d} {o[0]:8.2f} {r[0]:8.2f} "
                  f"{ratio(o[0], r[0]):8.2f} {o[1]:10.2f} {r[1]:10.2f} {ratio(o[1], r[1]):8.2f}")
        print(f"{'all four':11} {'':8} {'':8} {total_o[0]:8.2f} {total_r[0]:8.2f} {ratio(total_o[0], total_r[0]):8.2f} "
              f"{total_o[1]:10.2f} {total_r[1]:10.2f} {ratio(total_o[1], total_r[1]):8.2f}")
    print(f"\nlargest difference: {worst:.2f} points (tolerance {TOLERANCE_POINTS}); "
          f"points whose outcome differs: {disagree}")
    sys.exit(0 if worst <= TOLERANCE_POINTS and disagree == 0 else 1)


if __name__ == "__main__":
    main()

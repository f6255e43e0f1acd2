"""Side by side: our EOT (APGD eot_iter) and AutoAttack "rand" vs the reference's (fra31/auto-attack).

    python benchmarks/compare_autoattack_rand_reference.py --reference /tmp/autoattack_ref [--n 100]

`--reference` is a checkout of https://github.com/fra31/auto-attack (put on sys.path for this run
only, never copied into the repo). A test_resnet is trained on digits as in
compare_autoattack_reference.py, then:
1. deterministic model, APGD-CE with eot_iter=3 on both sides: EOT must change nothing, so the
   per-sample outcomes agree as in the standard comparison;
2. the same model behind Gaussian input noise (a randomized defense, sigma `--sigma` at every
   forward): AutoAttack "rand" (APGD-CE + APGD-DLR, EOT 20) on both sides, and our deterministic
   APGD-CE (EOT 1) for contrast. The noise draws differ between the two implementations, so the
   comparison is of robust accuracies, each the mean over `--draws` noisy forwards of x_adv.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.attacks.apgd import APGDCE  # noqa: E402
from harness.attacks.autoattack import AutoAttackRand  # noqa: E402
from harness.data.loader import make_loader  # noqa: E402
from harness.data.prepare import prepare_digits  # noqa: E402
from digits_model import train_digits_model  # noqa: E402  (benchmarks/ is on sys.path)


class NoisyInput(nn.Module):
    """Gaussian noise on the input at every forward (eval mode too): a randomized defense."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-sample share of `draws` forwards that classify right."""
    return torch.stack([(model(x).max(1)[1] == y).float() for _ in range(draws)]).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(args.reference.resolve()))
    from autoattack import AutoAttack as RefAutoAttack
    from autoattack.autopgd_base import APGDAttack

    with tempfile.TemporaryDirectory() as tmp:
        digits_dir = prepare_digits(Path(tmp))
        model = train_digits_model(digits_dir, epochs=args.epochs, seed=0)
        x, y = next(iter(make_loader(digits_dir, "test", args.n)))
    eps, seed = args.eps, args.seed
    with torch.no_grad():
        clean = model(x).max(1)[1] == y
    print(f"model: test_resnet on digits, clean {100 * clean.float().mean():.2f}% on n={len(y)}; Linf eps={eps}\n")

    t0 = time.perf_counter()
    ours = APGDCE(eps, seed=seed, eot_iter=3)(model, x, y)
    t1 = time.perf_counter()
    ref = APGDAttack(model, n_iter=100, norm="Linf", n_restarts=1, eps=eps, seed=seed, loss="ce",
                     eot_iter=3, rho=0.75, device="cpu").perturb(x.clone(), y.clone())
    t2 = time.perf_counter()
    with torch.no_grad():
        ok_ours, ok_ref = (model(ours).max(1)[1] == y) & clean, (model(ref).max(1)[1] == y) & clean
    print(f"1. deterministic model, APGD-CE eot_iter=3: ours {100 * ok_ours.float().mean():.2f}% ref "
          f"{100 * ok_ref.float().mean():.2f}%, same per-sample outcome {100 * (ok_ours == ok_ref).float().mean():.1f}%, "
          f"max |dx| {(ours - ref).abs().max():.2e}; ours {t1 - t0:.1f}s ref {t2 - t1:.1f}s\n")

    noisy = NoisyInput(model, args.sigma).eval()
    torch.manual_seed(seed)
    clean_noisy = accuracy(noisy, x, y, args.draws)
    rows = []
    for name, run in (
        ("ours APGD-CE, no EOT", lambda: APGDCE(eps, seed=seed)(noisy, x, y)),
        ("ours autoattack_rand", lambda: AutoAttackRand(eps, seed=seed)(noisy, x, y)),
        ("ref version='rand'", lambda: RefAutoAttack(noisy, norm="Linf", eps=eps, seed=seed, version="rand",
                                                     verbose=False, device="cpu").run_standard_evaluation(
                                                         x.clone(), y.clone(), bs=len(y))),
    ):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        x_adv = run()
        seconds = time.perf_counter() - t0
        torch.manual_seed(seed + 1)
        rows.append((name, 100 * accuracy(noisy, x_adv, y, args.draws).mean().item(), seconds))
    print(f"2. randomized model (input noise sigma={args.sigma}), accuracy = mean over {args.draws} draws; "
          f"clean {100 * clean_noisy.mean():.2f}%")
    for name, acc, seconds in rows:
        print(f"   {name:22} robust {acc:6.2f}%  {seconds:6.1f}s")


if __name__ == "__main__":
    main()

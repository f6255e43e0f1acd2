"""What IAD's poisoning costs per image: G and M forward (eval, no grad) beside a training step of
the cell's model on the same images, interleaved round by round so contention hits both alike.

    PYTHONPATH=$PWD python benchmarks/iad_cost.py [--sizes 1x8 3x32 3x224] [--rounds 5]

Prints, per image shape, the median seconds per image of each and their ratio. IAD applies G and M
once per poisoned or cross image per epoch (20% of the split at the defaults: 10% + 10% cross), and
once per test image for the triggered test set.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    from architectures.presets import build_classifier
    from harness.backdoor.iad import InputAware, normalise, threshold

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", nargs="+", default=["1x8", "3x32"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", default="test_resnet")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for size in args.sizes:
        channels, side = (int(v) for v in size.split("x"))
        netG, netM = InputAware().networks(channels, side, side)
        netG.eval().requires_grad_(False)
        netM.eval().requires_grad_(False)
        model = build_classifier({"name": args.arch, "kwargs": {}}, num_classes=10, in_chans=channels, img_size=side,
                                 mean=[0.5] * channels, std=[0.25] * channels)
        opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
        x, y = torch.rand(args.batch, channels, side, side), torch.randint(0, 10, (args.batch,))
        mean, std = torch.full((channels,), 0.5), torch.full((channels,), 0.25)
        iad, train = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            with torch.no_grad():
                n = normalise(x, mean, std)
                _ = x + (netG(n) - x) * threshold(netM(n))
            iad.append((time.perf_counter() - t0) / args.batch)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            train.append((time.perf_counter() - t0) / args.batch)
        a, b = statistics.median(iad), statistics.median(train)
        print(f"{size}: G+M forward {a * 1e3:.3f} ms/image, {args.arch} train step {b * 1e3:.3f} ms/image, "
              f"ratio {a / b:.2f} (batch {args.batch}, {args.rounds} rounds, 1 thread)")


if __name__ == "__main__":
    main()

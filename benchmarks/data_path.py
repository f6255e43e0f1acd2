"""The data path at cluster scale, measured side by side; prints one JSON object.

    python -m benchmarks.data_path [--samples 2048] [--per-shard 64] [--batch 128]

On synthetic 32x32 RGB noise shards (incompressible, so PNG bytes ~ raw bytes, like photos):
  bytes_read:  for W = 1, 2, 4 ranks, the shard bytes each rank's loader reads in one epoch
               (every rank of W run in this process, counted at the stream), divided by the
               split's bytes; `goal` is 1/W + one shard. The node's one-time full check is done
               before counting (it is once per node per dataset version, not per epoch).
  peak_rss:    peak resident memory (MiB) of a fresh process running one shuffled epoch of rank 0
               of 2, for a split of `--samples` and of 4x that; `ratio` = large / small (goal ~1).
  throughput:  loader images/s (shuffled, batch `--batch`, with 0 and 2 workers) divided by a
               tight loop that reads the same shards and decodes the same PNGs in one process,
               with no shuffling, batching or float conversion (goal: >= 0.9 with 2 workers).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _make_split(root: Path, name: str, samples: int, per_shard: int) -> Path:
    from harness.data.shards import write_dataset

    rng = np.random.default_rng(0)

    def gen(n: int):
        for i in range(n):
            yield rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), i % 10

    info = {"num_classes": 10, "class_names": [str(c) for c in range(10)], "channels": 3,
            "image_size": [32, 32], "source": "benchmark noise", "split_rule": "synthetic"}
    return Path(write_dataset(root, name, {"train": lambda: gen(samples), "test": lambda: gen(per_shard)},
                              info, per_shard))


def bytes_read(dataset: Path, batch: int) -> dict:
    """Max over ranks of (bytes a rank's epoch reads) / (split bytes), for W = 1, 2, 4."""
    from harness.data import location
    from harness.data.loader import make_loader
    from harness.data.shards import load_manifest

    shards = load_manifest(dataset)["splits"]["train"]["shards"]
    split_bytes = sum(s["size"] for s in shards)
    counter = {"bytes": 0}
    real_open = location.DataLocation.open_stream

    class Counting:
        def __init__(self, stream):
            self.stream = stream

        def read(self, n=-1):
            data = self.stream.read(n)
            counter["bytes"] += len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    location.DataLocation.open_stream = lambda self, name, version=None: Counting(real_open(self, name, version))
    out = {}
    try:
        for world in (1, 2, 4):
            per_rank = []
            for rank in range(world):
                loader = make_loader(dataset, "train", batch, rank=rank, world_size=world, shuffle=True, seed=0)
                counter["bytes"] = 0
                for _ in loader:
                    pass
                per_rank.append(counter["bytes"] / split_bytes)
            out[f"W={world}"] = {"max_rank_fraction": round(max(per_rank), 4),
                                 "goal": round(1 / world + max(s["size"] for s in shards) / split_bytes, 4),
                                 "sum_over_ranks": round(sum(per_rank), 4)}
    finally:
        location.DataLocation.open_stream = real_open
    return out


def _epoch_rss(dataset: Path, batch: int) -> float:
    """Peak RSS (MiB) of a fresh process running one epoch of rank 0 of 2."""
    code = (
        "import resource, sys; from harness.data.loader import make_loader\n"
        f"for _ in make_loader({str(dataset)!r}, 'train', {batch}, rank=0, world_size=2, shuffle=True): pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(done.stdout.strip().splitlines()[-1])


def throughput(dataset: Path, batch: int) -> dict:
    from harness.data.integrity import dataset_version, read_shard
    from harness.data.loader import make_loader
    from harness.data.location import DataLocation
    from harness.data.shards import decode_png, load_manifest

    manifest = load_manifest(dataset)
    loc, version = DataLocation(dataset), dataset_version(manifest)
    n = manifest["splits"]["train"]["count"]

    def tight() -> float:
        start, first = time.perf_counter(), 0
        for shard in manifest["splits"]["train"]["shards"]:
            images = [decode_png(png) for _, png, _ in read_shard(loc, shard, first, 10, version)]
            np.stack(images)
            first += shard["count"]
        return n / (time.perf_counter() - start)

    def loader(workers: int) -> float:
        start = time.perf_counter()
        for _ in make_loader(dataset, "train", batch, num_workers=workers, shuffle=True):
            pass
        return n / (time.perf_counter() - start)

    tight()  # warm the page cache and imports
    runs = {"tight": [], "w0": [], "w2": []}
    for _ in range(3):  # interleaved, median: a shared machine's load moves single runs
        runs["tight"].append(tight())
        runs["w0"].append(loader(0))
        runs["w2"].append(loader(2))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {"tight_loop_img_s": round(med["tight"]), "loader_0_workers_img_s": round(med["w0"]),
            "loader_2_workers_img_s": round(med["w2"]),
            "ratio_0_workers": round(med["w0"] / med["tight"], 3),
            "ratio_2_workers": round(med["w2"] / med["tight"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ROBUSTGRID_VERIFIED_DIR", str(Path(tmp) / "verified"))
        small = _make_split(Path(tmp), "small", args.samples, args.per_shard)
        large = _make_split(Path(tmp), "large", 4 * args.samples, args.per_shard)
        from harness.data.loader import make_loader

        for d in (small, large):
            make_loader(d, "train", args.batch)  # the node's one-time full check, outside the timings
        rss_small, rss_large = _epoch_rss(small, args.batch), _epoch_rss(large, args.batch)
        result = {
            "setup": {"samples": args.samples, "samples_per_shard": args.per_shard, "image": "32x32x3 noise PNG",
                      "batch": args.batch, "cpus": os.cpu_count()},
            "bytes_read_per_rank_over_split": bytes_read(small, args.batch),
            "peak_rss_mib": {f"split_{args.samples}": round(rss_small, 1), f"split_{4 * args.samples}":
                             round(rss_large, 1), "ratio": round(rss_large / rss_small, 3)},
            "throughput": throughput(small, args.batch),
            "this_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

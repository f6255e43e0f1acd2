"""A synthetic CIFAR-shaped dataset (random 3x32x32 images, or `size` x `size`, 10 classes) as real shards.

The benchmarks that time the trainer need its whole data path (shards, PNG decode, loader)
on data of CIFAR's shape, without a download; the content does not matter for speed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data.shards import write_dataset


def synthetic_cifar(out_root: Path, n_train: int, n_test: int = 256, name: str = "cifar10", seed: int = 0,
                    size: int = 32) -> Path:
    """Write `<out_root>/<name>` (train/test splits of uniform-noise `size` x `size` RGB images, 32 as
    CIFAR by default; smaller sizes show per-step overheads a 32x32 step hides); returns its dir."""
    rng = np.random.default_rng(seed)

    def split(n: int):
        images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        return lambda: ((images[i], int(labels[i])) for i in range(n))

    info = {"num_classes": 10, "class_names": [f"c{i}" for i in range(10)], "channels": 3,
            "image_size": [size, size], "source": "synthetic uniform noise (benchmarks/synthetic.py)",
            "split_rule": "synthetic"}
    return write_dataset(Path(out_root), name, {"train": split(n_train), "test": split(n_test)}, info,
                         samples_per_shard=1024)

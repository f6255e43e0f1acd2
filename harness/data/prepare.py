"""Converters from original dataset sources to the shard format of `harness.data.shards`.

Each `prepare_*` returns `<out_root>/<name>`; if that directory already holds a complete,
hash-verified dataset it is returned untouched, otherwise it is (re)built atomically.
"""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from harness.data.location import join
from harness.data.shards import DataError, existing_dataset, write_dataset

DIGITS_SPLIT_RULE = (
    "sklearn.datasets.load_digits() (1797 images); pixels uint8 = numpy.round(v * 255 / 16); "
    "indices split by sklearn.model_selection.train_test_split(numpy.arange(1797), "
    "test_size=0.2, random_state=0, stratify=target) -> 1437 train / 360 test; "
    "within each split samples are ordered by ascending original index"
)
CIFAR10_MEMBERS = {
    "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
    "test": ["cifar-10-batches-py/test_batch"],
}
CIFAR10_META = "cifar-10-batches-py/batches.meta"
CIFAR10_SPLIT_RULE = (
    "official CIFAR-10 split: train = data_batch_1..data_batch_5 concatenated in that order "
    "(50000), test = test_batch (10000); samples keep their order within each batch file"
)


def prepare_digits(out_root: Path | str, samples_per_shard: int = 64) -> Path | str:
    """Convert scikit-learn's bundled 8x8 digits into `<out_root>/digits` (1 channel, 8x8).

    64 samples per shard gives 23 train shards: enough for 2 ranks x 4 loader workers.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    final = _final(out_root, "digits")
    if existing_dataset(final):
        return final
    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)  # (1797, 8, 8)
    target = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(target)), test_size=0.2, random_state=0, stratify=target
    )

    def samples(indices: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        for i in np.sort(indices):
            yield images[i], int(target[i])

    info = {
        "num_classes": 10,
        "class_names": [str(c) for c in range(10)],
        "channels": 1,
        "image_size": [8, 8],
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
        "split_rule": DIGITS_SPLIT_RULE,
    }
    splits = {"train": lambda: samples(train_idx), "test": lambda: samples(test_idx)}
    return write_dataset(out_root, "digits", splits, info, samples_per_shard)


def _final(out_root: Path | str, name: str) -> Path | str:
    """Where a dataset lands: a Path for a local root, a URI string for a remote one."""
    final = join(str(out_root), name)
    return final if "://" in final else Path(final)


def prepare_cifar10(archive: Path, out_root: Path | str, samples_per_shard: int = 1000) -> Path | str:
    """Convert the official `cifar-10-python.tar.gz` into `<out_root>/cifar10`, read in place."""
    final = _final(out_root, "cifar10")
    if existing_dataset(final):
        return final
    archive = Path(archive)
    batches, label_names = _read_cifar10_archive(archive)

    def samples(split: str) -> Iterator[tuple[np.ndarray, int]]:
        for member in CIFAR10_MEMBERS[split]:
            data, labels = batches[member]
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # N x H x W x RGB
            for image, label in zip(images, labels):
                yield image, int(label)

    info = {
        "num_classes": len(label_names),
        "class_names": label_names,
        "channels": 3,
        "image_size": [32, 32],
        "source": f"CIFAR-10 python version ({archive.name})",
        "split_rule": CIFAR10_SPLIT_RULE,
    }
    splits = {"train": lambda: samples("train"), "test": lambda: samples("test")}
    return write_dataset(out_root, "cifar10", splits, info, samples_per_shard)


def _read_cifar10_archive(
    archive: Path,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Batches {member: (uint8 N x 3072, labels)} and label names, read straight from the tar.gz."""
    expected = (
        "the CIFAR-10 python version, cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, holding "
        "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"
    )
    if not archive.is_file():
        raise DataError(f"CIFAR-10 archive {archive} does not exist; expected {expected}")
    wanted = {m for ms in CIFAR10_MEMBERS.values() for m in ms} | {CIFAR10_META}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:  # one sequential pass: no seeking back in the gzip stream
                name = info.name[2:] if info.name.startswith("./") else info.name
                if name in wanted and info.isfile():
                    found[name] = _unpickle(tar.extractfile(info), archive, name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot read CIFAR-10 archive {archive} ({exc}); expected {expected}"
        ) from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"CIFAR-10 archive {archive} lacks member(s) {', '.join(missing)}; expected {expected}"
        )
    names = _field(found[CIFAR10_META], b"label_names", archive, CIFAR10_META)
    label_names = [_text(n) for n in names]
    batches = {
        name: _check_batch(found[name], archive, name, len(label_names))
        for name in wanted - {CIFAR10_META}
    }
    return batches, label_names


def _check_batch(
    batch: dict, archive: Path, member: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one batch dict: b"data" uint8 N x 3072 and N labels in range."""
    data = np.asarray(_field(batch, b"data", archive, member))
    labels = np.asarray(_field(batch, b"labels", archive, member), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{archive}:{member}: b'data' must be uint8 N x 3072, got {data.dtype} {data.shape}"
        )
    in_range = labels.size == 0 or 0 <= labels.min() <= labels.max() < num_classes
    if labels.shape != (data.shape[0],) or not in_range:
        raise DataError(
            f"{archive}:{member}: b'labels' must be {data.shape[0]} integers in [0, {num_classes})"
        )
    return data, labels


def _field(d: Any, key: bytes, archive: Path, member: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise DataError(f"{archive}:{member} is not a CIFAR-10 batch dict with key {key!r}")
    return d[key]


def _text(x: bytes | str) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers and numpy arrays (no arbitrary code)."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles from Python 3: bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(stream: Any, archive: Path, member: str) -> Any:
    """Load one CIFAR pickle (python2-era, so bytes keys via encoding='bytes')."""
    try:
        return _NumpyOnlyUnpickler(stream, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{archive}:{member} is not a readable CIFAR-10 pickle ({exc})") from None

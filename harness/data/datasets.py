"""Dataset plugins: the names configs use, each knowing how to prepare its shards.

Heavy imports happen inside `prepare`, so listing the registry stays cheap.
"""
from __future__ import annotations

from pathlib import Path

from harness.core.registry import DATASETS


@DATASETS.register("digits")
class Digits:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes); needs no download."""

    name = "digits"
    needs_source: bool = False

    def prepare(self, root: Path | str, source: Path | None = None, **options: int) -> Path | str:
        """Write `<root>/digits` (or return it if already complete); `source` is ignored."""
        from harness.data.prepare import prepare_digits

        return prepare_digits(root, **options)


@DATASETS.register("cifar10")
class Cifar10:
    """CIFAR-10 (32x32 RGB, 10 classes) from the official python-version archive."""

    name = "cifar10"
    needs_source: bool = True

    def prepare(self, root: Path | str, source: Path | None = None, **options: int) -> Path | str:
        """Write `<root>/cifar10` from `source` = cifar-10-python.tar.gz (no-op if complete)."""
        from harness.data.prepare import prepare_cifar10
        from harness.data.shards import DataError

        if source is None:
            raise DataError(
                "cifar10 needs its source archive: pass --source /path/to/cifar-10-python.tar.gz "
                "(from https://www.cs.toronto.edu/~kriz/cifar.html)"
            )
        return prepare_cifar10(Path(source), root, **options)

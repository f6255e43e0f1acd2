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


def _source(name: str, source: Path | None, what: str) -> Path:
    from harness.data.shards import DataError

    if source is None:
        raise DataError(f"{name} needs its source: pass --source {what}")
    return Path(source)


@DATASETS.register("cifar100")
class Cifar100:
    """CIFAR-100 (32x32 RGB, 100 fine classes) from cifar-100-python.tar.gz."""

    name = "cifar100"
    needs_source: bool = True

    def prepare(self, root: Path | str, source: Path | None = None, **options: int) -> Path | str:
        from harness.data.sources import prepare_cifar100

        return prepare_cifar100(_source(self.name, source, "/path/to/cifar-100-python.tar.gz"), root, **options)


@DATASETS.register("svhn")
class Svhn:
    """SVHN cropped digits (32x32 RGB, 10 classes) from train_32x32.mat / test_32x32.mat."""

    name = "svhn"
    needs_source: bool = True

    def prepare(self, root: Path | str, source: Path | None = None, **options: int) -> Path | str:
        from harness.data.sources import prepare_svhn

        return prepare_svhn(_source(self.name, source, "/folder/with/train_32x32.mat"), root, **options)


class _ImageFolder:
    """A class-per-folder tree (train/ + val/), resized at prepare time with --size."""

    name = "imagefolder"
    default_size: int | None = None
    needs_source: bool = True

    def prepare(self, root: Path | str, source: Path | None = None, **options: int) -> Path | str:
        from harness.data.sources import prepare_imagefolder

        options.setdefault("size", self.default_size)
        return prepare_imagefolder(_source(self.name, source, "/path/to/tree (train/<class>/..., val/...)"),
                                   root, name=self.name, **options)


@DATASETS.register("imagefolder")
class ImageFolder(_ImageFolder):
    """Any class-per-folder tree: train/<class>/*, val/<class>/* (or Tiny-ImageNet's val layout)."""


@DATASETS.register("tinyimagenet")
class TinyImageNet(_ImageFolder):
    """Tiny-ImageNet-200 (64x64, 200 classes) from tiny-imagenet-200/ (val via val_annotations.txt)."""

    name = "tinyimagenet"
    default_size = 64


@DATASETS.register("imagenet")
class ImageNet(_ImageFolder):
    """ImageNet-1k from train/<wnid>/ and val/<wnid>/ trees, stored at 256 (shorter side + center crop)."""

    name = "imagenet"
    default_size = 256


@DATASETS.register("hf")
class HuggingFace:
    """A Hugging Face dataset on disk (save_to_disk folder or parquet files with image + label)."""

    name = "hf"
    needs_source: bool = True

    def prepare(self, root: Path | str, source: Path | None = None, **options: int) -> Path | str:
        from harness.data.sources import prepare_hf

        return prepare_hf(_source(self.name, source, "/path/to/saved_dataset"), root, **options)


@DATASETS.register("gtsrb")
class Gtsrb:
    """GTSRB (43 traffic-sign classes) from its official zips, whole images resized to 32x32 as
    BackdoorBench does (harness/data/gtsrb.py)."""

    name = "gtsrb"
    needs_source: bool = True

    def prepare(self, root: Path | str, source: Path | None = None, **options: int) -> Path | str:
        from harness.data.gtsrb import prepare_gtsrb

        return prepare_gtsrb(_source(self.name, source, "/folder/with/GTSRB_Final_Training_Images.zip"),
                             root, **options)

"""Converters for the field's datasets from the files a user already has: CIFAR-100, SVHN,
image folders (Tiny-ImageNet, ImageNet-style trees) and Hugging Face datasets saved to disk.

Each returns `<out_root>/<name>` (a folder or URI) and, like harness.data.prepare, leaves an
already complete dataset untouched. Nothing here unpickles code: CIFAR pickles go through the
numpy-only unpickler, SVHN .mat files through scipy.io.loadmat, HF data through pyarrow.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from harness.data.prepare import _final, _unpickle
from harness.data.shards import DataError, existing_dataset, write_dataset

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def prepare_cifar100(archive: Path, out_root: Path | str, samples_per_shard: int = 1000) -> Path | str:
    """`cifar-100-python.tar.gz` (members cifar-100-python/{train,test,meta}) -> 100 fine classes."""
    final = _final(out_root, "cifar100")
    if existing_dataset(final):
        return final
    archive = Path(archive)
    wanted = {"cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"}
    found: dict[str, Any] = {}
    if not archive.is_file():
        raise DataError(f"CIFAR-100 archive {archive} does not exist; expected cifar-100-python.tar.gz")
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                name = info.name[2:] if info.name.startswith("./") else info.name
                if name in wanted and info.isfile():
                    found[name] = _unpickle(tar.extractfile(info), archive, name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read CIFAR-100 archive {archive} ({exc})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"CIFAR-100 archive {archive} lacks member(s) {', '.join(missing)}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in found["cifar-100-python/meta"][b"fine_label_names"]]

    def samples(member: str) -> Iterator[tuple[np.ndarray, int]]:
        batch = found[f"cifar-100-python/{member}"]
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, label in zip(data, batch[b"fine_labels"]):
            yield image, int(label)

    info = {"num_classes": len(names), "class_names": names, "channels": 3, "image_size": [32, 32],
            "source": f"CIFAR-100 python version ({archive.name})",
            "split_rule": "official split: train (50000) and test (10000), fine labels, file order"}
    return write_dataset(out_root, "cifar100", {"train": lambda: samples("train"), "test": lambda: samples("test")},
                         info, samples_per_shard)


def prepare_svhn(folder: Path, out_root: Path | str, samples_per_shard: int = 1000) -> Path | str:
    """`train_32x32.mat` + `test_32x32.mat` (format 2, cropped digits); label 10 means digit 0."""
    from scipy.io import loadmat

    final = _final(out_root, "svhn")
    if existing_dataset(final):
        return final
    folder = Path(folder)
    arrays = {}
    for split in ("train", "test"):
        path = folder / f"{split}_32x32.mat"
        if not path.is_file():
            raise DataError(f"SVHN file {path} does not exist; --source is the folder holding "
                            f"train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/)")
        try:
            mat = loadmat(path)
            x, y = np.asarray(mat["X"], dtype=np.uint8), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
        except Exception as exc:  # scipy raises several types for a damaged file
            raise DataError(f"{path} is not a readable SVHN .mat file with X and y ({exc})") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise DataError(f"{path}: X must be 32 x 32 x 3 x N with N labels, got {x.shape} and {len(y)}")
        arrays[split] = (x, y % 10)

    def samples(split: str) -> Iterator[tuple[np.ndarray, int]]:
        x, y = arrays[split]
        for i in range(len(y)):
            yield np.ascontiguousarray(x[:, :, :, i]), int(y[i])

    info = {"num_classes": 10, "class_names": [str(d) for d in range(10)], "channels": 3, "image_size": [32, 32],
            "source": "SVHN format 2 (train_32x32.mat, test_32x32.mat)",
            "split_rule": "official train (73257) / test (26032); extra unused; label 10 -> 0"}
    return write_dataset(out_root, "svhn", {"train": lambda: samples("train"), "test": lambda: samples("test")},
                         info, samples_per_shard)


def load_image(data: bytes | Path, size: int | None, where: str) -> np.ndarray:
    """Decode an image to RGB uint8; with `size`, resize the shorter side to it and center-crop."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as pil:
            pil = pil.convert("RGB")
            if size is not None:
                w, h = pil.size
                scale = size / min(w, h)
                pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
                w, h = pil.size
                left, top = (w - size) // 2, (h - size) // 2
                pil = pil.crop((left, top, left + size, top + size))
            return np.asarray(pil).copy()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {where} ({exc})") from None


def _folder_splits(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and (file, label) lists of train and test (val) for the supported layouts."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"image folder {root} has no train/ folder; expected train/<class>/... and "
                        f"val/<class>/... (ImageNet) or val/images + val/val_annotations.txt (Tiny-ImageNet)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)

    train = [(p, index[c]) for c in classes for p in images(train_dir / c)]
    val_dir = next((root / n for n in ("val", "validation", "test") if (root / n).is_dir()), None)
    if val_dir is None:
        raise DataError(f"image folder {root} has no val/ folder")
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():  # Tiny-ImageNet: val/images/<file> + "file<TAB>wnid<TAB>bbox..."
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        val_classes = sorted({r[1] for r in rows})
        test = [(val_dir / "images" / r[0], index.get(r[1], -1)) for r in rows]
    else:
        val_classes = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
        test = [(p, index.get(c, -1)) for c in val_classes for p in images(val_dir / c)]
    if val_classes != classes:
        raise DataError(f"image folder {root}: train has {len(classes)} classes, {val_dir.name} has "
                        f"{len(val_classes)} (e.g. {sorted(set(classes) ^ set(val_classes))[:3]}); both splits "
                        f"need the same class folders")
    return classes, {"train": train, "test": test}


def prepare_imagefolder(folder: Path, out_root: Path | str, size: int | None = None, name: str = "imagefolder",
                        samples_per_shard: int = 1000) -> Path | str:
    """One folder per class (Tiny-ImageNet or ImageNet layout) -> RGB shards, resized to `size`."""
    final = _final(out_root, name)
    if existing_dataset(final):
        return final
    classes, files = _folder_splits(Path(folder))
    first = load_image(files["train"][0][0], size, str(files["train"][0][0]))

    def samples(split: str) -> Iterator[tuple[np.ndarray, int]]:
        for path, label in files[split]:
            image = load_image(path, size, str(path))
            if image.shape != first.shape:
                raise DataError(f"{path} is {image.shape[1]}x{image.shape[0]}, others {first.shape[1]}x"
                                f"{first.shape[0]}; pass --size N to resize every image")
            yield image, label

    info = {"num_classes": len(classes), "class_names": classes, "channels": 3, "image_size": list(first.shape[:2]),
            "source": f"image folder {Path(folder).name}" + (f" resized to {size}" if size else ""),
            "split_rule": "train/ -> train, val/ -> test; classes = sorted train folder names; files sorted"}
    return write_dataset(out_root, name, {"train": lambda: samples("train"), "test": lambda: samples("test")},
                         info, samples_per_shard)


def prepare_hf(folder: Path, out_root: Path | str, size: int | None = None, name: str = "hf",
               samples_per_shard: int = 1000) -> Path | str:
    """A Hugging Face dataset on disk: a `save_to_disk` DatasetDict folder, or parquet files.

    Needs an image column (`image`/`img`, HF's {bytes, path} struct) and an integer label column
    (`label`/`labels`/`fine_label`); splits train and test (or validation). Read with pyarrow.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    final = _final(out_root, name)
    if existing_dataset(final):
        return final
    folder = Path(folder)
    tables: dict[str, list[Path]] = {}
    features: dict[str, Any] = {}
    if (folder / "dataset_dict.json").is_file():
        for split in json.loads((folder / "dataset_dict.json").read_text())["splits"]:
            tables[split] = sorted((folder / split).glob("*.arrow"))
            info = folder / split / "dataset_info.json"
            if info.is_file():
                features = json.loads(info.read_text()).get("features", {})
    else:
        for path in sorted(folder.rglob("*.parquet")):
            split = next((s for s in ("train", "test", "validation") if path.name.startswith(s)), None)
            if split:
                tables.setdefault(split, []).append(path)
                meta = (pq.read_schema(path).metadata or {}).get(b"huggingface")
                if meta:
                    features = json.loads(meta).get("info", {}).get("features", {})
    test_split = "test" if "test" in tables else "validation"
    if "train" not in tables or test_split not in tables:
        raise DataError(f"{folder} is neither a save_to_disk DatasetDict folder (dataset_dict.json) nor a folder "
                        f"of train-*/test-*.parquet files with both a train and a test/validation split")

    def read(path: Path) -> pa.Table:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()

    schema = read(tables["train"][0]).schema
    image_col = next((c for c in ("image", "img") if c in schema.names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in schema.names), None)
    if image_col is None or label_col is None:
        raise DataError(f"{folder}: need an image column (image/img) and a label column (label/labels/fine_label); "
                        f"it has {schema.names}")
    names = features.get(label_col, {}).get("names")

    def samples(split: str) -> Iterator[tuple[np.ndarray, int]]:
        for path in tables[split]:
            table = read(path)
            for batch in table.select([image_col, label_col]).to_batches(256):
                for image, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    data = image["bytes"] if isinstance(image, dict) else image
                    yield load_image(data, size, f"{path.name} row"), int(label)

    if names is None:
        labels = pa.concat_arrays([read(p).column(label_col).combine_chunks() for p in tables["train"]])
        names = [str(c) for c in range(int(pa.compute.max(labels).as_py()) + 1)]
    first = next(samples("train"))[0]
    info = {"num_classes": len(names), "class_names": list(names), "channels": 3, "image_size": list(first.shape[:2]),
            "source": f"Hugging Face dataset on disk ({folder.name})" + (f" resized to {size}" if size else ""),
            "split_rule": f"train -> train, {test_split} -> test; row order of the files"}
    return write_dataset(out_root, name, {"train": lambda: samples("train"), "test": lambda: samples(test_split)},
                         info, samples_per_shard)

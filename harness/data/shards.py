"""WebDataset shards and their manifest: writing a dataset directory and reading its manifest.

A dataset directory `<root>/<name>/` (a local folder or any URI of `harness.data.location`) holds
`train-000000.tar`, ..., `test-000000.tar`, ... and `manifest.json`. Each sample is `<key>.png`
(lossless uint8 image) + `<key>.cls` (integer text) with key `"%06d" % index_within_split`.
Writing is byte-deterministic (fixed tar mtime, owner and mode; PNG with fixed settings), so
the manifest's sha256s identify the data exactly. The manifest carries each shard's size and
sha256, each split's per-class label counts, and `content_sha256`, a hash of its own other
fields, so an edited manifest is caught as surely as an edited shard (harness.data.integrity).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from harness.core.errors import DataError  # defined there so the CLI can catch it without importing torch
from harness.data.integrity import dataset_sha256, prepare_hint, verify_once
from harness.data.location import DataLocation, is_uri, join

__all__ = ["DataError", "dataset_sha256", "prepare_hint", "load_manifest", "verify_shards", "write_dataset"]

FORMAT_VERSION = 2  # 2: shard sizes, per-class label counts, content_sha256
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
_TAR_MTIME = 0.0  # fixed so that identical input gives byte-identical shards
_HASH_CHUNK = 1 << 20


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. `train-000003.tar`."""
    return f"{split}-{index:06d}.tar"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 image: (H, W) -> mode "L", (H, W, 3) -> mode "RGB"."""
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {image.shape}")
    pil = Image.fromarray(np.ascontiguousarray(image))  # uint8 2-D -> "L", (H, W, 3) -> "RGB"
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of `encode_png`: uint8 array (H, W) for "L" or (H, W, 3) for "RGB"."""
    with Image.open(io.BytesIO(data)) as pil:
        return np.asarray(pil).copy()


class _ChannelStats:
    """Running per-channel mean/std of images in [0, 1] units (float64 sums, population std)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None

    def add(self, image: np.ndarray) -> None:
        pixels = image.reshape(image.shape[0] * image.shape[1], -1).astype(np.float64) / 255.0
        if self.sum is None:
            self.sum = np.zeros(pixels.shape[1])
            self.sumsq = np.zeros(pixels.shape[1])
        self.sum += pixels.sum(axis=0)
        self.sumsq += (pixels**2).sum(axis=0)
        self.n += pixels.shape[0]

    def result(self) -> tuple[list[float], list[float]]:
        if self.sum is None or self.n == 0:
            raise ValueError("no images to compute mean/std from")
        mean = self.sum / self.n
        var = np.maximum(self.sumsq / self.n - mean**2, 0.0)
        return [float(m) for m in mean], [float(s) for s in np.sqrt(var)]


def write_split(
    out_dir: Path,
    split: str,
    samples: Iterable[tuple[np.ndarray, int]],
    samples_per_shard: int,
    on_image: Callable[[np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Write `(image, label)` pairs as `<split>-NNNNNN.tar` shards; return the split's entry.

    Keys are the running index within the split; `on_image` sees every image (for statistics).
    All shards hold `samples_per_shard` samples except the last (see harness/data/loader.py).
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    shards: list[dict[str, Any]] = []
    labels: dict[int, int] = {}
    writer: wds.TarWriter | None = None
    stream = None
    index = 0
    shard_start = 0

    def close_shard() -> None:
        nonlocal writer, stream, shard_start
        if writer is None:
            return
        writer.close()  # closes the tar stream only; the file is ours to close
        stream.close()
        name = shard_name(split, len(shards))
        path = out_dir / name
        shards.append({"file": name, "count": index - shard_start, "size": path.stat().st_size,
                       "sha256": file_sha256(path)})
        writer, stream, shard_start = None, None, index

    for image, label in samples:
        if writer is None:
            stream = open(out_dir / shard_name(split, len(shards)), "wb")
            writer = wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME)
        if on_image is not None:
            on_image(image)
        key = f"{index:06d}"
        writer.write({"__key__": key, "png": encode_png(image), "cls": b"%d" % int(label)})
        labels[int(label)] = labels.get(int(label), 0) + 1
        index += 1
        if index % samples_per_shard == 0:
            close_shard()
    close_shard()
    return {"count": index, "shards": shards, "labels": labels}


def _remove_leftovers(out_root: Path, name: str) -> None:
    """Remove the temp folders of killed prepares of `name`: those nothing has written to for
    LEFTOVER_AFTER_S (a prepare running now, here or on another node, writes shards all along)."""
    now = time.time()
    for folder in out_root.glob(f".{name}.tmp*"):
        try:
            newest = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())])
        except OSError:
            continue
        if now - newest > LEFTOVER_AFTER_S:
            shutil.rmtree(folder, ignore_errors=True)


def write_dataset(
    out_root: Path | str,
    name: str,
    splits: dict[str, Callable[[], Iterator[tuple[np.ndarray, int]]]],
    info: dict[str, Any],
    samples_per_shard: int,
) -> Path | str:
    """Write a whole dataset atomically: shards + manifest in a temp dir, then rename into place.

    `splits` maps split name -> a callable giving `(image, label)` pairs (it must include
    "train", whose images give mean/std). `info` supplies the remaining manifest fields
    (num_classes, class_names, channels, image_size, source, split_rule). A crash leaves at
    most a hidden `.<name>.tmp*` directory, never a half dataset under `<name>/`. `out_root`
    may be a URI (s3://bucket/prefix): the dataset is built in a local temp dir and uploaded,
    manifest last, so readers never see a manifest without its shards.
    """
    if is_uri(out_root):
        with tempfile.TemporaryDirectory(prefix=f".{name}.upload") as tmp:
            built = _write_local(Path(tmp), name, splits, info, samples_per_shard)
            target = join(str(out_root), name)
            DataLocation(target).upload_folder(built)
        return target
    return _write_local(Path(out_root), name, splits, info, samples_per_shard)


LEFTOVER_AFTER_S = 3600.0  # a `.<name>.tmp*` folder untouched this long is a killed prepare's


def _write_local(out_root: Path, name: str, splits: dict[str, Callable[[], Iterator[tuple[np.ndarray, int]]]],
                 info: dict[str, Any], samples_per_shard: int) -> Path:
    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / name
    _remove_leftovers(out_root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=out_root))
    try:
        stats = _ChannelStats()
        split_entries: dict[str, Any] = {}
        for split, make_samples in splits.items():
            on_image = stats.add if split == "train" else None
            entry = write_split(tmp, split, make_samples(), samples_per_shard, on_image)
            entry["label_counts"] = _label_counts(entry.pop("labels"), info["num_classes"], split, name)
            split_entries[split] = entry
        mean, std = stats.result()
        manifest = {
            "name": name,
            "format_version": FORMAT_VERSION,
            "num_classes": info["num_classes"],
            "class_names": list(info["class_names"]),
            "channels": info["channels"],
            "image_size": list(info["image_size"]),
            "mean": mean,
            "std": std,
            "source": info["source"],
            "split_rule": info["split_rule"],
            "splits": split_entries,
        }
        manifest["content_sha256"] = content_sha256(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if final.exists():
            if existing_dataset(final):  # a concurrent prepare finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final)  # an invalid leftover: replace it
        try:
            os.rename(tmp, final)
        except OSError:
            # a concurrent prepare (another cell on this node) renamed its copy in between
            if not existing_dataset(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _label_counts(labels: dict[int, int], num_classes: int, split: str, name: str) -> list[int]:
    """Per-class sample counts of a split; labels outside [0, num_classes) are a converter bug."""
    bad = sorted(k for k in labels if not 0 <= k < num_classes)
    if bad:
        raise DataError(f"{name}: split '{split}' has labels {bad[:5]} outside [0, {num_classes})")
    return [labels.get(c, 0) for c in range(num_classes)]


def existing_dataset(dataset_dir: Path | str) -> bool:
    """True when `dataset_dir` holds a complete dataset (valid manifest, shards verified)."""
    try:
        verify_shards(dataset_dir, load_manifest(dataset_dir))
    except DataError:
        return False
    return True


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "format_version": int,
    "num_classes": int,
    "class_names": list,
    "channels": int,
    "image_size": list,
    "mean": list,
    "std": list,
    "source": str,
    "split_rule": str,
    "splits": dict,
    "content_sha256": str,
}


def load_manifest(dataset_dir: Path | str | DataLocation) -> dict[str, Any]:
    """Read and check `<dataset_dir>/manifest.json` (structure, format, own hash); DataError if not."""
    loc = dataset_dir if isinstance(dataset_dir, DataLocation) else DataLocation(dataset_dir)
    where = loc.display(MANIFEST)
    fix = prepare_hint(loc.uri)
    raw = loc.read_bytes(MANIFEST)
    if raw is None:
        raise DataError(f"dataset manifest {where} does not exist; {fix}")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"dataset manifest {where} is not valid JSON ({exc}); {fix}") from None
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"dataset manifest {where} has format_version {manifest.get('format_version')!r}; this code "
            f"reads format {FORMAT_VERSION} (shard sizes, label counts, a manifest hash). Fix: "
            f"{prepare_hint(loc.uri)}"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"dataset manifest {where} is invalid: {problem}; {fix}")
    if content_sha256(manifest) != manifest["content_sha256"]:
        raise DataError(f"dataset manifest {where} was edited after it was written (its content hash "
                        f"differs from content_sha256); {fix}")
    return manifest


def content_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its `content_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return dataset_sha256(body)


def _manifest_problem(m: Any) -> str | None:
    """First structural problem of a manifest, or None."""
    if not isinstance(m, dict):
        return "top level is not an object"
    for key, typ in _REQUIRED.items():
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            return f"field '{key}' missing or not {getattr(typ, '__name__', typ)}"
    if len(m["class_names"]) != m["num_classes"]:
        return "class_names length differs from num_classes"
    if len(m["mean"]) != m["channels"] or len(m["std"]) != m["channels"]:
        return "mean/std length differs from channels"
    if len(m["image_size"]) != 2:
        return "image_size is not [h, w]"
    for split, entry in m["splits"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            return f"split '{split}' has no shard list"
        for shard in entry["shards"]:
            if not isinstance(shard, dict) or not {"file", "count", "size", "sha256"} <= set(shard):
                return f"split '{split}' has a shard entry without file/count/size/sha256"
            if Path(shard["file"]).name != shard["file"]:
                return f"shard file '{shard['file']}' is not a plain file name"
        if entry.get("count") != sum(s["count"] for s in entry["shards"]):
            return f"split '{split}' count differs from the sum of its shard counts"
        counts = entry.get("label_counts")
        if not isinstance(counts, list) or len(counts) != m["num_classes"] or sum(counts) != entry["count"]:
            return f"split '{split}' label_counts do not match num_classes ({m['num_classes']}) and its count"
    return None


def verify_shards(
    dataset_dir: Path | str | DataLocation, manifest: dict[str, Any], splits: Iterable[str] = SPLITS
) -> None:
    """Check the shards of `splits` against the manifest: sizes always, full hashes once per node.

    See harness.data.integrity; a missing, truncated or corrupt shard raises DataError with the fix.
    """
    loc = dataset_dir if isinstance(dataset_dir, DataLocation) else DataLocation(dataset_dir)
    verify_once(loc, manifest, tuple(splits))

"""Shard integrity without re-hashing every epoch: a full check once per node, cheap checks always.

* Every `verify_shards` call lists the dataset once and compares each shard's size with the
  manifest (one LIST request on an object store): a missing or truncated shard fails at once.
* The full check (sha256 of every byte, tar structure, keys, label range, and the manifest's
  class count against the labels its train shards hold) runs once per node per dataset version
  and location: it leaves a marker named by sha256(manifest sha256 + location) in
  $ROBUSTGRID_VERIFIED_DIR (default ~/.cache/robustgrid/verified). A file lock makes the ranks
  and cells of one node wait for a single check instead of each hashing the split.
* While the loader streams a shard (`read_shard`), it checks the tar structure, that keys run
  in order from the shard's first index, the sample count, labels in range, and that the bytes
  read equal the manifest's size. A shard corrupted after the node's check (same size, flipped
  bytes) is caught when a tar header or PNG checksum breaks, not by a hash: that is the price
  of not hashing 140 GB per epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
from filelock import FileLock

from harness.core.errors import DataError
from harness.core.locations import basename, parent
from harness.data.location import DataLocation

MARKER_ENV = "ROBUSTGRID_VERIFIED_DIR"


def marker_dir() -> Path:
    return Path(os.environ.get(MARKER_ENV) or Path.home() / ".cache" / "robustgrid" / "verified")


def prepare_hint(dataset_dir: Path | str) -> str:
    """The fix to print in errors: re-create the dataset with the CLI (it replaces an invalid one)."""
    return (f"re-run `robustgrid data prepare {basename(dataset_dir)} --out {parent(dataset_dir)}` "
            f"(add --source ARCHIVE if it needs one)")


def dataset_sha256(manifest: dict[str, Any]) -> str:
    """Provenance id of a dataset: sha256 of the manifest's canonical JSON (sorted, compact)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dataset_version(manifest: dict[str, Any]) -> str:
    return dataset_sha256(manifest)


class _CountingReader:
    """File-like wrapper counting (and optionally hashing / copying) the bytes read through it."""

    def __init__(self, stream: BinaryIO, digest: Any = None, copy_to: BinaryIO | None = None) -> None:
        self.stream, self.digest, self.copy_to, self.bytes = stream, digest, copy_to, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n) if n is not None and n >= 0 else self.stream.read()
        self.bytes += len(data)
        if self.digest is not None:
            self.digest.update(data)
        if self.copy_to is not None:
            self.copy_to.write(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def read_shard(
    loc: DataLocation, shard: dict[str, Any], first_index: int, num_classes: int, version: str,
    digest: Any = None, shape: tuple[int, int, int] | None = None,
) -> Iterator[tuple[int, bytes, int]]:
    """Stream one shard as `(split index, png bytes, label)` with the cheap checks of the module doc;
    `shape` (channels, height, width): each image's PNG header must say the manifest's shape."""
    name = shard["file"]
    fix = _fix(loc)
    tmp = loc.cache_tmp(name, version)
    copy = open(tmp, "wb") if tmp is not None else None
    expected = first_index
    try:
        with loc.open_stream(name, version) as raw:
            reader = _CountingReader(raw, digest, copy)
            try:
                pending: dict[str, bytes] = {}
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, _, ext = member.name.partition(".")
                        if pending and key != pending["key"]:
                            yield _sample(pending, loc, name, expected, num_classes, fix, shape)
                            expected += 1
                            pending = {}
                        pending["key"] = key
                        pending[ext] = tar.extractfile(member).read()
                if pending:
                    yield _sample(pending, loc, name, expected, num_classes, fix, shape)
                    expected += 1
                reader.drain()
            except (tarfile.TarError, EOFError, OSError, pa.ArrowException) as err:
                raise DataError(f"shard {name} is corrupt or truncated ({loc.display(name)}: {err}); {fix}") from None
        if reader.bytes != shard["size"]:
            raise DataError(f"shard {name} has {reader.bytes} bytes, the manifest says {shard['size']} "
                            f"({loc.display(name)}); {fix}")
        if expected - first_index != shard["count"]:
            raise DataError(f"shard {name} holds {expected - first_index} samples, the manifest says "
                            f"{shard['count']} ({loc.display(name)}); {fix}")
        if copy is not None:
            copy.close()
            copy = None
            loc.keep_in_cache(name, version, tmp)
            tmp = None
    finally:
        if copy is not None:
            copy.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def manifest_shape(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) every image of the dataset has, per its manifest."""
    height, width = manifest["image_size"]
    return int(manifest["channels"]), int(height), int(width)


PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels (3, a palette, is not ours)


def png_shape(data: bytes) -> tuple[int, int, int] | None:
    """(channels, height, width) from a PNG's header alone (no pixel decoded); None: not a PNG."""
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return PNG_CHANNELS.get(data[25], -1), height, width


def _sample(pending: dict[str, Any], loc: DataLocation, name: str, expected: int, num_classes: int,
            fix: str, shape: tuple[int, int, int] | None = None) -> tuple[int, bytes, int]:
    key = pending["key"]
    if not key.isdigit() or int(key) != expected or "png" not in pending or "cls" not in pending:
        raise DataError(f"shard {name} holds entry {key!r} where sample {expected:06d} (png + cls) was "
                        f"expected ({loc.display(name)}); {fix}")
    try:
        label = int(pending["cls"])
    except ValueError:
        label = -1
    if not 0 <= label < num_classes:
        raise DataError(f"shard {name}: sample {key} has label {pending['cls']!r}, outside the manifest's "
                        f"{num_classes} classes ({loc.display(name)}); {fix}")
    if shape is not None:
        found = png_shape(pending["png"])
        if found != shape:
            what = "is not a PNG" if found is None else (
                f"is a palette PNG" if found[0] == -1 else f"has {found[0]} channel(s) of {found[1]}x{found[2]}")
            raise DataError(f"shard {name}: sample {key} {what}, the manifest says {shape[0]} channel(s) of "
                            f"{shape[1]}x{shape[2]} ({loc.display(name)}); {fix}")
    return expected, pending["png"], label


def check_sizes(loc: DataLocation, manifest: dict[str, Any], splits: tuple[str, ...]) -> None:
    """Every shard of `splits` exists with the manifest's size (one directory listing)."""
    fix = _fix(loc)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.root, allow_not_found=True))
    except (pa.ArrowException, OSError) as err:
        raise loc._error("", err) from None
    sizes = {info.base_name: info.size for info in infos if info.type == pafs.FileType.File}
    for split in splits:
        entry = manifest["splits"].get(split)
        if entry is None:
            known = ", ".join(sorted(manifest["splits"])) or "(none)"
            raise DataError(f"dataset {loc.uri} has no split '{split}' (it has: {known}); {fix}")
        for shard in entry["shards"]:
            size = sizes.get(shard["file"])
            if size is None:
                raise DataError(f"shard {shard['file']} is missing ({loc.display(shard['file'])}); {fix}")
            if size != shard["size"]:
                raise DataError(f"shard {shard['file']} is truncated or replaced: {size} bytes, the manifest "
                                f"says {shard['size']} ({loc.display(shard['file'])}); {fix}")


def verify_once(loc: DataLocation, manifest: dict[str, Any], splits: tuple[str, ...]) -> None:
    """Sizes always; the full check of `splits` once per node per (dataset version, location)."""
    check_sizes(loc, manifest, splits)
    version = dataset_version(manifest)
    folder = marker_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = hashlib.sha256(f"{version}\n{loc.uri}".encode()).hexdigest()[:32]
    todo = [s for s in splits if not (folder / f"{stem}.{s}.ok").exists()]
    if not todo:
        return
    with FileLock(str(folder / f"{stem}.lock")):
        for split in todo:
            marker = folder / f"{stem}.{split}.ok"
            if marker.exists():  # another process on this node finished it while we waited
                continue
            _full_check(loc, manifest, split, version)
            marker.write_text(json.dumps({"location": loc.uri, "version": version, "split": split}) + "\n")


def _full_check(loc: DataLocation, manifest: dict[str, Any], split: str, version: str) -> None:
    entry = manifest["splits"][split]
    fix = _fix(loc)
    counts = [0] * manifest["num_classes"]
    first = 0
    for shard in entry["shards"]:
        digest = hashlib.sha256()
        for _, _, label in read_shard(loc, shard, first, manifest["num_classes"], version, digest,
                                      manifest_shape(manifest)):
            counts[label] += 1
        if digest.hexdigest() != shard["sha256"]:
            raise DataError(f"shard {shard['file']} is corrupt: its sha256 differs from the manifest "
                            f"({loc.display(shard['file'])}); {fix}")
        first += shard["count"]
    if counts != entry["label_counts"]:
        raise DataError(f"split '{split}' of {loc.uri}: the labels in its shards do not match the manifest's "
                        f"label_counts; {fix}")
    if split == "train" and sum(1 for c in counts if c) != manifest["num_classes"]:
        raise DataError(f"the manifest of {loc.uri} says {manifest['num_classes']} classes, but its train "
                        f"shards hold labels of {sum(1 for c in counts if c)}; {fix}")


def _fix(loc: DataLocation) -> str:
    return prepare_hint(loc.uri)

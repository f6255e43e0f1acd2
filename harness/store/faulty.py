"""A results store that fails on purpose: `faulty+file:///path?fail=0.1` is the folder `/path`,
where each filesystem call (listing, read, write, move, delete) fails with an injected
"503 Service Unavailable" with probability `fail` (seeded by `seed`, default: random).

What an object store at scale does (S3 answers 500/503 and throttles): the chaos tests and a
user's fault drill run real grids against it to show that nothing is lost or committed twice
(harness/store/storage.py retries transient errors with backoff and jitter). Never for results
that matter.
"""
from __future__ import annotations

import random
import threading
import urllib.parse
from typing import Any

import pyarrow.fs as pafs

SCHEME = "faulty+"
INJECTED = "503 Service Unavailable (injected by a faulty+ store)"


class FaultyHandler(pafs.FileSystemHandler):
    """Delegates every call to `fs` after failing it with probability `rate`."""

    def __init__(self, fs: pafs.FileSystem, rate: float, seed: int | None = None) -> None:
        self.fs, self.rate = fs, float(rate)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def _maybe_fail(self) -> None:
        with self.lock:
            fail = self.rng.random() < self.rate
        if fail:
            raise OSError(INJECTED)

    def get_type_name(self) -> str:
        return "faulty"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: Any) -> bool:
        return isinstance(other, FaultyHandler) and other.fs.equals(self.fs) and other.rate == self.rate

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        self._maybe_fail()
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        self._maybe_fail()
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._maybe_fail()
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._maybe_fail()
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._maybe_fail()
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("a faulty+ store never empties its root")

    def delete_file(self, path: str) -> None:
        self._maybe_fail()
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._maybe_fail()
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._maybe_fail()
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        self._maybe_fail()
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        self._maybe_fail()
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        self._maybe_fail()
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        self._maybe_fail()
        return self.fs.open_append_stream(path, metadata=metadata)


def faulty_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root) of a `faulty+file:///path?fail=0.1[&seed=1]` location."""
    parsed = urllib.parse.urlparse(location[len(SCHEME):])
    if parsed.scheme != "file":
        raise ValueError(f"{location}: a faulty+ store wraps a local folder only (faulty+file:///abs/path?fail=0.1)")
    query = dict(urllib.parse.parse_qsl(parsed.query))
    rate = float(query.get("fail", 0.1))
    seed = int(query["seed"]) if "seed" in query else None
    return pafs.PyFileSystem(FaultyHandler(pafs.LocalFileSystem(), rate, seed)), parsed.path.rstrip("/")

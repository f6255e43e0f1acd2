"""Results and checkpoints on any pyarrow filesystem URI, with atomic, verified commits.

A results store is a local folder, `file:///abs/path`, `s3://bucket/prefix`, `gs://bucket/prefix`
or any other URI `pyarrow.fs.FileSystem.from_uri` understands, so every node of a cluster can
write to one shared place.

A cell is committed in two steps:
  1. its Parquet bytes are staged under `_staging/` and moved to `<key>.parquet`;
  2. a commit marker `_commits/<key>.json` records the file's sha256 and status.
Readers trust a `<key>.parquet` only when its marker exists and the sha256 matches, so a file
half-written by a killed process, or replaced without a marker, is never read: the cell simply
counts as not done and is rerun. The first 'ok' commit of a key wins: a second finisher of the
same cell (a retried task whose first attempt was not dead after all, two drivers on one grid)
leaves the committed file alone. On a local or shared POSIX folder the commit step holds an
exclusive lock file; object stores have no such primitive, so there a racing pair can at worst
leave a marker that does not verify, which reads as 'not done' (rerun), never as a wrong result.
Nothing here ever deletes a committed result.
"""
from __future__ import annotations

import datetime as dt
import errno
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.core.locations import child, is_uri, normalize_location
from harness.store.faulty import SCHEME, faulty_filesystem  # noqa: F401  (is_uri, normalize_location: re-exported for the store's callers)

COMMITS = "_commits"
STAGING = "_staging"
LOCK_STALE_SECONDS = 30.0  # a commit lock older than this was left by a killed process


def parquet_from_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet table (or these `columns` of it) from bytes in memory, read through an
    Arrow-owned copy of them.

    pq.read_table scans on Arrow's thread pool, and a pool thread may drop the last reference
    to the input buffer after the call returns. Were that a Python-owned buffer, its release
    needs the GIL, and at interpreter exit the thread is killed inside C++ code: `terminate
    called without an active exception` and exit code 134 after a successful run (measured:
    5 of 36 `robustgrid run` calls). An Arrow-owned copy is released without Python.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return pq.read_table(pa.BufferReader(sink.getvalue()), columns=columns)


class StorageError(ValueError):
    """A storage URI that cannot be used; the message says how to fix it."""


RETRY_ATTEMPTS = 10
RETRY_BASE_S = 0.1  # backoff: up to base x 2^attempt seconds (full jitter), capped
RETRY_CAP_S = 5.0
_TRANSIENT = re.compile(r"\b50[0-4]\b|SlowDown|Throttl|Service Unavailable|InternalError|RequestTimeout|timed out|"
                        r"Timeout|Connection (reset|refused|aborted)|Temporarily|Broken pipe|injected by a faulty",
                        re.IGNORECASE)
T = TypeVar("T")


def transient(err: BaseException) -> bool:
    """Whether a store error is worth retrying (a flaky or throttling server), not a verdict
    (missing file, denied access, full disk)."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if getattr(err, "errno", None) == errno.ENOSPC:
        return False
    return bool(_TRANSIENT.search(str(err)))


def out_of_space(err: BaseException, where: str, nbytes: int, local: str | os.PathLike | None = None
                 ) -> "StorageError | None":
    """A StorageError naming the place, the bytes and the fix when `err` means a full disk (ENOSPC,
    or a write failing on a local disk with less free space than it needed); None otherwise."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    if not full and local is not None:
        try:
            full = shutil.disk_usage(Path(local).parent).free < nbytes
        except OSError:
            pass
    if not full:
        return None
    return StorageError(f"no space left to write {where} ({nbytes:,} bytes needed): free space on that disk, or "
                        f"set results_dir (checkpoints of a URI store: ROBUSTGRID_CACHE) to a larger one; "
                        f"nothing was half-written and committed results are intact")


def local_path(location: str | os.PathLike) -> Path | None:
    """The local folder behind a location (a plain path or file://), None for remote stores."""
    text = str(location)
    if not is_uri(text):
        return Path(text)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None


@dataclass(frozen=True)
class Commit:
    """What a commit marker says about one committed cell file."""

    key: str
    status: str  # 'ok' | 'failed'
    sha256: str
    size: int
    file: str  # file name relative to the store root
    committed_at: str
    host: str
    pid: int
    attempt: str


@dataclass(frozen=True)
class CommitResult:
    path: str
    commit: Commit
    won: bool  # False: an earlier 'ok' commit of this key was kept and this one discarded


class Store:
    """One results store: a pyarrow filesystem and a root folder inside it."""

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = normalize_location(location)
        local = local_path(self.location)
        try:
            if self.location.startswith(SCHEME):  # a store that fails on purpose (harness/store/faulty.py)
                self.fs, self.root = faulty_filesystem(self.location)
            elif local is not None:
                self.fs: pafs.FileSystem = pafs.LocalFileSystem()
                self.root = str(local)
            else:
                self.fs, self.root = pafs.FileSystem.from_uri(self.location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise StorageError(f"cannot open results store '{self.location}': {err}. Use a local folder, "
                               f"file:///abs/path, s3://bucket/prefix or gs://bucket/prefix") from None
        self.root = self.root.rstrip("/")
        self.is_local = local is not None

    # ------------------------------------------------------------------ plain file access

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        """A location string for a file in the store (local path or URI), for messages and rows."""
        if self.is_local:
            return str(Path(self.root, *parts))
        return child(self.location, *parts)  # the query (?endpoint_override=...) stays at the end

    def read_bytes(self, rel: str) -> bytes | None:
        """A file's bytes; None when it is missing (or unreadable for good); transient store errors
        are retried, and a store that keeps failing raises StorageError naming it."""
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()
        try:
            return self._retried(f"reading {self.uri(rel)}", read)
        except (FileNotFoundError, OSError, pa.ArrowException):
            return None

    def write_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        """Write a whole file atomically: to a unique temp name, then moved into place.
        `durable=False` skips fsync (heartbeats: losing one to a machine crash is harmless)."""
        final = self.path(rel)

        def write() -> None:
            self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
            tmp = self.path(STAGING, f"{uuid.uuid4().hex}.tmp")
            self._write_new(tmp, data, durable)
            try:
                self.fs.move(tmp, final)
            except Exception:
                self._delete_quietly(tmp)
                raise
        self._retried(f"writing {self.uri(rel)}", write)

    def list(self, rel: str = "") -> list[str]:
        """Names of the files directly inside a folder of the store ([] if it does not exist)."""
        return sorted(name for name, info in self.entries(rel).items() if info.type == pafs.FileType.File)

    def entries(self, rel: str = "") -> dict[str, pafs.FileInfo]:
        """Everything directly inside a folder of the store, files and folders, by name, with
        sizes and modification times ({} if it does not exist); one (paged) listing."""
        return {info.base_name: info for info in self._listing(rel)}

    def files_by_folder(self, rel: str) -> dict[str, list[str]]:
        """{subfolder: names of the files directly in it} for every subfolder of `rel`, from one
        recursive (paged) listing: what a listing per subfolder would give, in a fixed number of
        requests however many subfolders there are."""
        prefix = self.path(rel) + "/"
        out: dict[str, list[str]] = {}
        for info in self._listing(rel, recursive=True):
            folder, _, name = info.path[len(prefix):].partition("/") if info.path.startswith(prefix) else ("", "", "")
            if info.type == pafs.FileType.File and name and "/" not in name:
                out.setdefault(folder, []).append(name)
        return out

    def _listing(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """The FileInfos below a folder of the store ([] if it does not exist), transient errors retried."""
        selector = pafs.FileSelector(self.path(rel) if rel else self.root, allow_not_found=True, recursive=recursive)
        try:
            return self._retried(f"listing {self.uri(rel)}", lambda: self.fs.get_file_info(selector))
        except (FileNotFoundError, NotADirectoryError, OSError):
            return []

    def exists(self, rel: str) -> bool:
        return self._retried(f"looking for {self.uri(rel)}",
                             lambda: self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File)

    def _retried(self, what: str, op: Callable[[], T]) -> T:
        """`op()`, retried with exponential backoff and full jitter while the store answers with
        transient errors (HTTP 5xx, throttling, timeouts, injected faults); StorageError naming
        the store when it keeps failing; any other error at once."""
        for attempt in range(RETRY_ATTEMPTS):
            try:
                return op()
            except (OSError, pa.ArrowException) as err:
                if not transient(err):
                    raise
                if attempt == RETRY_ATTEMPTS - 1:
                    raise StorageError(f"{what}: the store kept failing after {RETRY_ATTEMPTS} attempts "
                                       f"({str(err).strip().splitlines()[0]}); check {self.location} is "
                                       f"reachable, then rerun: committed cells are kept") from None
                time.sleep(random.uniform(0.0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** attempt)))
        raise AssertionError("unreachable")

    def delete(self, rel: str) -> None:
        self._delete_quietly(self.path(rel))

    def _write_new(self, full: str, data: bytes, durable: bool = True) -> None:
        """Write a new file; on failure nothing of it stays, and a full disk is named (out_of_space)."""
        self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        try:
            if self.is_local and durable:  # fsync, so a machine crash cannot leave a renamed-but-empty file
                with open(full, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                return
            with self.fs.open_output_stream(full) as fh:
                fh.write(data)
        except (OSError, pa.ArrowException) as err:
            self._delete_quietly(full)
            raise out_of_space(err, self.uri(full[len(self.root):].lstrip("/")), len(data),
                               full if self.is_local else None) or err

    def _delete_quietly(self, full: str) -> None:
        try:
            self.fs.delete_file(full)
        except (FileNotFoundError, OSError):
            pass

    # ------------------------------------------------------------------ commits

    def read_marker(self, key: str) -> Commit | None:
        raw = self.read_bytes(f"{COMMITS}/{key}.json")
        if raw is None:
            return None
        try:
            commit = Commit(**json.loads(raw))
        except (ValueError, TypeError):
            return None  # a marker we cannot parse commits nothing (harness.store.audit names it)
        return commit if commit.key == key else None  # a marker copied under another key is foreign

    def verified(self, key: str) -> tuple[Commit, bytes] | None:
        """The key's commit and file bytes, only when the file exists and matches the marker."""
        marker = self.read_marker(key)
        data = None if marker is None else self.vouched_bytes(marker)
        return None if data is None else (marker, data)

    def vouched_bytes(self, marker: Commit) -> bytes | None:
        """The bytes of the file a commit marker names, only when they match it (size, sha256)."""
        data = self.read_bytes(marker.file)
        if data is None or len(data) != marker.size or hashlib.sha256(data).hexdigest() != marker.sha256:
            return None
        return data

    def committed_status(self, key: str) -> str | None:
        found = self.verified(key)
        return found[0].status if found else None

    def read_table(self, key: str) -> pa.Table | None:
        """The committed, checksum-verified table of a key; None if nothing trustworthy is there."""
        found = self.verified(key)
        if found is None:
            return None
        try:
            return parquet_from_bytes(found[1])
        except (OSError, pa.ArrowException):
            return None

    def committed(self) -> Iterator[tuple[Commit, pa.Table]]:
        """Every verified commit in the store with its table (corrupt or unmarked files skipped)."""
        for name in self.list(COMMITS):
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            found = self.verified(key)
            if found is None:
                continue
            try:
                yield found[0], parquet_from_bytes(found[1])
            except (OSError, pa.ArrowException):
                continue

    def commit_table(self, key: str, table: pa.Table) -> CommitResult:
        """Commit one cell's table: stage, move to `<key>.parquet`, then write the marker.

        An existing verified 'ok' commit of the key wins over this one (returned with won=False);
        an earlier 'failed' commit is replaced.
        """
        status = "ok" if set(table.column("status").to_pylist()) == {"ok"} else "failed"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        # retried whole: the marker is written last, once, so a retry after an ambiguous failure
        # (the move happened, the answer was lost) commits the same bytes, never a second marker
        return self._retried(f"committing {key} to {self.location}", lambda: self._commit_once(key, data, status))

    def _commit_once(self, key: str, data: bytes, status: str) -> CommitResult:
        attempt = uuid.uuid4().hex
        staged = self.path(STAGING, f"{key}-{attempt}.parquet")
        self._write_new(staged, data)
        try:
            with self._commit_lock(key):
                kept = self._kept_commit(key)
                if kept is not None:
                    return CommitResult(self.uri(kept.file), kept, won=False)
                self.fs.move(staged, self.path(f"{key}.parquet"))
                commit = Commit(key=key, status=status, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                                file=f"{key}.parquet", committed_at=_now_iso(), host=socket.gethostname(),
                                pid=os.getpid(), attempt=attempt)
                self.write_bytes(f"{COMMITS}/{key}.json", json.dumps(asdict(commit), indent=1).encode())
                return CommitResult(self.uri(commit.file), commit, won=True)
        finally:
            self._delete_quietly(staged)

    def _kept_commit(self, key: str) -> Commit | None:
        found = self.verified(key)
        return found[0] if found is not None and found[0].status == "ok" else None

    @functools.cached_property
    def _lock_dir(self) -> Path | None:
        return Path(self.root, COMMITS, ".locks") if self.is_local else None

    def _commit_lock(self, key: str) -> "_Lock":
        return _Lock(self._lock_dir / f"{key}.lock" if self._lock_dir else None)


class _Lock:
    """An exclusive lock file (O_EXCL create); a lock left by a killed process expires."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __enter__(self) -> "_Lock":
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 4 * LOCK_STALE_SECONDS
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age > LOCK_STALE_SECONDS:
                    self.path.unlink(missing_ok=True)  # its holder died mid-commit
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"commit lock {self.path} held too long; remove it if no grid is running")
                time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def open_store(location: str | os.PathLike) -> Store:
    """The Store of a location, cached (opening an S3/GCS filesystem costs a round trip)."""
    return _cached_store(normalize_location(location))


@functools.lru_cache(maxsize=32)
def _cached_store(location: str) -> Store:
    return Store(location)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")

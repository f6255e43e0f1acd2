"""Where a dataset lives: a local folder or any URI pyarrow.fs opens (file://, s3://, gs://, hdfs://).

A `DataLocation` reads the manifest and streams shards from it, and writes a prepared dataset to
it. Remote filesystems are opened with short connect/request timeouts and few retries, so an
unreachable endpoint or missing credentials fail within seconds with an error naming the URI,
instead of hanging in the SDK's default retry loop.

A node-local cache (`cache_dir`, from `data.cache` or $ROBUSTGRID_DATA_CACHE) keeps a copy of each
remote shard once it has been read in full and its size matches the manifest: later epochs and
cells on that node read the copy. The cache is keyed by the manifest's sha256 (dataset version).
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from harness.core.errors import DataError
from harness.core.locations import child, is_uri

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
READ_BUFFER_BYTES = 8 << 20  # one ranged GET per 8 MiB, not per tar header
CACHE_ENV = "ROBUSTGRID_DATA_CACHE"
_S3_QUERY_KEYS = {"region": str, "endpoint_override": str, "scheme": str, "access_key": str,
                  "secret_key": str, "session_token": str, "allow_bucket_creation": None}


_COLLAPSED_URI = re.compile(r"^([a-z][a-z0-9+.-]*):/(?!/)")


def restore_uri(text: str) -> str:
    """Undo `Path("s3://b/x")` == "s3:/b/x": callers pass dataset dirs through pathlib."""
    match = _COLLAPSED_URI.match(text)
    if match is None:
        return text
    scheme, rest = match.group(1), text[match.end():]
    return f"file:///{rest}" if scheme == "file" else f"{scheme}://{rest}"


def join(location: str, name: str) -> str:
    """`location/name` for a local path or a URI (a URI's query string stays at the end)."""
    return child(location, name)


def _open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem + path for `uri`; s3 gets short timeouts and a bounded retry."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "s3":
        query = dict(urllib.parse.parse_qsl(parsed.query))
        kwargs: dict[str, Any] = {}
        for key, value in query.items():
            if key not in _S3_QUERY_KEYS:
                raise DataError(f"unknown s3 option '{key}' in {uri}; known: {sorted(_S3_QUERY_KEYS)}")
            kwargs[key] = value.lower() == "true" if _S3_QUERY_KEYS[key] is None else value
        fs = pafs.S3FileSystem(connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2), **kwargs)
        return fs, (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme in ("gs", "gcs") and not parsed.query:  # bounded retries: fail in seconds
        return (pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=CONNECT_TIMEOUT_S)),
                (parsed.netloc + parsed.path).rstrip("/"))
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), parsed.path.rstrip("/") or "/"
    return pafs.FileSystem.from_uri(uri)


class DataLocation:
    """One dataset directory on some filesystem: `name` is its last path component."""

    def __init__(self, location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        text = restore_uri(str(location))
        self.uri = text if is_uri(text) else str(Path(text).expanduser().absolute())
        try:
            if is_uri(text):
                self.fs, self.root = _open_filesystem(text)
            else:
                self.fs, self.root = pafs.LocalFileSystem(), self.uri
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(f"cannot open dataset location {self.uri}: {err}. Use a local folder, "
                            f"file:///abs/path, s3://bucket/prefix, gs://bucket/prefix or hdfs://...") from None
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.name = self.root.rstrip("/").rsplit("/", 1)[-1]
        cache = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV)
        self.cache_dir = Path(cache).expanduser() if cache and not self.is_local else None

    def __repr__(self) -> str:
        return f"DataLocation({self.uri!r})"

    def display(self, name: str) -> str:
        """The full location of a file, for error messages."""
        return join(self.uri, name)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    # ------------------------------------------------------------------ reading

    def read_bytes(self, name: str) -> bytes | None:
        """A small file's bytes, None if it does not exist; unreachable stores raise DataError."""
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as err:
            raise self._error(name, err) from None

    def size(self, name: str) -> int | None:
        """Size in bytes of a file, None if it does not exist."""
        try:
            info = self.fs.get_file_info(self.path(name))
        except (pa.ArrowException, OSError) as err:
            raise self._error(name, err) from None
        return info.size if info.type == pafs.FileType.File else None

    def open_stream(self, name: str, version: str | None = None) -> BinaryIO:
        """A sequential read stream of a shard: from the node-local cache when it has a copy."""
        cached = self._cached(name, version)
        if cached is not None:
            return open(cached, "rb")
        try:
            return self.fs.open_input_stream(self.path(name), compression=None, buffer_size=READ_BUFFER_BYTES)
        except FileNotFoundError:
            raise DataError(f"shard {name} is missing ({self.display(name)})") from None
        except (pa.ArrowException, OSError) as err:
            raise self._error(name, err) from None

    def _cached(self, name: str, version: str | None) -> Path | None:
        if self.cache_dir is None or version is None:
            return None
        path = self.cache_dir / version / name
        return path if path.is_file() else None

    def keep_in_cache(self, name: str, version: str, data_path: Path) -> None:
        """Move a fully read, size-checked local copy of shard `name` into the node-local cache."""
        if self.cache_dir is None:
            return
        final = self.cache_dir / version / name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(data_path, final)  # atomic: concurrent readers see the old or the whole file

    def cache_tmp(self, name: str, version: str) -> Path | None:
        """A fresh temp file beside the cache slot of `name`, or None without a cache."""
        if self.cache_dir is None or self._cached(name, version) is not None:
            return None
        folder = self.cache_dir / version
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        os.close(fd)
        return Path(tmp)

    # ------------------------------------------------------------------ writing

    def upload_folder(self, folder: Path) -> None:
        """Copy every file of a local folder here (manifest last, so readers never see half a dataset)."""
        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        files.sort(key=lambda p: p.name == "manifest.json")
        try:
            self.fs.create_dir(self.root, recursive=True)
            for path in files:
                with open(path, "rb") as src, self.fs.open_output_stream(self.path(path.name)) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (pa.ArrowException, OSError) as err:
            raise self._error(files[0].name if files else "", err) from None

    def _error(self, name: str, err: BaseException) -> DataError:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if not self.is_local:
            hint = (" Check that the endpoint is reachable from this node and that credentials are set "
                    "(s3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance role; an S3-compatible "
                    "endpoint via ?endpoint_override=HOST:PORT&scheme=http; gs: GOOGLE_APPLICATION_CREDENTIALS).")
        return DataError(f"cannot read {self.display(name)}: {text}.{hint}")

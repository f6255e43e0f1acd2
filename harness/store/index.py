"""A store's committed rows read in one pass, with a read index so a reader re-reads only new commits.

Reading a 10,000-cell store cell by cell costs two GETs and one Parquet parse per cell (about
3 ms a cell on a local disk, 20,000 requests on S3) on every `status`, `leaderboard`, `report`
and `compare`. This module lists the store once (`_commits/` and the top level, paged by the
filesystem), reads the commits it has not seen before in parallel, and keeps what it verified
in the store itself as index segments, `_index/<uuid>.parquet`: the conformed rows of each cell
with the identity of the commit marker they were verified against (its size and modification
time from the listing, and what it says).

Why it cannot serve a wrong result: an index entry counts only while the listing still shows
that cell's marker with the same size and modification time. The first 'ok' commit of a key is
never replaced (harness.store.storage), so an 'ok' entry stays true; a 'failed' commit may be
replaced by a later one, so a failed entry's marker is re-read (one small GET) and must say
what the indexed one said. Anything else (a new cell, a rewritten marker, an index segment that is
missing, corrupt or forged into a shape we do not know) is read and verified from the cell's
own files, as if there were no index. The index is a cache: deleting `_index/` loses nothing.

Several readers and drivers on one store: each writes only new segments under unique names and
merges (writes one segment holding every valid entry, then deletes exactly the segments it
read) when there are more than MAX_SEGMENTS; a segment deleted under a reader's feet is skipped,
entries written twice are read once. A reader that may not write (read-only credentials) still
reads correctly, only without the cache.
"""
from __future__ import annotations

import functools
import io
import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.store.audit import warn_about_store
from harness.store.results import RESULT_SCHEMA, conform
from harness.store.storage import COMMITS, Commit, Store, open_store, parquet_from_bytes

INDEX = "_index"
FILE_MISMATCH = "its file is missing or does not match its marker"
MAX_SEGMENTS = 8  # more segments than this are merged into one by the next reader that wrote one
READ_BATCH = 1000  # cells read before their tables are combined (10,000 one-cell tables held ~1 GiB)
READ_THREADS = {True: 4, False: 32}  # is_local -> parallel reads of new commits (latency-bound on S3)
MARKER_SIZE, MARKER_MTIME, MARKER_TEXT = "_marker_size", "_marker_mtime_ns", "_marker_json"
INDEX_SCHEMA = RESULT_SCHEMA.append(pa.field(MARKER_SIZE, pa.int64())).append(
    pa.field(MARKER_MTIME, pa.int64())).append(pa.field(MARKER_TEXT, pa.string()))


@dataclass
class StoreListing:
    """One listing of a store: its top-level entries and its `_commits/` folder, by file name."""

    top: dict[str, pafs.FileInfo]
    commit_files: dict[str, pafs.FileInfo]

    @functools.cached_property
    def markers(self) -> dict[str, pafs.FileInfo]:
        """key -> its commit marker's FileInfo (size, modification time)."""
        return {name[: -len(".json")]: info for name, info in self.commit_files.items()
                if name.endswith(".json") and info.type == pafs.FileType.File}


@dataclass
class CommittedRows:
    """Every verified commit of a store: rows (RESULT_SCHEMA), commit per key, and what was skipped."""

    table: pa.Table
    commits: dict[str, Commit]
    listing: StoreListing
    skipped: dict[str, str] = field(default_factory=dict)  # key -> its committed file, which is not a result file, and why
    unverified: dict[str, str] = field(default_factory=dict)  # key -> why its marker/file does not verify
    read_from_cells: int = 0  # commits read from their own files this time (not from the index)

    def marked(self) -> set[str]:
        """Keys with a commit marker of their own, verified or not (a cell `status` can name)."""
        return set(self.commits) | set(self.skipped) | {k for k, why in self.unverified.items() if why == FILE_MISMATCH}


def list_store(store: Store) -> StoreListing:
    """The top level and `_commits/` of a store, one (paged) listing each."""
    return StoreListing(store.entries(), store.entries(COMMITS))


def read_results(results_dir: str | os.PathLike) -> pa.Table:
    """All committed, checksum-verified rows of a store, cast to RESULT_SCHEMA; every other file is
    skipped with a warning naming it (harness.store.audit), so nothing is left out silently."""
    return read_store(results_dir).table


def read_store(results_dir: str | os.PathLike) -> CommittedRows:
    """read_results' rows with the commit of each cell (its sha256 names its rows exactly)."""
    location = str(results_dir)
    found = read_committed(location)
    warn_about_store(location, found.listing.top, found.listing.commit_files, found.commits)
    for what in found.skipped.values():
        print(f"warning: {what}: ignored", file=sys.stderr)
    return found


def read_committed(location: str, columns: Sequence[str] | None = None, only: Iterable[str] | None = None,
                   write_index: bool = True) -> CommittedRows:
    """Every verified, conforming commit's rows, read through the store's index (see the module
    docstring); new commits are read from their own files in parallel and indexed. `columns`:
    only these result columns are read from the index (`status` needs key and status alone).
    `only`: just these keys (a grid's cells: another grid's cells in the same store are never read)."""
    store = open_store(location)
    listing = list_store(store)
    markers = listing.markers if only is None else {k: v for k, v in listing.markers.items() if k in set(only)}
    segment_names = sorted(name for name in store.entries(INDEX) if name.endswith(".parquet"))
    wanted = list(RESULT_SCHEMA.names if columns is None else dict.fromkeys(["key", "status", *columns]))
    segments = _load_segments(store, segment_names, wanted)
    chosen, recheck = _usable_entries(segments, markers)
    if recheck:  # failed commits may be replaced: their marker must still say what the indexed one said
        now = _parallel(store, store.read_marker, sorted(recheck))
        chosen.update({key: recheck[key][0] for key, marker in now.items()
                       if marker is not None and marker == recheck[key][1]})
    to_read = sorted(set(markers) - set(chosen))
    out = CommittedRows(RESULT_SCHEMA.empty_table(), {}, listing, read_from_cells=len(to_read))
    new_tables = []
    for start in range(0, len(to_read), READ_BATCH):  # a batch's one-cell tables become one table
        batch = to_read[start:start + READ_BATCH]
        fresh = _parallel(store, lambda key: _read_cell(store, key, markers[key]), batch)
        tables = []
        for key in batch:
            entry = fresh[key]
            if isinstance(entry, str):
                out.unverified[key] = entry
            elif isinstance(entry, tuple):
                out.skipped[key] = f"{store.uri(entry[0].file)} {entry[1]}"
            else:
                tables.append(entry)
        if tables:
            new_tables.append(pa.concat_tables(tables).combine_chunks())
    names = [*wanted, MARKER_SIZE, MARKER_MTIME, MARKER_TEXT]
    parts = [t for t in [*_chosen_rows(segments, chosen), *(t.select(names) for t in new_tables)] if t.num_rows]
    combined = pa.concat_tables(parts) if parts else _schema(names).empty_table()
    out.commits = _commits_of(combined)
    out.table = combined.select(wanted)
    if write_index and new_tables:
        _write_segments(store, new_tables, segment_names, listing.markers, segments if columns is None else None)
    return out


def _schema(names: Sequence[str]) -> pa.Schema:
    return pa.schema([INDEX_SCHEMA.field(name) for name in names])


def _mtime_ns(info: pafs.FileInfo) -> int:
    return int(info.mtime_ns or 0) if info.mtime is not None else -1


def _read_cell(store: Store, key: str, info: pafs.FileInfo) -> pa.Table | tuple[Commit, str] | str:
    """A commit read from its own files: its index rows, (commit, why) for a committed file that is
    not a result file of this key, or why the marker/file does not verify."""
    commit = store.read_marker(key)
    if commit is None:
        return "no readable commit marker of this key"
    data = store.vouched_bytes(commit)
    if data is None:
        return FILE_MISMATCH
    try:
        conformed = conform(parquet_from_bytes(data))
    except (OSError, pa.ArrowException) as err:
        return commit, f"is not readable Parquet ({err})"
    if isinstance(conformed, str):
        return commit, conformed
    if set(conformed.column("key").to_pylist()) != {key}:
        return commit, f"holds rows of other keys than {key}"
    n = conformed.num_rows
    return (conformed.append_column(INDEX_SCHEMA.field(MARKER_SIZE), pa.array([info.size] * n, pa.int64()))
            .append_column(INDEX_SCHEMA.field(MARKER_MTIME), pa.array([_mtime_ns(info)] * n, pa.int64()))
            .append_column(INDEX_SCHEMA.field(MARKER_TEXT), pa.array([json.dumps(asdict(commit))] * n, pa.string())))


def _parallel(store: Store, read, keys: list[str]) -> dict:
    if not keys:
        return {}
    with ThreadPoolExecutor(max_workers=min(READ_THREADS[store.is_local], len(keys))) as pool:
        return dict(zip(keys, pool.map(read, keys)))


def _load_segments(store: Store, names: list[str], columns: list[str]) -> list[pa.Table]:
    """The index segments' `columns` and marker columns, in name order; a segment that is gone,
    unreadable or not of our schema is skipped (its cells are read from their own files)."""
    wanted = [*columns, MARKER_SIZE, MARKER_MTIME, MARKER_TEXT]

    def load(name: str) -> pa.Table | None:
        raw = store.read_bytes(f"{INDEX}/{name}")
        if raw is None:
            return None
        try:
            return parquet_from_bytes(raw, wanted).select(wanted).cast(_schema(wanted))
        except (OSError, KeyError, ValueError, pa.ArrowException):
            return None
    loaded = _parallel(store, load, names)
    return [loaded[name] for name in names if loaded[name] is not None]


def _usable_entries(segments: list[pa.Table], markers: dict[str, pafs.FileInfo]
                    ) -> tuple[dict[str, int], dict[str, tuple[int, Commit]]]:
    """key -> the segment whose entry matches the listing's marker (ok commits), and the failed
    keys to re-check against their marker: key -> (segment, the commit the entry was verified against)."""
    chosen: dict[str, int] = {}
    recheck: dict[str, tuple[int, Commit]] = {}
    for s, table in enumerate(segments):
        cols = zip(table.column("key").to_pylist(), table.column(MARKER_SIZE).to_pylist(),
                   table.column(MARKER_MTIME).to_pylist(), table.column(MARKER_TEXT).to_pylist())
        for key, size, mtime, text in cols:
            if key in chosen or key in recheck:
                continue  # a key's rows come from one segment (the same entry may be in two)
            info = markers.get(key)
            if info is None or info.size != size or _mtime_ns(info) != mtime:
                continue
            commit = _commit(text)
            if commit is not None and commit.status == "ok":
                chosen[key] = s
            elif commit is not None:
                recheck[key] = (s, commit)
    return chosen, recheck


def _commit(text: str) -> Commit | None:
    """The commit an index entry was verified against (None: a segment we cannot trust for it)."""
    try:
        return Commit(**json.loads(text))
    except (ValueError, TypeError):
        return None


def _chosen_rows(segments: list[pa.Table], chosen: dict[str, int]) -> list[pa.Table]:
    """Each segment's rows of the keys taken from it."""
    out = []
    for s, table in enumerate(segments):
        keys = [key for key, seg in chosen.items() if seg == s]
        if len(keys) == len(pc.unique(table.column("key"))):
            out.append(table)  # every cell of the segment (a merged index): no filter to run
        elif keys:
            out.append(table.filter(pc.is_in(table.column("key"), value_set=pa.array(keys, pa.string()))))
    return out


def _commits_of(table: pa.Table) -> dict[str, Commit]:
    out: dict[str, Commit] = {}
    for key, text in zip(table.column("key").to_pylist(), table.column(MARKER_TEXT).to_pylist()):
        if key not in out:
            out[key] = _commit(text)  # every row here was chosen because its commit parsed
    return out


def _write_segments(store: Store, new_tables: list[pa.Table], segment_names: list[str],
                    markers: dict[str, pafs.FileInfo], loaded: list[pa.Table] | None) -> None:
    """Index what was read from cells: one new segment; past MAX_SEGMENTS, one segment of every
    entry still valid for the whole store's listing (`markers`) with the new ones, replacing the
    segments this reader saw (`loaded`: them with every column, when the reader has them already).
    A store we may not write is only noted."""
    merge = len(segment_names) + 1 > MAX_SEGMENTS
    table = pa.concat_tables(new_tables)
    if merge:
        full = loaded if loaded is not None else _load_segments(store, segment_names, list(RESULT_SCHEMA.names))
        chosen, recheck = _usable_entries(full, markers)  # failed entries stay: every read re-checks them
        chosen.update({key: seg for key, (seg, _) in recheck.items()})
        fresh = set(table.column("key").to_pylist())
        table = pa.concat_tables([*_chosen_rows(full, {k: v for k, v in chosen.items() if k not in fresh}), table])
    buf = io.BytesIO()  # one chunk per column: a table of 10,000 one-cell chunks writes ~10x slower
    pq.write_table(table.combine_chunks(), buf, compression="zstd")
    try:
        store.write_bytes(f"{INDEX}/{uuid.uuid4().hex}.parquet", buf.getvalue(), durable=False)
        if merge:
            for name in segment_names:
                store.delete(f"{INDEX}/{name}")
    except (OSError, pa.ArrowException, ValueError) as err:
        print(f"note: could not write the read index to {store.uri(INDEX)} ({str(err).splitlines()[0]}); "
              f"results are read correctly, only without the cache", file=sys.stderr)

"""The read index (harness/store/index.py): a store is read in one pass, a second reader reads only
new commits, and no index state (stale, forged, half-deleted, unwritable) can change what is read."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.store.index import INDEX, MAX_SEGMENTS, read_committed, read_results
from harness.store.results import write_cell_result
from harness.store.storage import COMMITS, open_store


def _row(key: str, status: str = "ok", acc: float = 0.5) -> dict:
    return {"key": key, "status": status, "attack": None if status == "failed" else "pgd",
            "robust_acc": None if status == "failed" else acc, "error": "boom" if status == "failed" else None}


def _store(tmp_path: Path, n: int) -> str:
    location = str(tmp_path / "results")
    for i in range(n):
        write_cell_result(location, f"k{i:03d}", [_row(f"k{i:03d}", acc=i / 100)])
    return location


def _accs(table: pa.Table) -> dict[str, float]:
    return dict(zip(table.column("key").to_pylist(), table.column("robust_acc").to_pylist()))


def test_a_second_read_comes_from_the_index_and_reads_only_new_commits(tmp_path: Path) -> None:
    location = _store(tmp_path, 5)
    first = read_committed(location)
    assert first.read_from_cells == 5 and len(open_store(location).list(INDEX)) == 1
    second = read_committed(location)
    assert second.read_from_cells == 0
    assert _accs(second.table) == _accs(first.table) == {f"k{i:03d}": i / 100 for i in range(5)}
    write_cell_result(location, "k999", [_row("k999", acc=0.9)])
    third = read_committed(location)
    assert third.read_from_cells == 1 and _accs(third.table)["k999"] == 0.9 and third.table.num_rows == 6
    assert set(third.commits) == {*(f"k{i:03d}" for i in range(5)), "k999"}


def test_a_failed_cell_committed_again_as_ok_is_read_anew(tmp_path: Path) -> None:
    location = str(tmp_path / "results")
    write_cell_result(location, "kf", [_row("kf", "failed")])
    assert read_committed(location).commits["kf"].status == "failed"
    write_cell_result(location, "kf", [_row("kf", "ok", 0.7)])
    again = read_committed(location)
    assert again.commits["kf"].status == "ok" and _accs(again.table) == {"kf": 0.7}


def test_a_failed_entry_whose_marker_text_changed_in_place_is_not_trusted(tmp_path: Path) -> None:
    """A failed marker rewritten with the same size and time (S3 keeps seconds) is re-read: failed
    entries are re-checked by their marker's text, never by size and time alone."""
    location = str(tmp_path / "results")
    write_cell_result(location, "kf", [_row("kf", "failed")])
    read_committed(location)
    store = open_store(location)
    marker = Path(store.path(COMMITS, "kf.json"))
    stat = marker.stat()
    text = json.loads(marker.read_text())
    text["attempt"] = "f" * len(text["attempt"])  # same length: same size
    marker.write_text(json.dumps(text, indent=1))
    os.utime(marker, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = read_committed(location)
    assert again.read_from_cells == 1 and again.commits["kf"].attempt == "f" * len(text["attempt"])


def test_a_forged_or_corrupt_index_changes_nothing(tmp_path: Path) -> None:
    location = _store(tmp_path, 3)
    truth = _accs(read_results(location))
    store = open_store(location)
    (name,) = store.list(INDEX)
    # a segment claiming other numbers for a listed cell, with a marker identity that does not match
    table = pq.read_table(store.path(INDEX, name))
    forged = table.set_column(table.schema.get_field_index("robust_acc"), "robust_acc",
                              pa.array([1.0] * table.num_rows, pa.float64()))
    forged = forged.set_column(forged.schema.get_field_index("_marker_size"), "_marker_size",
                               pa.array([1] * table.num_rows, pa.int64()))
    pq.write_table(forged, store.path(INDEX, "0forged.parquet"))
    Path(store.path(INDEX, "1garbage.parquet")).write_bytes(b"not parquet")
    Path(store.path(INDEX, "2foreign.parquet")).write_bytes(pa.BufferOutputStream().getvalue().to_pybytes())
    assert _accs(read_results(location)) == truth


def test_a_cell_whose_marker_is_gone_leaves_the_results_though_the_index_holds_it(tmp_path: Path) -> None:
    location = _store(tmp_path, 3)
    read_committed(location)
    os.remove(open_store(location).path(COMMITS, "k001.json"))
    assert sorted(_accs(read_results(location))) == ["k000", "k002"]


def test_segments_are_merged_past_the_limit_and_duplicates_read_once(tmp_path: Path) -> None:
    location = str(tmp_path / "results")
    for i in range(MAX_SEGMENTS + 2):  # one new cell per read: one new segment each
        write_cell_result(location, f"k{i:03d}", [_row(f"k{i:03d}", acc=i / 100)])
        found = read_committed(location)
        assert found.table.num_rows == i + 1
    store = open_store(location)
    assert len(store.list(INDEX)) <= MAX_SEGMENTS
    # a copy of a segment (two writers indexing the same commits): each cell is read once
    name = store.list(INDEX)[0]
    Path(store.path(INDEX, "copy-" + name)).write_bytes(Path(store.path(INDEX, name)).read_bytes())
    table = read_results(location)
    assert sorted(table.column("key").to_pylist()) == [f"k{i:03d}" for i in range(MAX_SEGMENTS + 2)]


def test_a_store_that_cannot_take_the_index_is_still_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    location = _store(tmp_path, 2)
    index_dir = Path(open_store(location).path(INDEX))
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    index_dir.write_text("a file where the index folder goes")  # writing a segment fails
    found = read_committed(location)
    assert sorted(_accs(found.table)) == ["k000", "k001"]
    assert "could not write the read index" in capsys.readouterr().err


def test_status_reads_only_keys_and_status_from_the_index(tmp_path: Path) -> None:
    location = _store(tmp_path, 2)
    read_committed(location)
    found = read_committed(location, columns=())
    assert found.table.column_names == ["key", "status"] and found.read_from_cells == 0


def test_the_index_over_s3_reads_each_commit_once(s3: str) -> None:
    location = f"s3://bkt/indexed?{s3}"
    for i in range(3):
        write_cell_result(location, f"k{i}", [_row(f"k{i}", acc=i / 10)])
    assert read_committed(location).read_from_cells == 3
    again = read_committed(location)
    assert again.read_from_cells == 0 and _accs(again.table) == {"k0": 0.0, "k1": 0.1, "k2": 0.2}


def test_a_grid_restricted_read_never_reads_another_grids_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status grid=...` in a store shared with another grid: the other grid's markers and files are
    neither read nor questioned (here they are damaged, so a read would show)."""
    from harness.store.audit import audit_store
    from harness.store.storage import Store

    location = _store(tmp_path, 4)
    store = open_store(location)
    for key in ("k002", "k003"):
        Path(store.path(f"{key}.parquet")).write_bytes(b"damaged")
    read: list[str] = []
    original = Store.read_bytes
    monkeypatch.setattr(Store, "read_bytes", lambda self, rel: read.append(rel) or original(self, rel))
    found = read_committed(location, columns=(), only=["k000", "k001"])
    assert found.read_from_cells == 2 and set(found.commits) == {"k000", "k001"} and not found.unverified
    assert audit_store(location, found.listing.top, found.listing.commit_files, found.commits,
                       only={"k000", "k001"}) == []
    assert not [rel for rel in read if "k002" in rel or "k003" in rel]
    assert any("does not match" in m or "k002" in m for m in audit_store(location))  # unrestricted: named


def test_leaderboard_report_and_compare_read_a_store_uri(s3: str, tmp_path: Path) -> None:
    """The site, the paper table and compare straight from an S3 store (no local copy), and a
    bucket that does not exist is named before any work."""
    from harness.cli import main

    location = f"s3://bkt/site-from-s3?{s3}"
    for key, acc in (("a0", 0.4), ("b0", 0.6)):
        row = {**_row(key, acc=acc), "dataset": "digits", "arch": "cnn", "method": "erm", "seed": 0, "norm": "linf",
               "eps": 0.1, "clean_acc": 0.9, "n_eval": 400, "grid": "t"}
        write_cell_result(location, key, [row])
    assert main(["leaderboard", "--results", location, "--out", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file() and len(list((tmp_path / "site" / "cells").glob("*.html"))) == 2
    assert main(["report", "--results", location, "--out", str(tmp_path / "table.md")]) == 0
    assert "erm" in (tmp_path / "table.md").read_text()
    assert main(["compare", location, location]) == 0
    assert main(["report", "--results", f"s3://no-such-bucket/x?{s3}"]) == 2


def test_status_only_and_grid_restricted_readers_merge_without_losing_other_entries(tmp_path: Path) -> None:
    """Readers of key + status alone (status) and of one grid's keys also merge past the limit,
    and the merged segment keeps every other cell's entry (no re-read of them afterwards)."""
    location = _store(tmp_path, 3)  # k000..k002: another grid's cells
    read_committed(location)
    for i in range(3, 3 + MAX_SEGMENTS + 1):  # one new cell per status read: one segment each, then a merge
        write_cell_result(location, f"k{i:03d}", [_row(f"k{i:03d}", acc=i / 100)])
        read_committed(location, columns=(), only=[f"k{i:03d}"])
    store = open_store(location)
    assert len(store.list(INDEX)) <= MAX_SEGMENTS
    again = read_committed(location)
    assert again.read_from_cells == 0 and again.table.num_rows == 3 + MAX_SEGMENTS + 1
    assert _accs(again.table)["k001"] == 0.01

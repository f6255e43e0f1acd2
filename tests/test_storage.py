"""Atomic, verified commits on a pyarrow filesystem URI: first ok wins, corrupt files ignored."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness.store.index import read_results

from harness.store.results import committed_status, rows_to_table, result_path, write_cell_result
from harness.store.storage import COMMITS, Store, StorageError, local_path, normalize_location, open_store


def _rows(key: str, status: str = "ok", acc: float = 0.5) -> list[dict]:
    if status == "ok":
        return [{"key": key, "status": "ok", "attack": "pgd", "robust_acc": acc, "clean_acc": 0.9}]
    return [{"key": key, "status": "failed", "error": "boom"}]


@pytest.fixture(params=["path", "file_uri"])
def location(request, tmp_path: Path) -> str:
    folder = tmp_path / "results"
    return str(folder) if request.param == "path" else f"file://{folder}"


def test_commit_writes_file_then_verified_marker(location: str) -> None:
    path = write_cell_result(location, "k1", _rows("k1"))
    folder = local_path(location)
    assert Path(path) == folder / "k1.parquet" == Path(result_path(location, "k1"))
    marker = json.loads((folder / COMMITS / "k1.json").read_text())
    assert marker["status"] == "ok" and marker["size"] == (folder / "k1.parquet").stat().st_size
    assert committed_status(location, "k1") == "ok"
    assert read_results(location).column("robust_acc").to_pylist() == [0.5]
    assert not list((folder / "_staging").glob("*")), "no staged leftovers after a commit"


def test_first_ok_commit_wins(location: str) -> None:
    write_cell_result(location, "k", _rows("k", acc=0.25))
    folder = local_path(location)
    before = (folder / "k.parquet").read_bytes(), (folder / COMMITS / "k.json").read_text()
    result = open_store(location).commit_table("k", rows_to_table(_rows("k", acc=0.9)))  # a second finisher
    assert result.won is False and result.commit.sha256 == json.loads(before[1])["sha256"]
    write_cell_result(location, "k", _rows("k", acc=0.75))
    after = (folder / "k.parquet").read_bytes(), (folder / COMMITS / "k.json").read_text()
    assert after == before, "a duplicate finisher must not overwrite the first ok commit"
    assert read_results(location).column("robust_acc").to_pylist() == [0.25]


def test_failed_commit_is_replaced_by_a_later_ok(location: str) -> None:
    write_cell_result(location, "k", _rows("k", "failed"))
    assert committed_status(location, "k") == "failed"
    write_cell_result(location, "k", _rows("k", acc=0.5))
    assert committed_status(location, "k") == "ok"
    assert read_results(location).num_rows == 1


def test_corrupt_partial_or_unmarked_files_are_never_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    write_cell_result(folder, "good", _rows("good"))
    write_cell_result(folder, "torn", _rows("torn"))
    write_cell_result(folder, "flipped", _rows("flipped"))
    # a torn write: the file cut short after its marker was written
    data = (folder / "torn.parquet").read_bytes()
    (folder / "torn.parquet").write_bytes(data[: len(data) // 2])
    # same size, one byte changed: still valid Parquet maybe, but not what was committed
    flipped = bytearray((folder / "flipped.parquet").read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF
    (folder / "flipped.parquet").write_bytes(bytes(flipped))
    # a file with no commit marker (a killed process moved it but never committed)
    pq.write_table(pq.read_table(folder / "good.parquet"), folder / "orphan.parquet")
    # a marker that is not JSON
    (folder / COMMITS / "junk.json").write_text("{not json")

    assert committed_status(folder, "good") == "ok"
    for key in ("torn", "flipped", "orphan", "junk"):
        assert committed_status(folder, key) is None, key
    assert read_results(folder).column("key").to_pylist() == ["good"]
    # the corrupt cell is rerun and its new commit is trusted; nothing committed was deleted
    write_cell_result(folder, "torn", _rows("torn"))
    assert committed_status(folder, "torn") == "ok"
    assert sorted(read_results(folder).column("key").to_pylist()) == ["good", "torn"]


def test_stale_commit_lock_of_a_killed_process_expires(tmp_path: Path, monkeypatch) -> None:
    import harness.store.storage as storage

    folder = tmp_path / "r"
    lock = folder / COMMITS / ".locks" / "k.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("dead 1")
    os.utime(lock, (0, 0))
    monkeypatch.setattr(storage, "LOCK_STALE_SECONDS", 0.5)
    write_cell_result(folder, "k", _rows("k"))
    assert committed_status(folder, "k") == "ok" and not lock.exists()


def _racer(folder: str, acc: float, barrier) -> None:
    barrier.wait()
    write_cell_result(folder, "race", _rows("race", acc=acc))


def test_racing_finishers_commit_exactly_once(tmp_path: Path) -> None:
    folder = str(tmp_path / "r")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_racer, args=(folder, i / 10, barrier)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    table = read_results(folder)
    assert table.num_rows == 1 and committed_status(folder, "race") == "ok"
    assert len(list(Path(folder).glob("*.parquet"))) == 1


def test_locations_normalise_and_bad_uris_fail_clearly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize_location("rel/dir") == str(tmp_path / "rel" / "dir")
    assert normalize_location("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert local_path("file:///x/y") == Path("/x/y") and local_path("s3://b/p") is None
    with pytest.raises(StorageError, match="file:///abs/path"):
        Store("nosuchscheme://bucket/x")


def test_grid_reruns_only_the_cell_whose_committed_file_was_corrupted(tiny, ray_session) -> None:
    from harness.run.grid import expand_grid, run_grid

    cells = expand_grid(["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]",
                         "grid.axes.seed=[0,1]", "attack=[fgsm]"] + [o for o in tiny if not o.startswith("attack.")])
    report = run_grid(cells)
    assert [o.status for o in report.outcomes] == ["ok", "ok"], [o.error for o in report.outcomes]
    folder = Path(cells[0]["results_dir"])
    bad, good = cells[0]["key"], cells[1]["key"]
    good_marker = (folder / COMMITS / f"{good}.json").read_text()
    data = (folder / f"{bad}.parquet").read_bytes()
    (folder / f"{bad}.parquet").write_bytes(data[:100])  # a torn file
    assert committed_status(folder, bad) is None
    again = run_grid(expand_grid(["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]",
                                  "grid.axes.seed=[0,1]", "attack=[fgsm]"] + [o for o in tiny if not o.startswith("attack.")]))
    assert again.skipped == [good] and [o.key for o in again.outcomes] == [bad]
    assert committed_status(folder, bad) == "ok"
    assert (folder / COMMITS / f"{good}.json").read_text() == good_marker
    assert read_results(folder).num_rows == 2


def test_reading_a_result_then_exiting_does_not_abort(tmp_path: Path) -> None:
    """Reading a committed table from bytes and exiting at once used to abort the interpreter
    (`terminate called without an active exception`, exit 134) in most runs: an Arrow pool thread
    released the Python-owned input buffer during shutdown (harness.store.storage.parquet_from_bytes)."""
    import subprocess
    import sys

    write_cell_result(tmp_path, "k", _rows("k"))
    script = ("import sys; from harness.store.results import read_cell_result; "
              "assert read_cell_result(sys.argv[1]).num_rows == 1")
    for _ in range(4):
        done = subprocess.run([sys.executable, "-c", script, str(result_path(tmp_path, "k"))],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

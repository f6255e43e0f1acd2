"""Foreign, stray and unverifiable files in a results store are named in a warning, never silently
skipped, and a stray commit marker is never listed as a cell."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.run.status import grid_status
from harness.run.status_report import status_command
from harness.store.audit import audit_store
from harness.store.index import read_results
from harness.store.results import write_cell_result
from harness.store.storage import COMMITS


def _rows(key: str) -> list[dict]:
    return [{"key": key, "status": "ok", "attack": "pgd", "robust_acc": 0.5, "clean_acc": 0.9}]


@pytest.fixture()
def tampered(tmp_path: Path) -> Path:
    """A store with two real cells and one of each kind of stranger."""
    root = tmp_path / "results"
    write_cell_result(str(root), "a" * 20, _rows("a" * 20))
    write_cell_result(str(root), "b" * 20, _rows("b" * 20))
    (root / COMMITS / "garbage.json").write_text("{not json")
    (root / COMMITS / "copied.json").write_text((root / COMMITS / f"{'a' * 20}.json").read_text())
    (root / COMMITS / "README").write_text("hi")
    marker = json.loads((root / COMMITS / f"{'b' * 20}.json").read_text())
    (root / f"{'b' * 20}.parquet").write_bytes(b"x" * (marker["size"] + 3))  # replaced after commit
    (root / "orphan.parquet").write_bytes(b"PAR1")
    (root / "notes.txt").write_text("hello")
    (root / "downloads").mkdir()
    return root


def test_audit_names_every_stranger_and_no_real_cell(tampered: Path) -> None:
    messages = audit_store(str(tampered))
    text = "\n".join(messages)
    for name in ("garbage.json", "copied.json", "README", f"{'b' * 20}.parquet", "orphan.parquet", "notes.txt",
                 "downloads"):
        assert str(tampered / name) in text or str(tampered / COMMITS / name) in text, (name, text)
    assert len(messages) == 7
    assert not any(f"{'a' * 20}.parquet" in m for m in messages)


def test_a_clean_store_has_no_warnings(tmp_path: Path) -> None:
    write_cell_result(str(tmp_path / "r"), "c" * 20, _rows("c" * 20))
    assert audit_store(str(tmp_path / "r")) == []
    assert audit_store(str(tmp_path / "missing")) == []


def test_status_ignores_stray_markers_with_a_warning(tampered: Path, capsys: pytest.CaptureFixture) -> None:
    status = grid_status(str(tampered))
    assert status.done == ["a" * 20] and status.pending == ["b" * 20]  # b's file was replaced: rerun
    assert status_command(None, str(tampered), True) == 0
    out = capsys.readouterr()
    assert "garbage" not in out.out and "copied" not in out.out
    assert "stray commit marker" in out.err and str(tampered / COMMITS / "garbage.json") in " ".join(out.err.split())


def test_leaderboard_reader_warns_and_keeps_the_good_rows(tampered: Path, capsys: pytest.CaptureFixture) -> None:
    table = read_results(str(tampered))
    assert table.column("key").to_pylist() == ["a" * 20]
    err = " ".join(capsys.readouterr().err.split())
    assert str(tampered / "orphan.parquet") in err and str(tampered / "notes.txt") in err


def test_status_reads_cells_as_the_leaderboard_does(tmp_path: Path) -> None:
    """A forged commit marker over a foreign parquet file (its checksum matching) is not a done
    cell: status, like the leaderboard, counts only result files of the schema, of this key
    (issue 24, item 10)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from harness.store.storage import Commit

    root = tmp_path / "results"
    write_cell_result(str(root), "a" * 20, _rows("a" * 20))
    for key, table in (("f" * 20, pa.table({"x": [1, 2]})),                       # a foreign schema
                       ("g" * 20, pa.table({"key": ["a" * 20], "status": ["ok"]}))):  # another key's rows
        path = root / f"{key}.parquet"
        pq.write_table(table, path)
        data = path.read_bytes()
        marker = Commit(key=key, status="ok", sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                        file=path.name, committed_at="now", host="h", pid=1, attempt="x")
        (root / COMMITS / f"{key}.json").write_text(json.dumps(marker.__dict__))
    status = grid_status(str(root), ["a" * 20, "f" * 20, "g" * 20])
    assert status.done == ["a" * 20] and status.pending == ["f" * 20, "g" * 20]
    assert read_results(str(root)).column("key").to_pylist() == ["a" * 20]

"""A full disk ends a write with a clear error (the place, the bytes it needed, the fix), leaves no
temporary file, and never touches results already committed (issue 24, item 8). The disk is made
full by a filesystem wrapper: the write path's fsync / torch.save raise ENOSPC."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

import harness.store.checkpoints as checkpoints
import harness.store.storage as storage
from harness.core.config import compose_config, finalize
from harness.run.cell import run_cell
from harness.store.results import write_cell_result
from harness.store.storage import STAGING, StorageError, open_store


def _rows(key: str) -> list[dict]:
    return [{"key": key, "status": "ok", "attack": "pgd", "robust_acc": 0.5, "clean_acc": 0.9}]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_commit_on_a_full_disk_names_it_and_keeps_what_was_committed(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "results"
    write_cell_result(str(root), "a" * 20, _rows("a" * 20))
    before = (root / f"{'a' * 20}.parquet").read_bytes()
    monkeypatch.setattr(storage.os, "fsync", _full)
    with pytest.raises(StorageError, match=r"no space left to write .*bytes needed\): free space on that disk"):
        write_cell_result(str(root), "b" * 20, _rows("b" * 20))
    monkeypatch.undo()
    assert not any((root / STAGING).iterdir()), "no temporary file left behind"
    store = open_store(str(root))
    assert store.committed_status("a" * 20) == "ok" and (root / f"{'a' * 20}.parquet").read_bytes() == before
    assert store.committed_status("b" * 20) is None


def test_a_checkpoint_on_a_full_disk_names_it_and_keeps_the_last_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint(path, {"epoch": 0, "w": torch.zeros(10)})

    def half_then_full(state, target) -> None:  # torch's zip writer: part of the file, then a RuntimeError
        Path(target).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:...] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoints.torch, "save", half_then_full)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(StorageError, match=r"checkpoint.pt \(40 bytes needed\)"):
        checkpoints.save_checkpoint(path, {"epoch": 1, "w": torch.zeros(10)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert checkpoints.load_checkpoint(path)["epoch"] == 0


def test_a_training_that_fills_the_disk_is_a_failed_row_naming_it(tiny: list[str], monkeypatch) -> None:
    cfg = finalize(compose_config(tiny + ["trainer.epochs=1", "data.train_limit=64"]))
    monkeypatch.setattr(checkpoints.torch, "save", _full)
    outcome = run_cell(cfg)
    assert outcome.status == "failed" and "no space left to write" in outcome.error

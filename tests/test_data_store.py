"""Datasets and results in object storage, tested for real against moto's S3 server on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from harness.data.loader import make_loader, split_count
from harness.data.shards import DataError, load_manifest

moto_server = pytest.importorskip("moto.server")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_prepare_to_s3_then_ranks_stream_disjoint_shards(s3: str, tmp_path: Path) -> None:
    done = _cli("data", "prepare", "digits", "--out", f"s3://bkt/data?{s3}")
    assert done.returncode == 0, done.stderr
    uri = f"s3://bkt/data/digits?{s3}"
    manifest = load_manifest(uri)
    assert manifest["splits"]["train"]["count"] == 1437
    cache = tmp_path / "cache"
    keys = []
    for rank in range(2):
        loader = make_loader(uri, "train", 64, rank=rank, world_size=2, num_workers=1, shuffle=True,
                             return_keys=True, cache_dir=str(cache))
        rank_keys = [k for _, _, batch in loader for k in batch]
        assert len(rank_keys) == split_count(uri, "train", rank, 2)
        keys += rank_keys
    assert sorted(keys) == [f"{i:06d}" for i in range(1437)]
    cached = sorted(p.name for p in cache.rglob("train-*.tar"))
    assert cached == [s["file"] for s in manifest["splits"]["train"]["shards"]]  # each shard once
    again = [k for _, _, b in make_loader(uri, "train", 64, return_keys=True, cache_dir=str(cache)) for k in b]
    assert again == [f"{i:06d}" for i in range(1437)]  # read back from the node-local cache


def test_unreachable_store_fails_within_seconds_naming_the_uri() -> None:
    uri = "s3://bkt/data/digits?endpoint_override=127.0.0.1:1&scheme=http"
    start = time.monotonic()
    with pytest.raises(DataError, match="s3://bkt/data/digits") as err:
        make_loader(uri, "train", 8)
    assert time.monotonic() - start < 15
    assert "credentials" in str(err.value)


def test_missing_dataset_in_bucket_names_the_fix(s3: str) -> None:
    with pytest.raises(DataError, match="robustgrid data prepare nothing"):
        load_manifest(f"s3://bkt/data/nothing?{s3}")


def test_results_store_on_s3(s3: str) -> None:
    from harness.store.storage import open_store

    store = open_store(f"s3://bkt/results?{s3}")
    table = pa.table({"key": ["k1"], "status": ["ok"], "accuracy": [0.5]})
    first = store.commit_table("k1", table)
    assert first.won and store.committed_status("k1") == "ok"
    assert store.read_table("k1").to_pylist() == table.to_pylist()
    second = store.commit_table("k1", pa.table({"key": ["k1"], "status": ["ok"], "accuracy": [0.9]}))
    assert not second.won and store.read_table("k1").column("accuracy").to_pylist() == [0.5]
    assert [c.key for c, _ in store.committed()] == ["k1"]


@pytest.mark.slow
def test_cell_trains_and_evaluates_from_s3(s3: str, tiny: list[str]) -> None:
    done = _cli("data", "prepare", "digits", "--out", f"s3://bkt/cell?{s3}")
    assert done.returncode == 0, done.stderr
    overrides = [o for o in tiny if not o.startswith(("data.root", "results_dir"))]
    done = _cli("run", *overrides, f"data.root='s3://bkt/cell?{s3}'", f"results_dir='s3://bkt/cellres?{s3}'")
    assert done.returncode == 0, done.stdout + done.stderr
    from harness.store.storage import open_store

    rows = [row for _, t in open_store(f"s3://bkt/cellres?{s3}").committed() for row in t.to_pylist()]
    assert rows and all(r["status"] == "ok" for r in rows)
    assert any((r.get("clean_acc") or 0) > 0.1 for r in rows)

"""Every location the harness derives from another keeps a URI's query string, so an S3-compatible
endpoint (?endpoint_override=HOST:PORT&scheme=http) is never lost: the dataset folder from the data
root, its parent (where `ensure_prepared` writes a dataset it prepares), the fix an error prints, the
results store's file URIs. Issue 24, item 2."""
from __future__ import annotations

from pathlib import Path

from harness.core.config import compose_config, finalize
from harness.core.locations import basename, child, parent
from harness.data.ensure import ensure_prepared
from harness.data.integrity import prepare_hint
from harness.data.location import DataLocation
from harness.data.shards import load_manifest
from harness.store.storage import open_store

Q = "endpoint_override=127.0.0.1:9000&scheme=http"


def test_derived_uris_keep_their_query(tmp_path: Path) -> None:
    assert child(f"s3://b/data?{Q}", "digits") == f"s3://b/data/digits?{Q}"
    assert child(f"s3://b/data/?{Q}", "checkpoints", "k") == f"s3://b/data/checkpoints/k?{Q}"
    assert parent(f"s3://b/data/digits?{Q}") == f"s3://b/data?{Q}"
    assert basename(f"s3://b/data/digits?{Q}") == "digits"
    assert child(str(tmp_path), "x") == str(tmp_path / "x") and parent(str(tmp_path / "x")) == str(tmp_path)
    cfg = finalize(compose_config([f"data.root='s3://b/data?{Q}'", f"results_dir='s3://b/res?{Q}'"]))
    assert cfg["data"]["dir"] == f"s3://b/data/digits?{Q}"
    assert cfg["results_dir"] == f"s3://b/res?{Q}"
    assert f"--out s3://b/data?{Q}" in prepare_hint(cfg["data"]["dir"])
    assert open_store(cfg["results_dir"]).uri("checkpoints", "k", "checkpoint.pt") == \
        f"s3://b/res/checkpoints/k/checkpoint.pt?{Q}"


def test_a_dataset_prepared_on_first_use_lands_on_the_endpoint(s3: str) -> None:
    """digits on an S3 root it is not prepared at yet: prepared there, on the moto server (the
    query was dropped before, so the upload aimed at the real AWS host)."""
    cfg = finalize(compose_config([f"data.root='s3://bkt/first-use?{s3}'"]))
    ensure_prepared(cfg["data"])
    manifest = load_manifest(DataLocation(cfg["data"]["dir"]))
    assert manifest["num_classes"] == 10

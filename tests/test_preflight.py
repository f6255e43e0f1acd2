"""The driver's checks before any work read each dataset manifest once per grid, not once per cell."""
from __future__ import annotations

import os
import shutil

import harness.run.preflight as preflight
from harness.core.config import compose_config, finalize
from harness.data.shards import MANIFEST


def test_train_split_size_reads_each_manifest_once_and_again_when_it_changes(tiny, digits_dir, tmp_path,
                                                                            monkeypatch) -> None:
    data_dir = tmp_path / "digits"
    shutil.copytree(digits_dir, data_dir)
    reads = []
    real = preflight.split_count
    monkeypatch.setattr(preflight, "split_count", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    cfg = finalize(compose_config(tiny))
    cfg["data"]["dir"] = str(data_dir)
    sizes = {preflight.train_split_size(cfg) for _ in range(100)}
    assert sizes == {256} and len(reads) == 1, "100 cells of one dataset: one manifest read"
    manifest = data_dir / MANIFEST
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # re-prepared
    assert preflight.train_split_size(cfg) == 256 and len(reads) == 2


def test_the_results_store_is_probed_once_per_store_not_once_per_cell(tmp_path, monkeypatch) -> None:
    """A 10,000-cell grid on one store writes one probe object, not 10,000 (20,000 requests on S3)."""
    opened = []
    real = preflight.open_store
    monkeypatch.setattr(preflight, "open_store", lambda location: opened.append(location) or real(location))
    location = str(tmp_path / "results")
    for _ in range(100):
        preflight.check_results_writable(location)
    assert opened == [location]

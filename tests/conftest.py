"""Shared fixtures: the digits shards (prepared once), tiny cell overrides, one Ray per session."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# the node-local "shards verified" markers of harness.data.integrity: fresh for each test session
os.environ.setdefault("ROBUSTGRID_VERIFIED_DIR", tempfile.mkdtemp(prefix="robustgrid-verified-"))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.data.prepare import prepare_digits

    root = tmp_path_factory.mktemp("data")
    prepare_digits(root)
    return root


@pytest.fixture(scope="session")
def digits_dir(data_root: Path) -> Path:
    return data_root / "digits"


@pytest.fixture(scope="session")
def erm_model(digits_dir: Path):
    """A test_resnet trained on digits (~97% test accuracy), shared by the attack tests.
    Tests that switch its mode switch it back to eval."""
    from helpers import digits_classifier, train_erm

    return train_erm(digits_classifier(digits_dir), digits_dir)


@pytest.fixture()
def tiny(data_root: Path, tmp_path: Path) -> list[str]:
    """Overrides that shrink a cell to a few seconds on one CPU core."""
    return [
        f"data.root={data_root}",
        f"results_dir={tmp_path / 'results'}",
        f"leaderboard_dir={tmp_path / 'site'}",
        "trainer=tiny",
        "data.train_limit=256",
        "eval.limit=64",
        "attack.pgd.steps=3",
        # the backdoor detectors every backdoor cell runs, at a few steps (docs/detectors.md)
        "eval.detectors.mmbd.starts=2",
        "eval.detectors.mmbd.steps=3",
        "eval.detectors.strip.n=4",
    ]


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A moto S3 server on a free local port with bucket `bkt`; yields the URI query to reach it."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir("bkt")
    yield query
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

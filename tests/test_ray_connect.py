"""A wrong Ray address fails in seconds with a message naming it, instead of retrying for minutes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core.config import ConfigError
from harness.run.ray_connect import check_ray_address


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_fails_fast_naming_the_address() -> None:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="ray.address=127.0.0.1:1") as info:
        check_ray_address("127.0.0.1:1")
    assert time.perf_counter() - t0 < 15
    assert "ray start --head" in str(info.value)


def test_auto_follows_ray_address_env_like_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    # Ray rewrites 127.0.0.1 to this node's IP, as ray.init would
    with pytest.raises(ConfigError, match=f"ray.address=auto \\(resolved to [^ ]+:{port}\\)"):
        check_ray_address("auto")


def test_auto_without_any_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RAY_ADDRESS, no `ray start` session file, no GCS process: Ray's own lookup finds nothing.
    (This machine may run other people's clusters, so the process scan is emptied here.)"""
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    with pytest.raises(ConfigError, match="ray.address=auto: no running Ray cluster found"):
        check_ray_address("auto")


def test_a_listening_port_passes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray_address(f"127.0.0.1:{server.getsockname()[1]}")
    check_ray_address(None)
    check_ray_address("local")


def test_grid_with_a_dead_address_exits_2_before_ray(tiny: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    args = ["grid", "grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[erm]", *tiny,
            "ray.address=127.0.0.1:1", "--no-leaderboard"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    seconds = time.perf_counter() - t0
    message = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, message
    assert "ray.address=127.0.0.1:1" in message and "Traceback" not in message
    assert seconds < 60, f"took {seconds:.0f}s"  # interpreter + config start-up on a busy machine; the probe is < 1 s
    assert not list((tmp_path / "results").glob("*.parquet"))


def test_a_port_that_answers_but_is_not_ray_fails_fast() -> None:
    """ray.address at a live web server (the dashboard's 8265, say): named in seconds, not a hang of
    ray.init (issue 24, item 10)."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match="something answers there, but not a Ray cluster's GCS"):
            check_ray_address(f"127.0.0.1:{server.server_address[1]}")
        assert time.perf_counter() - t0 < 10
    finally:
        server.shutdown()


def test_a_real_gcs_passes(ray_session) -> None:
    check_ray_address(ray_session.get_runtime_context().gcs_address)

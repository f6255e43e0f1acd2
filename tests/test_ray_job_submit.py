"""docs/cluster.md's `ray job submit` flow, run for real against a local `ray start --head` on
loopback: the job's driver runs `robustgrid grid ... ray.address=auto`, its cell runs on the
cluster, and the result is committed to the store. Slow (a Ray cluster starts): `-m slow`."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.store.index import read_results

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_documented_ray_job_submit_flow(data_root: Path, tmp_path: Path) -> None:
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists() or shutil.which("ray", path=str(ray.parent)) is None:
        pytest.skip("the ray CLI is not installed (pip install '.[cluster]')")
    pytest.importorskip("aiohttp", reason="`ray job submit` needs ray[default] (pip install '.[cluster]')")
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    temp = Path(tempfile.mkdtemp(prefix="rgray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{ray.parent}:{os.environ.get('PATH', '')}", "ROBUSTGRID_DATA": str(data_root),
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    # --block keeps `ray start` in the foreground; ending it ends exactly the processes it started.
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         # every port picked free: another Ray on this machine holds the defaults (agent 52365, ...)
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = tmp_path / "results"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while subprocess.run([str(ray), "job", "list", "--address", address], env=env, capture_output=True,
                             timeout=60).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray dashboard did not come up within 120 s"
            time.sleep(2)
        # the command of docs/cluster.md, shrunk to one tiny cell
        submit = [str(ray), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                  "robustgrid", "grid", "-m", "method=erm", "ray.address=auto", f"results_dir={results}",
                  "trainer=tiny", "data.train_limit=64", "eval.limit=32", "attack=[fgsm]", "--no-leaderboard"]
        agent_deadline = time.time() + 300  # on a loaded machine the agent can take minutes
        while True:  # the node's job agent comes up after the dashboard
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=540)
            if "No available agent" not in job.stderr or time.time() > agent_deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        rows = read_results(results).to_pylist()
        assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["method"] == "erm"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

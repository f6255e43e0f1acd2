"""Resources from config, checked up front; checkpoint sync through a URI store; status counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from harness.core.config import ConfigError, compose_config, finalize
from harness.run.resources import GIB, cell_resources, rank_options, task_options, worker_resources


def _cfg(*overrides: str) -> dict:
    return finalize(compose_config(["trainer=tiny", *overrides]))


def test_default_task_options_retry_worker_death() -> None:
    options = task_options(_cfg())
    assert options["num_cpus"] == 1 and options["num_gpus"] == 0 and options["max_retries"] == 2
    assert options["retry_exceptions"] == [mp.ProcessExitedException]
    assert "memory" not in options


def test_resources_scale_with_world_size_and_share_gpus() -> None:
    options = task_options(_cfg("trainer.world_size=2", "resources.cpus=2", "resources.gpus=1",
                                "resources.memory_gb=1.5", "resources.max_retries=5"))
    assert options["num_cpus"] == 4 and options["num_gpus"] == 2 and options["max_retries"] == 5
    assert options["memory"] == 3 * GIB
    shared = task_options(_cfg("resources.gpus=0.25"))
    assert shared["num_gpus"] == 0.25  # four small cells share one GPU
    no_retry = task_options(_cfg("resources.retry_worker_death=false"))
    assert "retry_exceptions" not in no_retry


def test_ray_train_launcher_orchestrates_with_zero_cpus() -> None:
    cfg = _cfg("resources.launcher=ray_train", "trainer.world_size=2", "resources.gpus=1", "resources.memory_gb=2")
    assert task_options(cfg)["num_cpus"] == 0
    assert worker_resources(cfg) == {"CPU": 1.0, "GPU": 1.0, "memory": float(2 * GIB)}
    assert rank_options(cfg)["num_gpus"] == 1.0
    assert cell_resources(cfg).train_max_failures == 2


@pytest.mark.parametrize("overrides,message", [
    (["resources.launcher=slurm"], "resources.launcher='slurm' is not one of task, ray_train"),
    (["resources.gpus=1.5"], "fraction below 1"),
    (["resources.gpus=0.5", "trainer.world_size=2"], "DDP ranks cannot share one GPU"),
    (["resources.cpus=0"], "resources.cpus=0 is out of range: it must be > 0"),
    (["resources.memory_gb=-1"], "resources.memory_gb=-1 is out of range: it must be > 0"),
    (["resources.cpus=lots"], "resources.cpus must be a number"),
    (["trainer.device=cuda"], "set resources.gpus"),
    (["resources.max_retries=-2"], "resources.max_retries=-2 is out of range: it must be >= -1"),
])
def test_bad_resources_fail_before_any_work(overrides, message) -> None:
    from harness.run.grid import validate_cell

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_cell(_cfg(*overrides))


def test_a_killed_ddp_rank_is_retried_not_recorded_as_failed(tiny, monkeypatch) -> None:
    """A rank killed by a signal must reach Ray as an exception it retries, with nothing committed."""
    import harness.run.cell as cell
    import harness.run.nodes as nodes
    from harness.store.results import committed_status

    cfg = finalize(compose_config(tiny))

    def killed(cfg, work_dir):
        raise mp.ProcessExitedException("process 1 terminated with signal SIGKILL", error_index=1,
                                        error_pid=1, exit_code=-9, signal_name="SIGKILL")

    monkeypatch.setattr(nodes, "train", killed)
    with pytest.raises(mp.ProcessExitedException):
        cell.run_cell(cfg)
    assert committed_status(cfg["results_dir"], cfg["key"]) is None
    cfg["resources"]["retry_worker_death"] = False
    outcome = cell.run_cell(cfg)
    assert outcome.status == "failed" and "SIGKILL" in outcome.error


def test_checkpoints_sync_through_a_uri_store_and_resume_on_another_node(tiny, tmp_path, monkeypatch) -> None:
    """Train 1 epoch on 'node A', lose it; 'node B' (empty cache) resumes at epoch 1 from the store."""
    from harness.store import checkpoint_sync
    from harness.run.cell import run_cell
    from harness.data.ensure import ensure_prepared
    from harness.train.trainer import train

    store = f"file://{tmp_path / 'store'}"
    cfg = finalize(compose_config([o for o in tiny if not o.startswith("results_dir")] + [f"results_dir={store}"]))
    ensure_prepared(cfg["data"])
    one_epoch = json.loads(json.dumps(cfg))
    one_epoch["trainer"]["epochs"] = 1
    monkeypatch.setenv("ROBUSTGRID_CACHE", str(tmp_path / "node_a"))
    first = train(one_epoch, checkpoint_sync.local_work_dir(one_epoch))
    assert first.epochs == 1
    remote = tmp_path / "store" / "checkpoints" / cfg["train_key"]
    assert json.loads((remote / "checkpoint.json").read_text())["epoch"] == 0
    (remote / "train_summary.json").unlink()  # node A died after its epoch-0 checkpoint: no summary

    monkeypatch.setenv("ROBUSTGRID_CACHE", str(tmp_path / "node_b"))
    work_dir = checkpoint_sync.local_work_dir(cfg)
    assert not work_dir.exists()
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    curve = json.loads((work_dir / "train_summary.json").read_text())["curve"]
    assert [p["epoch"] for p in curve] == [0, 1]
    assert curve[0] == first.curve[0], "epoch 0 came from node A's checkpoint, not retrained"
    assert json.loads((remote / "checkpoint.json").read_text())["epoch"] == 1


def test_status_counts_from_the_store(tmp_path: Path) -> None:
    from harness.store.results import write_cell_result
    from harness.run.status import RUNNING, RunningMarker, grid_status

    store = str(tmp_path / "r")
    write_cell_result(store, "a", [{"key": "a", "status": "ok"}])
    write_cell_result(store, "b", [{"key": "b", "status": "failed", "error": "x"}])
    with RunningMarker(store, "c"):
        status = grid_status(store, ["a", "b", "c", "d"])
        assert status.counts() == {"done": 1, "failed": 1, "running": 1, "stale-running": 0, "stale": 0,
                                   "pending": 1}
        assert status.attempts["c"] == 1
    assert not (Path(store) / RUNNING / "c.json").exists()
    # a marker whose heartbeat stopped (its worker was killed) is stale-running, not running
    (Path(store) / RUNNING / "c.json").write_text(json.dumps({"key": "c", "heartbeat": 0}))
    assert grid_status(store, ["c"]).stale_running == ["c"]
    assert grid_status(store).counts() == {"done": 1, "failed": 1, "running": 0, "stale-running": 1, "stale": 0,
                                           "pending": 0}


def test_status_cli(tiny, capsys) -> None:
    from harness.cli import main

    assert main(["status", "--list", "grid=demo", *tiny]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("pending ") for line in out.splitlines()) == 6 and "test_vit/trades/s0" in out
    assert main(["status"]) == 2
    assert "grid=<name>" in capsys.readouterr().err


def test_a_multi_rank_cells_eval_node_holds_its_ranks_like_its_train_node() -> None:
    """A W-rank cell evaluates on its W ranks: launcher=task holds them in the node's task,
    launcher=ray_train orchestrates with 0 CPUs while Ray Train's workers hold them; 1 rank: one rank's."""
    from harness.run.grid import node_options
    from harness.run.plan import build_plan

    def options(*overrides: str) -> dict[str, dict]:
        return {n.kind: node_options(n) for n in build_plan([_cfg(*overrides)])}

    task = options("trainer.world_size=2", "resources.cpus=2")
    assert task["eval"]["num_cpus"] == task["train"]["num_cpus"] == 4
    ray_train = options("resources.launcher=ray_train", "trainer.world_size=2")
    assert ray_train["eval"]["num_cpus"] == ray_train["train"]["num_cpus"] == 0
    assert options("resources.cpus=3")["eval"]["num_cpus"] == 3

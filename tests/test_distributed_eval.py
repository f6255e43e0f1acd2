"""Evaluation split over 2 gloo ranks gives exactly the 1-rank evaluation (harness/eval/distributed.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import pyarrow.parquet as pq
import torch.multiprocessing as mp

from harness.eval.distributed import evaluate_distributed
from harness.eval.evaluate import EvalResult, evaluate
from harness.eval.samples import samples_path
from helpers import digits_classifier

# PGD's random start draws from the global RNG and APGD from its own generator: both must give
# the same per-sample results whichever rank attacks a batch.
ATTACKS = [{"name": "pgd", "eps": 0.1, "steps": 3}, {"name": "apgd_ce", "eps": 0.1, "n_iter": 5}]
SETTINGS = dict(num_classes=10, batch_size=32, limit=96, seed=3, integrity_points=16)


def _summary(result: EvalResult) -> dict:
    return {"clean_acc": result.clean_acc, "labels": result.labels.tolist(), "clean_ok": result.clean_ok.tolist(),
            "attacks": [{"name": r.attack.name, "robust_acc": r.robust_acc, "per_class": r.per_class_robust_acc,
                         "broken_by": r.broken_by, "flags": r.flags} for r in result.attacks]}


def _rank(rank: int, world_size: int, weights: str, digits_dir: str, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size)
    try:
        model = digits_classifier(Path(digits_dir))
        model.load_state_dict(torch.load(weights, weights_only=True))
        result = evaluate_distributed(model.eval(), ATTACKS, Path(digits_dir), **SETTINGS)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_summary(result), default=str))
    finally:
        dist.destroy_process_group()


def test_two_rank_evaluation_equals_one_rank(erm_model, digits_dir, tmp_path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(erm_model.state_dict(), weights)
    mp.start_processes(_rank, args=(2, str(weights), str(digits_dir), str(tmp_path / "store"), str(tmp_path)),
                       nprocs=2, start_method="spawn", join=True)
    one = _summary(evaluate(erm_model.eval(), ATTACKS, digits_dir, **SETTINGS))
    two = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert two[0] == two[1], "every rank must return the same gathered result"
    assert json.loads(json.dumps(one, default=str)) == two[0]
    assert len(one["labels"]) == 96 and 0 < one["attacks"][0]["robust_acc"] < one["clean_acc"]
    assert any(b not in (None, "clean") for b in one["attacks"][0]["broken_by"]), "some points must be broken"


def test_a_two_rank_cell_evaluates_on_its_two_ranks_with_one_rank_results(tiny, monkeypatch) -> None:
    """The eval node of a trainer.world_size=2 cell (launcher=task) asks Ray for both ranks and
    runs the evaluation on 2 spawned ranks; its rows equal a 1-rank evaluation of the same model."""
    import harness.run.nodes as nodes
    from harness.core.config import compose_config, finalize
    from harness.run.cell import run_cell
    from harness.run.grid import node_options
    from harness.run.plan import build_plan
    from harness.store.rows import now

    cfg = finalize(compose_config(tiny + ["trainer.world_size=2", "trainer.batch_size=32", "eval.batch_size=16",
                                          "eval.neuron_sensitivity.enabled=false"]))
    eval_node = next(n for n in build_plan([cfg]) if n.kind == "eval")
    assert node_options(eval_node)["num_cpus"] == 2, "the eval node holds both ranks' CPUs (GPUs alike)"
    ranks_run = []

    def recording(fn, world_size, *args, **kwargs):
        ranks_run.append(world_size)
        return real(fn, world_size, *args, **kwargs)

    real = nodes.run_ranks
    monkeypatch.setattr(nodes, "run_ranks", recording)
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    assert ranks_run == [2]
    two_rows = pq.read_table(outcome.result_path).to_pylist()
    two_samples = pq.read_table(samples_path(cfg["results_dir"], cfg["key"])).to_pylist()
    cfg["trainer"]["world_size"] = 1  # the same trained model (same train key), now on one rank
    one_rows = nodes.evaluate_cell(cfg, now())
    assert ranks_run == [2], "one rank evaluates in this process"
    assert pq.read_table(samples_path(cfg["results_dir"], cfg["key"])).to_pylist() == two_samples
    keys = ("attack", "clean_acc", "robust_acc", "per_class_robust_acc", "n_eval", "flags")
    assert [{k: r[k] for k in keys} for r in two_rows] == [{k: r[k] for k in keys} for r in one_rows]
    assert 0 < two_rows[0]["robust_acc"] <= two_rows[0]["clean_acc"]

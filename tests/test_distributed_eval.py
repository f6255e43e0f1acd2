"""Evaluation split over 2 gloo ranks gives exactly the 1-rank evaluation (harness/eval/distributed.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.eval.distributed import evaluate_distributed
from harness.eval.evaluate import EvalResult, evaluate
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

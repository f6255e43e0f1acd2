"""An evaluation killed and retried commits the same rows: a retry is a fresh evaluation (nothing
is committed until the cell's rows are, atomically), and a fresh evaluation in another process
gives bitwise the same numbers: attacks seeded per batch from (seed, batch index), the same
batches, the analyses seeded from the cell (issue 27, item 2)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from harness.core.config import compose_config, finalize
from harness.run.cell import run_cell
from harness.run.nodes import evaluate_cell
from harness.store.results import read_cell_result
from harness.store.rows import now

# what a result says about the model; the rest is where, when and how long
COMPARED = ("clean_acc", "robust_acc", "per_class_clean_acc", "per_class_robust_acc", "flags", "flag_details",
            "n_eval", "checkpoint_sha256", "attack_config", "neuron_sensitivity", "neuron_sensitivity_layers",
            "asr", "backdoor_robust_acc", "per_class_asr", "poison_indices_sha256", "n_triggered")


def _evaluate_in_a_new_process(cfg: dict[str, Any], out: Any) -> None:
    out.put(evaluate_cell(cfg, now()))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("extra", [["method=pgd_at", "method.attack.steps=2"], ["method=erm", "backdoor=badnets"]],
                         ids=["pgd_at", "erm@badnets"])
def test_a_retried_evaluation_commits_the_same_rows(tiny: list[str], extra: list[str]) -> None:
    cfg = finalize(compose_config(tiny + ["trainer.epochs=1", "data.train_limit=128", "eval.neuron_sensitivity.limit=32",
                                          "eval.integrity_points=16", *extra]))
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    committed = read_cell_result(outcome.result_path).to_pylist()

    queue = mp.get_context("spawn").SimpleQueue()  # the retry: another process, as on another worker
    process = mp.get_context("spawn").Process(target=_evaluate_in_a_new_process, args=(cfg, queue))
    process.start()
    retried = queue.get()
    process.join()

    assert len(retried) == len(committed) == len(cfg["attack"])
    checked = [c for c in COMPARED if c in committed[0]]
    assert {"clean_acc", "robust_acc", "flags", "neuron_sensitivity"} <= set(checked)
    for first, again in zip(committed, retried):
        differ = [c for c in checked if not _same(first[c], again.get(c))]
        assert not differ, f"{first['attack']}: the retry differs in {differ}"

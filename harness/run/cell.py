"""`robustgrid run`: one cell's plan (its upstream trainings, artifacts, its own training and
evaluation) executed node by node in this process: the same nodes a grid runs on Ray."""
from __future__ import annotations

import time
from typing import Any, Callable

from harness.run.nodes import BUSY, CellOutcome, NodeOutcome, run_artifact_node, run_eval_node, run_train_node
from harness.run.plan import Plan, eval_node_id, pending_plan
from harness.store.results import result_path

BUSY_WAIT_S = 5.0
RUNNERS: dict[str, Callable[..., Any]] = {"train": run_train_node, "artifact": run_artifact_node,
                                         "eval": run_eval_node}


def run_plan_here(plan: Plan, on_done: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Execute every node in order (the plan's order is topological); returns outcomes by node id."""
    outcomes: dict[str, NodeOutcome | CellOutcome] = {}
    for node in plan:
        outcome = RUNNERS[node.kind](node, *(outcomes[i] for i in node.inputs))
        while outcome.status == BUSY:  # another process trains this key: wait for it (nothing else to do here)
            time.sleep(BUSY_WAIT_S)
            outcome = RUNNERS[node.kind](node, *(outcomes[i] for i in node.inputs))
        outcomes[node.id] = outcome
        if on_done is not None:
            on_done(outcome)
    return outcomes


def run_cell(cfg: dict[str, Any]) -> CellOutcome:
    """Run a finalized cell config (harness.core.config.finalize) here; an 'ok' cell already
    committed runs nothing, a trained model is only evaluated."""
    outcomes = run_plan_here(pending_plan([cfg]))
    outcome = outcomes.get(eval_node_id(cfg))
    if outcome is None:  # committed before: nothing ran
        return CellOutcome(cfg["key"], cfg.get("label", cfg["key"]), "ok", None,
                           str(result_path(cfg["results_dir"], cfg["key"])), 0.0)
    return outcome

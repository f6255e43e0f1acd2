"""Best-epoch selection on the validation split, never the test split: `trainer.select`.

    last             the last epoch's weights (default; no selection)
    best_val_robust  the probed epoch with the highest validation PGD-10 accuracy
    best_val_clean   the probed epoch with the highest validation clean accuracy

Ties go to the earliest such epoch. Whenever a probe beats every earlier one, rank 0 writes that
epoch's weights to `checkpoint_best.pt` (before the epoch's own checkpoint, and pushed to the store
with it: a resumed run finds it); the best so far is read off the curve, which the epoch checkpoint
holds, so nothing else needs saving. After the last epoch the selected weights are loaded on rank
0, broadcast to every rank and written as the final `checkpoint.pt`: what the evaluation loads.
The summary records the rule, the epoch and why (`selection`). This is what makes the official
TRADES / ADML / CausalAdv "best checkpoint" comparable without test-set leakage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.store.checkpoint_sync import BEST
from harness.store.checkpoints import load_checkpoint as load_file, save_checkpoint as save_file

RULES: dict[str, str | None] = {"last": None, "best_val_robust": "val_robust_acc", "best_val_clean": "val_clean_acc"}
_WHAT = {"val_robust_acc": "validation PGD-10 accuracy", "val_clean_acc": "validation clean accuracy"}


def select_rule(tcfg: dict[str, Any]) -> str:
    """`trainer.select`, checked against the known rules."""
    rule = str(tcfg.get("select", "last") or "last")
    if rule not in RULES:
        raise ValueError(f"trainer.select={rule!r} is not a selection rule; known: {', '.join(RULES)}")
    return rule


def check_select(tcfg: dict[str, Any], probing: bool, backdoor: bool) -> None:
    """A rule other than `last` needs the probes it selects on (before any work)."""
    rule = select_rule(tcfg)
    if rule == "last":
        return
    if not probing:
        raise ValueError(f"trainer.select={rule} selects on the validation probes, but trainer.validation holds "
                         f"out no images. Fix: trainer.validation.fraction=0.02 (or more), or trainer.select=last")
    if backdoor and RULES[rule] == "val_robust_acc":
        raise ValueError(f"trainer.select={rule}: a backdoor cell probes C-Acc and ASR, no robust accuracy. "
                         f"Fix: trainer.select=best_val_clean or trainer.select=last")


def best_probe(curve: list[dict[str, Any]], rule: str) -> dict[str, Any] | None:
    """The curve entry the rule selects (the earliest of equal bests); None for `last` or no probe."""
    metric = RULES[rule]
    if metric is None:
        return None
    scored = [e for e in curve if isinstance(e.get(metric), (int, float))]
    return max(scored, key=lambda e: e[metric]) if scored else None  # max keeps the first of ties


def improved(curve: list[dict[str, Any]], rule: str) -> bool:
    """Whether the curve's last entry is a probe that beats every earlier probe under `rule`."""
    metric = RULES[rule]
    if metric is None or not curve or not isinstance(curve[-1].get(metric), (int, float)):
        return False
    return best_probe(curve, rule) is curve[-1]


def save_best(work_dir: Path, epoch: int, module: nn.Module) -> None:
    """Rank 0: this epoch's weights as the best so far (atomic, weights only)."""
    save_file(work_dir / BEST, {"epoch": epoch, "model": module.state_dict()})


def selection(curve: list[dict[str, Any]], rule: str, epochs: int) -> dict[str, Any]:
    """{rule, epoch, metric, value, reason}: which epoch's weights are the model, and why."""
    best = best_probe(curve, rule)
    if best is None:
        return {"rule": rule, "epoch": epochs - 1, "metric": None, "value": None,
                "reason": "the last epoch's weights (trainer.select=last)"}
    metric = RULES[rule]
    assert metric is not None
    n_probes = sum(1 for e in curve if isinstance(e.get(metric), (int, float)))
    return {"rule": rule, "epoch": int(best["epoch"]), "metric": metric, "value": best[metric],
            "reason": f"{_WHAT[metric]} {best[metric]:.4f} at epoch {int(best['epoch'])}, the highest of "
                      f"{n_probes} probes (trainer.select={rule}; ties: the earliest)"}


def restore_selected(work_dir: Path, module: nn.Module, chosen: dict[str, Any], rank: int,
                     device: torch.device) -> bool:
    """Load the selected epoch's weights into `module` on every rank (rank 0 reads
    `checkpoint_best.pt`, then broadcasts); False when the last epoch is the selected one."""
    last = chosen["metric"] is None
    if not last and rank == 0:
        state = load_file(work_dir / BEST, map_location=device)
        if int(state["epoch"]) != int(chosen["epoch"]):
            raise RuntimeError(f"{work_dir / BEST} holds epoch {state['epoch']}, but the curve selects epoch "
                               f"{chosen['epoch']}: the best checkpoint is stale; delete the cell's checkpoint folder")
        module.load_state_dict(state["model"])
    if last:
        return False
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)
    return True

"""One plan: the selected cells as a DAG of train, eval and artifact nodes with declared inputs.

    train/<train key>    trains one model. Deduplicated: cells that differ only in eval settings,
                         and every cell that needs the same upstream checkpoint, share one node.
    eval/<cell key>      attacks + analyses on one trained model, then commits the cell's rows.
                         Inputs: its train node and the artifacts its analyses need.
    artifact/<key>       something analyses or a training need built first (ACE's DDPM, helper
                         classifiers, a class-conditional generator and the set it generates:
                         harness/generate/artifacts.py; a learned poison's clean surrogate and
                         trigger: harness/backdoor/artifacts.py). An artifact may need others (its inputs).

A method declares what it trains from through one hook, `Method.upstream` (methods/base.py):
ADML's base method, CBD's briefly trained backdoored model, FT/FP/NAD's poisoned ERM, ABL's
isolation and fine-tuned models. Each upstream is a train node of the same cell with another method (and trainer
overrides), an input of the dependent train node. Keys are computed here, once, from configs, so
an upstream that equals a grid's own cell (FT's ERM is the grid's ERM cell) is the same node.

Every node is submitted as its own Ray task with ObjectRef dependencies, its own resources and
retries (harness/run/grid.py); `robustgrid run` executes the same plan in this process
(harness/run/cell.py). Nothing trains inline inside another node, so the scheduler sees every
training and no task waits on a lock. `prune` drops what is already committed: adding an attack to
a finished grid leaves only eval nodes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from harness.core.config import cell_identity, cell_key, train_key
from harness.backdoor.artifacts import poison_artifacts
from harness.core.registry import METHODS
from harness.eval.stage import Artifact, analysis_artifacts
from harness.generate.artifacts import data_artifacts, generated_dir
from harness.store.checkpoint_sync import trained
from harness.store.storage import COMMITS, open_store
from methods.base import Upstream


@dataclass(frozen=True)
class UpstreamInput:
    """A checkpoint a train node starts from: `arg` of the method (None: trainer.init_from)."""

    arg: str | None
    cfg: dict[str, Any]  # the upstream train node's cell config (its results_dir and train_key)


@dataclass
class Node:
    id: str
    kind: str  # 'train' | 'eval' | 'artifact'
    label: str
    inputs: tuple[str, ...] = ()
    cfg: dict[str, Any] | None = None  # train: a cell config with the train key; eval: the cell
    upstream: tuple[UpstreamInput, ...] = ()  # train nodes only
    artifact: Artifact | None = None  # artifact nodes only


@dataclass
class Plan:
    nodes: dict[str, Node] = field(default_factory=dict)  # insertion order is a topological order

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def counts(self) -> dict[str, int]:
        return {kind: len(self.of_kind(kind)) for kind in ("train", "eval", "artifact")}


def train_node_id(cfg: dict[str, Any]) -> str:
    return f"train/{cfg['train_key']}"


def eval_node_id(cfg: dict[str, Any]) -> str:
    return f"eval/{cfg['key']}"


def build_plan(cells: list[dict[str, Any]]) -> Plan:
    """The DAG for finalized cell configs (harness.core.config.finalize)."""
    plan = Plan()
    for cfg in cells:
        inputs = [] if cfg.get("model") else [_add_train(plan, cfg)]  # model=...: trained elsewhere, no train node
        inputs += _add_artifacts(plan, cfg, poison_artifacts(cfg))[-1:]  # the triggered test set's trigger
        inputs += _add_artifacts(plan, cfg, analysis_artifacts(cfg))
        plan.add(Node(eval_node_id(cfg), "eval", cfg.get("label", cfg["key"]), tuple(inputs), cfg=cfg))
    return plan


def _add_artifacts(plan: Plan, cfg: dict[str, Any], artifacts: list[Artifact]) -> list[str]:
    """Artifact nodes (in dependency order: an artifact's inputs come before it in `artifacts` or
    are in the plan already), each built on the device of the first cell that needs it (a DDPM
    trains on a GPU cell's GPU); returns their ids."""
    ids = []
    for artifact in artifacts:
        inputs = tuple(f"artifact/{key}" for key in artifact.inputs)
        ids.append(plan.add(Node(f"artifact/{artifact.key}", "artifact", artifact.label, inputs, cfg=cfg,
                                 artifact=artifact)))
    return ids


def _add_train(plan: Plan, cfg: dict[str, Any]) -> str:
    node_id = train_node_id(cfg)
    if node_id in plan.nodes:
        return node_id
    upstream = tuple(UpstreamInput(up.arg, derive(cfg, up)) for up in method_upstream(cfg))
    # the data it trains on first (a generated set), then its upstream trainings
    data = _add_artifacts(plan, cfg, data_artifacts(cfg))[-1:]  # the last one is the set (it needs the others)
    data += _add_artifacts(plan, cfg, poison_artifacts(cfg))[-1:]  # a learned poison's trigger (it needs its surrogate)
    inputs = tuple(data) + tuple(_add_train(plan, u.cfg) for u in upstream)
    label = f"train {cfg.get('label', cfg['train_key'])}"
    return plan.add(Node(node_id, "train", label, inputs, cfg=cfg, upstream=upstream))


def method_upstream(cfg: dict[str, Any]) -> list[Upstream]:
    return METHODS.get(cfg["method"]["name"]).upstream(cfg["method"], cfg["trainer"])


def derive(cfg: dict[str, Any], up: Upstream) -> dict[str, Any]:
    """The upstream cell: this cell with the upstream's method and trainer overrides."""
    out = copy.deepcopy(cfg)
    out["method"] = copy.deepcopy(up.method)
    out["trainer"] = {**out["trainer"], **copy.deepcopy(up.trainer)}
    out["key"], out["train_key"], out["cell_id"] = cell_key(out), train_key(out), cell_identity(out)
    name = cfg["method"]["name"]
    label = cfg.get("label", "").replace(f"/{name}/", f"/{up.method['name']}/", 1)
    overrides = ",".join(f"{k}={v}" for k, v in sorted(up.trainer.items()) if not isinstance(v, dict))
    out["label"] = label + (f"[{overrides}]" if overrides else "")
    return out


def prune(plan: Plan, committed_ok: set[str], trained: set[str]) -> Plan:
    """The nodes still to run: eval nodes not committed 'ok', and the train and artifact nodes they
    need, where a train node whose model is already trained (`trained`: train node ids) is not run
    and its own upstream is not needed either."""
    needed: set[str] = set()
    todo = [n.id for n in plan.of_kind("eval") if n.cfg["key"] not in committed_ok]
    while todo:
        node_id = todo.pop()
        if node_id in needed:
            continue
        needed.add(node_id)
        if node_id not in trained:
            todo.extend(plan.nodes[node_id].inputs)
    kept = Plan()
    for node in plan:
        if node.id in needed and node.id not in trained:
            kept.add(Node(node.id, node.kind, node.label, tuple(i for i in node.inputs if i not in trained),
                          node.cfg, node.upstream, node.artifact))
    return kept


def committed_ok(cells: list[dict[str, Any]]) -> set[str]:
    """Keys of the cells whose result is committed 'ok' (one listing of each store's commit markers,
    then a verified read only of the cells listed there)."""
    out: set[str] = set()
    for location in {c["results_dir"] for c in cells}:
        store = open_store(location)
        listed = {name[: -len(".json")] for name in store.list(COMMITS) if name.endswith(".json")}
        out |= {c["key"] for c in cells if c["results_dir"] == location and c["key"] in listed
                and store.committed_status(c["key"]) == "ok"}
    return out


def pending_plan(cells: list[dict[str, Any]], done: set[str] | None = None) -> Plan:
    """The plan of `cells` less everything already done: what a grid or `run` executes.
    `done`: committed_ok(cells), when the caller has it already (each check reads a result file)."""
    plan = build_plan(cells)
    done = committed_ok(cells) if done is None else done
    if all(c["key"] in done for c in cells):
        return Plan()
    return prune(plan, done, {n.id for n in plan.of_kind("train") if trained(n.cfg)})


# ---------------------------------------------------------------------------------- run configs


def planned_trainer(cfg: dict[str, Any]) -> dict[str, Any]:
    """The trainer settings a cell's own training runs with: the cell's, with the method's
    `runtime_trainer` overrides (ADML's stage 2, FT's short fine-tuning)."""
    method = METHODS.get(cfg["method"]["name"])
    return {**cfg["trainer"], **method.runtime_trainer(cfg["method"], cfg["trainer"])}


def planned_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """The data settings a cell's own training runs with: the cell's, with the method's
    `runtime_data` overrides (ABL's stages: no augmentation, or Cutout)."""
    method = METHODS.get(cfg["method"]["name"])
    return {**cfg["data"], **method.runtime_data(cfg["method"], cfg["data"])}


def run_config(cfg: dict[str, Any], checkpoints: dict[str | None, str]) -> dict[str, Any]:
    """The config the trainer runs for a train node: its trainer and data settings, the upstream
    checkpoints (`checkpoints`: arg -> local path; None -> trainer.init_from), the train split for
    methods that read it, and the clean subset of post-training defenses (`method.clean_subset`)."""
    out = copy.deepcopy(cfg)
    out["trainer"] = planned_trainer(cfg)
    out["data"] = copy.deepcopy(planned_data(cfg))
    out["data"]["generated_dir"] = generated_dir(cfg)  # the generated set it mixes in (None: none)
    for arg, path in checkpoints.items():
        if arg is None:
            out["trainer"]["init_from"] = path
        else:
            out["method"][arg] = path
    if METHODS.get(cfg["method"]["name"]).needs_train_data:
        out["method"]["train_data"] = {"data": cfg["data"], "backdoor": cfg.get("backdoor"), "seed": cfg["seed"]}
    fraction = cfg["method"].get("clean_subset")
    if fraction is not None:
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"method.clean_subset must be in (0, 1], got {fraction}")
        from harness.data.loader import split_count

        n = split_count(Path(cfg["data"]["dir"]), "train", 0, 1, limit=cfg["data"].get("train_limit"))
        out["data"]["train_limit"] = max(1, math.ceil(float(fraction) * n))
        out["backdoor"] = {**(out.get("backdoor") or {"name": "none"}), "clean_train": True}
        # the defender's clean subset is the official recipe's whole data: none of it is held out
        # for validation (at 5% of digits a 2% split would be 1 image); docs/training_health.md
        out["trainer"]["validation"] = {"fraction": 0, "max": 0}
    return out

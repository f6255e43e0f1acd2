"""What each node of the plan does when it runs, in a Ray task or in this process.

    run_train_node(node, *upstream outcomes)  -> TrainOutcome   trains one model, once
    run_artifact_node(node, *input outcomes)  -> NodeOutcome    builds one artifact (a DDPM, a generated set)
    run_eval_node(node, *input outcomes)      -> CellOutcome    evaluates + commits one cell

A node's failure is its outcome, not an exception: a failed train node hands its error to the
eval nodes that need it, which commit a 'failed' row naming it, so a grid goes on. A killed
process (a DDP rank, a worker) is re-raised so that Ray retries the node (resources.max_retries);
the trainer resumes from its last epoch checkpoint.
"""
from __future__ import annotations

import json
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing import ProcessRaisedException

from harness.data.loader import split_count
from harness.data.shards import dataset_sha256, load_manifest
from harness.eval.distributed import evaluate_distributed
from harness.eval.evaluate import EvalResult
from harness.eval.external_model import load_external_model
from harness.eval.samples import load_survivors
from harness.eval.stage import EvalContext, cell_analyses
from harness.generate.artifacts import generated_dir
from harness.run.plan import Node, run_config
from harness.run.resources import cell_resources, worker_death_exceptions
from harness.run.status import RunningMarker, record_identity
from harness.store.checkpoint_sync import CHECKPOINT, SUMMARY, local_work_dir, pull, trained
from harness.store.lease import Lease
from harness.store.provenance import file_sha256
from harness.store.results import committed_status, result_path, write_cell_result
from harness.store.rows import base_row, failed_row, now
from harness.store.storage import open_store
from harness.eval.cost import StageClock, cost_columns
from harness.train.device import cell_device
from harness.train.ranks import run_ranks
from harness.train.trainer import TrainSummary, load_trained_classifier, train
from harness.run.health_columns import diverged_columns, health_columns

TRAIN_RUNS = "_train_runs"  # one small file per training actually run: who trained what, where


@dataclass
class NodeOutcome:
    node_id: str
    status: str  # 'ok' | 'failed'
    error: str | None = None
    seconds: float = 0.0


@dataclass
class TrainOutcome(NodeOutcome):
    summary: dict[str, Any] | None = None  # TrainSummary as a dict


@dataclass
class CellOutcome:
    key: str
    label: str
    status: str  # 'ok' | 'failed'
    error: str | None
    result_path: str
    seconds: float


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"


def _retry(err: BaseException, cfg: dict[str, Any]) -> bool:
    """A killed process, not the node's fault: re-raise so Ray retries it."""
    return isinstance(err, worker_death_exceptions()) and (cfg.get("resources") or {}).get("retry_worker_death", True)


def _attempt_owner() -> str | None:
    """Who runs this node, the same for each of Ray's retries of it: the Ray session and task id
    (task ids repeat across separate clusters, sessions do not). None outside a Ray task."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None  # the driver itself (nodes run in this process): nobody's retry
    task = context.get_task_id()
    return f"{context.get_session_name()}/{task}" if task else None


def _failed_inputs(inputs: tuple[NodeOutcome, ...]) -> str | None:
    bad = [o for o in inputs if isinstance(o, NodeOutcome) and o.status != "ok"]
    if not bad:
        return None
    first = (bad[0].error or "").strip().splitlines()
    return f"upstream node {bad[0].node_id} failed: {first[0] if first else 'unknown error'}"


# ------------------------------------------------------------------------------------------- train


BUSY = "busy"  # a train node's outcome when another process holds its train key's lease


def run_train_node(node: Node, *inputs: NodeOutcome) -> TrainOutcome:
    """Train the node's model into its checkpoint folder (resuming a partial one), once across
    every driver on the store: under the train key's lease (harness/store/lease.py). A node whose
    key another process is training returns `busy` (its driver tries again later); one whose model
    is already trained returns its summary without training."""
    cfg, t0 = node.cfg, time.perf_counter()
    upstream_error = _failed_inputs(inputs)
    if upstream_error:
        return TrainOutcome(node.id, "failed", upstream_error)
    lease = Lease(open_store(cfg["results_dir"]), f"train-{cfg['train_key']}", owner=_attempt_owner())
    try:
        if not lease.acquire():
            holder = lease.holder() or {}
            return TrainOutcome(node.id, BUSY, f"train key {cfg['train_key']} is being trained by pid "
                                f"{holder.get('pid')} on {holder.get('host')}", time.perf_counter() - t0)
        if trained(cfg):  # another driver finished it while this node waited
            return TrainOutcome(node.id, "ok", None, time.perf_counter() - t0, summary=trained_summary(cfg).__dict__)
        return _train_under_lease(node, cfg, t0)
    finally:
        lease.release()


def _train_under_lease(node: Node, cfg: dict[str, Any], t0: float) -> TrainOutcome:
    try:
        with RunningMarker(cfg["results_dir"], f"train-{cfg['train_key']}"):
            _log_train_run(cfg)
            if cell_resources(cfg).launcher == "ray_train":
                from harness.run.ray_train import train_with_ray_train

                train_with_ray_train(cfg, [(u.arg, u.cfg) for u in node.upstream])
                summary = trained_summary(cfg)
            else:
                checkpoints = {u.arg: str(fetch_checkpoint(u.cfg)) for u in node.upstream}
                summary = train(run_config(cfg, checkpoints), local_work_dir(cfg))
    except Exception as err:
        if _retry(err, cfg):
            raise
        return TrainOutcome(node.id, "failed", _error_text(err), time.perf_counter() - t0)
    return TrainOutcome(node.id, "ok", None, time.perf_counter() - t0, summary=summary.__dict__)


def fetch_checkpoint(cfg: dict[str, Any]) -> Path:
    """The local path of a trained cell's final checkpoint (pulled from the store if remote)."""
    return _pulled(cfg, CHECKPOINT, "trained checkpoint")


def _pulled(cfg: dict[str, Any], name: str, what: str) -> Path:
    """A file of a trained cell's folder, made local (pulled from the store when it is a URI)."""
    work_dir = local_work_dir(cfg)
    pull(cfg, work_dir)
    path = work_dir / name
    if not path.exists():
        raise FileNotFoundError(f"no {what} for train key {cfg['train_key']} at {path}: its train node has not "
                                f"run, or results_dir is not shared by the nodes (use a shared folder or a URI: "
                                f"s3://, gs://)")
    return path


def _log_train_run(cfg: dict[str, Any]) -> None:
    from harness.store.provenance import hostname

    stamp = now().strftime("%Y%m%dT%H%M%S")
    record = {"train_key": cfg["train_key"], "label": cfg.get("label"), "host": hostname(), "started_at": stamp}
    open_store(cfg["results_dir"]).write_bytes(f"{TRAIN_RUNS}/{cfg['train_key']}/{stamp}-{uuid.uuid4().hex[:8]}.json",
                                               json.dumps(record).encode(), durable=False)


def trained_summary(cfg: dict[str, Any]) -> TrainSummary:
    """The summary of a trained model (pulled with its checkpoint from the store if remote)."""
    return TrainSummary(**json.loads(_pulled(cfg, SUMMARY, "training summary").read_text()))


def _train_columns(cfg: dict[str, Any], summary: TrainSummary) -> dict[str, Any]:
    return {"n_train": summary.n_train, "epochs": summary.epochs, "world_size": summary.world_size,
            "replicas_in_sync": summary.replicas_in_sync, "train_seconds": summary.train_seconds,
            "images_per_second": summary.images_per_second, "final_train_loss": summary.final_train_loss,
            "train_curve": json.dumps(summary.curve), "method_summary": json.dumps(summary.method_summary),
            "checkpoint_sha256": file_sha256(local_work_dir(cfg) / CHECKPOINT), "device": summary.device,
            **health_columns(cfg, summary)}


# ---------------------------------------------------------------------------------------- artifact


def run_artifact_node(node: Node, *inputs: NodeOutcome) -> NodeOutcome:
    """Build (and cache) one artifact, after the artifacts it needs; whoever needs it finds it cached."""
    t0 = time.perf_counter()
    upstream_error = _failed_inputs(inputs)
    if upstream_error:
        return NodeOutcome(node.id, "failed", upstream_error)
    try:
        node.artifact.build(device=cell_device(node.cfg))
    except Exception as err:
        return NodeOutcome(node.id, "failed", _error_text(err), time.perf_counter() - t0)
    return NodeOutcome(node.id, "ok", None, time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------- eval


def run_eval_node(node: Node, *inputs: NodeOutcome) -> CellOutcome:
    """Evaluate the cell's trained model (clean, attacks, then each analysis) and commit its rows,
    under the cell's lease: a cell another driver is evaluating is `busy` (tried again later, when
    its committed result makes this node return at once)."""
    cfg, t0 = node.cfg, time.perf_counter()
    with Lease(open_store(cfg["results_dir"]), f"eval-{cfg['key']}", owner=_attempt_owner()) as lease:
        if not lease.acquire():
            return CellOutcome(cfg["key"], cfg.get("label", cfg["key"]), BUSY, None, "", time.perf_counter() - t0)
        if committed_status(cfg["results_dir"], cfg["key"]) == "ok":  # another driver committed it meanwhile
            return CellOutcome(cfg["key"], cfg.get("label", cfg["key"]), "ok", None,
                               str(result_path(cfg["results_dir"], cfg["key"])), time.perf_counter() - t0)
        return _evaluate_under_lease(cfg, t0, inputs)


def _evaluate_under_lease(cfg: dict[str, Any], t0: float, inputs: tuple[NodeOutcome, ...]) -> CellOutcome:
    started = now()
    with RunningMarker(cfg["results_dir"], cfg["key"]):
        try:
            upstream_error = _failed_inputs(inputs)
            if upstream_error:
                raise RuntimeError(upstream_error)
            rows = evaluate_cell(cfg, started)
            status, error = "ok", None
        except Exception as err:  # recorded, not raised: one broken cell must not stop a grid
            if _retry(err, cfg):
                raise
            status, error = "failed", _error_text(err)
            rows = [failed_row(cfg, error, started) | diverged_columns(error)]
        path = write_cell_result(cfg["results_dir"], cfg["key"], rows)
        record_identity(cfg["results_dir"], cfg.get("cell_id"), cfg["key"], status, cfg.get("code_version"))
    return CellOutcome(cfg["key"], cfg.get("label", cfg["key"]), status, error, str(path), time.perf_counter() - t0)


def evaluate_cell(cfg: dict[str, Any], started: Any) -> list[dict[str, Any]]:
    """The eval node's work: model -> clean + attacks -> every analysis -> rows. A cell of
    `trainer.world_size` W > 1 evaluates on its W ranks, as it trained: spawned here
    (launcher=task) or on Ray Train workers across the cluster (launcher=ray_train)."""
    res = cell_resources(cfg)
    if res.ranks == 1:  # this process, on the threads its task was given
        return evaluate_cell_rank(0, 1, cell_device(cfg), cfg, started)
    if res.launcher == "ray_train":  # on Ray Train workers, placed across the cluster like the training
        from harness.run.ray_train import run_on_ray_train

        return run_on_ray_train(cfg, evaluate_cell_rank, cfg, started)
    try:
        return run_ranks(evaluate_cell_rank, res.ranks, cfg, cfg, started)
    except ProcessRaisedException as err:  # a rank's own error: the cell's failure, its text kept
        raise RuntimeError(f"evaluation rank failed: {str(err).strip().splitlines()[-1]}\n{err}") from None


def evaluate_cell_rank(rank: int, world_size: int, device: torch.device, cfg: dict[str, Any],
                       started: Any) -> list[dict[str, Any]] | None:
    """One rank of the eval node: every rank attacks its slice of the test batches
    (harness/eval/distributed.py: results identical to one rank's); rank 0 then runs the
    analyses and builds the rows, which it returns (the other ranks return None)."""
    ecfg = cfg.get("eval") or {}
    data_dir = Path(cfg["data"]["dir"])
    survivors = None
    if ecfg.get("survivors_from"):
        n_eval = split_count(data_dir, "test", 0, 1, ecfg.get("limit"))
        survivors = load_survivors(cfg["results_dir"], str(ecfg["survivors_from"]), train_key=cfg.get("train_key"),
                                   n_eval=n_eval)
    clock = StageClock(device)  # eval seconds per stage, for the cost columns
    manifest = load_manifest(data_dir)
    with clock.stage("load"):
        if cfg.get("model"):  # a model trained elsewhere: evaluated only (harness/eval/external_model.py)
            model, model_info = load_external_model(
                cfg["model"], manifest["num_classes"], device, in_chans=manifest["channels"],
                img_size=int(cfg["data"].get("img_size") or manifest["image_size"][0]), results_dir=cfg["results_dir"])
            summary = None
        else:
            summary, model_info = trained_summary(cfg), None
            model = load_trained_classifier(cfg, local_work_dir(cfg), device)
    with clock.stage("attacks"):
        result = evaluate_distributed(
            model, list(cfg["attack"].values()), data_dir, num_classes=manifest["num_classes"],
            batch_size=int(ecfg.get("batch_size", 256)), img_size=cfg["data"].get("img_size"), limit=ecfg.get("limit"),
            device=device, seed=int(cfg["seed"]), survivors=survivors, integrity_points=0,
            precision=str(ecfg.get("precision", "fp32")), fold_bn=bool(ecfg.get("fold_bn", True)))
    if rank != 0:  # the analyses are rank 0's (they are not split over ranks yet)
        return None
    ctx = EvalContext(cfg, model, device, manifest, result)
    for analysis in cell_analyses(cfg):
        with clock.stage(analysis.label):
            analysis.run(ctx)
    if ctx.summaries:
        ctx.columns["analysis_json"] = json.dumps(ctx.summaries, sort_keys=True, default=str)
    cost = cost_columns(device=device, device_count=summary.world_size if summary else world_size,
                        train_seconds=summary.train_seconds if summary else 0.0, clock=clock,
                        flops_per_image=summary.flops_per_image if summary else None,
                        train_flops=summary.train_flops if summary else None,
                        cpu_threads=int(cfg["trainer"].get("threads_per_rank") or 1),
                        precision=summary.precision if summary else "fp32",
                        train_peak_memory=summary.peak_memory_bytes if summary else None)
    if summary is None:  # trained elsewhere: no training cost is known here
        cost["train_seconds"] = None
    return [row | ctx.columns | cost for row in cell_rows(cfg, summary, result, manifest, started, model_info)]


def cell_rows(cfg: dict[str, Any], summary: TrainSummary | None, result: EvalResult, manifest: dict[str, Any],
              started: Any, model_info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per eval attack: the cell's provenance, training summary and that attack's numbers
    (summary None and model_info for a model trained elsewhere: no train columns)."""
    train = _train_columns(cfg, summary) if summary is not None else {
        "checkpoint_sha256": model_info["checkpoint_sha256"], "model_id": model_info["model_id"]}
    if (cfg.get("data") or {}).get("generated") is not None:  # provenance: the generated set's key and place
        cfg = {**cfg, "data": {**cfg["data"], "generated_dir": generated_dir(cfg)}}
    base = base_row(cfg, started) | train | {
        "status": "ok",
        "clean_acc": result.clean_acc,
        "per_class_clean_acc": result.per_class_clean_acc,
        "class_names": manifest["class_names"],
        "n_eval": result.n_eval,
        "data_sha256": dataset_sha256(manifest),
    }
    resumed = {"survivors_from": str(cfg["eval"]["survivors_from"])} if (cfg.get("eval") or {}).get("survivors_from") else {}
    return [base | {
        "attack": r.attack.name,
        "norm": r.attack.norm,
        "eps": r.attack.eps,
        "attack_config": json.dumps(r.attack.describe() | resumed, sort_keys=True),
        "robust_acc": r.robust_acc,
        "flags": r.flags,
        "flag_details": json.dumps(r.flag_details, sort_keys=True),
        "per_class_robust_acc": r.per_class_robust_acc,
        "attack_seconds": r.seconds,
    } for r in result.attacks]

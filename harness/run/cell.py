"""One grid cell end to end: train (DDP) -> evaluate (clean + attacks) -> commit Parquet rows.

Any exception (a NaN loss, a bad setting found late, a crash in an attack) becomes one 'failed'
row with the error text, so a grid goes on and the failure is visible on the leaderboard.
"""
from __future__ import annotations

import datetime as dt
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.eval.analysis.runner import check_analyses, run_analyses
from harness.eval.backdoor_metrics import add_backdoor_metrics
from harness.store.checkpoint_sync import local_work_dir
from harness.data.loader import split_count
from harness.data.shards import dataset_sha256, load_manifest
from harness.eval.evaluate import EvalResult, evaluate
from harness.eval.external_model import load_external_model
from harness.eval.neuron_sensitivity import SensitivityResult, analyse_cell
from harness.run.prerequisites import train_in_place
from harness.store.provenance import file_sha256, git_commit, hardware, hostname, package_versions
from harness.run.resources import worker_death_exceptions
from harness.store.results import SCHEMA_VERSION, write_cell_result
from harness.eval.samples import load_survivors, samples_table, write_samples
from harness.run.stages import ensure_dependencies, train_config
from harness.train.trainer import CHECKPOINT, TrainSummary, load_trained_classifier, train


@dataclass
class CellOutcome:
    key: str
    label: str
    status: str  # 'ok' | 'failed'
    error: str | None
    result_path: str
    seconds: float


def checkpoint_dir(cfg: dict[str, Any]) -> Path:
    """Keyed by what is trained only: cells differing in eval attacks share the checkpoint.
    A node-local cache synced to the store when results_dir is a URI (harness.store.checkpoint_sync)."""
    return local_work_dir(cfg)


def run_cell(cfg: dict[str, Any], train_fn: Callable[[dict[str, Any], Path], TrainSummary] = train) -> CellOutcome:
    """Run a finalized cell config (see harness.core.config.finalize) and commit its result file.

    `train_fn` trains (or, for Ray Train, fetches what its workers trained). A killed DDP rank
    (resources.retry_worker_death) is re-raised so Ray retries the cell instead of failing it.
    """
    started, t0 = _now(), time.perf_counter()
    work_dir = checkpoint_dir(cfg)
    try:
        check_analyses(cfg)
        ecfg = cfg.get("eval", {})
        survivors = None
        if ecfg.get("survivors_from"):  # checked before any training or attack runs
            n_eval = split_count(Path(cfg["data"]["dir"]), "test", 0, 1, ecfg.get("limit"))
            survivors = load_survivors(cfg["results_dir"], str(ecfg["survivors_from"]),
                                       train_key=cfg.get("train_key"), n_eval=n_eval)
        manifest = load_manifest(Path(cfg["data"]["dir"]))
        model_info: dict[str, Any] = {}
        if cfg.get("model"):  # a model trained elsewhere: evaluated only (harness/eval/external_model.py)
            model, model_info = load_external_model(
                cfg["model"], manifest["num_classes"], in_chans=manifest["channels"], results_dir=cfg["results_dir"],
                img_size=int(cfg["data"].get("img_size") or manifest["image_size"][0]))
            summary = None
        else:
            ensure_dependencies(cfg)  # a two-stage cell (ADML) needs its base checkpoint first
            # method-declared prerequisites (CBD's f_B, FT/FP/NAD's backdoored ERM) are trained here,
            # and post-training defenses get their clean subset (harness/run/prerequisites.py)
            summary = train_in_place(train_config(cfg), work_dir, train_fn)
            model = load_trained_classifier(cfg, work_dir)
        result = evaluate(
            model, list(cfg["attack"].values()), Path(cfg["data"]["dir"]),
            num_classes=manifest["num_classes"], batch_size=int(ecfg.get("batch_size", 256)),
            img_size=cfg["data"].get("img_size"), limit=ecfg.get("limit"), seed=int(cfg["seed"]),
            survivors=survivors, integrity_points=int(ecfg.get("integrity_points", 64)),
        )
        write_samples(cfg["results_dir"], cfg["key"], samples_table(
            cfg["key"], cfg.get("train_key"), {r.attack.name: r.broken_by for r in result.attacks},
            result.labels, result.clean_ok))
        sensitivity = analyse_cell(cfg, model)
        analyses = run_analyses(cfg, model)
        rows = _ok_rows(cfg, summary, result, manifest, work_dir, started, sensitivity, model_info)
        rows = add_backdoor_metrics(cfg, model, rows, manifest["num_classes"])
        if analyses:
            rows = [r | {"analysis_json": json.dumps(analyses, sort_keys=True, default=str)} for r in rows]
        status, error = "ok", None
    except Exception as err:  # recorded, not raised: one broken cell must not stop a grid
        if isinstance(err, worker_death_exceptions()) and (cfg.get("resources") or {}).get("retry_worker_death", True):
            raise  # a killed process, not the cell's fault: Ray retries the cell
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
        rows = [_base_row(cfg, started) | {"status": "failed", "error": error}]
        status = "failed"
    path = write_cell_result(cfg["results_dir"], cfg["key"], rows)
    return CellOutcome(cfg["key"], cfg.get("label", cfg["key"]), status, error, str(path),
                       time.perf_counter() - t0)


def _ok_rows(cfg: dict[str, Any], summary: TrainSummary | None, result: EvalResult, manifest: dict[str, Any],
             work_dir: Path, started: dt.datetime, sensitivity: SensitivityResult | None = None,
             model_info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Result rows; summary None (and model_info) for a model trained elsewhere: no train columns."""
    train = _train_columns(summary, work_dir) if summary is not None else {
        "checkpoint_sha256": model_info["checkpoint_sha256"], "model_id": model_info["model_id"]}
    base = _base_row(cfg, started) | train | {
        "status": "ok",
        "clean_acc": result.clean_acc,
        "per_class_clean_acc": result.per_class_clean_acc,
        "class_names": manifest["class_names"],
        "n_eval": result.n_eval,
        "eval_seconds": result.seconds,
        "data_sha256": dataset_sha256(manifest),
        "neuron_sensitivity": sensitivity.value if sensitivity else None,
        "neuron_sensitivity_layers": sensitivity.layers_json() if sensitivity else None,
    }
    rows = []
    for attack_result in result.attacks:
        attack = attack_result.attack
        rows.append(base | {
            "attack": attack.name,
            "norm": attack.norm,
            "eps": attack.eps,
            "attack_config": json.dumps(attack.describe() | _resumed(cfg), sort_keys=True),
            "robust_acc": attack_result.robust_acc,
            "flags": attack_result.flags,
            "flag_details": json.dumps(attack_result.flag_details, sort_keys=True),
            "per_class_robust_acc": attack_result.per_class_robust_acc,
            "attack_seconds": attack_result.seconds,
        })
    return rows


def _train_columns(summary: TrainSummary, work_dir: Path) -> dict[str, Any]:
    return {"n_train": summary.n_train, "epochs": summary.epochs, "world_size": summary.world_size,
            "replicas_in_sync": summary.replicas_in_sync, "train_seconds": summary.train_seconds,
            "images_per_second": summary.images_per_second, "final_train_loss": summary.final_train_loss,
            "train_curve": json.dumps(summary.curve), "checkpoint_sha256": file_sha256(work_dir / CHECKPOINT),
            "device": summary.device}


def _resumed(cfg: dict[str, Any]) -> dict[str, Any]:
    """Robust accuracy resumed from survivors is that of both evaluations' attacks together."""
    source = (cfg.get("eval") or {}).get("survivors_from")
    return {"survivors_from": str(source)} if source else {}


def _base_row(cfg: dict[str, Any], started: dt.datetime) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "key": cfg["key"],
        "grid": (cfg.get("grid") or {}).get("name"),
        "dataset": cfg["data"]["name"],
        "arch": cfg["model"]["id"] if cfg.get("model") else cfg["arch"].get("model") or cfg["arch"]["name"],
        "method": "eval-only" if cfg.get("model") else cfg["method"]["name"],
        "source": "eval-only" if cfg.get("model") else "trained",  # eval-only: a model not trained here
        "seed": int(cfg["seed"]),
        "git_commit": git_commit(),
        "code_version": cfg.get("code_version"),
        "package_versions": package_versions(),
        "config_json": json.dumps(cfg, sort_keys=True),
        "hardware": hardware(),
        "hostname": hostname(),
        "started_at": started,
        "finished_at": _now(),
    }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

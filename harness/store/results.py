"""The results contract: an explicit pyarrow schema, atomic per-cell Parquet files, and readers.

One Parquet file per cell, `<results_dir>/<key>.parquet`, one row per (cell, eval attack).
A failed cell is one row with status 'failed', null metrics and the error text.
Metrics are floats with a fixed schema (never strings, never inferred), so an all-null column
can't drift the schema and the leaderboard never sorts numbers as text.

Commits go through harness.store.storage (any pyarrow filesystem URI): the file is moved into place,
then a commit marker with its sha256 is written; readers trust only verified, committed files,
so a reader never sees a half-written file and a cell is never counted twice.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from harness.store.storage import open_store, parquet_from_bytes

SCHEMA_VERSION = 1

RESULT_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("grid", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # 'ok' | 'failed'
        pa.field("error", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("arch", pa.string()),
        pa.field("method", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("attack", pa.string()),  # eval attack name; null on a failed cell
        pa.field("norm", pa.string()),  # 'linf' | 'l2'
        pa.field("eps", pa.float64()),
        pa.field("attack_config", pa.string()),  # JSON of the eval attack's settings
        pa.field("clean_acc", pa.float64()),
        pa.field("robust_acc", pa.float64()),
        pa.field("flags", pa.list_(pa.string())),  # integrity flags (evaluation untrustworthy if any)
        pa.field("per_class_clean_acc", pa.list_(pa.float64())),
        pa.field("per_class_robust_acc", pa.list_(pa.float64())),
        pa.field("class_names", pa.list_(pa.string())),
        pa.field("n_eval", pa.int64()),
        pa.field("n_train", pa.int64()),
        pa.field("epochs", pa.int32()),
        pa.field("world_size", pa.int32()),
        pa.field("replicas_in_sync", pa.bool_()),  # DDP ranks ended with bitwise-equal weights
        pa.field("train_seconds", pa.float64()),
        pa.field("eval_seconds", pa.float64()),
        pa.field("attack_seconds", pa.float64()),
        pa.field("images_per_second", pa.float64()),
        pa.field("final_train_loss", pa.float64()),
        pa.field("train_curve", pa.string()),  # JSON list of per-epoch {epoch, loss, lr, ...}
        pa.field("git_commit", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("package_versions", pa.map_(pa.string(), pa.string())),
        pa.field("config_json", pa.string()),  # the resolved cell config
        pa.field("data_sha256", pa.string()),
        pa.field("checkpoint_sha256", pa.string()),
        pa.field("device", pa.string()),
        pa.field("hardware", pa.string()),
        pa.field("hostname", pa.string()),
        pa.field("started_at", pa.timestamp("s", tz="UTC")),
        pa.field("finished_at", pa.timestamp("s", tz="UTC")),
        pa.field("neuron_sensitivity", pa.float64()),  # mean per-layer neuron sensitivity (harness/eval/neuron_sensitivity.py)
        pa.field("neuron_sensitivity_layers", pa.string()),  # JSON {layer: sensitivity}
        pa.field("flag_details", pa.string()),  # JSON {flag: evidence} (harness/eval/integrity.py)
        # backdoor track (harness/eval/backdoor_metrics.py): null on cells trained on clean data
        pa.field("backdoor", pa.string()),  # poisoning attack name
        pa.field("poison_rate", pa.float64()),
        pa.field("target_class", pa.int64()),
        pa.field("n_poisoned", pa.int64()),
        pa.field("poison_indices", pa.list_(pa.int64())),  # training-split indices that were poisoned
        pa.field("poison_indices_sha256", pa.string()),
        pa.field("asr", pa.float64()),  # attack success rate on triggered non-target test images
        pa.field("backdoor_robust_acc", pa.float64()),  # triggered non-target images -> true class
        pa.field("per_class_asr", pa.list_(pa.float64())),
        pa.field("n_triggered", pa.int64()),
        pa.field("backdoor_eval_seconds", pa.float64()),
        pa.field("analysis_json", pa.string()),  # JSON {label: summary} of post-eval analyses (ACE)
        pa.field("detectors_json", pa.string()),  # JSON {det_<name>_<quantity>: value} of the backdoor detectors
        pa.field("cell_id", pa.string()),  # the key without the code version (harness.core.config.cell_identity)
        # cost of the result (harness/eval/cost.py): what the robust accuracy was bought with
        pa.field("device_name", pa.string()),  # GPU product name, or the CPU model
        pa.field("device_count", pa.int32()),  # devices the cell trained on (DDP ranks)
        pa.field("eval_stage_seconds", pa.string()),  # JSON {stage: seconds}; eval_seconds is their sum
        pa.field("flops_per_image", pa.float64()),  # forward pass (FlopCounterMode)
        pa.field("train_flops", pa.float64()),  # FLOPs of training, train-time attacks included (estimated)
        pa.field("device_hours", pa.float64()),  # GPU-hours (CPU core-hours on a CPU), training + evaluation
        pa.field("peak_memory_bytes", pa.int64()),  # peak GPU memory allocated (peak RSS on a CPU)
        pa.field("mfu", pa.float64()),  # training's model FLOPs utilisation; null on a CPU
        pa.field("source", pa.string()),  # 'trained' here, or 'eval-only': a model trained elsewhere (robustgrid eval)
        pa.field("model_id", pa.string()),  # eval-only rows: timm:<name> | py:<module>:<fn> | robustgrid:<key>
        # training health (harness/train/probes.py, health.py, best_epoch.py): null where nothing was trained here
        pa.field("train_flags", pa.list_(pa.string())),  # training-integrity flags (ranked last, as `flags`)
        pa.field("train_flag_details", pa.string()),  # JSON {flag: evidence, with the epoch it fired at}
        pa.field("validation_n", pa.int64()),  # images held out of training for the probes (0: none)
        pa.field("validation_sha256", pa.string()),  # hash of the held-out samples' keys
        pa.field("selection", pa.string()),  # trainer.select: last | best_val_robust | best_val_clean
        pa.field("selected_epoch", pa.int32()),  # whose weights were evaluated
        pa.field("selection_reason", pa.string()),
        pa.field("val_clean_acc", pa.float64()),  # the validation probe at the selected epoch
        pa.field("val_robust_acc", pa.float64()),  # PGD-10 at data.eps (clean cells)
        pa.field("val_asr", pa.float64()),  # triggered validation copy (backdoor cells)
        pa.field("method_summary", pa.string()),  # JSON of Method.summary(): what the method decided (pruned, flagged)
    ]
)

COLUMNS = RESULT_SCHEMA.names


def result_path(results_dir: str | os.PathLike, key: str) -> Path | str:
    """Where a cell's committed file lives: a local Path, or a URI string for a remote store."""
    store = open_store(results_dir)
    return Path(store.uri(f"{key}.parquet")) if store.is_local else store.uri(f"{key}.parquet")


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Build a table in RESULT_SCHEMA; unknown keys are an error, missing keys are null."""
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(COLUMNS)
        if extra:
            raise ValueError(f"result row has columns not in RESULT_SCHEMA: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    for row_index, version in enumerate(columns["schema_version"]):
        if version is None:
            columns["schema_version"][row_index] = SCHEMA_VERSION
    if columns["package_versions"]:
        columns["package_versions"] = [
            list(v.items()) if isinstance(v, dict) else v for v in columns["package_versions"]
        ]
    return pa.table(columns, schema=RESULT_SCHEMA)


def write_cell_result(results_dir: str | os.PathLike, key: str, rows: list[dict[str, Any]]) -> Path | str:
    """Commit a cell's rows atomically with a checksummed commit marker (harness.store.storage).

    Returns where the committed file is; if an 'ok' result of the key was already committed,
    that one is kept (first ok commit wins) and its location is returned.
    """
    store = open_store(results_dir)
    path = store.commit_table(key, rows_to_table(rows)).path
    return Path(path) if store.is_local else path


def read_cell_result(path: str | os.PathLike) -> pa.Table | None:
    """Read one committed cell file by path; None if it is missing, uncommitted, corrupt or not ours."""
    text = str(path)
    folder, _, name = text.rpartition("/") if "://" in text else (str(Path(text).parent), "", Path(text).name)
    if not name.endswith(".parquet"):
        return None
    table = open_store(folder).read_table(name[: -len(".parquet")])
    if table is None or "key" not in table.column_names or "status" not in table.column_names:
        return None
    return table


def committed_status(results_dir: str | os.PathLike, key: str) -> str | None:
    """'ok' / 'failed' for a committed, checksum-verified cell; None if nothing trustworthy is committed."""
    return open_store(results_dir).committed_status(key)


def conform(table: pa.Table) -> pa.Table | str:
    """The table cast to RESULT_SCHEMA (absent columns null), or why it is not a result file."""
    if "key" not in table.column_names or "status" not in table.column_names:
        return "has no key/status columns: not a result file"
    have = set(table.column_names)  # the table is built once: appending a column at a time rebuilt it per column
    fields = [table.schema.field(name) if name in have else RESULT_SCHEMA.field(name) for name in COLUMNS]
    columns = [table.column(name) if name in have else pa.nulls(table.num_rows, RESULT_SCHEMA.field(name).type)
               for name in COLUMNS]
    try:
        return pa.Table.from_arrays(columns, schema=pa.schema(fields)).cast(RESULT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        return f"does not fit the result schema ({err})"


def result_status(results_dir: str | os.PathLike, key: str) -> str | None:
    """'ok' / 'failed' of a cell as the leaderboard reads it: committed, checksum-verified, a result
    file (RESULT_SCHEMA) whose rows are this key's; None otherwise (a forged marker over a foreign
    file counts as nothing)."""
    found = open_store(results_dir).verified(key)  # one read of the marker and of the file
    if found is None:
        return None
    try:
        conformed = conform(parquet_from_bytes(found[1]))
    except (OSError, pa.ArrowException):
        return None
    if isinstance(conformed, str) or set(conformed.column("key").to_pylist()) != {key}:
        return None
    return found[0].status

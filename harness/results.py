"""The results contract: an explicit pyarrow schema, atomic per-cell Parquet files, and readers.

One Parquet file per cell, `<results_dir>/<key>.parquet`, one row per (cell, eval attack).
A failed cell is one row with status 'failed', null metrics and the error text.
Metrics are floats with a fixed schema (never strings, never inferred), so an all-null column
can't drift the schema and the leaderboard never sorts numbers as text.

Writes go to a temp file in the same folder and are renamed into place (atomic on POSIX and on
object stores that pyarrow writes whole), so a reader never sees a half-written file.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

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
        pa.field("analysis_json", pa.string()),  # JSON {label: summary} of post-eval analyses (ACE)
    ]
)

COLUMNS = RESULT_SCHEMA.names


def result_path(results_dir: str | os.PathLike, key: str) -> Path:
    return Path(results_dir) / f"{key}.parquet"


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


def write_cell_result(results_dir: str | os.PathLike, key: str, rows: list[dict[str, Any]]) -> Path:
    """Commit a cell's rows atomically: temp file in the same folder, fsync, rename."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    table = rows_to_table(rows)
    final = result_path(results_dir, key)
    tmp = results_dir / f".tmp-{key}-{uuid.uuid4().hex}.parquet"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def read_cell_result(path: str | os.PathLike) -> pa.Table | None:
    """Read one committed cell file; None if it is missing, unreadable or not ours."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if "key" not in table.column_names or "status" not in table.column_names:
        return None
    return table


def committed_status(results_dir: str | os.PathLike, key: str) -> str | None:
    """'ok' / 'failed' for a committed cell, None if nothing trustworthy is committed."""
    table = read_cell_result(result_path(results_dir, key))
    if table is None or table.num_rows == 0:
        return None
    statuses = set(table.column("status").to_pylist())
    return "ok" if statuses == {"ok"} else "failed"


def read_results(results_dir: str | os.PathLike) -> pa.Table:
    """All committed rows under a folder, cast to RESULT_SCHEMA; foreign files are skipped."""
    tables = []
    for path in sorted(Path(results_dir).glob("*.parquet")):
        if path.name.startswith("."):
            continue  # an in-flight temp file
        table = read_cell_result(path)
        if table is None:
            continue
        missing = [n for n in COLUMNS if n not in table.column_names]
        for name in missing:
            table = table.append_column(
                RESULT_SCHEMA.field(name), pa.nulls(table.num_rows, RESULT_SCHEMA.field(name).type)
            )
        try:
            tables.append(table.select(COLUMNS).cast(RESULT_SCHEMA))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            continue
    if not tables:
        return RESULT_SCHEMA.empty_table()
    return pa.concat_tables(tables)

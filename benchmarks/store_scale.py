"""Store, status and site at scale: `status`, `leaderboard`, `report` and `compare` over N committed cells.

    python benchmarks/store_scale.py --source DIR --cells 1000,10000 [--s3-cells 1000] [--work /tmp/store_scale]

`--source` is a results store holding real cells (e.g. `robustgrid grid grid=demo results_dir=DIR`).
Its cells' rows are re-keyed into N synthetic cells (seed 0-9, then one architecture variant per
ten cells of each source cell, so a setting holds N/10 leaderboard rows) and committed through the
real commit path (harness.store.results.write_cell_result, marker last), each with the attempt
file a grid writes, into a local store and, with --s3-cells, into a bucket of moto's S3 server on
127.0.0.1 (a counting proxy in front of it numbers the requests each command makes).

Each command runs as its own process, as a user runs it (imports included), twice: cold (no read
index: every commit is read from its own files and indexed) and warm (the index of the first run;
nothing new committed). `compare` compares the store with itself (its second read is warm). Printed per command: wall seconds, peak RSS, seconds and bytes per cell,
S3 requests by kind (LIST / GET / HEAD / PUT / COPY / DELETE / MULTIPART). A last line is JSON of it all.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.store.index import INDEX, read_results  # noqa: E402
from harness.store.results import write_cell_result  # noqa: E402
from harness.store.storage import open_store  # noqa: E402

SEEDS = 10
# a command as its own process; prints its peak RSS (KiB) last, on stderr
RUNNER = ("import resource, sys\nfrom harness.cli import main\nrc = main(sys.argv[1:])\n"
          "print(f'PEAK_RSS_KIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
          "sys.exit(rc)\n")


def source_cells(source: str) -> list[list[dict]]:
    """The source store's committed cells, each as its list of rows."""
    by_key: dict[str, list[dict]] = {}
    for row in read_results(source).to_pylist():
        by_key.setdefault(row["key"], []).append(row)
    if not by_key:
        raise SystemExit(f"no committed cells in {source}: run `robustgrid grid grid=demo results_dir={source}` first")
    return [by_key[k] for k in sorted(by_key)]


def synthetic_rows(cells: list[list[dict]], i: int) -> tuple[str, list[dict]]:
    """Cell i: a source cell's rows under a new key, seed and architecture variant."""
    template = cells[i % len(cells)]
    seed, variant = (i // len(cells)) % SEEDS, i // (len(cells) * SEEDS)
    key = hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()[:24]
    rows = []
    for row in template:
        rows.append({**row, "key": key, "cell_id": f"id-{key}", "seed": seed, "arch": f"{row['arch']}-v{variant}"})
    return key, rows


def fill(location: str, cells: list[list[dict]], n: int, threads: int) -> float:
    """Commit cells 0..n-1 (those not committed yet) with an attempt file each; returns seconds."""
    store = open_store(location)
    have = {name[: -len(".json")] for name in store.list("_commits")}

    def commit(i: int) -> None:
        key, rows = synthetic_rows(cells, i)
        if key in have:
            return
        store.write_bytes(f"_attempts/{key}/20261207T000000.000000Z-{i:012x}.json",
                          json.dumps({"key": key}).encode(), durable=False)
        write_cell_result(location, key, rows)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(commit, range(n)))
    return time.perf_counter() - start


def drop_index(location: str) -> None:
    store = open_store(location)
    for name in store.list(INDEX):
        store.delete(f"{INDEX}/{name}")


class CountingS3:
    """moto's S3 server behind a counting WSGI wrapper, on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
        app = DomainDispatcherApplication(create_backend_app)
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

        def counting(environ, start_response):
            with self.lock:
                self.counts[self.kind(environ)] += 1
            return app(environ, start_response)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = make_server("127.0.0.1", self.port, counting, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                          allow_bucket_creation=True).create_dir("bench")

    @staticmethod
    def kind(environ: dict) -> str:
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        if method == "GET" and ("list-type" in query or "prefix=" in query or "delimiter" in query):
            return "LIST"
        if method == "PUT" and environ.get("HTTP_X_AMZ_COPY_SOURCE"):
            return "COPY"
        if method == "POST" and "delete" in query:
            return "DELETE"
        if method == "POST":
            return "MULTIPART"  # create / complete a multipart upload (pyarrow's output streams)
        return method

    def uri(self, prefix: str) -> str:
        return f"s3://bench/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def take(self) -> dict[str, int]:
        with self.lock:
            out, self.counts = dict(self.counts), Counter()
        return out


def run_command(argv: list[str]) -> dict:
    """One command as its own process: wall seconds, peak RSS (MiB), exit code."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KIB=")]
    if done.returncode not in (0, 1) or not peak:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_mib": round(int(peak[-1].split("=")[1]) / 1024, 1)}


def commands(location: str, out: Path) -> dict[str, list[str]]:
    return {"status": ["status", "--results", location],
            "leaderboard": ["leaderboard", "--results", location, "--out", str(out / "site")],
            "report": ["report", "--results", location, "--out", str(out / "report.md")],
            "compare": ["compare", location, location]}


def site_size(site: Path) -> tuple[int, float]:
    files = [p for p in site.rglob("*") if p.is_file()]
    return len(files), round(sum(p.stat().st_size for p in files) / 2**20, 1)


def measure(label: str, location: str, n: int, out: Path, s3: CountingS3 | None) -> list[dict]:
    """Each command cold (its store's read index dropped first) then warm (the index it wrote)."""
    results = []
    for name, argv in commands(location, out).items():
        drop_index(location)
        for phase in ("cold", "warm"):
            if s3:
                s3.take()
            row = {"store": label, "cells": n, "command": name, "phase": phase, **run_command(argv)}
            row["ms_per_cell"] = round(1000 * row["seconds"] / n, 3)
            if s3:
                row["requests"] = s3.take()
            if name == "leaderboard":
                row["site_files"], row["site_mib"] = site_size(out / "site")
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="a results store with real cells (grid=demo)")
    parser.add_argument("--cells", default="1000,10000", help="local store sizes, comma-separated")
    parser.add_argument("--s3-cells", default="", help="moto S3 store sizes, comma-separated (empty: none)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/store_scale"))
    parser.add_argument("--threads", type=int, default=8, help="threads committing the synthetic cells")
    args = parser.parse_args()
    cells = source_cells(args.source)
    print(f"source: {len(cells)} cells, {sum(len(c) for c in cells)} rows; uptime: {os.getloadavg()}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(v) for v in args.cells.split(",") if v]:
        location = str(args.work / f"local-{n}")
        took = fill(location, cells, n, args.threads)
        print(f"local store of {n} cells committed in {took:.1f} s ({1000 * took / n:.2f} ms/cell)", flush=True)
        out = args.work / f"out-local-{n}"
        shutil.rmtree(out, ignore_errors=True)
        results += measure("local", location, n, out, None)
    s3_sizes = [int(v) for v in args.s3_cells.split(",") if v]
    if s3_sizes:
        s3 = CountingS3()
        for n in s3_sizes:
            location = s3.uri(f"store-{n}")
            took = fill(location, cells, n, args.threads)  # moto loses writes under many more
            print(f"moto S3 store of {n} cells committed in {took:.1f} s; requests: {s3.take()}", flush=True)
            out = args.work / f"out-s3-{n}"
            shutil.rmtree(out, ignore_errors=True)
            results += measure("s3", location, n, out, s3)
    print(json.dumps({"uptime": os.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()

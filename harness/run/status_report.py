"""`robustgrid status`: a grid's (or a store's) cells by state, printed from the results store alone."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from harness.core.locations import is_uri
from harness.data.location import DataLocation
from harness.run.status import FRESH_SECONDS, grid_status
from harness.store.audit import warn_about_store
from harness.store.index import read_committed


def status_command(cells: list[dict[str, Any]] | None, results: str | None, show_keys: bool) -> int:
    """`robustgrid status`: print counts (and with show_keys, each cell) for the cells a grid's own
    arguments select (`cells`: the same overrides, -m sweeps included, as `robustgrid grid`), or
    for every cell a store holds (`cells` None, `results` given)."""
    from rich.console import Console
    from rich.table import Table

    labels: dict[str, str] = {}
    identities: dict[str, str] = {}
    train_keys: dict[str, str] = {}
    keys: list[str] | None = None
    if cells:
        labels = {c["key"]: c["label"] for c in cells}
        identities = {c["key"]: c["cell_id"] for c in cells}
        train_keys = {c["key"]: c["train_key"] for c in cells}
        keys = list(labels)
        locations = sorted({c["results_dir"] for c in cells})
        if results is None and len(locations) > 1:
            raise ValueError(f"this grid writes to several results stores {locations}; pass --results")
        location = results or locations[0]
    elif results is not None:
        location = results
    else:
        raise ValueError("say which cells: the arguments the grid was started with (`robustgrid status grid=<name> "
                         "[overrides]`, `robustgrid status -m method=erm,pgd_at seed=0,1`) or `--results DIR|URI`")
    check_store_reachable(location)  # a wrong bucket or endpoint fails here, naming it, in seconds
    # one pass over the store (harness.store.index); with a grid given, its cells only
    committed = read_committed(location, columns=(), only=keys)
    warn_about_store(location, committed.listing.top, committed.listing.commit_files, committed.commits,
                     only=None if keys is None else set(keys))  # foreign / unverifiable files, each named
    status = grid_status(location, keys, identities, train_keys, committed)
    out = Console()
    table = Table("state", "cells", title=f"{location}" + ("" if keys is not None else " (no grid given: pending unknown)"))
    for state, count in status.counts().items():
        if state == "pending" and not status.grid_known:
            continue
        table.add_row(state, str(count))
    out.print(table)
    retried = {k: n for k, n in status.attempts.items() if n > 1}
    if status.stale:
        out.print(f"{len(status.stale)} cells have results from older code only (kept; the next grid run recomputes them)")
    if retried:
        out.print(f"{len(retried)} cells needed more than one attempt (worker/node/driver died)")
    if status.stale_running:
        dead = len(status.dead_driver)
        out.print(f"{len(status.stale_running)} cells were running in a process that stopped (no heartbeat for "
                  f"{FRESH_SECONDS:.0f} s): {dead} left by a driver that is gone (rerun the grid to finish them), "
                  f"{len(status.stale_running) - dead} under a live driver (Ray retries them)")
    if show_keys:
        for state in ("done", "failed", "running", "stale_running", "stale", "pending"):
            for key in getattr(status, state):
                note = " (its driver is gone)" if key in status.dead_driver else ""
                out.print(f"{state.replace('_', '-'):13} {key} {labels.get(key, '')} "
                          f"attempts={status.attempts.get(key, 0)}{note}")
    return 0


def check_store_reachable(location: str) -> None:
    """ValueError naming the store and the reason when an object store cannot be reached or its
    bucket does not exist (read with short timeouts and bounded retries: seconds, not the SDK's
    minute of retries). A store that exists but holds nothing yet is fine: its cells are pending."""
    if not is_uri(location) or location.startswith("file://"):
        return
    loc = DataLocation(location)
    bucket = loc.root.split("/", 1)[0]
    try:
        info = loc.fs.get_file_info(bucket)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"cannot read the results store {location}: {str(err).strip().splitlines()[0]}. Check "
                         f"the endpoint (?endpoint_override=HOST:PORT&scheme=http for an S3-compatible server) "
                         f"and the credentials") from None
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"the results store {location} does not exist: no bucket '{bucket}' at its endpoint. Fix "
                         f"results_dir (or --results) to the bucket the grid wrote to")

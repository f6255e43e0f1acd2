"""Build the static leaderboard site from a results folder.

Layout (all links relative, so any static host or a file:// URL works):
    index.html                 every setting's ranking (compact) and every failed cell, each key linked
    settings/<track>-....html  one per setting: full sortable table, per-attack columns, plots
    cells/<key>.html           one per cell (failed ones too): rows, reproduce command, provenance, config, curves
    methods/<id>.html          one per method: its paper and its rows in every setting
    flagged.html               every flagged row with the evidence per cell
    ace.html                   ACE counterfactual gallery (only when some cell has an ACE analysis)
    data.json                  one record per leaderboard row: pd.read_json("data.json")
    site.json, data.csv        everything nested (summary, tables, failed, problems); long-form CSV
Each file is written atomically (temp + rename); pages of cells/settings that no longer exist
are removed after the new ones are in place. Nothing in one row stops the build: a page or figure
that cannot be drawn is replaced or left out and listed on the index with its reason. A rebuild
into the same folder renders only the cell pages whose inputs changed (leaderboard.incremental).
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

from harness.store.index import read_store
from harness.store.storage import local_path
from leaderboard.ace_gallery import ACE_PAGE, collect
from leaderboard.aggregate import aggregate
from leaderboard.exports import to_csv, to_json, to_records
from leaderboard.format import method_file
from leaderboard.incremental import MANIFEST, PageManifest, page_hash
from leaderboard.pages import Renderer, table_heading

PAGE_DIRS = ("cells", "settings", "methods")
BACKDOOR_PAGE = "backdoor.html"  # the attack x defense matrix (leaderboard/backdoor_matrix.py)


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename, so a served site never shows a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _prune(out_dir: Path, written: set[Path]) -> None:
    """Remove stale pages (cells/settings no longer in the results) from an earlier build."""
    for sub in PAGE_DIRS:
        for page in (out_dir / sub).glob("*.html"):
            if page not in written:
                page.unlink()


def build_site(results_dir: str | Path, out_dir: str | Path) -> Path:
    """Read results (a local folder or any store URI), aggregate, write all pages + data.json +
    data.csv; return index.html's path."""
    local = local_path(results_dir)
    if local is not None and not local.is_dir():
        raise FileNotFoundError(f"results folder not found: {local}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = read_store(results_dir)
    board = aggregate(found.table)
    generated_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    render = Renderer(board, generated_at, local, out_dir)  # artifact links only into a local folder
    explained = collect(board.cells, results_dir)
    explained_keys = frozenset(e.key for e in explained)
    render.env.globals["ace_keys"] = explained_keys

    written: set[Path] = set()
    pages = PageManifest.load(out_dir)
    for cell in board.cells.values():
        path = out_dir / cell.page
        artifacts = render.artifacts(cell)
        table = render.table_of_key.get(cell.key)
        commit = found.commits.get(cell.key)  # its sha256 names the cell's rows exactly (no need to hash them)
        digest = page_hash(commit.sha256 if commit else cell.rows, table and [table["page"], table_heading(table)],
                           cell.key in explained_keys, artifacts)
        kept = pages.unchanged(cell.page, digest)
        written.add(path)
        if kept is not None:  # nothing it shows changed: leaderboard.incremental
            render.problems.extend(kept)
            pages.record(cell.page, digest, kept)
            continue
        before = len(render.problems)
        try:
            page = render.cell(cell, artifacts)
        except Exception as err:  # one undrawable cell never stops the build
            reason = f"{type(err).__name__}: {err}"
            render.problems.append({"subject": cell.key, "what": "cell page", "reason": reason})
            page = render.cell_fallback(cell, reason)
        _write_atomic(path, page)
        pages.record(cell.page, digest, render.problems[before:])
    for table in board.tables:
        path = out_dir / table["page"]
        _write_atomic(path, render.setting(table))
        written.add(path)
    for name in render.method_names():
        path = out_dir / method_file(name)
        _write_atomic(path, render.method(name))
        written.add(path)
    _write_atomic(out_dir / "flagged.html", render.flagged())
    _write_atomic(out_dir / "data.json", to_records(board))
    _write_atomic(out_dir / "data.csv", to_csv(board))
    if board.backdoor_tables:
        _write_atomic(out_dir / BACKDOOR_PAGE, render.backdoor_matrix())
    elif (out_dir / BACKDOOR_PAGE).exists():
        (out_dir / BACKDOOR_PAGE).unlink()
    if explained:
        _write_atomic(out_dir / ACE_PAGE, render.ace(explained))
    elif (out_dir / ACE_PAGE).exists():
        (out_dir / ACE_PAGE).unlink()
    index = out_dir / "index.html"
    _write_atomic(index, render.index())
    _write_atomic(out_dir / "site.json", to_json(board, generated_at, render.problems))
    _prune(out_dir, written)
    _write_atomic(out_dir / MANIFEST, pages.text())  # last: a page is recorded only once written
    return index

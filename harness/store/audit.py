"""Name every file in a results store that is not ours or cannot be verified, instead of skipping it silently.

Readers trust only committed, checksum-verified `<key>.parquet` files (harness.store.storage) and
skip everything else. Skipping is right, silence is not: a foreign file, a stray or damaged commit
marker, or a result file no marker vouches for each get one warning naming the file, so a user
who copied results in by hand, or finds a store tampered with, learns what was ignored and why.
The audit reads the listing and the small marker files only (no result bytes), and a reader that
has just verified the commits (harness.store.index) passes them in, so their markers are not read twice.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from typing import TextIO

import pyarrow.fs as pafs

from harness.store.storage import COMMITS, STAGING, Commit, open_store

# folders the harness itself writes into a results store
OWN_FOLDERS = {COMMITS, STAGING, "_running", "_attempts", "_drivers", "_cells", "_train_runs", "_ray_train",
               "_leases", "_index", "checkpoints", "artifacts", "samples", "analysis"}


def audit_store(location: str | os.PathLike, top: dict[str, pafs.FileInfo] | None = None,
                commits: dict[str, pafs.FileInfo] | None = None, known: dict[str, Commit] | None = None,
                only: set[str] | None = None) -> list[str]:
    """One message per foreign or unverifiable entry of the store's top level and `_commits/`.
    A reader that has just listed the store and verified commits passes its listing (`top`, and
    `commits` by file name) and the commits it verified (`known`, by key), which are not read again.
    `only`: a grid's keys; other cells' markers (another grid in the same store) are not read."""
    store = open_store(location)
    top = store.entries() if top is None else top
    messages: list[str] = []
    vouched: set[str] = set()
    commits = store.entries(COMMITS) if commits is None else commits
    known = known or {}
    for name, info in sorted(commits.items()):
        if info.type != pafs.FileType.File:
            continue
        key = name[: -len(".json")]
        if name.endswith(".json") and key in known:  # verified by the caller: its file exists and matches
            vouched.add(known[key].file)
            continue
        if name.endswith(".json") and only is not None and key not in only:
            vouched.add(f"{key}.parquet")  # another grid's cell: not ours to read or to question
            continue
        where = store.uri(COMMITS, name)
        if not name.endswith(".json"):
            messages.append(f"stray file {where} in the commit markers: ignored")
            continue
        commit, why = _parse_marker(store.read_bytes(f"{COMMITS}/{name}"), key)
        if commit is None:
            messages.append(f"stray commit marker {where} ({why}): ignored, not a cell")
            continue
        target = top.get(commit.file) if "/" not in commit.file else None
        if target is None or target.type != pafs.FileType.File:
            messages.append(f"commit marker {where} names {commit.file}, which is missing: the cell counts as "
                            f"not done and reruns")
        elif target.size != commit.size:
            messages.append(f"{store.uri(commit.file)} does not match its commit marker ({target.size} bytes, "
                            f"marker says {commit.size}): ignored; the cell counts as not done and reruns")
        vouched.add(commit.file)  # named above if it does not match; not again as unverified
    for name, info in sorted(top.items()):
        if name in vouched:
            continue
        where = store.uri(name)
        if info.type == pafs.FileType.Directory:
            if name not in OWN_FOLDERS and not name.startswith("."):
                messages.append(f"foreign folder {where} in the results store: ignored")
        elif name.endswith(".parquet"):
            if name not in vouched:
                messages.append(f"unverified result file {where}: no commit marker vouches for it, so it is "
                                f"ignored (copy results with their _commits/ markers)")
        elif not name.startswith("."):
            messages.append(f"foreign file {where} in the results store: ignored")
    messages += [f"leftover rank rendezvous folder {store.uri(rel)} of a killed training: harmless, removed by the "
                 f"cell's next run (or delete it)" for rel in leftover_rendezvous(store)]
    return messages


RANKS_PREFIX = "rg-ranks-"  # harness/train/ranks.py: rg-ranks-<host>-<pid>-<random>


def rendezvous_owner(name: str) -> tuple[str, int | None]:
    """(host, pid) a rank rendezvous folder's name records; ("", None) for an unnamed (old) one."""
    host, _, pid = name[len(RANKS_PREFIX):].rpartition("-")[0].rpartition("-")
    return host, int(pid) if pid.isdigit() else None


def owner_alive(name: str) -> bool:
    """Whether a rendezvous folder may still be in use: its process lives on this host, or it
    belongs to another host (whose processes this one cannot see)."""
    host, pid = rendezvous_owner(name)
    if host and host != socket.gethostname():
        return True
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_rendezvous(store) -> list[str]:
    """`checkpoints/<train key>/rg-ranks-*` folders: a killed training's process-group rendezvous
    (harness/train/ranks.py). They live only in a local store (a URI store's checkpoint folders
    are node-local caches), found with one walk of `checkpoints/`."""
    if not store.is_local:
        return []
    selector = pafs.FileSelector(store.path("checkpoints"), allow_not_found=True, recursive=True)
    try:
        infos = store.fs.get_file_info(selector)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return []
    root = store.path("")
    found = (info.path[len(root):].lstrip("/") for info in infos if info.type == pafs.FileType.Directory
             and info.base_name.startswith(RANKS_PREFIX) and not owner_alive(info.base_name))
    return sorted(rel for rel in found if rel.count("/") == 2)  # checkpoints/<train key>/rg-ranks-*


def warn_about_store(location: str | os.PathLike, top: dict[str, pafs.FileInfo] | None = None,
                     commits: dict[str, pafs.FileInfo] | None = None, known: dict[str, Commit] | None = None,
                     only: set[str] | None = None, out: TextIO | None = None) -> int:
    """Print each audit message (audit_store, same arguments) as a warning on stderr; returns how
    many there were."""
    messages = audit_store(location, top, commits, known, only)
    for message in messages:
        print(f"warning: {message}", file=out or sys.stderr)
    return len(messages)


def _parse_marker(raw: bytes | None, key: str) -> tuple[Commit | None, str]:
    if raw is None:
        return None, "unreadable"
    try:
        commit = Commit(**json.loads(raw))
    except (ValueError, TypeError) as err:
        return None, f"not a commit marker: {type(err).__name__}"
    if commit.key != key:
        return None, f"it is for key {commit.key!r}, not {key!r}"
    return commit, ""

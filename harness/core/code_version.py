"""The version of the code that computes a cell: a hash of robustgrid's own source files, not git.

A cell key (harness/core/config.py) includes it, so a fix to the code that computes a result
gives the cells it touches new keys: re-running a grid recomputes them, while results of the old
code stay in the store (shown as stale by `robustgrid status`). Two parts:

* the shared code every cell runs: the `.py` files of harness/{core,data,attacks,backdoor,train,
  eval}, harness/run/plan.py (what a cell's training is derived from) and architectures/, plus
  methods/base.py (the contract);
* the cell's method: the source files of its plugin class and of every `methods.*` module that
  file imports (ADML's base method too, through `method.base`), and an external plugin's own file.

So a change to CBD's file makes CBD's cells stale and leaves ERM's alone; a change to the trainer
makes every cell stale. Orchestration (grid, status, the CLI) and the leaderboard never do.
Hashes are of file bytes, cached per process (a few ms for the whole tree).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding harness/, methods/, architectures/
_SHARED = ("harness/core", "harness/data", "harness/attacks", "harness/backdoor", "harness/train",
           "harness/eval", "architectures")
_SHARED_FILES = ("harness/run/plan.py", "methods/base.py", "methods/__init__.py")


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(_ROOT) if f.is_relative_to(_ROOT) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def shared_code_hash() -> str:
    """Hash of the code every cell runs (see the module docstring)."""
    files = [f for d in _SHARED for f in (_ROOT / d).rglob("*.py") if "__pycache__" not in f.parts]
    return _digest(files + [_ROOT / f for f in _SHARED_FILES if (_ROOT / f).exists()])


@functools.lru_cache(maxsize=256)
def _module_closure(path: Path) -> frozenset[Path]:
    """`path` and the methods/*.py files it imports, transitively."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        f = todo.pop()
        if f in seen or not f.exists():
            continue
        seen.add(f)
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                if name.startswith("methods.") and name != "methods.base":
                    todo.append(_ROOT / (name.replace(".", "/") + ".py"))
    return frozenset(seen)


def method_code_hash(method_cfg: dict[str, Any]) -> str:
    """Hash of the source of the method a cell trains with (and its base method's, for ADML)."""
    names = []
    cfg: dict[str, Any] | None = method_cfg
    while cfg:
        names.append(cfg["name"])
        cfg = cfg.get("base") if isinstance(cfg.get("base"), dict) else None
    return _methods_hash(tuple(names))


@functools.lru_cache(maxsize=1024)
def _methods_hash(names: tuple[str, ...]) -> str:
    from harness.core.registry import METHODS

    files: set[Path] = set()
    for name in names:
        source = inspect.getsourcefile(METHODS.get(name))
        if source:
            files |= _module_closure(Path(source).resolve())
    return _digest(list(files))


def clear_cache() -> None:
    """Forget the hashes (a long-lived process whose plugin files were edited)."""
    for cached in (shared_code_hash, _module_closure, _methods_hash):
        cached.cache_clear()


def code_version(method_cfg: dict[str, Any]) -> str:
    """What a cell key hashes for the code: the shared hash and the method's."""
    return f"{shared_code_hash()}-{method_code_hash(method_cfg)}"

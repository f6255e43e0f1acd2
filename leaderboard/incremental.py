"""Render a cell page only when what it shows changed since the last build into the same folder.

A 10,000-cell site is 10,000 cell pages; a grid that adds 100 cells should not re-render the other
9,900. Each cell page's inputs are hashed (the cell's committed rows, named by their commit's
sha256; the setting it links back to; whether it has an ACE gallery entry; its artifact links;
and the version of the code that renders it: the leaderboard's modules and templates and the configs its reproduce command is
composed from); `.pages.json` in the site folder records each page's hash and the problems its
rendering reported, written last. A page whose hash is unchanged and whose file is still there is
kept as it is (its problems reported again); anything else is rendered. Deleting `.pages.json`
re-renders everything.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = ".pages.json"
_LEADERBOARD = Path(__file__).resolve().parent
_CONFIGS = _LEADERBOARD.parent / "configs"


@functools.lru_cache(maxsize=1)
def render_version() -> str:
    """A hash of the files a cell page is rendered from (leaderboard code, templates, configs)."""
    digest = hashlib.sha256()
    for root, pattern in ((_LEADERBOARD, "*.py"), (_LEADERBOARD / "templates", "*"), (_CONFIGS, "*.yaml")):
        for path in sorted(root.rglob(pattern)):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def page_hash(*inputs: Any) -> str:
    text = json.dumps([render_version(), *inputs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PageManifest:
    """The last build's page hashes (read) and this build's (`text`, written after the pages)."""

    out_dir: Path
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, out_dir: Path) -> "PageManifest":
        try:
            previous = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
            previous = previous if isinstance(previous, dict) else {}
        except (OSError, ValueError):
            previous = {}
        return cls(out_dir, previous)

    def unchanged(self, page: str, digest: str) -> list[dict[str, str]] | None:
        """The problems recorded with the page when it can be kept as it is; None to render it."""
        old = self.previous.get(page)
        if not isinstance(old, dict) or old.get("hash") != digest or not (self.out_dir / page).is_file():
            return None
        problems = old.get("problems")
        return problems if isinstance(problems, list) else None

    def record(self, page: str, digest: str, problems: list[dict[str, str]]) -> None:
        """A page of this build (kept or rendered) with its hash and its rendering's problems."""
        self.current[page] = {"hash": digest, "problems": problems}

    def text(self) -> str:
        return json.dumps(self.current, sort_keys=True)

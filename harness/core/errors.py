"""User-facing error types, in a module with no heavy imports so the CLI can catch them cheaply."""
from __future__ import annotations

import difflib
from typing import Iterable


class DataError(RuntimeError):
    """A dataset on disk is missing, incomplete or corrupt; the message names the file and fix."""


def did_you_mean(word: str, known: Iterable[str], prefix: str = "", n: int = 1) -> str:
    """" Did you mean <prefix><closest>?" for the known words closest to `word` ("" when none is)."""
    close = difflib.get_close_matches(word, sorted(known), n=n, cutoff=0.6)
    return f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""

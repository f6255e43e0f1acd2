"""Where things live, as text: a local path or a URI any pyarrow.fs opens (s3://, gs://, file://)."""
from __future__ import annotations

import os
from pathlib import Path


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def normalize_location(location: str | os.PathLike) -> str:
    """A local path becomes absolute (workers may start elsewhere); URIs are kept as given."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())

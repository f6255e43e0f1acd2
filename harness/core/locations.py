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


def child(location: str | os.PathLike, *names: str) -> str:
    """`location/name/...` for a local path or a URI, a URI's query string kept at the end
    (s3://b/data?endpoint_override=h:9000 -> s3://b/data/digits?endpoint_override=h:9000)."""
    if not is_uri(location):
        return str(Path(location, *names))
    head, sep, query = str(location).partition("?")
    return "/".join([head.rstrip("/"), *(n.strip("/") for n in names)]) + sep + query


def parent(location: str | os.PathLike) -> str:
    """The folder holding `location` (a URI keeps its query string)."""
    if not is_uri(location):
        return str(Path(location).parent)
    head, sep, query = str(location).partition("?")
    return head.rstrip("/").rsplit("/", 1)[0] + sep + query


def basename(location: str | os.PathLike) -> str:
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]

"""User-facing error types, in a module with no heavy imports so the CLI can catch them cheaply."""
from __future__ import annotations


class DataError(RuntimeError):
    """A dataset on disk is missing, incomplete or corrupt; the message names the file and fix."""

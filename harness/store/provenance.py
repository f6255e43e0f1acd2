"""Provenance stamped on every result row: code version, packages, hardware, host."""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

_PACKAGES = ("robustgrid", "torch", "torchvision", "timm", "ray", "numpy", "pyarrow",
             "webdataset", "hydra-core", "omegaconf", "duckdb")


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the robustgrid checkout (with '+dirty' for uncommitted changes), or 'unknown'."""
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["torch"] = torch.__version__  # with its local tag (+cpu, +cu130): the build matters
    return out


def hardware() -> str:
    cpu = f"{platform.machine()} x{os.cpu_count()}"
    if torch.cuda.is_available():
        return f"{cpu}; {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"{cpu}; no GPU"


def hostname() -> str:
    return socket.gethostname()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

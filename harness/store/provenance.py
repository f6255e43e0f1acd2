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
    """robustgrid's own commit: HEAD (+dirty) when the package runs from a robustgrid checkout,
    else `source:<hash of the package's source files>` (installed from a wheel, or vendored
    inside a user's repository, whose HEAD says nothing about this code)."""
    src = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=src, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if top and Path(top).resolve() == src and (src / "harness" / "core").is_dir():
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "harness",
                                    "methods", "architectures", "leaderboard", "configs"], cwd=src,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"source:{source_hash()}"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 (first 16 hex) of every .py/.yaml/.j2 file of the robustgrid packages."""
    src = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for pkg in ("harness", "methods", "architectures", "leaderboard", "configs"):
        for f in sorted((src / pkg).rglob("*")):
            if f.suffix in (".py", ".yaml", ".j2") and "__pycache__" not in f.parts:
                digest.update(str(f.relative_to(src)).encode())
                digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


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

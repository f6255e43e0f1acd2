"""Save and load checkpoints without ever running code from the file.

Checkpoints travel through shared stores (s3://, NFS): anyone who can write there could plant a
pickle whose `__reduce__` runs a command on every node that loads it. So every load goes through
`torch.load(weights_only=True)`, whose unpickler builds only tensors and plain containers (dict,
list, tuple, str, int, float, bool, None) and refuses any other class before constructing it.
What we save is kept to that vocabulary too: model/optimizer state dicts, the CPU RNG state as a
uint8 tensor, and plain numbers/lists, so a saved file always loads back under the same rules.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from harness.core.errors import DataError
from harness.store.storage import out_of_space


class UnsafeCheckpointError(DataError):
    """A checkpoint holds something other than tensors and plain containers; it was not loaded."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at `path` as a dict, loaded with the weights-only unpickler (never runs code).

    Raises UnsafeCheckpointError naming the file and what it tried to build when the file holds
    pickled objects (code), and DataError when it is not a checkpoint at all.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _first_reason(str(err))
        raise UnsafeCheckpointError(
            f"refused to load checkpoint {path}: it holds pickled objects beyond tensors and plain "
            f"containers, which could run code ({reason}). Nothing from it was executed. If you did not "
            f"write it, someone else did: delete it so the cell retrains, and check who can write "
            f"to that store") from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DataError(f"checkpoint {path} is not a readable torch checkpoint ({_first_reason(str(err))}); "
                        f"delete it so the cell retrains") from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"refused checkpoint {path}: expected a dict of state, got "
                                    f"{type(state).__name__}; delete it so the cell retrains")
    return state


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` atomically (temp file + rename), so a crash never leaves half a checkpoint; a
    failed write leaves no temp file, and a full disk is named with the bytes it needed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise out_of_space(err, str(path), _state_bytes(state), tmp) or err
    os.replace(tmp, path)


def _state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about what its checkpoint needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _first_reason(message: str) -> str:
    """The informative line of torch's long weights-only error (e.g. 'Unsupported global: GLOBAL os.system')."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "GLOBAL" in line or "global" in line:
            return line
    return lines[0] if lines else "unreadable"

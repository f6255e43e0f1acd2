"""Models trained elsewhere, evaluated without training: `robustgrid eval model=<id> ...`.

A model id names where the module comes from:
- `timm:<name>`: `timm.create_model(name, pretrained=False, num_classes=...)` (nothing is
  downloaded); with `model.checkpoint=<path>` its state_dict is loaded from a .pt/.pth file
  (`torch.load(weights_only=True)`: tensors only, pickled code is refused) or a .safetensors file.
- `py:<module>:<function>`: `function(**model.kwargs)` returns an nn.Module that takes [0,1]
  images and returns logits; `model.checkpoint` is optional here too.
- `robustgrid:<cell key>`: a cell of this results store, its trained checkpoint found through its
  committed result row (the classifier's weights; methods that wrap it are refused, see below).

`model.mean` / `model.std` (per channel) go inside the wrapper (architectures.Classifier), so the
attacks see [0,1] images; without them the model gets the images as they are. `module.`
prefixes (a state_dict saved from DataParallel/DDP) are stripped. Before any attack the module is
put in eval mode and checked on a probe batch: its output must have the dataset's class count,
and be logits, not probabilities. Every problem is an ExternalModelError naming the fix.
"""
from __future__ import annotations

import importlib
import json
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from architectures.classifier import Classifier
from harness.eval.integrity import check_probabilities
from harness.store.provenance import file_sha256

KINDS = ("timm", "py", "robustgrid")
SOURCE = "eval-only"  # the `source` column of the rows of a model not trained here
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
_SHOWN_KEYS = 5  # missing/unexpected keys listed in a mismatch error


class ExternalModelError(ValueError):
    """A model to evaluate cannot be loaded or does not fit the contract; the message says why."""


class ExternalClassifier(Classifier):
    """Classifier around a module built elsewhere: hooks fall back to the module's children
    when it has no timm `feature_info` (the neuron-sensitivity analysis needs some layers)."""

    def layer_names(self) -> list[str]:
        return super().layer_names() or [f"body.{name}" for name, _ in self.body.named_children()]


def parse_model_id(model_id: str) -> tuple[str, str]:
    """('timm'|'py'|'robustgrid', target) from `timm:resnet18`, `py:pkg.mod:fn`, `robustgrid:<key>`."""
    kind, sep, target = str(model_id).partition(":")
    if not sep or kind not in KINDS or not target:
        raise ExternalModelError(
            f"model={model_id!r} is not a model id. Fix: model=timm:<timm name> (with "
            f"model.checkpoint=<.pt|.pth|.safetensors>), model=py:<module>:<function>, or "
            f"model=robustgrid:<cell key>")
    if kind == "py" and target.count(":") != 1:
        raise ExternalModelError(f"model={model_id!r}: write py:<module>:<function>, e.g. py:my_pkg.models:build")
    return kind, target


def check_model_spec(model_cfg: dict[str, Any]) -> None:
    """The checks that need no weights loaded (for planning a grid): the id, the timm name or
    the py function, the checkpoint's path and format."""
    kind, target = parse_model_id(model_cfg.get("id"))
    if kind == "timm":
        _check_timm_name(target)
    elif kind == "py":
        _import_function(target)
    checkpoint = model_cfg.get("checkpoint")
    if checkpoint:
        _checkpoint_path(checkpoint)


def load_external_model(model_cfg: dict[str, Any], num_classes: int, device: torch.device | str = "cpu", *,
                        in_chans: int = 3, img_size: int = 32,
                        results_dir: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`: [0,1] images in, logits out; info for the result rows).

    `model_cfg`: {id, checkpoint, mean, std, kwargs, small_input}. Raises ExternalModelError
    before any attack on every problem the module docstring lists."""
    kind, target = parse_model_id(model_cfg.get("id"))
    kwargs = dict(model_cfg.get("kwargs") or {})
    checkpoint = model_cfg.get("checkpoint")
    sha = None
    if kind == "robustgrid":
        return _load_robustgrid_cell(target, model_cfg, num_classes, device, in_chans, img_size, results_dir)
    if kind == "timm":
        _check_timm_name(target)
        import timm

        body = timm.create_model(target, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    else:
        body = _import_function(target)(**kwargs)
        if not isinstance(body, nn.Module):
            raise ExternalModelError(f"model={model_cfg['id']}: the function returned {type(body).__name__}, "
                                     f"not a torch.nn.Module. Fix: return the model (taking [0,1] images, "
                                     f"returning logits)")
    if checkpoint:
        path = _checkpoint_path(checkpoint)
        load_weights(body, read_state_dict(path), str(path))
        sha = file_sha256(path)
        planned = model_cfg.get("checkpoint_sha256")  # set by finalize: the cell key holds it
        if planned and planned != sha:
            raise ExternalModelError(f"model.checkpoint={path} changed after the cell was planned (sha256 "
                                     f"{sha[:12]}, planned {planned[:12]}); plan the grid again")
    elif kind == "timm":
        raise ExternalModelError(f"model={model_cfg['id']} needs its weights: model.checkpoint=<path to a "
                                 f".pt/.pth/.safetensors state_dict> (timm models are never downloaded)")
    model = wrap(body, model_cfg.get("mean"), model_cfg.get("std"), in_chans)
    model.to(device).eval()
    check_outputs(model, num_classes, in_chans, img_size, device, str(model_cfg["id"]))
    info = {"model_id": str(model_cfg["id"]), "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": sha, "source": SOURCE}
    return model, info


def wrap(body: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None, in_chans: int) -> Classifier:
    """Normalisation inside the model: (x - mean) / std before `body` (identity without them)."""
    if (mean is None) != (std is None):
        raise ExternalModelError("give both model.mean and model.std (per channel), or neither")
    mean = [0.0] * in_chans if mean is None else [float(m) for m in mean]
    std = [1.0] * in_chans if std is None else [float(s) for s in std]
    if len(mean) != in_chans or len(std) != in_chans or any(s <= 0 for s in std):
        raise ExternalModelError(f"model.mean/model.std need {in_chans} values (one per channel; std > 0), "
                                 f"got mean={mean} std={std}")
    return ExternalClassifier(body, mean=mean, std=std)


# ------------------------------------------------------------------------------------------------
# Weights: safe reading, DDP prefixes, key matching
# ------------------------------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pt/.pth file; a {'state_dict': ...} or {'model': ...}
    wrapper is unwrapped. A file holding pickled objects other than tensors is refused."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ExternalModelError(f"model.checkpoint={path}: not a readable safetensors file ({err})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ExternalModelError(
                f"model.checkpoint={path} refused: it holds pickled Python objects, not only tensors, "
                f"and loading them could run code from the file ({str(err).splitlines()[0]}). Fix: save "
                f"model.state_dict() (torch.save(model.state_dict(), path)) or a .safetensors file") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ExternalModelError(f"model.checkpoint={path}: not a readable torch file ({err})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExternalModelError(f"model.checkpoint={path} is not a state_dict (a dict of name -> tensor). "
                                 f"Fix: save model.state_dict()")
    return {_strip_prefix(k): v for k, v in state.items()}


def _strip_prefix(key: str) -> str:
    """'module.' prefixes of a model saved from DataParallel/DDP (possibly nested)."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load; a mismatch lists the first missing and unexpected keys (and shapes)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ExternalModelError(
            f"model.checkpoint={where} does not match the architecture: {len(missing)} missing keys "
            f"(first: {missing[:_SHOWN_KEYS]}), {len(unexpected)} unexpected keys (first: "
            f"{unexpected[:_SHOWN_KEYS]}). Fix: the model id (timm name, kwargs) must build the network "
            f"the state_dict was saved from")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ExternalModelError(f"model.checkpoint={where}: tensor shapes differ from the architecture "
                                 f"(file vs model; first: {wrong[:_SHOWN_KEYS]}). Fix: the same architecture "
                                 f"and number of classes as the checkpoint")
    module.load_state_dict(state, strict=True)


def _checkpoint_path(checkpoint: str) -> Path:
    path = Path(str(checkpoint)).expanduser()
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ExternalModelError(f"model.checkpoint={checkpoint}: use a {'/'.join(WEIGHT_SUFFIXES)} state_dict")
    if not path.is_file():
        raise ExternalModelError(f"model.checkpoint={checkpoint}: no such file")
    return path.resolve()


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------

def _check_timm_name(name: str) -> None:
    import timm

    if name not in timm.list_models():
        raise ExternalModelError(f"model=timm:{name}: unknown timm model. Fix: a name from timm.list_models(), "
                                 f"e.g. timm:resnet18")


def _import_function(target: str):
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as err:  # a script-style module that exits when imported: never the harness's exit
        raise ExternalModelError(f"model=py:{target}: importing {module_name!r} called sys.exit({err.code!r}). "
                                 f"Fix: move the module's script code under `if __name__ == \"__main__\":`") from None
    except Exception as err:  # ImportError, or any error the module raises while importing
        raise ExternalModelError(f"model=py:{target}: cannot import {module_name!r} ({type(err).__name__}: "
                                 f"{err}). Fix: make it importable on every node that runs cells (PYTHONPATH or pip install)") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ExternalModelError(f"model=py:{target}: {module_name} has no function {function!r}")
    return fn


def _load_robustgrid_cell(key: str, model_cfg: dict[str, Any], num_classes: int, device: torch.device | str,
                          in_chans: int, img_size: int, results_dir: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier a committed cell trained: its config from the result row, its checkpoint
    from the cell's work folder (sha256 checked against the row)."""
    from architectures.presets import build_classifier
    from harness.store.checkpoint_sync import CHECKPOINT, local_work_dir
    from harness.store.results import read_cell_result, result_path

    if results_dir is None:
        raise ExternalModelError("model=robustgrid:<key> needs results_dir (the store holding the cell)")
    table = read_cell_result(result_path(results_dir, key))
    rows = [r for r in (table.to_pylist() if table is not None else []) if r["status"] == "ok"]
    if not rows:
        raise ExternalModelError(f"model=robustgrid:{key}: no committed 'ok' cell {key} in {results_dir}")
    cell_cfg = json.loads(rows[0]["config_json"])
    path = local_work_dir(cell_cfg) / CHECKPOINT
    if not path.is_file():
        raise ExternalModelError(f"model=robustgrid:{key}: its checkpoint {path} is not on this node")
    sha = file_sha256(path)
    if rows[0].get("checkpoint_sha256") and sha != rows[0]["checkpoint_sha256"]:
        raise ExternalModelError(f"model=robustgrid:{key}: {path} changed since the cell was evaluated "
                                 f"(sha256 {sha[:12]} vs {rows[0]['checkpoint_sha256'][:12]})")
    manifest_mean, manifest_std = model_cfg.get("mean"), model_cfg.get("std")
    classifier = build_classifier(cell_cfg["arch"], num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                                  mean=manifest_mean or [0.0] * in_chans, std=manifest_std or [1.0] * in_chans)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except pickle.UnpicklingError as err:
        raise ExternalModelError(f"model=robustgrid:{key}: {path} holds more than tensors ({err})") from None
    if any(not k.startswith(("body.", "mean", "std")) for k in saved):
        raise ExternalModelError(f"model=robustgrid:{key}: method {cell_cfg['method']['name']} wraps the "
                                 f"classifier; re-evaluate it with `robustgrid run` on its config plus "
                                 f"attack=[...] (its train key reuses the checkpoint)")
    load_weights(classifier, {k: v for k, v in saved.items()}, str(path))
    classifier.to(device).eval()
    check_outputs(classifier, num_classes, in_chans, img_size, device, f"robustgrid:{key}")
    return classifier, {"model_id": f"robustgrid:{key}", "checkpoint": str(path), "checkpoint_sha256": sha,
                        "source": SOURCE}


# ------------------------------------------------------------------------------------------------
# The contract, checked before any attack
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def check_outputs(model: nn.Module, num_classes: int, in_chans: int, img_size: int,
                  device: torch.device | str, model_id: str) -> None:
    """Output shape (batch, num_classes) and logits (not probabilities) on a [0,1] probe batch."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand((4, in_chans, img_size, img_size), generator=gen).to(device)
    try:
        out = model(probe)
    except Exception as err:
        raise ExternalModelError(f"model={model_id} fails on a ({in_chans}, {img_size}, {img_size}) [0,1] "
                                 f"image batch: {type(err).__name__}: {err}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExternalModelError(f"model={model_id} returns {shape} for 4 images; the dataset has "
                                 f"{num_classes} classes, so (4, {num_classes}) logits are needed. Fix: "
                                 f"the model's num_classes / head")
    found = check_probabilities(model, probe)
    if found is not None:
        raise ExternalModelError(f"model={model_id} returns probabilities, not logits (rows in [0,1] summing "
                                 f"to 1; the integrity flag outputs_are_probabilities): attack losses saturate "
                                 f"on them. Fix: return the logits (drop the final softmax)")

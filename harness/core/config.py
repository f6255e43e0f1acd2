"""Config composition (Hydra compose API) and the cell key.

Configs are Hydra groups under the `configs` package: data, arch, method, attack, trainer, grid.
We compose with `initialize_config_module` (version_base 1.3: no working-dir change) and turn
the result into plain Python containers at once, so no DictConfig leaks into torch or Ray.

Plugin names are checked before any work: an override naming an unknown method, architecture,
dataset or attack fails with the list of known names. A plugin registered by an external
package (entry point) without a config file of ours is accepted: its config becomes
`{name: <plugin>, **plugin.default_config}`.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from harness.core.code_version import code_version
from harness.store.storage import normalize_location
from harness.core.registry import ARCHITECTURES, ATTACKS, DATASETS, METHODS, POISONS, Registry, UnknownPluginError

# Groups whose option names are plugin names, and the registry that knows them.
PLUGIN_GROUPS: dict[str, Registry] = {"method": METHODS, "arch": ARCHITECTURES, "data": DATASETS,
                                      "backdoor": POISONS}

# Keys that say where/how a cell runs, not what it computes: left out of the cell key.
NON_SEMANTIC_KEYS = ("results_dir", "leaderboard_dir", "ray", "resources", "label", "grid", "key",
                     "train_key", "code_version", "cell_id")
EVAL_ONLY_KEYS = ("attack", "eval", "analysis")
NON_SEMANTIC_TRAINER_KEYS = ("progress", "num_workers", "threads_per_rank", "device")
NON_SEMANTIC_DATA_KEYS = ("root", "dir", "source", "cache")


class ConfigError(ValueError):
    """A config or override is wrong; the message says how to fix it."""


def config_options(group: str) -> list[str]:
    """The config files (without .yaml) of one config group."""
    folder = resources.files("configs") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """Compose `configs/config.yaml` with Hydra overrides into a plain, resolved dict."""
    hydra_overrides = _plugin_overrides(overrides)
    try:
        with initialize_config_module(config_module="configs", version_base="1.3"):
            cfg = compose(config_name="config", overrides=hydra_overrides)
    except Exception as err:  # hydra raises several types; all mean a bad override
        raise ConfigError(f"cannot compose config with overrides {overrides}: {err}") from None
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    _check_plugin_names(container)
    return container


def _plugin_overrides(overrides: list[str]) -> list[str]:
    """Check plugin names in `group=name` overrides; rewrite ones that name an external plugin.

    A plugin with no config file of ours (registered by another package's entry point) becomes
    `~group +group={name: ..., **plugin.default_config}`, so `group.key=value` still works after it.
    """
    out: list[str] = []
    for override in overrides:
        group, sep, value = override.partition("=")
        group = group.lstrip("+~")
        if sep and group in PLUGIN_GROUPS and value not in config_options(group):
            registry = PLUGIN_GROUPS[group]
            if value not in registry:
                known = sorted(set(config_options(group)) | set(registry.names()))
                raise ConfigError(
                    f"unknown {registry.kind} '{value}'. Known {registry.kind}s: {', '.join(known)}. "
                    f"Fix: {group}=<one of these>, or install a package that registers '{value}' "
                    f"under the '{registry.group}' entry-point group."
                )
            defaults = {"name": value, **dict(getattr(registry.get(value), "default_config", {}))}
            out += [f"~{group}", f"+{group}={_hydra_literal(defaults)}"]
            continue
        if sep and group == "attack":
            for name in value.strip("[]").split(","):
                name = name.strip()
                if name and name not in config_options("attack"):
                    raise ConfigError(
                        f"unknown attack '{name}'. Known attacks: {', '.join(config_options('attack'))}. "
                        f"Fix: attack=[<names>] from this list."
                    )
        out.append(override)
    return out


def _hydra_literal(value: Any) -> str:
    """A Python value in Hydra's override grammar (JSON's quoted keys are not allowed there)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_hydra_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_hydra_literal(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_plugin_names(cfg: dict[str, Any]) -> None:
    for group, registry in PLUGIN_GROUPS.items():
        name = (cfg.get(group) or {}).get("name")
        if name is None:
            raise ConfigError(f"config group '{group}' has no 'name'; pick one with {group}=<name>")
        if name not in registry:
            raise ConfigError(str(UnknownPluginError(registry.unknown_message(name))))
    for label, attack in (cfg.get("attack") or {}).items():
        if attack.get("name") not in ATTACKS:
            raise ConfigError(f"eval attack '{label}': {ATTACKS.unknown_message(attack.get('name'))}")


def cell_key(cfg: dict[str, Any]) -> str:
    """Hash of what a cell computes: resolved config (minus where/how it runs) + code version + seed."""
    return _hash(_semantic(cfg))


def cell_identity(cfg: dict[str, Any]) -> str:
    """The cell key without the code version: what stays the same when the code changes, so a
    result computed by older code is found (and shown as stale) rather than lost."""
    return _hash(_semantic(cfg, with_code=False))


def train_key(cfg: dict[str, Any]) -> str:
    """Hash of what a cell trains (no eval settings): cells that differ only in their eval
    attacks share one checkpoint, so adding an attack to a grid re-evaluates but never retrains."""
    semantic = _semantic(cfg)
    for name in EVAL_ONLY_KEYS:
        semantic.pop(name, None)
    return _hash(semantic)


def training_setup(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(id, config) of how a cell's model was trained, seed and code version left out: the
    leaderboard averages seeds of one setup and never across setups (leaderboard/setups.py)."""
    semantic = _semantic(cfg, with_code=False)
    for name in (*EVAL_ONLY_KEYS, "seed", "code_version"):
        semantic.pop(name, None)
    return _hash(semantic), semantic


def trains_on_poison(cfg: dict[str, Any]) -> bool:
    """Whether the cell's `backdoor` group names a poisoning attack (not `none`)."""
    return (cfg.get("backdoor") or {}).get("name", "none") != "none"


def _semantic(cfg: dict[str, Any], with_code: bool = True) -> dict[str, Any]:
    semantic = {k: v for k, v in cfg.items() if k not in NON_SEMANTIC_KEYS}
    semantic["trainer"] = {k: v for k, v in (cfg.get("trainer") or {}).items() if k not in NON_SEMANTIC_TRAINER_KEYS}
    semantic["data"] = {k: v for k, v in (cfg.get("data") or {}).items() if k not in NON_SEMANTIC_DATA_KEYS}
    if not trains_on_poison(cfg):
        semantic.pop("backdoor", None)  # clean cells keep the keys they had before the backdoor track
    if with_code:
        semantic["code_version"] = code_version(cfg["method"])
    return semantic


def _hash(obj: dict[str, Any]) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finalize(cfg: dict[str, Any]) -> dict[str, Any]:
    """Resolve paths to absolute ones (Ray workers may run elsewhere) and stamp key + label."""
    cfg = json.loads(json.dumps(cfg))  # a deep, plain copy
    data = cfg["data"]
    root = str(data["root"])  # a folder or a URI (s3://bucket/prefix): harness.data.location
    if "://" in root:  # the dataset folder goes before a query string (?endpoint_override=...)
        head, _, query = root.partition("?")
        data["dir"] = f"{head.rstrip('/')}/{data['name']}" + (f"?{query}" if query else "")
    else:
        data["dir"] = str((Path(root).expanduser() / data["name"]).resolve())
    if data.get("source"):
        data["source"] = str(Path(data["source"]).expanduser().resolve())
    cfg["results_dir"] = normalize_location(cfg["results_dir"])  # a local path or a pyarrow.fs URI
    cfg["code_version"] = code_version(cfg["method"])
    cfg["key"] = cell_key(cfg)
    cfg["cell_id"] = cell_identity(cfg)
    cfg["train_key"] = train_key(cfg)
    cfg["label"] = f"{cfg['arch']['name']}/{cfg['method']['name']}/s{cfg['seed']}"
    if trains_on_poison(cfg):
        cfg["label"] += f"/{cfg['backdoor']['name']}"
    return cfg

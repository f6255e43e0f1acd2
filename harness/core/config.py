"""Config composition (Hydra compose API) and the cell key.

Configs are Hydra groups under the `configs` package: data, arch, method, attack, backdoor,
trainer, analysis, grid. We compose with `initialize_config_module` (version_base 1.3: no
working-dir change) and turn the result into plain Python containers at once, so no DictConfig
leaks into torch or Ray.

Everything is checked before any work:
- A plugin group (method, arch, data, backdoor, attack) accepts every name the registry knows,
  YAML preset or not: a plugin without a preset gets its class defaults (harness/core/plugin_config.py).
  An unknown name fails with the list of known names.
- The composed config is in struct mode: a key that no group defines is refused, with a
  "did you mean" from the known keys. `+key=value` adds a key only under a group that is open by
  design (an architecture's `kwargs`, declared by the plugin's `open_config_keys`; OPEN_KEYS); what it adds
  is part of the cell's config, hence of its key and of every result row.
- A plugin group may hold only the settings its class takes, of the types its annotations allow;
  a setting with no default must be set. Elsewhere an overridden value keeps its default's type.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from harness.core.code_version import code_version
from harness.core.errors import did_you_mean
from harness.core.plugin_config import (PLUGIN_GROUPS, accepted_keys, config_options, plugin_options,
                                        recipe_methods, register_plugin_configs, setting_types, type_problem)
from harness.core.locations import child, is_uri, normalize_location

__all__ = ["ConfigError", "check_values_set", "compose_config", "config_options", "finalize", "cell_key", "train_key",
           "training_setup", "trains_on_poison", "PLUGIN_GROUPS"]

# Keys that say where/how a cell runs, not what it computes: left out of the cell key.
NON_SEMANTIC_KEYS = ("results_dir", "leaderboard_dir", "ray", "resources", "label", "grid", "key",
                     "train_key", "code_version", "cell_id")
EVAL_ONLY_KEYS = ("attack", "eval", "analysis")
NON_SEMANTIC_TRAINER_KEYS = ("progress", "num_workers", "threads_per_rank", "device")
TRAINER_EVAL_KEYS = ("flags",)  # trainer settings read by the eval node only (harness/train/health.py)
NON_SEMANTIC_DATA_KEYS = ("root", "dir", "source", "cache", "generated_dir")  # where, not what: locations
# Groups open by design besides plugins' `open_config_keys`: a grid's axes may sweep any key, and an
# optimizer's or schedule's settings depend on its `name` (the trainer checks them before any work).
OPEN_KEYS = ("grid.axes", "trainer.optimizer", "trainer.schedule",
             "model.kwargs", "attack.torchattacks.kwargs")  # an external model's / a torchattacks class's own


class ConfigError(ValueError):
    """A config or override is wrong; the message says how to fix it."""


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """Compose `configs/config.yaml` with Hydra overrides into a plain, resolved, checked dict."""
    overrides = _eval_overrides(overrides)
    parsed = _parse(overrides)
    _check_plugin_names(parsed)
    _check_group_options(parsed)
    register_plugin_configs()
    _refuse_closed_additions(parsed)
    try:
        cfg = _compose(overrides)
    except Exception as err:  # hydra raises several types; all mean a bad override
        _refuse_unknown_keys(parsed)  # the usual cause, said with a "did you mean"
        raise ConfigError(f"cannot compose config with overrides {overrides}: {err}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key(s) {', '.join(missing)} have no value (the plugin's class gives no "
                          f"default). Fix: pass " + " ".join(f"{k}=<value>" for k in missing))
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that cannot resolve, e.g. ${oc.env:...} unset
        raise ConfigError(f"cannot resolve the config of overrides {overrides}: {err}") from None
    assert isinstance(container, dict)
    _check_recipe(container)
    _check_plugin_settings(container)
    _check_value_types(container, parsed)
    return container


def check_values_set(cfg: dict[str, Any], overrides: list[str]) -> None:
    """compose_config's checks of values, for a config composed once and then given other values
    of keys Hydra already accepted (harness/run/expand.py): each plugin group's settings and each
    overridden value's kind, named as compose_config names them."""
    _check_plugin_settings(cfg)
    _check_value_types(cfg, _parse_once(tuple(overrides)))


@functools.lru_cache(maxsize=256)
def _parse_once(overrides: tuple[str, ...]) -> list[Override]:
    """_parse, cached: a sweep checks every value combination against one list of overrides."""
    return _parse(list(overrides))


def _eval_overrides(overrides: list[str]) -> list[str]:
    """`model=<id>` (robustgrid eval) and a torchattacks class's settings, in Hydra's terms."""
    out: list[str] = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key == "model" and value not in config_options("model"):
            out += model_overrides(value)  # model=<id>: the `external` group entry plus its id
        elif sep and key.startswith("attack.torchattacks."):
            out.append(torchattacks_override(override))
        else:
            out.append(override)
    return out


def model_overrides(value: str) -> list[str]:
    """`model=timm:resnet18` -> the model group's `external` entry with `model.id` set; a grid's
    model axis may give a JSON object with the other settings too ({"id": ..., "checkpoint": ...})."""
    settings = json.loads(value) if value.startswith("{") else {"id": value}
    if not isinstance(settings, dict) or not settings.get("id"):
        raise ConfigError(f"model={value}: give a model id, e.g. model=timm:resnet18 model.checkpoint=<path>")
    return ["model=external"] + [f"model.{k}={_literal(v)}" for k, v in settings.items()]


def torchattacks_override(override: str) -> str:
    """`attack.torchattacks.name=<Class>` picks the torchattacks class (the plugin keeps the name
    `torchattacks`); any other key but eps is that class's keyword argument (under `kwargs`)."""
    key, _, value = override.partition("=")
    setting = key[len("attack.torchattacks."):]
    if setting == "name" and value != "torchattacks":
        return f"attack.torchattacks.class_name={value}"
    if setting.split(".")[0] in ("name", "class_name", "eps", "kwargs"):
        return override
    return f"++attack.torchattacks.kwargs.{setting}={value}"


def _literal(value: Any) -> str:
    """A Python value in Hydra's override grammar (JSON's quoted keys are not allowed there)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _compose(overrides: list[str]) -> Any:
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _parse(overrides: list[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra's grammar errors
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None


def _check_recipe(cfg: dict[str, Any]) -> None:
    """`recipe=<name>` other than the grid's must exist for the cell's method (a paper recipe
    silently replaced by the grid's trainer would put a recipe nobody published in a table)."""
    recipe, method = (cfg.get("recipe") or {}).get("name", "grid"), cfg["method"]["name"]
    if recipe == "grid" or method in recipe_methods(recipe):
        return
    having = recipe_methods(recipe)
    raise ConfigError(f"method '{method}' has no '{recipe}' recipe. Methods with one: {', '.join(having) or '(none)'}. "
                      f"Fix: recipe=grid (the trainer preset), or add configs/recipes/{recipe}/{method}.yaml "
                      f"(a plugin: a `recipes` ClassVar)")


def _is_group(key: str) -> bool:
    """Whether an override key selects a config group (`method=...`, `method/base=...`)."""
    return "/" in key or ("." not in key and key in _groups())


def _groups() -> set[str]:
    return {*PLUGIN_GROUPS, "trainer", "analysis", "grid", "recipe"}


def _check_plugin_names(parsed: list[Override]) -> None:
    """`group=name` for a plugin group must name a preset or a registered plugin."""
    for override in parsed:
        group = override.key_or_group
        if group not in PLUGIN_GROUPS or override.is_delete():
            continue
        value = override.value()
        names = value if isinstance(value, list) else [value]
        known = plugin_options(group)
        for name in names:
            if isinstance(name, str) and name not in known:
                registry = PLUGIN_GROUPS[group]
                if name in {b.name for b in registry.broken()}:
                    raise ConfigError(registry.unknown_message(name))
                raise ConfigError(
                    f"unknown {registry.kind} '{name}'. Known {registry.kind}s: {', '.join(known)}. "
                    f"Fix: {group}={'[<names>]' if group == 'attack' else '<one of these>'}, or install a "
                    f"package that registers '{name}' under the '{registry.group}' entry-point group."
                )


def _check_group_options(parsed: list[Override]) -> None:
    """`trainer=`, `grid=`, `recipe=` (groups of YAML presets only) must name a preset: said first,
    so `grid=demoo seed=1` names the grid, not the keys it would have defined."""
    for override in parsed:
        group = override.key_or_group
        if group not in ("trainer", "grid", "recipe") or override.is_delete():
            continue
        value, known = override.value(), config_options(group)
        if isinstance(value, str) and value not in known:
            raise ConfigError(f"unknown {group} '{value}'. Known {group}s: {', '.join(known)}."
                              f"{did_you_mean(value, known, f'{group}=')}")


@functools.lru_cache(maxsize=1)
def _open_prefixes() -> list[str]:
    """Keys under which `+key=` may add: OPEN_KEYS and plugins' `open_config_keys` (arch.kwargs)."""
    return sorted(set(OPEN_KEYS) | {f"{group}.{key}" for group, registry in PLUGIN_GROUPS.items()
                   for _, plugin in registry.items() for key in getattr(plugin, "open_config_keys", ())})


def _refuse_closed_additions(parsed: list[Override]) -> None:
    """`+key=`/`++key=` on a group that is not open by design would hide a typo: refuse it."""
    open_prefixes = _open_prefixes()
    closed = [o for o in parsed if (o.is_add() or o.is_force_add()) and not _is_group(o.key_or_group)
              and not any(o.key_or_group.startswith(p + ".") for p in open_prefixes)]
    if not closed:
        return
    known = _known_keys(parsed)
    problems = [_unknown_key_message(o.key_or_group, known) for o in closed]
    raise ConfigError("; ".join(problems) + f". `+key=value` adds keys only under the groups that are open by "
                      f"design: {', '.join(p + '.<key>' for p in open_prefixes) or '(none)'}.")


def _refuse_unknown_keys(parsed: list[Override]) -> None:
    """After a failed compose: raise for every plain `key=value` naming a key no group defines."""
    known = _known_keys(parsed)
    unknown = [o.key_or_group for o in parsed if not _is_group(o.key_or_group) and not o.is_delete()
               and not (o.is_add() or o.is_force_add()) and o.key_or_group not in known]
    if unknown:
        raise ConfigError("; ".join(_unknown_key_message(k, known) for k in unknown) + ".")


def _known_keys(parsed: list[Override]) -> set[str]:
    """Dotted keys of the config the overrides' group choices compose (values not applied)."""
    return set(_dotted(_group_defaults(tuple(o.input_line for o in parsed if _is_group(o.key_or_group)))))


@functools.lru_cache(maxsize=64)
def _group_defaults(groups: tuple[str, ...]) -> dict[str, Any]:
    """The unresolved config of these group choices alone: the defaults a value override replaces.
    Cached: a grid's cells share a few group choices, and compose costs tens of milliseconds."""
    try:
        cfg = OmegaConf.to_container(_compose(list(groups)), resolve=False)
    except Exception:  # noqa: BLE001 -- a bad group choice: no defaults, the caller's error stands
        return {}
    assert isinstance(cfg, dict)
    return cfg


def _check_value_types(cfg: dict[str, Any], parsed: list[Override]) -> None:
    """Outside plugin groups (typed by their classes) an overridden value keeps its default's kind:
    a number where the default is a number, true/false where it is a bool, or null (many keys take
    null for "off" or "all"). So `seed=abc` is named here, not deep inside torch. (YAML writes
    1.0 as 1, so an integer default does not refuse a fraction: range checks do that.)"""
    values = [o for o in parsed if not _is_group(o.key_or_group) and not o.is_delete()
              and o.key_or_group.split(".")[0] not in (*PLUGIN_GROUPS, "analysis", "grid")]
    if not values:
        return
    defaults = _group_defaults(tuple(o.input_line for o in parsed if _is_group(o.key_or_group)))
    for override in values:
        key = override.key_or_group
        default, value = _lookup(defaults, key), _lookup(cfg, key)
        if value is None or not isinstance(default, (bool, int, float)):
            continue
        if isinstance(default, bool):
            wrong, expected = not isinstance(value, bool), "true or false"
        else:
            wrong, expected = isinstance(value, bool) or not isinstance(value, (int, float)), "a number"
        if wrong:
            raise ConfigError(f"{key} must be {expected} (its default is {default!r}), got {value!r}. "
                              f"Fix: {key}=<{expected}>")


def _lookup(node: Any, key: str) -> Any:
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _dotted(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            out.append(path)
            out += _dotted(value, path + ".")
    return out


def _unknown_key_message(key: str, known: set[str]) -> str:
    """'unknown config key X', with the closest known keys (difflib on the last part of the key:
    beside it first, then anywhere) or the keys beside it."""
    parent, _, leaf = key.rpartition(".")
    siblings = sorted(k for k in known if k.rpartition(".")[0] == parent)
    message = f"unknown config key '{key}': no config group defines it."
    if parent and parent not in known:
        top = key.split(".")[0]
        return message + f" This config has nothing under '{parent}' (is its group selected, e.g. {top}=<name>?)"
    close = _closest(leaf, siblings, 0.6) or _closest(leaf, sorted(known), 0.8)
    if close:
        return message + f" Did you mean {' or '.join(close)}? Fix: {close[0]}=<value>"
    return message + f" Keys under '{parent or '(top level)'}': {', '.join(siblings[:30])}"


def _closest(leaf: str, keys: list[str], cutoff: float) -> list[str]:
    by_leaf: dict[str, list[str]] = {}
    for k in keys:
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    matches = difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=cutoff)
    return [k for m in matches for k in by_leaf[m]][:3]


def _check_plugin_settings(cfg: dict[str, Any]) -> None:
    """Each plugin group holds only the settings its plugin's class takes (a YAML preset too),
    each of a type its annotation allows."""
    for group, registry in PLUGIN_GROUPS.items():
        blocks = (cfg.get(group) or {}).items() if group == "attack" else [(group, cfg.get(group))]
        for label, block in blocks:
            where = f"attack.{label}" if group == "attack" else group
            if not isinstance(block, dict) or block.get("name") is None:
                raise ConfigError(f"config group '{where}' has no 'name'; pick one with {group}=<name>")
            if group == "data" and block["name"] in config_options("data"):
                continue  # a dataset's preset is its schema: its keys are read by the data layer, not a class
            plugin = registry.get(block["name"])
            allowed = accepted_keys(group, plugin)
            for key in block:
                if key not in allowed:
                    hint = did_you_mean(key, allowed, f"{where}.", n=3)
                    raise ConfigError(f"unknown config key '{where}.{key}': {registry.kind} '{block['name']}' "
                                      f"takes {', '.join(sorted(allowed - {'name'}))}.{hint}")
            for key, types_ in setting_types(group, plugin).items():
                if key in block and type_problem(block[key], types_):
                    expected = " or ".join("null" if t is type(None) else t.__name__ for t in types_)
                    raise ConfigError(f"{where}.{key} must be {expected}, got {block[key]!r}. "
                                      f"Fix: {where}.{key}=<{expected}>")


def cell_key(cfg: dict[str, Any]) -> str:
    """Hash of what a cell computes: resolved config (minus where/how it runs) + code version + seed."""
    return _hash(_semantic(cfg))


def cell_identity(cfg: dict[str, Any]) -> str:
    """The cell key without the code version: what stays the same when the code changes, so a
    result computed by older code is found (and shown as stale) rather than lost."""
    return _hash(_semantic(cfg, with_code=False))


def train_key(cfg: dict[str, Any]) -> str:
    """Hash of what a cell trains (no eval settings): cells that differ only in their eval
    attacks share one checkpoint, so adding an attack to a grid re-evaluates but never retrains.
    The training-flag thresholds (`trainer.flags`) are read off the train curve by the eval node:
    changing one re-evaluates, never retrains."""
    return _hash(_trained(_semantic(cfg)))


def _trained(semantic: dict[str, Any]) -> dict[str, Any]:
    """A semantic config reduced to what shapes the trained model."""
    for name in EVAL_ONLY_KEYS:
        semantic.pop(name, None)
    semantic["trainer"] = {k: v for k, v in semantic["trainer"].items() if k not in TRAINER_EVAL_KEYS}
    return semantic


def training_setup(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(id, config) of how a cell's model was trained, seed and code version left out: the
    leaderboard averages seeds of one setup and never across setups (leaderboard/setups.py)."""
    semantic = _trained(_semantic(cfg, with_code=False))
    for name in ("seed", "code_version"):
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
    backdoor = semantic.get("backdoor")
    if isinstance(backdoor, dict) and backdoor.get("label_mode") == "all_to_one":
        # the default: left out, so backdoor cells keep the keys they had before all-to-all existed
        semantic["backdoor"] = {k: v for k, v in backdoor.items() if k != "label_mode"}
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
    if is_uri(root):  # the dataset folder goes before a query string (?endpoint_override=...)
        data["dir"] = child(root, data["name"])
    else:
        data["dir"] = str((Path(root).expanduser() / data["name"]).resolve())
    if data.get("source"):
        data["source"] = str(Path(data["source"]).expanduser().resolve())
    cfg["results_dir"] = normalize_location(cfg["results_dir"])  # a local path or a pyarrow.fs URI
    cfg["code_version"] = code_version(cfg["method"])
    checkpoint = (cfg.get("model") or {}).get("checkpoint")
    if checkpoint and Path(checkpoint).expanduser().is_file():  # eval-only: keyed by the weights' content too
        cfg["model"]["checkpoint"] = str(Path(checkpoint).expanduser().resolve())
        with open(cfg["model"]["checkpoint"], "rb") as fh:
            cfg["model"]["checkpoint_sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
    cfg["key"] = cell_key(cfg)
    cfg["cell_id"] = cell_identity(cfg)
    cfg["train_key"] = train_key(cfg)
    cfg["label"] = f"{cfg['arch']['name']}/{cfg['method']['name']}/s{cfg['seed']}"
    if trains_on_poison(cfg):
        cfg["label"] += f"/{cfg['backdoor']['name']}"
    if cfg.get("model"):
        cfg["label"] = f"{cfg['model']['id']}/eval/s{cfg['seed']}"
    return cfg

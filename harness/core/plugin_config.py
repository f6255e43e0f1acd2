"""Config groups whose options are plugins, and the settings a plugin's class declares.

A plugin's settings are the arguments of its class: `__init__` (methods, attacks, poisons) or
`build` (architectures), followed up the class's bases where it forwards `**kwargs`, plus a
`default_config` ClassVar where a class declares one (datasets: their `data` settings).
So the class is the plugin's typed schema: its parameters are the keys its config group may
hold, their defaults the group's defaults. The YAML files under configs/<group>/ stay as
presets (paper recipes with comments); a registered plugin without one is still selectable,
because `register_plugin_configs` puts its class defaults into Hydra's ConfigStore under
the plugin's name (`method=my_method`, `attack=[my_attack]`, then `attack.my_attack.eps=...`).
"""
from __future__ import annotations

import inspect
from importlib import resources
from typing import Any

from hydra.core.config_store import ConfigStore

from harness.core.registry import ARCHITECTURES, ATTACKS, DATASETS, METHODS, POISONS, Registry

# Config groups whose option names are plugin names, and the registry that knows them.
PLUGIN_GROUPS: dict[str, Registry] = {"method": METHODS, "arch": ARCHITECTURES, "data": DATASETS,
                                      "backdoor": POISONS, "attack": ATTACKS}

# Keys the harness itself reads from a group, beside the plugin's own settings.
HARNESS_KEYS: dict[str, tuple[str, ...]] = {
    "method": ("name", "finetune", "stages"),  # finetune, stages: read by the run layer (ADML's stage 2)
    "arch": ("name",),
    "attack": ("name",),
    "backdoor": ("name",),
    "data": ("name", "dir"),
}
# What every dataset's `data` group holds (the shards' place and the data-wide eval radii);
# a dataset class adds or overrides these with its `default_config`. `???`: must be set.
DATA_COMMON: dict[str, Any] = {
    "root": "${oc.env:ROBUSTGRID_DATA,data}",
    "source": None,
    "img_size": None,
    "eps": "???",
    "eps_l2": None,
    "augment": {"crop_padding": 0, "hflip": False},
    "train_limit": None,
}
# Arguments the harness passes to an architecture's build(): not config keys.
BUILD_ARGS = ("num_classes", "in_chans", "img_size", "mean", "std")
MISSING = "???"


def config_options(group: str) -> list[str]:
    """The YAML presets (file names without .yaml) of one config group."""
    folder = resources.files("configs") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def plugin_options(group: str) -> list[str]:
    """Every name `group=<name>` accepts: YAML presets and registered plugins."""
    names = set(config_options(group))
    if group in PLUGIN_GROUPS:
        names |= set(PLUGIN_GROUPS[group].names())
    return sorted(names)


def plugin_settings(group: str, plugin: object) -> dict[str, Any]:
    """The settings a plugin's class declares, with their defaults (`???` where it has none)."""
    if group == "data":
        settings = dict(DATA_COMMON)
    else:
        settings = {}
        for param in _parameters(group, plugin):
            settings[param.name] = _default(group, plugin, param)
    settings.update(_plain(dict(getattr(plugin, "default_config", None) or {})))
    for key in getattr(plugin, "open_config_keys", ()):
        if settings.get(key) is None:
            settings[key] = {}
    return settings


def accepted_keys(group: str, plugin: object) -> set[str]:
    """Top-level keys a plugin's config group may hold."""
    keys = set(HARNESS_KEYS.get(group, ("name",)))
    keys |= {p.name for p in _parameters(group, plugin)} if group != "data" else set(DATA_COMMON)
    keys |= set(getattr(plugin, "default_config", None) or {})
    return keys


def register_plugin_configs() -> None:
    """Put every registered plugin that has no YAML preset into Hydra's ConfigStore, with its
    class defaults, so that it is selected and overridden exactly like a built-in."""
    store = ConfigStore.instance()
    for group, registry in PLUGIN_GROUPS.items():
        presets = set(config_options(group))
        for name, plugin in registry.items():
            if name in presets:
                continue
            node = {"name": name, **plugin_settings(group, plugin)}
            store.store(group=group, name=name, node={name: node} if group == "attack" else node)


def _parameters(group: str, plugin: object) -> list[inspect.Parameter]:
    """Named parameters of the plugin's constructor (or an architecture's build)."""
    if group == "arch":
        build = getattr(plugin, "build")
        params = list(inspect.signature(build).parameters.values())
        if isinstance(plugin, type):  # unbound: drop self
            params = params[1:]
        return [p for p in params if p.name not in BUILD_ARGS and _named(p)]
    if not isinstance(plugin, type):
        return []
    found: dict[str, inspect.Parameter] = {}
    for klass in plugin.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            break
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if _named(p):
                found.setdefault(p.name, p)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break  # **kwargs is taken to be forwarded to the base class's __init__
    return list(found.values())


def _named(param: inspect.Parameter) -> bool:
    return param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _default(group: str, plugin: object, param: inspect.Parameter) -> Any:
    if param.default is not inspect.Parameter.empty:
        return _plain(param.default)
    if group == "attack" and param.name == "eps":  # an attack's radius is the dataset's, by norm
        return "${data.eps_l2}" if getattr(plugin, "norm", "linf") == "l2" else "${data.eps}"
    return MISSING


def _plain(value: Any) -> Any:
    """A default as a config value: tuples become lists (YAML has no tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)

"""Config groups whose options are plugins, and the settings a plugin's class declares.

A plugin's settings are the arguments of its class: `__init__` (methods, attacks, poisons) or
`build` (architectures), followed up the class's bases where it forwards `**kwargs`, plus a
`default_config` ClassVar where a class declares one (datasets: their `data` settings).
So the class is the plugin's typed schema: its parameters are the keys its config group may
hold, their defaults the group's defaults. The YAML files under configs/<group>/ stay as
presets (paper recipes with comments); a registered plugin without one is still selectable,
because `register_plugin_configs` puts its class defaults into Hydra's ConfigStore under
the plugin's name (`method=my_method`, `attack=[my_attack]`, then `attack.my_attack.eps=...`).
An evaluation analysis that is not `always` on is selected the same way, its settings being its
class's `default_config` (`analysis=[my_analysis]`, then `analysis.my_analysis.points=...`).
"""
from __future__ import annotations

import inspect
import types
import typing
from functools import lru_cache, wraps
from importlib import resources
from typing import Any, Callable, TypeVar

from hydra.core.config_store import ConfigStore

from harness.core.registry import ANALYSES, ARCHITECTURES, ATTACKS, DATASETS, METHODS, POISONS, Registry

# Config groups whose option names are plugin names, and the registry that knows them.
PLUGIN_GROUPS: dict[str, Registry] = {"method": METHODS, "arch": ARCHITECTURES, "data": DATASETS,
                                      "backdoor": POISONS, "attack": ATTACKS}

# Keys the harness itself reads from a group, beside the plugin's own settings.
HARNESS_KEYS: dict[str, tuple[str, ...]] = {
    "method": ("name",),
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
    "augment": {"crop_padding": 0, "hflip": False, "random_resized_crop": None},
    "train_limit": None,
    "shuffle_buffer": 4096,
    "cache": None,
}
# Arguments the harness passes to an architecture's build(): not config keys.
BUILD_ARGS = ("num_classes", "in_chans", "img_size", "mean", "std")
MISSING = "???"
R = TypeVar("R")


def _per_plugin(func: Callable[[str, object], R]) -> Callable[[str, object], R]:
    """Memoise a (group, plugin) function by the plugin's identity (plugins live as long as their
    registry; some, like the timm presets, hold dicts and are not hashable)."""
    memo: dict[tuple[str, int], tuple[object, R]] = {}

    @wraps(func)
    def wrapper(group: str, plugin: object) -> R:
        hit = memo.get((group, id(plugin)))
        if hit is None or hit[0] is not plugin:
            hit = memo[(group, id(plugin))] = (plugin, func(group, plugin))
        return hit[1]

    return wrapper


def config_options(group: str) -> list[str]:
    """The YAML presets (file names without .yaml) of one config group."""
    return list(_presets(group))


@lru_cache(maxsize=None)
def _presets(group: str) -> tuple[str, ...]:
    """Listed once per process: a grid composes a config per cell."""
    folder = resources.files("configs") / group
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


@lru_cache(maxsize=None)
def _recipe_files(recipe: str) -> tuple[str, ...]:
    folder = resources.files("configs") / "recipes" / recipe
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


def recipe_methods(recipe: str) -> list[str]:
    """Methods that carry `recipe` (e.g. 'paper'): a configs/recipes/<recipe>/<method>.yaml file,
    or a plugin's `recipes` ClassVar ({recipe: {"trainer": {...}, "method": {...}}})."""
    names = set(_recipe_files(recipe))
    names |= {name for name, plugin in METHODS.items() if recipe in (getattr(plugin, "recipes", None) or {})}
    return sorted(names)


def plugin_options(group: str) -> list[str]:
    """Every name `group=<name>` accepts: YAML presets and registered plugins."""
    names = set(config_options(group))
    if group in PLUGIN_GROUPS:
        names |= set(PLUGIN_GROUPS[group].names())
    if group == "analysis":
        names |= set(selectable_analyses())
    return sorted(names)


def selectable_analyses() -> dict[str, object]:
    """Analyses a cell selects by name (`analysis=[name]`): every registered one not `always` on."""
    return {name: cls for name, cls in ANALYSES.items() if not getattr(cls, "always", False)}


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


@_per_plugin
def accepted_keys(group: str, plugin: object) -> set[str]:
    """Top-level keys a plugin's config group may hold."""
    keys = set(HARNESS_KEYS.get(group, ("name",)))
    keys |= {p.name for p in _parameters(group, plugin)} if group != "data" else set(DATA_COMMON)
    keys |= set(getattr(plugin, "default_config", None) or {})
    return keys


@_per_plugin
def setting_types(group: str, plugin: object) -> dict[str, tuple[type, ...]]:
    """Setting -> the plain types its annotation allows (float also takes int), for settings
    annotated with plain types only (int, float, bool, str, None and their unions)."""
    out: dict[str, tuple[type, ...]] = {}
    for param in _parameters(group, plugin):
        allowed = _plain_types(param.annotation)
        if allowed:
            out[param.name] = allowed
    return out


def type_problem(value: Any, allowed: tuple[type, ...]) -> bool:
    """Whether `value` fits none of `allowed` (bool is not a number here; an int is a float)."""
    if isinstance(value, bool):
        return bool not in allowed
    if isinstance(value, int) and float in allowed:
        return False
    return not isinstance(value, allowed)


_registered: set[tuple[str, str]] = set()


def register_plugin_configs() -> None:
    """Put every registered plugin that has no YAML preset into Hydra's ConfigStore, with its
    class defaults, so that it is selected and overridden exactly like a built-in (once per process)."""
    store = ConfigStore.instance()
    for group, registry in PLUGIN_GROUPS.items():
        presets = set(config_options(group))
        for name, plugin in registry.items():
            if name in presets or (group, name) in _registered:
                continue
            node = {"name": name, **plugin_settings(group, plugin)}
            store.store(group=group, name=name, node={name: node} if group == "attack" else node)
            _registered.add((group, name))
    for name, plugin in METHODS.items():  # a plugin's own paper recipe(s), beside configs/recipes/
        for recipe, node in (getattr(plugin, "recipes", None) or {}).items():
            if name in _recipe_files(recipe) or (f"recipes/{recipe}", name) in _registered:
                continue
            store.store(group=f"recipes/{recipe}", name=name, node=_plain(dict(node)), package="_global_")
            _registered.add((f"recipes/{recipe}", name))
    presets = set(config_options("analysis"))
    for name, plugin in selectable_analyses().items():  # settings: the class's `default_config`
        if name in presets or ("analysis", name) in _registered:
            continue
        node = {"name": name, **_plain(dict(getattr(plugin, "default_config", None) or {}))}
        store.store(group="analysis", name=name, node={name: node})
        _registered.add(("analysis", name))


_PLAIN = {int, float, bool, str, type(None)}


def _plain_types(annotation: Any) -> tuple[type, ...]:
    """(int, float, ...) for a plain-typed annotation; () where anything else (or nothing) is allowed."""
    if annotation is inspect.Parameter.empty:
        return ()
    if isinstance(annotation, type):
        return (annotation,) if annotation in _PLAIN else ()
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return tuple(args) if all(a in _PLAIN for a in args) else ()
    return ()


@_per_plugin
def _parameters(group: str, plugin: object) -> list[inspect.Parameter]:
    """Named parameters of the plugin's constructor (or an architecture's build), their string
    annotations (`from __future__ import annotations`) evaluated where they can be."""
    if group == "arch":
        build = getattr(plugin, "build")
        params = list(_signature(build).parameters.values())
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
        params = list(_signature(init).parameters.values())[1:]
        for p in params:
            if _named(p):
                found.setdefault(p.name, p)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break  # **kwargs is taken to be forwarded to the base class's __init__
    return list(found.values())


def _signature(func: Any) -> inspect.Signature:
    try:
        return inspect.signature(func, eval_str=True)
    except Exception:  # noqa: BLE001 -- an annotation that names what its module does not import
        return inspect.signature(func)


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

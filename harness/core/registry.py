"""One plugin mechanism for methods, attacks, architectures, datasets, poisons and analyses.

A plugin is a class (or factory) registered under a name; the names are what configs use.
External packages add plugins without editing robustgrid by declaring a Python entry point in
the registry's group, e.g. in their pyproject.toml::

    [project.entry-points."robustgrid.methods"]
    my_method = "my_pkg.my_method:MyMethod"

Entry points are loaded lazily, the first time a registry is asked for a name, so importing
robustgrid stays cheap. Duplicate names are an error (fvcore's lesson): silently shadowing a
plugin would make a result depend on import order.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """A config named a plugin that no registry knows; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message with quotes
        return str(self.args[0])


class DuplicatePluginError(ValueError):
    """Two plugins tried to register under one name."""


class Registry(Generic[T]):
    """Name -> plugin table for one kind of plugin.

    `builtin_modules` are imported on first lookup so that the built-in plugins register
    themselves; `group` is the entry-point group external packages use.
    """

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Class decorator: `@METHODS.register("erm")`; the name defaults to `obj.name`."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None)
            if not key:
                raise ValueError(f"{self.kind} plugin {obj!r} has no name; pass register('name')")
            self.add(key, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise DuplicatePluginError(
                f"{self.kind} '{name}' is registered twice ({_where(existing)} and {_where(obj)}); "
                f"rename one of them"
            )
        self._items[name] = obj

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            import_module(module)
        for ep in entry_points(group=self.group):
            obj = ep.load()
            if ep.name not in self._items or self._items[ep.name] is not obj:
                self.add(ep.name, obj)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownPluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = ", ".join(self.names()) or "(none)"
        return (
            f"unknown {self.kind} '{name}'. Known {self.kind}s: {known}. "
            f"Fix: pick one of these, or install a package that registers '{name}' "
            f"under the '{self.group}' entry-point group."
        )

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        self._load()
        return sorted(self._items.items())


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS: Registry = Registry(
    "method", "robustgrid.methods",
    ("methods.erm", "methods.pgd_at", "methods.trades", "methods.mart", "methods.awp", "methods.trades_awp",
     "methods.fgsm_rs", "methods.causaladv", "methods.sns", "methods.adml",
     # backdoor defenses (docs/backdoor.md)
     "methods.cbd", "methods.ft", "methods.fp", "methods.nad", "methods.abl"),
)
ATTACKS: Registry = Registry(
    "attack",
    "robustgrid.attacks",
    # methods.trades holds TRADES' own inner attack (trades_kl): a plugin's story stays in one file
    ("harness.attacks.fgsm", "harness.attacks.pgd", "harness.attacks.pgd_l2", "harness.attacks.cw",
     "harness.attacks.apgd", "harness.attacks.fab", "harness.attacks.square",
     "harness.attacks.autoattack", "methods.trades"),
)
ARCHITECTURES: Registry = Registry(
    "architecture", "robustgrid.architectures", ("architectures.presets",)
)
DATASETS: Registry = Registry("dataset", "robustgrid.datasets", ("harness.data.datasets",))
POISONS: Registry = Registry(
    "poison", "robustgrid.poisons",
    ("harness.backdoor.none", "harness.backdoor.badnets", "harness.backdoor.blended",
     "harness.backdoor.sig", "harness.backdoor.wanet"),
)

ANALYSES: Registry = Registry(
    "analysis", "robustgrid.analyses",
    # evaluation analyses (harness/eval/stage.py): each adds columns or files to a cell's rows
    ("harness.eval.integrity", "harness.eval.samples", "harness.eval.neuron_sensitivity",
     "harness.eval.backdoor_metrics", "harness.eval.analysis.run_ace"),
)

REGISTRIES: dict[str, Registry] = {
    "methods": METHODS,
    "attacks": ATTACKS,
    "architectures": ARCHITECTURES,
    "datasets": DATASETS,
    "poisons": POISONS,
    "analyses": ANALYSES,
}

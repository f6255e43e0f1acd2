"""One plugin mechanism for methods, attacks, architectures, datasets, poisons and analyses.

A plugin is a class (or factory) registered under a name; the names are what configs use.
External packages add plugins without editing robustgrid by declaring a Python entry point in
the registry's group, e.g. in their pyproject.toml::

    [project.entry-points."robustgrid.methods"]
    my_method = "my_pkg.my_method:MyMethod"

Entry points are loaded lazily, the first time a registry is asked for a name, so importing
robustgrid stays cheap. Duplicate names are an error (fvcore's lesson): silently shadowing a
plugin would make a result depend on import order.

A broken entry point (its module fails to import, it names something that is not a plugin, or it
clashes with a registered name) never breaks the registry: it is set aside as a `BrokenPlugin`
that names the entry point (`name = value` in its group) and the cause. Listing shows the good
plugins and reports the broken ones; only selecting a broken one is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """A config named a plugin that no registry knows; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message with quotes
        return str(self.args[0])


class DuplicatePluginError(ValueError):
    """Two plugins tried to register under one name."""


class BrokenPluginError(UnknownPluginError):
    """A config selected a plugin whose entry point could not be loaded (the message names it)."""


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not become a plugin, and why."""

    name: str
    value: str
    group: str
    reason: str

    def describe(self) -> str:
        return (f"entry point `{self.name} = {self.value}` in group '{self.group}' is broken: {self.reason}. "
                f"Fix: repair or uninstall the package that declares it")


def is_class(obj: object) -> str | None:
    """The usual plugin check: None if `obj` is a class, else what is wrong with it."""
    return None if isinstance(obj, type) else f"it is a {type(obj).__name__}, not a class"


class Registry(Generic[T]):
    """Name -> plugin table for one kind of plugin.

    `builtin_modules` are imported on first lookup so that the built-in plugins register
    themselves; `group` is the entry-point group external packages use; `check` says what is
    wrong with an object an entry point names (None: it is a valid plugin).
    """

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = (),
                 check: Callable[[object], str | None] = is_class) -> None:
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._check = check
        self._items: dict[str, T] = {}
        self._broken: dict[str, BrokenPlugin] = {}
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
            self._load_entry_point(ep)

    def _load_entry_point(self, ep: EntryPoint) -> None:
        """Register one external plugin, or set it aside as broken (never raise: one bad package
        must not stop every command)."""
        try:
            obj = ep.load()
            problem = self._check(obj)
            if problem:
                raise TypeError(f"it must name a {self.kind} plugin, but {problem}")
            self.add(ep.name, obj)
        except Exception as err:  # noqa: BLE001 -- any failure of foreign code is reported, not raised
            reason = f"{type(err).__name__}: {err}".strip().splitlines()[0]
            self._broken[ep.name] = BrokenPlugin(ep.name, ep.value, self.group, reason)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            if name in self._broken:
                raise BrokenPluginError(self.unknown_message(name)) from None
            raise UnknownPluginError(self.unknown_message(name)) from None

    def broken(self) -> list[BrokenPlugin]:
        """Entry points of this registry's group that failed to load, by name."""
        self._load()
        return [self._broken[n] for n in sorted(self._broken)]

    def unknown_message(self, name: str) -> str:
        if name in self._broken:
            return f"{self.kind} '{name}' cannot be used: {self._broken[name].describe()}"
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
     "methods.cbd", "methods.ft", "methods.fp", "methods.nad", "methods.abl",
     "methods.ft_sam", "methods.i_bau", "methods.sau",
     "methods.backdoor.clp", "methods.backdoor.anp", "methods.backdoor.nc",
     # detect, remove, retrain (the detectors' scoring functions; docs/detectors.md)
     "methods.spectral", "methods.ac",
     # more pruning defenses (RNP: unlearn, then recover masks; BNP: BatchNorm statistics)
     "methods.backdoor.rnp", "methods.backdoor.bnp",
     # unlearn the suspected poisoned, relearn the rest (D-BR)
     "methods.d_br"),
)
ATTACKS: Registry = Registry(
    "attack",
    "robustgrid.attacks",
    # methods.trades holds TRADES' own inner attack (trades_kl): a plugin's story stays in one file
    ("harness.attacks.fgsm", "harness.attacks.pgd", "harness.attacks.pgd_l2", "harness.attacks.cw",
     "harness.attacks.apgd", "harness.attacks.fab", "harness.attacks.square",
     "harness.attacks.autoattack", "harness.attacks.torchattacks_adapter", "methods.trades"),
)
def _builds_models(obj: object) -> str | None:
    """Architectures are classes or objects (the timm presets) with a `build` method."""
    return None if callable(getattr(obj, "build", None)) else "it has no build(...) method"


ARCHITECTURES: Registry = Registry(
    "architecture", "robustgrid.architectures", ("architectures.presets",), check=_builds_models
)
DATASETS: Registry = Registry("dataset", "robustgrid.datasets", ("harness.data.datasets",))
POISONS: Registry = Registry(
    "poison", "robustgrid.poisons",
    ("harness.backdoor.none", "harness.backdoor.badnets", "harness.backdoor.blended",
     "harness.backdoor.sig", "harness.backdoor.wanet",
     "harness.backdoor.bpp", "harness.backdoor.adaptive_blend", "harness.backdoor.adaptive_patch",
     "harness.backdoor.refool", "harness.backdoor.lf", "harness.backdoor.lc", "harness.backdoor.trojannn",
     "harness.backdoor.ftrojan", "harness.backdoor.iad", "harness.backdoor.ssba"),
)

ANALYSES: Registry = Registry(
    "analysis", "robustgrid.analyses",
    # evaluation analyses (harness/eval/stage.py): each adds columns or files to a cell's rows
    ("harness.eval.integrity", "harness.eval.samples", "harness.eval.neuron_sensitivity",
     "harness.eval.backdoor_metrics", "harness.eval.analysis.run_ace",
     # backdoor detectors (docs/detectors.md): on by default on backdoor cells, eval.detectors
     "harness.eval.analysis.detectors.strip", "harness.eval.analysis.detectors.spectral",
     "harness.eval.analysis.detectors.ac", "harness.eval.analysis.detectors.mmbd"),
)

REGISTRIES: dict[str, Registry] = {
    "methods": METHODS,
    "attacks": ATTACKS,
    "architectures": ARCHITECTURES,
    "datasets": DATASETS,
    "poisons": POISONS,
    "analyses": ANALYSES,
}

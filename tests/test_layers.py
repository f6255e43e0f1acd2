"""The house's layers: no import cycle between modules or between packages, lazy imports included.

A package here is a folder (harness/run, harness/core, methods, leaderboard, ...): the floors of
the architecture. Imports inside functions count: a cycle through a lazy import is still a cycle,
only one that bites later. Dynamic loading through the registry (importlib) is allowed.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "architectures", "leaderboard", "configs")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, f in modules.items():
        base = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                anchor = base[: len(base) - node.level + 1] if node.level else []
                prefix = ".".join(anchor + ([node.module] if node.module else []))
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != mod and not mod.startswith(found + "."):
                    edges[mod].add(found)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _package(module: str, modules: dict[str, Path]) -> str:
    """The folder a module lives in (a package's __init__ belongs to the package itself)."""
    return module if modules[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def test_no_module_import_cycles() -> None:
    cycles = _cycles(_edges(_modules()))
    assert cycles == [], f"module import cycles (lazy imports included): {cycles}"


def test_no_package_import_cycles() -> None:
    modules = _modules()
    edges = _edges(modules)
    packages: dict[str, set[str]] = {}
    for mod, targets in edges.items():
        src = _package(mod, modules)
        packages.setdefault(src, set())
        for target in targets:
            dst = _package(target, modules)
            if dst != src:
                packages[src].add(dst)
    for pkg in list(packages):
        for dst in packages[pkg]:
            packages.setdefault(dst, set())
    cycles = _cycles(packages)
    assert cycles == [], f"package import cycles (folders importing each other): {cycles}"


def test_the_checker_finds_a_lazy_cycle() -> None:
    """The checker itself: a cycle closed by an import inside a function is found."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert _cycles(edges) == [["a", "b"]]

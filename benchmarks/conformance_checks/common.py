"""What every conformance check shares: the record of one compared quantity, the goals, loading
the official code's own functions from a checkout, the same tiny model and batch for both sides,
and running official CUDA-only code on the CPU (patched in this process, never in their files)."""
from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

GOALS = {"int": 0.0, "image": 0.0, "float": 1e-5}


@dataclass
class Compared:
    """One quantity computed by both sides: its largest absolute difference and its goal."""

    name: str
    difference: float
    kind: str = "float"  # int | image | float (GOALS)
    note: str = ""

    @property
    def goal(self) -> float:
        return GOALS[self.kind]

    @property
    def ok(self) -> bool:
        return self.difference <= self.goal


def max_abs(a: Any, b: Any) -> float:
    """Largest |a - b| over tensors, arrays, numbers or (nested) lists of them; inf on a shape mismatch."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max((max_abs(x, y) for x, y in zip(a, b)), default=0.0)
    ta, tb = torch.as_tensor(a).detach().double().cpu(), torch.as_tensor(b).detach().double().cpu()
    if ta.shape != tb.shape:
        return float("inf")
    return float((ta - tb).abs().max()) if ta.numel() else 0.0


def max_param_diff(a: nn.Module, b: nn.Module, buffers: bool = False) -> float:
    """Largest difference between two models' parameters (`buffers`: their floating buffers
    instead, e.g. BatchNorm's running statistics); same architecture."""
    na = dict(a.named_buffers() if buffers else a.named_parameters())
    nb = dict(b.named_buffers() if buffers else b.named_parameters())
    if na.keys() != nb.keys():
        return float("inf")
    return max((max_abs(na[k], nb[k]) for k in na if na[k].is_floating_point()), default=0.0)


def reference_commit(reference: Path) -> str:
    """The checkout's commit (git rev-parse HEAD), or 'unknown' when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def import_file(path: Path, name: str | None = None, search: Path | None = None) -> types.ModuleType:
    """Import one official file as a module of its own name space (`search`: put that folder on
    sys.path first, for the file's own imports). Their files are read, never copied."""
    if search is not None and str(search) not in sys.path:
        sys.path.insert(0, str(search))
    module_name = name or f"official_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_functions(path: Path, names: list[str], namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """The named top-level functions (and classes) of an official *script*, without running the
    script's module-level code (argument parsing, data downloads, training): each definition is
    taken from the file's syntax tree and executed in `namespace` (give it the imports they use)."""
    tree = ast.parse(path.read_text(), str(path))
    wanted = [node for node in tree.body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
    missing = set(names) - {node.name for node in wanted}
    if missing:
        raise ValueError(f"{path} defines no {sorted(missing)}")
    scope: dict[str, Any] = dict(namespace or {})
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), scope)  # noqa: S102 (their code, by design)
    return {name: scope[name] for name in names}


def run_statements(path: Path, where: str | None, match: Callable[[ast.stmt, str], bool],
                   namespace: dict[str, Any]) -> dict[str, Any]:
    """Run the statements of an official script that `match(node, source)` selects, in order, in
    `namespace` (returned, with what they assigned): code that lives inside a script's `main()`
    (`where`: that function's name; None: the module level), such as the line that builds its
    scheduler or the body of its training loop, run as written rather than transcribed. Nested
    statements are searched too; a selected statement runs whole (ScriptBody.select)."""
    body = ScriptBody(path, where)
    selected = body.select(match)
    if not selected:
        raise ValueError(f"{path}: no statement of {where or 'the module'} matched")
    return body.run(selected, namespace)


def assigns(*names: str) -> Callable[[ast.stmt, str], bool]:
    """A `run_statements` selector: the assignments to any of `names`."""
    return lambda node, _: isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id in names for t in node.targets)


def argparse_defaults(path: Path, where: str | None = None) -> Any:
    """An official script's argparse defaults (`args` as it runs with no command-line flags): its
    own `parser = ...` and `parser.add_argument(...)` lines, run and parsed with no arguments."""
    import argparse

    def building(node: ast.stmt, source: str) -> bool:
        return source.startswith("parser = ") or source.startswith("parser.add_argument(")

    namespace = run_statements(path, where, building, {"argparse": argparse})
    return namespace["parser"].parse_args([])


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """Official code that calls `.cuda()` runs on the CPU: `.cuda()` returns the CPU object and
    torch.cuda.is_available() is False, for this block only."""
    saved = (torch.Tensor.cuda, nn.Module.cuda, torch.cuda.is_available)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.cuda.is_available = lambda: False  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.cuda.is_available = saved  # type: ignore[method-assign]


def tiny_model(seed: int = 0, in_chans: int = 3, num_classes: int = 10, img_size: int = 32,
               arch: str = "test_resnet") -> nn.Module:
    """Our test_resnet (BatchNorm, a few conv stages), seeded: both sides get copies of it."""
    from architectures.presets import build_classifier

    torch.manual_seed(seed)
    return build_classifier({"name": arch, "kwargs": {}}, num_classes=num_classes, in_chans=in_chans,
                            img_size=img_size, mean=[0.5] * in_chans, std=[0.25] * in_chans)


def tiny_batch(n: int = 16, seed: int = 0, shape: tuple[int, int, int] = (3, 32, 32),
               num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded CIFAR-shaped batch in [0, 1] with labels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)


def twins(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Two independent copies of the same weights: one for the official code, one for ours."""
    return copy.deepcopy(model), copy.deepcopy(model)


def same_random(seed: int = 0) -> None:
    """Reset every generator a step may draw from, before each side runs (same random start)."""
    torch.manual_seed(seed)
    import numpy as np
    import random

    np.random.seed(seed)
    random.seed(seed)


def train_context(model: nn.Module, epoch: int = 0, epochs: int = 1, step: int = 0, steps_per_epoch: int = 1):
    """The TrainContext our trainer hands a method at (epoch, step), on the CPU, world size 1."""
    from methods.base import TrainContext

    return TrainContext(epoch=epoch, epochs=epochs, step=step, steps_per_epoch=steps_per_epoch,
                        device=torch.device("cpu"), rank=0, world_size=1, classifier=model)


def our_step(method: Any, module: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             ctx: Any) -> dict[str, torch.Tensor]:
    """One optimisation step exactly as our trainer takes it (harness/train/trainer.py `_step`,
    then the method's `after_step`), on a plain module in train mode (DDP at world size 1 adds
    no arithmetic)."""
    from harness.train.trainer import _step

    module.train()
    logs = _step(method, module, optimizer, method.extra_optimizers(module), x, y, ctx, torch.device("cpu"), "fp32")
    method.after_step(module, ctx)
    return logs


class Recorder(nn.Module):
    """Wraps a model and keeps every input it is called on, with the mode it was in: how a check
    reads the adversarial example an official loss function crafts but does not return."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, x.detach().clone()))
        return self.model(x)


def paper_trainers(method: str, data: str = "cifar10", arch: str = "resnet18") -> dict[str, dict[str, Any]]:
    """The trainer every train node of a `recipe=paper` cell runs with, by the node's method (a
    method's upstream stages are nodes of their own): what the lr-per-epoch comparisons read."""
    from harness.core.config import compose_config, finalize
    from harness.run.plan import build_plan, planned_trainer

    cfg = finalize(compose_config([f"method={method}", "recipe=paper", f"data={data}", f"arch={arch}"]))
    return {n.cfg["method"]["name"]: planned_trainer(n.cfg) for n in build_plan([cfg]) if n.kind == "train"}


def official_lrs(set_lr: Any, epochs: range, base_lr: float, optimizer_kwargs: dict[str, Any] | None = None,
                 ) -> list[float]:
    """The lr an official per-epoch rule `set_lr(optimizer, epoch)` sets at each epoch of `epochs`
    (it writes param_group['lr'], as their scripts do)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr, **(optimizer_kwargs or {}))
    out = []
    for epoch in epochs:
        set_lr(optimizer, epoch)
        out.append(optimizer.param_groups[0]["lr"])
    return out


class ScriptBody:
    """The statements of one function of an official script (`function=None`: the module level),
    to run piece by piece: training scripts keep their step inside `main()`, beside argument
    parsing and data downloads. Statements are picked by what they assign, test or loop over
    (`find`, `assignments`, `definitions`) or by a predicate (`select`, `run_statements`), and
    executed in a namespace the check provides; nothing of them is copied."""

    def __init__(self, path: Path, function: str | None = "main") -> None:
        self.text = path.read_text()
        tree = ast.parse(self.text, str(path))
        if function is None:
            self.body: list[ast.stmt] = tree.body
        else:
            found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
            if not found:
                raise ValueError(f"{path} defines no function {function}()")
            self.body = found[0].body
        self.path = path

    def select(self, match: Callable[[ast.stmt, str], bool]) -> list[ast.stmt]:
        """The statements `match(node, source)` selects, searched into nested blocks (a selected
        statement is taken whole, its own blocks not searched), in the script's order."""
        selected: list[ast.stmt] = []

        def visit(body: list[ast.stmt]) -> None:
            for node in body:
                if match(node, ast.get_source_segment(self.text, node) or ""):
                    selected.append(node)
                    continue
                for name in ("body", "orelse", "finalbody"):
                    inner = getattr(node, name, None)
                    if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                        visit(inner)

        visit(self.body)
        return selected

    def find(self, kind: type, text: str, attribute: str, within: list[ast.stmt] | None = None) -> ast.stmt:
        """The one statement of `kind` among `within` (default: the body's top level; e.g. a
        loop's `.body`) whose `attribute` (a loop's 'target', an if's 'test') unparses to `text`."""
        nodes = [n for n in (within if within is not None else self.body)
                 if isinstance(n, kind) and ast.unparse(getattr(n, attribute)) == text]
        if len(nodes) != 1:
            raise ValueError(f"{self.path}: {len(nodes)} {kind.__name__} statements with {attribute} {text!r}")
        return nodes[0]

    def assignments(self, *names: str) -> list[ast.stmt]:
        """The top-level assignments to `names`, in the script's order."""
        found = [n for n in self.body if isinstance(n, ast.Assign)
                 and any(ast.unparse(t) in names for t in n.targets)]
        missing = set(names) - {ast.unparse(t) for n in found for t in n.targets}
        if missing:
            raise ValueError(f"{self.path}: no top-level assignment to {sorted(missing)}")
        return found

    def definitions(self, *names: str) -> list[ast.stmt]:
        """The functions defined at the top of the body (nested helpers of main, e.g. a schedule)."""
        found = [n for n in self.body if isinstance(n, ast.FunctionDef) and n.name in names]
        if {n.name for n in found} != set(names):
            raise ValueError(f"{self.path}: missing definitions among {sorted(names)}")
        return found

    def run(self, nodes: list[ast.stmt], namespace: dict[str, Any], in_loop: bool = False) -> dict[str, Any]:
        """Execute `nodes` in `namespace` and return it (`in_loop`: inside a one-pass loop, so that
        their `break` is legal and ends them as it ends the script's loop)."""
        if in_loop:
            nodes = [ast.For(target=ast.Name("_once", ast.Store()), iter=ast.parse("[0]", mode="eval").body,
                             body=nodes, orelse=[])]
        module = ast.fix_missing_locations(ast.Module(body=nodes, type_ignores=[]))
        exec(compile(module, str(self.path), "exec"), namespace)  # noqa: S102 (their code, by design)
        return namespace


class NormalisedInput(nn.Module):
    """What a script whose data pipeline normalises sees: its model takes (x - mu) / std; ours
    (normalisation inside, [0, 1] in) sits behind the inverse map, so both share one set of weights."""

    def __init__(self, model: nn.Module, mu: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mu", mu.detach().clone().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.detach().clone().view(1, -1, 1, 1), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(self.pixels(z))

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mu

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / self.std

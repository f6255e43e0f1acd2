"""Every torchattacks attack that fits our contract, through one plugin (torchattacks is optional).

    attack=[torchattacks] attack.torchattacks.name=<torchattacks class> attack.torchattacks.<kwarg>=...
(the class's keyword arguments are stored under `kwargs`: `attack.torchattacks.steps=20` is
`attack.torchattacks.kwargs.steps=20`, harness.core.config.torchattacks_override)

e.g. `attack.torchattacks.name=MIFGSM attack.torchattacks.steps=20 attack.torchattacks.decay=1.0`.
`eps` (default: the data's eps) is passed to classes that take one; their threat model is then
L-inf, or L2 for PGDL2/PGDRSL2 and for `norm='L2'` (APGD, APGDT, FAB, Square, AutoAttack).
Classes without `eps` (CW, DeepFool, SparseFool, OnePixel, Pixle, GN, VANILA) have no threat
model: they are recorded with eps=inf (a minimum-perturbation attack's success rate).
`n_classes` (APGDT, FAB, AutoAttack) defaults to the model's output size. The torchattacks object
is built per call, on the model it attacks, so the plugin stays a stateless call.

Not adapted (NOT_ADAPTED, docs/attacks.md): MultiAttack (takes attacks, not a model), LGV (trains
surrogate models on a train loader) and TPGD (ignores the labels). torchattacks' AutoAttack is not the reference's (APGD 10 steps): never
a headline number. torchattacks is the `torchattacks` extra: pip install 'robustgrid[torchattacks]'.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from harness.attacks.base import Attack, parse_number
from harness.core.registry import ATTACKS

NOT_ADAPTED = {
    "MultiAttack": "combines other torchattacks objects instead of attacking a model",
    "LGV": "trains surrogate models on a train loader before attacking (needs data and training)",
    "Attack": "the base class, not an attack",
    "TPGD": "ignores the labels: it maximises the KL divergence to the model's clean prediction (TRADES' "
            "inner attack), so it can turn misclassified points correct (measured: 62.5% -> 68.8% accuracy)",
}
L2_CLASSES = ("PGDL2", "PGDRSL2")


def torchattacks_module():
    """The torchattacks package, or an error saying how to install the optional extra."""
    try:
        import torchattacks
    except ImportError:
        raise ValueError("attack 'torchattacks' needs the torchattacks package, an optional extra: "
                         "pip install 'robustgrid[torchattacks]' (torchattacks>=3.3,<3.6 with idna>=3)") from None
    return torchattacks


def adapted_classes() -> list[str]:
    """Names of every torchattacks attack class the plugin accepts."""
    module = torchattacks_module()
    return sorted(n for n in getattr(module, "__all__", dir(module))
                  if inspect.isclass(getattr(module, n)) and n not in NOT_ADAPTED)


@ATTACKS.register("torchattacks")
class TorchAttacks(Attack):
    """A torchattacks attack class by name, with its keyword arguments."""

    name = "torchattacks"

    def __init__(self, class_name: str = "PGD", eps: float | str | None = None,
                 kwargs: dict[str, Any] | None = None) -> None:
        kwargs = dict(kwargs or {})
        module = torchattacks_module()
        if class_name in NOT_ADAPTED:
            raise ValueError(f"torchattacks.{class_name} does not fit the attack contract: {NOT_ADAPTED[class_name]}")
        cls = getattr(module, str(class_name), None)
        if not inspect.isclass(cls):
            raise ValueError(f"torchattacks has no attack {class_name!r}. Fix: attack.torchattacks.name=<one of "
                             f"{', '.join(adapted_classes())}>")
        params = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"torchattacks.{class_name} takes no {unknown}; its arguments: "
                             f"{[p for p in params if p not in ('self', 'model')]}")
        bounded = "eps" in params
        super().__init__(eps if bounded and eps is not None else (params["eps"].default if bounded else 0.0))
        if not bounded:
            self.eps = math.inf  # no threat model (the base class takes finite radii only)
        self.class_name = str(class_name)
        self.kwargs = dict(kwargs)
        norm = str(kwargs.get("norm", params["norm"].default if "norm" in params else "Linf"))
        self.norm = "l2" if class_name in L2_CLASSES or norm == "L2" or not bounded else "linf"
        self._cls, self._bounded, self._wants_classes = cls, bounded, "n_classes" in params

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class_name": self.class_name, "norm": self.norm, "eps": self.eps,
                "kwargs": self.kwargs, "torchattacks": self._version()}

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kwargs = dict(self.kwargs)
        if self._bounded:
            kwargs["eps"] = self.eps
        if self._wants_classes and "n_classes" not in kwargs:
            with torch.no_grad():
                kwargs["n_classes"] = int(model(x[:1]).shape[1])
        had_grad = [p.grad is not None for p in model.parameters()]
        try:
            return self._cls(model, **kwargs)(x, y).to(x.dtype)
        finally:  # some classes call loss.backward(): leave no parameter gradient behind
            for p, had in zip(model.parameters(), had_grad):
                if not had:
                    p.grad = None

    @staticmethod
    def _version() -> str:
        return str(getattr(torchattacks_module(), "__version__", "?"))

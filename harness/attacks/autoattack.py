"""AutoAttack (Croce & Hein, ICML 2020): a parameter-free ensemble, the field's headline number.

- `autoattack` (version "standard"): APGD-CE -> APGD-T -> FAB-T -> Square, each attack run only
  on the points that every earlier attack left robust. Components at the reference's standard
  strength: APGD-CE 100 iterations 1 restart; APGD-T 100 iterations, 9 target classes; FAB-T 100
  iterations, 9 target classes; Square 5000 queries, p_init 0.8. All seeded with `seed` (the
  reference's `seed` argument; it seeds every component the same way).
- `autoattack_rand` (version "rand", for randomized defenses): APGD-CE -> APGD-DLR (untargeted),
  1 restart, 100 iterations, each gradient averaged over `eot_iter`=20 forwards (EOT), the
  reference's settings. Run it instead of `autoattack` when the `randomized_outputs` flag fires.
- `autoattack_fast`: APGD-CE -> APGD-T only (no FAB-T, no Square): most of the standard
  version's strength at a fraction of its cost, but without the black-box Square check.
  Not an official AutoAttack version; report it as "APGD-CE + APGD-T".

`perturb_with_log` also says which component first broke each point: the per-sample record
that lets a later, stronger evaluation resume from the survivors (harness/eval/samples.py), and the
per-component robust accuracies that the Square-vs-white-box integrity check reads.
(torchattacks' AutoAttack runs APGD for 10 iterations: it is not this, nor the reference.)
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from harness.attacks.apgd import APGDCE, APGDDLR, APGDT
from harness.attacks.base import Attack, attack_mode
from harness.attacks.fab import FABT
from harness.attacks.square import Square
from harness.core.registry import ATTACKS

CLEAN = "clean"  # broken_by value of a point misclassified before any attack


class _AutoAttackBase(Attack):
    components_of_version: tuple[str, ...] = ()
    default_eot_iter: int = 1

    def __init__(self, eps: float | str, norm: str = "linf", seed: int = 0, n_iter: int = 100,
                 n_queries: int = 5000, eot_iter: int | None = None, skip_fooled: bool | None = None) -> None:
        """n_iter (APGD, FAB) and n_queries (Square) default to the reference's standard
        strength; lower them only for smoke tests (the row's attack_config records them).
        skip_fooled: APGD and FAB-T drop a point from their batch once it is fooled (every
        point's outcome is the reference's; docs/attacks.md); False attacks every point to the
        end of each run, as the reference does. None (default): on unless eot_iter > 1
        (`autoattack_rand`: a randomized model draws its noise per batch row)."""
        super().__init__(eps)
        if n_iter < 1 or n_queries < 1:
            raise ValueError(f"{self.name} needs n_iter >= 1 and n_queries >= 1")
        if norm not in ("linf", "l2"):
            raise ValueError(f"{self.name} norm must be 'linf' or 'l2', got {norm!r}")
        if norm == "l2" and ("fab_t" in self.components_of_version or "square" in self.components_of_version):
            raise ValueError(f"{self.name} has FAB-T and Square, which are L-inf only here; for L2 "
                             f"use autoattack_fast (APGD-CE + APGD-T)")
        self.norm = norm
        self.seed, self.n_iter, self.n_queries = int(seed), int(n_iter), int(n_queries)
        self.components = list(self.components_of_version)
        self.eot_iter = int(self.default_eot_iter if eot_iter is None else eot_iter)
        self.skip_fooled = self.eot_iter == 1 if skip_fooled is None else bool(skip_fooled)
        if self.eot_iter < 1:
            raise ValueError(f"{self.name} eot_iter must be >= 1, got {self.eot_iter}")

    def build_components(self) -> list[Attack]:
        skip = self.skip_fooled
        built: dict[str, Any] = {
            "apgd_ce": lambda: APGDCE(self.eps, norm=self.norm, n_iter=self.n_iter, n_restarts=1, seed=self.seed,
                                      eot_iter=self.eot_iter, skip_fooled=skip),
            "apgd_dlr": lambda: APGDDLR(self.eps, norm=self.norm, n_iter=self.n_iter, n_restarts=1, seed=self.seed,
                                        eot_iter=self.eot_iter, skip_fooled=skip),
            "apgd_t": lambda: APGDT(self.eps, norm=self.norm, n_iter=self.n_iter, n_restarts=1,
                                    n_target_classes=9, seed=self.seed, eot_iter=self.eot_iter, skip_fooled=skip),
            "fab_t": lambda: FABT(self.eps, n_iter=self.n_iter, n_restarts=1, n_target_classes=9, seed=self.seed,
                                  skip_fooled=skip),
            "square": lambda: Square(self.eps, n_queries=self.n_queries, p_init=0.8, seed=self.seed),
        }
        return [built[name]() for name in self.components]

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run(model, x, y)[0]

    def perturb_with_log(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         seconds: dict[str, float] | None = None) -> tuple[torch.Tensor, list[str | None]]:
        """(x_adv, broken_by): broken_by[i] is 'clean' for a point misclassified already, the
        name of the first component that fooled it, or None if it survived every component.
        `seconds` (optional) receives each component's wall time.
        Mode restored and input gradients only, as `attack(model, x, y)`."""
        with attack_mode(model):
            x_adv, broken_by = self._run(model, x.detach(), y.detach(), seconds)
        return x_adv.detach(), broken_by

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             seconds: dict[str, float] | None = None) -> tuple[torch.Tensor, list[str | None]]:
        """The chain; `seconds`, when given, receives each component's wall time (its check
        forward included; on CUDA the times are synchronised)."""
        x = x.float()
        with torch.no_grad():
            robust = model(x).max(1)[1] == y
        broken_by: list[str | None] = [None if r else CLEAN for r in robust.tolist()]
        x_adv = x.clone()
        for attack in self.build_components():
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                break
            started = time.perf_counter()
            found, _ = attack.perturb_with_mask(model, x[idx], y[idx])
            with torch.no_grad():  # a fresh forward decides, as in the reference (a new draw for a randomized model)
                fooled = model(found).max(1)[1] != y[idx]
            if seconds is not None:
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                seconds[attack.name] = time.perf_counter() - started
            x_adv[idx[fooled]] = found[fooled]
            robust[idx[fooled]] = False
            for i in idx[fooled].tolist():
                broken_by[i] = attack.name
        return x_adv, broken_by


@ATTACKS.register("autoattack")
class AutoAttack(_AutoAttackBase):
    """AutoAttack "standard": APGD-CE -> APGD-T -> FAB-T -> Square on the still-robust points."""

    name = "autoattack"
    components_of_version = ("apgd_ce", "apgd_t", "fab_t", "square")


@ATTACKS.register("autoattack_rand")
class AutoAttackRand(_AutoAttackBase):
    """AutoAttack "rand": APGD-CE -> APGD-DLR with EOT over 20 forwards, for randomized defenses."""

    name = "autoattack_rand"
    components_of_version = ("apgd_ce", "apgd_dlr")
    default_eot_iter = 20


@ATTACKS.register("autoattack_fast")
class AutoAttackFast(_AutoAttackBase):
    """APGD-CE -> APGD-T on the still-robust points (AutoAttack without FAB-T and Square)."""

    name = "autoattack_fast"
    components_of_version = ("apgd_ce", "apgd_t")

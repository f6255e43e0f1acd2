"""Evasion attacks: stateless `attack(model, x, y) -> x_adv` plugins (see base.py)."""
from harness.attacks.base import Attack, build_attack

__all__ = ["Attack", "build_attack"]

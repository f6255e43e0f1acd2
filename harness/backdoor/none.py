"""`backdoor=none`: clean training data (the default); cells without a backdoor keep their keys."""
from __future__ import annotations

from harness.core.registry import POISONS


@POISONS.register("none")
class NoPoison:
    """No poisoning: `harness.backdoor.base.build_poison` returns None for it."""

    name = "none"

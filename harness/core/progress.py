"""Progress bars that work both in a plain process and inside a Ray worker.

Inside Ray, `ray.experimental.tqdm_ray` forwards the bar to the driver, which draws all
running cells' bars together; elsewhere it is ordinary tqdm on stderr.
"""
from __future__ import annotations

from typing import Any


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


class _RayBar:
    """tqdm_ray has no set_postfix: show the postfix in the description instead."""

    def __init__(self, bar: Any, desc: str) -> None:
        self._bar, self._desc = bar, desc

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **kwargs: Any) -> None:
        self._bar.set_description(self._desc + " " + " ".join(f"{k}={v}" for k, v in kwargs.items()))

    def close(self) -> None:
        self._bar.close()


class _TqdmBar:
    """Plain tqdm whose postfix waits for tqdm's own redraw interval: `tqdm.set_postfix` alone
    redraws the bar on every call, and the trainer sets it on every CPU step."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **kwargs: Any) -> None:
        self._bar.set_postfix(refresh=False, **kwargs)

    def close(self) -> None:
        self._bar.close()


def in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # ray missing or not started: a plain process
        return False


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    if not enabled:
        return _NullBar()
    if in_ray_worker():
        from ray.experimental import tqdm_ray

        return _RayBar(tqdm_ray.tqdm(total=total, desc=desc), desc)
    from tqdm.auto import tqdm

    return _TqdmBar(tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True))

"""A marker file a running process keeps fresh from a daemon thread, and removes when it is done.

The cells' and train nodes' run markers (harness/run/status.py) and the driver marker
(harness/run/single_driver.py) are both this: a JSON file with a `heartbeat` timestamp rewritten
every few seconds, so a reader can tell a live process from one that was killed, and deleted on
exit only while it still names its owner (a newer attempt may have taken it over).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

from harness.store.storage import Store


class HeartbeatMarker:
    def __init__(self, store: Store, rel: str, payload: Callable[[], dict[str, Any]], owner: tuple[str, str],
                 every: float, name: str, exclusive: bool = False) -> None:
        """`exclusive`: beat only while the marker still names its owner (a lease taken over by
        another process after this one was presumed dead is never overwritten by its late beat)."""
        self.store, self.rel, self.payload, self.owner, self.every, self.name = store, rel, payload, owner, every, name
        self.exclusive = exclusive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        info = self.payload() | {"heartbeat": time.time()}
        self.store.write_bytes(self.rel, json.dumps(info).encode(), durable=False)

    def read(self) -> dict[str, Any] | None:
        raw = self.store.read_bytes(self.rel)
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def start(self) -> None:
        """Keep beating from a daemon thread (the first beat is the caller's)."""
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; remove the marker if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every)
        current = self.read()
        key, value = self.owner
        if current is not None and current.get(key) == value:
            self.store.delete(self.rel)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if self.exclusive and (self.read() or {}).get(self.owner[0]) != self.owner[1]:
                    return  # no longer ours: stop beating, never overwrite the new holder's marker
                self.beat()
            except Exception:  # a flaky store must not kill the process; the marker just goes stale
                pass

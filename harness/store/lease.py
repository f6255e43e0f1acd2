"""An exclusive, expiring claim on a name in a results store, kept alive by a heartbeat.

Any number of drivers, on any machines, may run grids that share cells on one store; each train
key must still be trained once. Before training, a train node takes the lease
`_leases/<name>.json` (harness/run/nodes.py): a JSON file naming its holder, rewritten every few
seconds by a daemon thread (harness/store/heartbeat.py) and deleted when the training ends. Another
node that finds a fresh lease does not train: the driver hands it back and tries again later,
and when the lease is free it finds the model trained (or resumes it from its last epoch). A
holder that dies stops beating; after `expire_s` its lease may be taken over. One holder is known
dead at once: when Ray retries a node (its worker or machine died), the retry carries the same
`owner` (the Ray session and task id, harness/run/nodes.py) and takes its own dead attempt's lease
without waiting out the expiry; a Ray retry starts only after Ray saw the attempt die, so the
retry of an interrupted training resumes at once instead of queueing behind a wave of newer nodes.

Taking a lease: on a local (or mounted) store, create-if-absent (O_EXCL) is atomic, and a stale
lease is first renamed aside (only one taker's rename can succeed). Object stores (S3, GCS) have
no create-if-absent through pyarrow: the taker checks that no fresh lease exists, writes its own,
waits `settle_s` and reads it back; it holds the lease only if it still finds its own token. Two
takers can both pass only if one checks and writes more than `settle_s` apart, which a process
doing nothing in between does not.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from harness.store.heartbeat import HeartbeatMarker
from harness.store.storage import Store

LEASES = "_leases"
BEAT_S = 5.0
EXPIRE_S = 4 * BEAT_S
SETTLE_S = 1.0


class Lease:
    def __init__(self, store: Store, name: str, every: float = BEAT_S, expire_s: float = EXPIRE_S,
                 settle_s: float = SETTLE_S, owner: str | None = None) -> None:
        """`owner`: who takes the lease, the same for every attempt of one task (None: nobody's
        retry, the lease is taken only when free or expired)."""
        self.store, self.rel, self.owner = store, f"{LEASES}/{name}.json", owner
        self.expire_s, self.settle_s = expire_s, settle_s
        self.token = uuid.uuid4().hex
        self._marker = HeartbeatMarker(store, self.rel, self._info, ("token", self.token), every, f"lease-{name}",
                                       exclusive=True)
        self.held = False

    def _info(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "owner": self.owner}

    def holder(self) -> dict[str, Any] | None:
        """The current lease's content while it is fresh (None: free or expired)."""
        info = self._marker.read()
        if info is None or time.time() - float(info.get("heartbeat", 0)) >= self.expire_s:
            return None
        return info

    def _from_a_dead_attempt(self, info: dict[str, Any] | None) -> bool:
        """The lease is held by an earlier attempt of this very task (which Ray saw die)."""
        return (self.owner is not None and info is not None and info.get("owner") == self.owner
                and info.get("token") != self.token)

    def acquire(self) -> bool:
        """Take the lease unless another holder keeps it fresh; True when it is ours (then beating)."""
        taken = self._take_local() if self.store.is_local else self._take_remote()
        if taken:
            self._marker.start()
            self.held = True
        return taken

    def release(self) -> None:
        if self.held:
            self._marker.stop()  # deletes the lease only while it is still ours
            self.held = False

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _take_local(self) -> bool:
        path = self.store.path(self.rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        current = self._marker.read()
        if current is not None and (self.holder() is None or self._from_a_dead_attempt(current)):
            # stale, or our own dead attempt's: set it aside, once
            aside = self.store.path(LEASES, f".expired-{uuid.uuid4().hex}.json")
            try:
                os.rename(path, aside)
                os.unlink(aside)
            except FileNotFoundError:
                pass  # another taker moved it first
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self._info() | {"heartbeat": time.time()}))
        return True

    def _take_remote(self) -> bool:
        current = self.holder()
        if current is not None and not self._from_a_dead_attempt(current):
            return False
        self._marker.beat()
        time.sleep(self.settle_s)
        current = self._marker.read()
        return current is not None and current.get("token") == self.token

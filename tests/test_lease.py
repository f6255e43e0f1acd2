"""A train key's lease (harness/store/lease.py): exclusive while its holder beats, taken over once
the holder stops beating, and exactly one of many racing takers gets it, on a local store and on
an S3 server (moto on 127.0.0.1). Issue 24, item 1."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.store.lease import Lease
from harness.store.storage import open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_store(str(tmp_path / "results"))
    query = request.getfixturevalue("s3")
    return open_store(f"s3://bkt/leases-{time.time_ns()}?{query}")


def _lease(store, **kw) -> Lease:
    return Lease(store, "train-abc", every=0.2, expire_s=1.0, settle_s=0.3, **kw)


def test_a_held_lease_is_exclusive_until_released(store) -> None:
    first, second = _lease(store), _lease(store)
    assert first.acquire()
    assert not second.acquire() and second.holder()["token"] == first.token
    time.sleep(1.2)  # the holder keeps beating: the lease stays fresh past its expiry
    assert not second.acquire()
    first.release()
    assert store.read_bytes("_leases/train-abc.json") is None  # released: the lease file is gone
    assert second.acquire()
    second.release()


def test_a_dead_holder_s_lease_is_taken_over_after_expiry(store) -> None:
    dead, taker = _lease(store), _lease(store)
    assert dead.acquire()
    dead._marker._stop.set()  # the holder is SIGKILLed: its heartbeat stops, its lease file stays
    assert not taker.acquire()
    time.sleep(1.3)
    assert taker.acquire() and taker.holder()["token"] == taker.token
    dead.release()  # a late release of the dead holder never deletes the taker's lease
    assert taker.holder()["token"] == taker.token
    taker.release()


def test_exactly_one_of_racing_takers_gets_the_lease(store) -> None:
    takers = [_lease(store) for _ in range(6)]
    won: list[bool] = [False] * len(takers)
    start = threading.Barrier(len(takers))

    def take(i: int) -> None:
        start.wait()
        won[i] = takers[i].acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(takers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won) == 1, won
    for taker in takers:
        taker.release()


def test_a_holder_presumed_dead_never_overwrites_its_successor(store) -> None:
    """A holder that was only slow (not dead) finds its lease taken over: it stops beating instead
    of writing over the new holder's lease."""
    slow, taker = _lease(store), _lease(store)
    assert slow.acquire()
    slow._marker._stop.set()
    slow._marker._thread.join()
    time.sleep(1.3)
    assert taker.acquire()
    slow._marker._stop.clear()  # the slow holder wakes up and beats again...
    slow._marker.start()
    time.sleep(0.6)
    assert taker.holder()["token"] == taker.token  # ... but never over the taker's lease
    assert not slow._marker._thread.is_alive()
    taker.release()


def test_a_retry_of_the_same_task_takes_its_dead_attempt_s_lease_at_once(store) -> None:
    """Ray retries a node only after it saw the attempt die: the retry (same owner) takes the
    lease without waiting out the expiry; any other taker still waits."""
    dead = _lease(store, owner="session_a/task_1")
    assert dead.acquire()
    dead._marker._stop.set()  # SIGKILLed: the lease file stays, still fresh
    stranger, other_session = _lease(store, owner="session_b/task_1"), _lease(store)
    assert not stranger.acquire() and not other_session.acquire()
    retry = _lease(store, owner="session_a/task_1")
    assert retry.acquire() and retry.holder()["token"] == retry.token
    dead.release()  # the dead attempt never deletes its retry's lease
    assert retry.holder()["token"] == retry.token
    retry.release()


def test_a_ray_retry_of_a_killed_train_node_is_not_kept_waiting_by_its_own_lease(tmp_path: Path, ray_session) -> None:
    """A train node's worker SIGKILLed while it holds its lease: Ray's retry of that task takes
    the lease at once (the expiry here is an hour) and goes on."""
    import os

    from harness.run.nodes import _attempt_owner

    ray = ray_session

    results = str(tmp_path / "results")
    marker = tmp_path / "attempts.txt"

    @ray.remote(max_retries=1)
    def node() -> tuple[bool, str | None]:
        lease = Lease(open_store(results), "train-k", expire_s=3600.0, owner=_attempt_owner())
        got = lease.acquire()
        with open(marker, "a") as fh:
            fh.write(f"{got}\n")
        if sum(1 for _ in open(marker)) == 1:
            os._exit(1)  # killed while holding the lease
        lease.release()
        return got, lease.owner

    got, owner = ray.get(node.remote(), timeout=120)
    assert marker.read_text().split() == ["True", "True"] and got
    assert owner and owner.startswith("session_")
    assert not Lease(open_store(results), "train-k").holder(), "the retry released its lease"

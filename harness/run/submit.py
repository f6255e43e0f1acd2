"""Which nodes of a plan are handed to Ray, and when: a bounded window of runnable nodes.

Submitting a whole plan at once puts every training in Ray's queue before the first one runs.
A task Ray retries (its worker was killed, its node lost) then goes to the back of that queue: a
10,000-cell grid's interrupted training would wait behind every training submitted after it.
So the driver submits a node only once its inputs are done (it is runnable), and keeps at most
`window` submitted nodes unfinished: twice what the cluster can run at once (from
`ray.cluster_resources()` and the nodes' requests, re-read every round, so a cluster that grows
widens the window) plus a little. A retry then waits behind at most about one wave of queued
nodes, while the queue still shows Ray's autoscaler a wave of demand beyond what runs.
Every node is still its own Ray task with its own resources and retries: the scheduler sees
every training, only not all of them at once.
"""
from __future__ import annotations

import heapq
import math
import time
from typing import Any, Callable, Iterable

from harness.run.plan import Node, Plan

QUEUE_SLACK = 2  # runnable nodes queued beyond twice the cluster's capacity
SIZING_SAMPLE = 64  # the runnable nodes whose requests size the window
RESIZE_S = 1.0  # the window is re-sized from the cluster's totals at most this often


def capacity(totals: dict[str, float], requests: Iterable[dict[str, Any]]) -> int:
    """How many of the smallest of these requests the cluster's totals hold at once (at least 1)."""
    best = 0
    for request in requests:
        fits = [totals.get(name, 0.0) / float(amount) for name, amount in
                (("CPU", request.get("num_cpus", 1)), ("GPU", request.get("num_gpus", 0)),
                 ("memory", request.get("memory", 0))) if amount]
        best = max(best, int(math.floor(min(fits))) if fits else 1_000_000)
    return max(1, best)


class Window:
    """Submits the plan's nodes in topological order, runnable ones only, `window` at a time.

    `submit(node, input_refs) -> ref` starts one node (a Ray task); `finished(node_id)` tells the
    window a node's task ended (ok or not), which makes room and may make others runnable.
    Every step is incremental (a heap of runnable nodes in plan order, a count of each node's
    unfinished inputs), so a round costs what it submits, not the plan's size: a 10,000-cell grid's
    driver fills its window once per finished node without rescanning 20,000 nodes each time."""

    def __init__(self, plan: Plan, submit: Callable[[Node, list[Any]], Any],
                 options: Callable[[Node], dict[str, Any]]) -> None:
        self.plan, self._submit, self._options = plan, submit, options
        self.order = {n.id: i for i, n in enumerate(plan)}
        self.refs: dict[str, Any] = {}
        self.done: set[str] = set()
        self.in_flight: set[str] = set()
        self._waiting_on: dict[str, int] = {}  # node id -> its inputs not finished yet
        self._dependents: dict[str, list[str]] = {}
        self._ready: list[tuple[int, str]] = []  # (plan order, node id): runnable, not submitted
        self._later: list[tuple[float, int, str]] = []  # (not before, plan order, node id): handed back
        self._unsubmitted = len(plan)
        self._unfinished_dependents: dict[str, int] = {}  # node id -> dependents not finished yet
        self._window: tuple[float, int] | None = None  # (when sized, size)
        self._totals: dict[str, float] = {}
        for node in plan:
            self._waiting_on[node.id] = len(node.inputs)
            for i in node.inputs:
                self._dependents.setdefault(i, []).append(node.id)
                self._unfinished_dependents[i] = self._unfinished_dependents.get(i, 0) + 1
            if not node.inputs:
                self._ready.append((self.order[node.id], node.id))
        heapq.heapify(self._ready)

    def _size(self, totals: dict[str, float], now: float) -> int:
        """Twice what the cluster runs at once, plus QUEUE_SLACK; re-sized when the cluster's totals
        change, else at most every RESIZE_S (the runnable nodes' requests are read then, a bounded
        sample of them; called only while some node is runnable)."""
        if self._window is None or totals != self._totals or now - self._window[0] >= RESIZE_S:
            self._totals = dict(totals)
            sample = [self.plan.nodes[node_id] for _, node_id in self._ready[:SIZING_SAMPLE]]
            self._window = (now, 2 * capacity(totals, (self._options(n) for n in sample)) + QUEUE_SLACK)
        return self._window[1]

    def fill(self, totals: dict[str, float]) -> list[tuple[Any, Node]]:
        """Submit runnable nodes while fewer than the window are unfinished; (ref, node) of each."""
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            _, rank, node_id = heapq.heappop(self._later)
            heapq.heappush(self._ready, (rank, node_id))
        if not self._ready:  # nothing runnable: nothing to size the window for
            return []
        window = self._size(totals, now)
        started = []
        while self._ready and len(self.in_flight) < window:
            _, node_id = heapq.heappop(self._ready)
            node = self.plan.nodes[node_id]
            ref = self._submit(node, [self.refs[i] for i in node.inputs])
            self.refs[node.id] = ref
            self.in_flight.add(node.id)
            self._unsubmitted -= 1
            started.append((ref, node))
        return started

    def finished(self, node_id: str) -> None:
        self.in_flight.discard(node_id)
        if node_id in self.done:
            return
        self.done.add(node_id)
        self._release(node_id)
        for i in self.plan.nodes[node_id].inputs:
            self._unfinished_dependents[i] -= 1  # its inputs' results: no longer needed by it
            self._release(i)
        for dependent in self._dependents.get(node_id, ()):
            self._waiting_on[dependent] -= 1
            if self._waiting_on[dependent] == 0:
                heapq.heappush(self._ready, (self.order[dependent], dependent))

    def _release(self, node_id: str) -> None:
        """Drop a finished node's ref once every node that needs it has finished: Ray then frees its
        result (a train node's summary, an eval node's outcome) instead of holding all for the grid."""
        if node_id in self.done and not self._unfinished_dependents.get(node_id, 0):
            self.refs.pop(node_id, None)

    def again_later(self, node: Node, delay_s: float) -> None:
        """The node could not run now (another driver holds its train key's lease): it leaves the
        window and is submitted again, in its place in the order, once `delay_s` has passed."""
        self.in_flight.discard(node.id)
        self.refs.pop(node.id, None)
        self._unsubmitted += 1
        heapq.heappush(self._later, (time.monotonic() + delay_s, self.order[node.id], node.id))

    @property
    def handed_back(self) -> bool:
        """Some node waits to be submitted again (another driver held its lease)."""
        return bool(self._later)

    @property
    def unsubmitted(self) -> list[Node]:
        """Nodes not submitted (runnable, handed back, or waiting on inputs), in plan order; O(plan):
        for messages and tests, not for every round."""
        return [n for n in self.plan if n.id not in self.in_flight and n.id not in self.done]

    @property
    def exhausted(self) -> bool:
        return not self._unsubmitted and not self.in_flight

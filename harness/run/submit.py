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

import math
import time
from typing import Any, Callable, Iterable

from harness.run.plan import Node, Plan

QUEUE_SLACK = 2  # runnable nodes queued beyond twice the cluster's capacity
SIZING_SAMPLE = 64  # the runnable nodes whose requests size the window


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
    window a node's task ended (ok or not), which makes room and may make others runnable."""

    def __init__(self, plan: Plan, submit: Callable[[Node, list[Any]], Any],
                 options: Callable[[Node], dict[str, Any]]) -> None:
        self.plan, self._submit, self._options = plan, submit, options
        self.unsubmitted: list[Node] = list(plan)
        self.refs: dict[str, Any] = {}
        self.done: set[str] = set()
        self.in_flight: set[str] = set()
        self.not_before: dict[str, float] = {}  # node id -> monotonic time it may be submitted again

    def fill(self, totals: dict[str, float]) -> list[tuple[Any, Node]]:
        """Submit runnable nodes while fewer than the window are unfinished; (ref, node) of each."""
        now = time.monotonic()
        runnable = [n for n in self.unsubmitted if all(i in self.done for i in n.inputs)
                    and self.not_before.get(n.id, 0.0) <= now]
        sample = (runnable or self.unsubmitted)[:SIZING_SAMPLE]  # requests read per round: bounded at scale
        window = 2 * capacity(totals, (self._options(n) for n in sample)) + QUEUE_SLACK
        started = []
        for node in runnable:
            if len(self.in_flight) >= window:
                break
            self.not_before.pop(node.id, None)
            ref = self._submit(node, [self.refs[i] for i in node.inputs])
            self.refs[node.id] = ref
            self.in_flight.add(node.id)
            started.append((ref, node))
        submitted = {node.id for _, node in started}
        self.unsubmitted = [n for n in self.unsubmitted if n.id not in submitted]
        return started

    def finished(self, node_id: str) -> None:
        self.in_flight.discard(node_id)
        self.done.add(node_id)

    def again_later(self, node: Node, delay_s: float) -> None:
        """The node could not run now (another driver holds its train key's lease): it leaves the
        window and is submitted again, in its place in the order, once `delay_s` has passed."""
        self.in_flight.discard(node.id)
        self.refs.pop(node.id, None)
        self.not_before[node.id] = time.monotonic() + delay_s
        order = {n.id: i for i, n in enumerate(self.plan)}
        self.unsubmitted = sorted([*self.unsubmitted, node], key=lambda n: order[n.id])

    @property
    def exhausted(self) -> bool:
        return not self.unsubmitted and not self.in_flight

"""The driver hands Ray runnable nodes only, a bounded window at a time, so a task Ray retries
waits behind about one wave of queued nodes, not the whole grid (issue 27, item 6)."""
from __future__ import annotations

from harness.run.plan import Node, Plan
from harness.run.submit import QUEUE_SLACK, Window, capacity


def _plan(cells: int) -> Plan:
    plan = Plan()
    for i in range(cells):
        plan.add(Node(f"train/{i}", "train", f"t{i}"))
        plan.add(Node(f"eval/{i}", "eval", f"e{i}", inputs=(f"train/{i}",)))
    return plan


def test_capacity_from_the_cluster_and_the_requests() -> None:
    assert capacity({"CPU": 8.0}, [{"num_cpus": 2}]) == 4
    assert capacity({"CPU": 64.0, "GPU": 8.0}, [{"num_cpus": 4, "num_gpus": 1}]) == 8  # GPUs bound it
    assert capacity({"CPU": 8.0}, [{"num_cpus": 0.5, "num_gpus": 0}, {"num_cpus": 4}]) == 16  # the smallest request
    assert capacity({"CPU": 1.0}, [{"num_cpus": 4}]) == 1  # never 0: the request waits for a node


def test_only_runnable_nodes_are_submitted_a_window_at_a_time() -> None:
    submitted: list[str] = []
    window = Window(_plan(50), lambda node, inputs: submitted.append(node.id) or node.id, lambda node: {"num_cpus": 1})
    totals = {"CPU": 2.0}
    limit = 2 * 2 + QUEUE_SLACK
    first = window.fill(totals)
    assert [node.id for _, node in first] == [f"train/{i}" for i in range(limit)]  # no eval before its training
    assert window.fill(totals) == []  # the window is full
    window.finished("train/0")  # one training ends: its evaluation is runnable, and there is room for it
    assert [node.id for _, node in window.fill(totals)] == ["eval/0"]
    window.finished("train/1")
    window.finished("eval/0")
    assert [node.id for _, node in window.fill(totals)] == ["eval/1", f"train/{limit}"]
    while not window.exhausted:  # the rest drains; never more than the window unfinished
        for _, node in window.fill({"CPU": 2.0}):
            assert len(window.in_flight) <= limit
        window.finished(next(iter(sorted(window.in_flight))))
    assert sorted(submitted) == sorted(n.id for n in _plan(50))
    assert len(submitted) == len(set(submitted)) == 100


def test_a_growing_cluster_widens_the_window() -> None:
    window = Window(_plan(100), lambda node, inputs: node.id, lambda node: {"num_cpus": 1})
    assert len(window.fill({"CPU": 2.0})) == 2 * 2 + QUEUE_SLACK
    assert len(window.fill({"CPU": 16.0})) == 2 * 16 + QUEUE_SLACK - (2 * 2 + QUEUE_SLACK)


def test_the_driver_lets_go_of_each_result_once_its_dependents_finished() -> None:
    """A 10,000-cell grid's driver must not hold every node's result: a ref is dropped once the
    nodes that read it have finished, and kept while one of them is handed back (busy)."""
    window = Window(_plan(3), lambda node, inputs: f"ref-{node.id}", lambda node: {"num_cpus": 1})
    window.fill({"CPU": 8.0})
    window.finished("train/0")
    window.fill({"CPU": 8.0})
    assert "train/0" in window.refs  # eval/0 reads it and is running
    window.again_later(window.plan.nodes["eval/0"], 0.0)  # another driver holds the cell: it comes back
    assert "train/0" in window.refs
    assert [node.id for _, node in window.fill({"CPU": 8.0})] == ["eval/0"]
    window.finished("eval/0")
    assert "train/0" not in window.refs and "eval/0" not in window.refs
    for node_id in ("train/1", "train/2"):
        window.finished(node_id)
    window.fill({"CPU": 8.0})
    for node_id in ("eval/1", "eval/2"):
        window.finished(node_id)
    assert window.exhausted and window.refs == {}

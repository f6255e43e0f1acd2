"""The plan: cells -> train / eval / artifact nodes, deduplicated, upstream declared by methods,
pruned to what is not yet done. Planning only: nothing here trains."""
from __future__ import annotations

from harness.core.config import compose_config, finalize
from harness.run.plan import build_plan, eval_node_id, prune, train_node_id


def _cells(tiny: list[str], *methods: str, extra: tuple[str, ...] = ()) -> list[dict]:
    return [finalize(compose_config(tiny + ["backdoor=badnets", f"method={m}", *extra])) for m in methods]


def test_upstream_models_are_train_nodes_shared_by_every_cell_that_needs_them(tiny) -> None:
    erm, ft, fp, nad, cbd = _cells(tiny, "erm", "ft", "fp", "nad", "cbd")
    plan = build_plan([erm, ft, fp, nad, cbd])
    erm_node = train_node_id(erm)
    # FT, FP and NAD start from the grid's own ERM cell: the same node, not a copy
    for cell in (ft, fp, nad):
        assert erm_node in plan.nodes[train_node_id(cell)].inputs
    # NAD's teacher is the FT model: FT's train node, again shared
    assert train_node_id(ft) in plan.nodes[train_node_id(nad)].inputs
    # CBD's f_B is ERM for T epochs: another model, its own node
    (fb,) = plan.nodes[train_node_id(cbd)].inputs
    assert fb != erm_node and plan.nodes[fb].cfg["trainer"]["epochs"] == 1
    assert plan.counts() == {"train": 6, "eval": 5, "artifact": 0}
    order = list(plan.nodes)
    for node in plan:
        assert all(order.index(i) < order.index(node.id) for i in node.inputs), "inputs come first"


def test_cells_differing_in_eval_settings_share_one_train_node(tiny) -> None:
    a, b = finalize(compose_config(tiny)), finalize(compose_config(tiny + ["attack=[pgd]"]))
    plan = build_plan([a, b])
    assert a["train_key"] == b["train_key"] and plan.counts()["train"] == 1
    assert plan.nodes[eval_node_id(a)].inputs == plan.nodes[eval_node_id(b)].inputs


def test_prune_keeps_only_what_is_not_done(tiny) -> None:
    erm, ft = _cells(tiny, "erm", "ft")
    plan = build_plan([erm, ft])
    # nothing done: everything runs
    assert len(prune(plan, set(), set())) == len(plan)
    # ERM trained and committed: FT still needs ERM's model, but only reads it
    kept = prune(plan, {erm["key"]}, {train_node_id(erm)})
    assert set(kept.nodes) == {train_node_id(ft), eval_node_id(ft)}
    assert kept.nodes[train_node_id(ft)].inputs == ()
    # both models trained, a new attack added: eval nodes only, never a training
    kept = prune(plan, set(), {train_node_id(erm), train_node_id(ft)})
    assert kept.counts() == {"train": 0, "eval": 2, "artifact": 0}
    # a committed cell whose checkpoint is gone is not retrained for nothing
    assert len(prune(plan, {erm["key"], ft["key"]}, set())) == 0

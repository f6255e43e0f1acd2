"""grid=backdoor_bench: every registered poison x every backdoor defense (plus no defense), planned
with one poisoned ERM per (poison, seed) that every post-training defense starts from. Planning only."""
from __future__ import annotations

from harness.core.registry import METHODS, POISONS
from harness.run.expand import expand_grid
from harness.run.plan import build_plan, train_node_id


def _axes() -> dict:
    from harness.core.config import compose_config

    return compose_config(["grid=backdoor_bench"])["grid"]["axes"]


def test_the_matrix_covers_every_poison_and_every_defense() -> None:
    axes = _axes()
    assert set(axes["backdoor"]) == set(POISONS.names()) - {"none"}, "a new poison joins the matrix"
    defenses = {name for name, cls in METHODS.items() if getattr(cls, "backdoor_defense", False)}
    assert set(axes["method"]) == defenses | {"erm"}, "a new backdoor defense joins the matrix"
    assert axes["method"][0] == "erm"


def test_post_training_defenses_share_one_poisoned_erm_per_poison_and_seed(data_root, tmp_path) -> None:
    # three poisons (a fixed trigger, a learned one, a trained generator) x every method: composing
    # all 14 x 17 cells costs a Hydra composition each (~100 s here) and proves nothing more
    poisons = ["badnets", "lf", "iad"]
    cells = expand_grid(["grid=backdoor_bench", "grid.axes.seed=[0]", f"grid.axes.backdoor=[{','.join(poisons)}]",
                         f"data.root={data_root}", f"results_dir={tmp_path}"])
    axes = {**_axes(), "backdoor": poisons}
    assert len(cells) == len(axes["backdoor"]) * len(axes["method"])
    assert all(c["data"]["img_size"] == 16 for c in cells)
    plan = build_plan(cells)
    erm = {c["backdoor"]["name"]: train_node_id(c) for c in cells if c["method"]["name"] == "erm"}
    for cell in cells:
        node = plan.nodes[train_node_id(cell)]
        if cell["method"]["name"] in ("ft", "fp", "nad"):
            assert erm[cell["backdoor"]["name"]] in node.inputs, cell["label"]
    # each poisoned ERM is one node, whatever number of defenses start from it
    assert sum(1 for n in plan.nodes.values() if n.id in set(erm.values())) == len(axes["backdoor"])

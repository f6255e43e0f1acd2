"""ABL as bboylyg/ABL runs it: three train nodes (isolation model, fine-tuning on the other 99%,
unlearning of the isolated 1%), each with its official settings, the isolation decided by the
isolation model's weights whatever the stage starts from, and the unlearning an ascent step with
BatchNorm in train mode."""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from harness.core.config import compose_config, finalize
from harness.run.plan import build_plan, planned_data, planned_trainer, train_node_id
from harness.train.schedule import lr_at_epochs
from methods.abl import ABL, ABL_DEFAULTS, ABLFinetune, ABLIsolation, isolate
from methods.base import TrainContext

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


def _stages(*overrides: str) -> dict[str, Any]:
    cfg = finalize(compose_config(["method=abl", "backdoor=badnets", "trainer=backdoor", *overrides]))
    return {n.cfg["method"]["name"]: n for n in build_plan([cfg]) if n.kind == "train"}, cfg


def test_isolation_keeps_the_floor_of_ratio_lowest_losses() -> None:
    losses = np.array([0.5, 0.1, 0.9, 0.0, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4])
    indices = np.arange(100, 110)
    assert isolate(indices, losses, 0.25).tolist() == [101, 103]  # floor(2.5) = 2, as isolate_data's int()
    assert isolate(indices, losses, 0.3).tolist() == [101, 103, 105]
    with pytest.raises(ValueError, match="isolation_ratio=0.05 isolates no sample of 10"):
        isolate(indices, losses, 0.05)


def test_defaults_are_the_official_stage_settings() -> None:
    """configs/method/abl.yaml, ABL's keyword defaults and ABL_DEFAULTS (read by its plan hooks) agree."""
    config = yaml.safe_load((CONFIGS / "abl.yaml").read_text())
    signature = {k: p.default for k, p in inspect.signature(ABL.__init__).parameters.items()
                 if k not in ("self", "isolation_checkpoint")}
    signature["finetune_milestones"] = list(signature["finetune_milestones"])
    assert {k: v for k, v in config.items() if k != "name"} == ABL_DEFAULTS == signature
    nodes, _ = _stages()
    lga, ft, unlearn = (planned_trainer(nodes[n].cfg) for n in ("abl_lga", "abl_finetune", "abl"))
    assert (lga["epochs"], lga["batch_size"], lr_at_epochs(lga)) == (10, 128, [0.1] * 10)
    assert (ft["epochs"], ft["batch_size"]) == (60, 128)
    assert lr_at_epochs(ft) == pytest.approx([0.1] * 40 + [0.01] * 20)
    assert (unlearn["epochs"], unlearn["batch_size"], lr_at_epochs(unlearn)) == (4, 128, [5e-4] * 4)
    assert unlearn["init_optimizer"] is True and not lga.get("init_optimizer") and not ft.get("init_optimizer")
    for t in (lga, ft, unlearn):  # trainer=backdoor: their optimiser
        assert t["optimizer"] == {"name": "sgd", "lr": t["optimizer"]["lr"], "momentum": 0.9, "weight_decay": 1e-4,
                                  "nesterov": True}


def test_the_plan_chains_isolation_finetuning_and_unlearning() -> None:
    nodes, cfg = _stages()
    lga, ft, unlearn = nodes["abl_lga"], nodes["abl_finetune"], nodes["abl"]
    assert [(u.arg, u.cfg["method"]["name"]) for u in unlearn.upstream] == [("isolation_checkpoint", "abl_lga"),
                                                                              (None, "abl_finetune")]
    assert [(u.arg, u.cfg["method"]["name"]) for u in ft.upstream] == [("isolation_checkpoint", "abl_lga")]
    assert unlearn.inputs == (lga.id, ft.id) and ft.inputs == (lga.id,)  # one isolation model for both
    assert unlearn.id == train_node_id(cfg)
    data = {name: planned_data(node.cfg) for name, node in nodes.items()}
    assert data["abl_lga"]["augment"] == {} and data["abl_lga"]["shuffle"] is False
    assert data["abl_finetune"]["augment"]["cutout"] == {"holes": 1, "length": 3}
    assert data["abl"]["augment"] == {}

    nodes, cfg = _stages("method.finetune=false")  # the unlearning starts from the isolation model, fresh SGD
    assert set(nodes) == {"abl_lga", "abl"}
    assert [u.arg for u in nodes["abl"].upstream] == ["isolation_checkpoint"]
    assert planned_trainer(nodes["abl"].cfg)["init_optimizer"] is False

    nodes, _ = _stages("method.isolation_epochs=3", "method.finetune_epochs=5", "method.cutout_length=0")
    assert planned_trainer(nodes["abl_lga"].cfg)["epochs"] == 3
    assert planned_trainer(nodes["abl_finetune"].cfg)["epochs"] == 5
    assert "cutout" not in planned_data(nodes["abl_finetune"].cfg)["augment"]


class _Samples:
    """A TrainSamples stand-in: `score` runs fn on a fixed batch (the split), indices 0..n-1."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, poisoned: np.ndarray) -> None:
        self.x, self.y, self.poisoned, self.device = x, y, poisoned, torch.device("cpu")

    def score(self, fn):
        with torch.no_grad():
            return np.arange(len(self.y)), fn(self.x, self.y).double().numpy()


def _model(seed: int = 0):
    from architectures.presets import build_classifier

    torch.manual_seed(seed)
    return build_classifier({"name": "test_resnet", "kwargs": {}}, num_classes=10, in_chans=1, img_size=8,
                            mean=[0.5], std=[0.25])


def test_both_stages_select_by_the_isolation_weights(tmp_path: Path) -> None:
    """The isolated set is the lowest CE of the isolation checkpoint in eval mode, even when the
    stage's module starts elsewhere (init_from, resume); fine-tuning takes exactly the rest."""
    from harness.store.checkpoints import save_checkpoint

    isolation = _model(1)
    path = tmp_path / "isolation.pt"
    save_checkpoint(path, {"model": isolation.state_dict()})
    gen = torch.Generator().manual_seed(0)
    samples = _Samples(torch.rand(200, 1, 8, 8, generator=gen), torch.randint(0, 10, (200,), generator=gen),
                       poisoned=np.arange(0, 200, 10))
    with torch.no_grad():
        expected = np.sort(np.argsort(F.cross_entropy(isolation.eval()(samples.x), samples.y,
                                                      reduction="none").double().numpy())[:10])

    picked = {}
    for cls in (ABL, ABLFinetune):
        method = cls(isolation_ratio=0.05, isolation_checkpoint=str(path))
        module = method.build(_model(2))
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), isolation.state_dict().values()))
        with torch.no_grad():  # the trainer's init_from (or a resumed checkpoint) replaces the weights
            for p in module.parameters():
                p.add_(1.0)
        picked[cls.name] = method.select_train_samples(samples)
    assert picked["abl"].tolist() == expected.tolist()
    assert sorted(picked["abl"].tolist() + picked["abl_finetune"].tolist()) == list(range(200))
    assert method.precision == pytest.approx(np.isin(expected, samples.poisoned).mean())


def test_unlearning_ascends_with_batchnorm_in_train_mode_unless_frozen() -> None:
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for freeze in (False, True):
        model = _model().train()
        stats = [b.clone() for b in model.buffers() if b.is_floating_point()]
        method = ABL(freeze_bn=freeze)
        ctx = TrainContext(epoch=0, epochs=1, step=0, steps_per_epoch=1, device=torch.device("cpu"), rank=0,
                           world_size=1, classifier=model)
        logs = method.training_step(model, x, y, ctx)
        assert torch.equal(logs["loss"], -logs["isolated_ce"]) and logs["isolated_ce"] > 0
        moved = any(not torch.equal(a, b) for a, b in zip(stats, (b for b in model.buffers() if b.is_floating_point())))
        assert moved is not freeze  # official: train mode, so the running statistics move
        assert model.training  # the mode is restored


def test_isolation_is_the_lga_loss() -> None:
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    ce = F.cross_entropy(logits, y)
    for gamma, sign in ((0.5, 1.0), (50.0, -1.0)):
        ctx = TrainContext(epoch=0, epochs=1, step=0, steps_per_epoch=1, device=torch.device("cpu"), rank=0,
                           world_size=1, classifier=None)  # type: ignore[arg-type]
        logs = ABLIsolation(gamma=gamma).training_step(lambda x: x, logits, y, ctx)
        assert torch.allclose(logs["loss"], sign * ce)


def test_an_abl_cell_trains_its_three_nodes_and_unlearns_the_isolated_samples(tiny) -> None:
    from harness.run.cell import run_cell
    from harness.store.checkpoint_sync import local_work_dir
    from harness.store.index import read_results
    from harness.train.trainer import SUMMARY
    import json

    base = [o for o in tiny if not o.startswith("attack.")] + ["backdoor=badnets", "attack=[fgsm]"]
    cfg = finalize(compose_config(base + ["method=abl", "method.isolation_epochs=1", "method.finetune_epochs=1",
                                          "method.epochs=1", "method.isolation_ratio=0.05", "method.batch_size=64"]))
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    row = read_results(cfg["results_dir"]).to_pylist()[0]
    assert row["n_train"] == math.floor(0.05 * 256) and row["epochs"] == 1  # the isolated 5%
    nodes = {n.cfg["method"]["name"]: n for n in build_plan([cfg]) if n.kind == "train"}
    finetuned = json.loads((local_work_dir(nodes["abl_finetune"].cfg) / SUMMARY).read_text())
    assert finetuned["n_train"] == 256 - 12
    curve = json.loads(row["train_curve"]) if isinstance(row["train_curve"], str) else row["train_curve"]
    assert 0 <= curve[-1]["isolation_precision"] <= 1 and curve[-1]["loss"] < 0

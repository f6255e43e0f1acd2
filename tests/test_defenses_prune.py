"""The pruning / trigger-synthesis defenses (methods/backdoor/: CLP, ANP, NC, RNP, BNP): each decision they
document, on a digits test_resnet, through the trainer; the plan refuses a BatchNorm-pruning
defense on an architecture without BatchNorm, and a clean fraction outside (0, 1], before work."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import harness.train.trainer as trainer
from harness.core.config import ConfigError, compose_config, finalize
from harness.run.plan import planned_trainer, run_config
from harness.store.checkpoint_sync import local_work_dir
from harness.store.checkpoints import save_checkpoint
from helpers import digits_batch


class _Samples:
    """The clean split in memory, scored as harness/train/selection.py's TrainSamples does."""

    poisoned = np.zeros(0, dtype=np.int64)

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def score(self, fn):
        with torch.no_grad():
            out = [fn(self.x[i:i + 64], self.y[i:i + 64]).double().numpy() for i in range(0, len(self.y), 64)]
        return np.arange(len(self.y)), np.concatenate(out)


def _cell(data_root: Path, tmp_path: Path, method: str, *extra: str) -> dict[str, Any]:
    return finalize(compose_config([f"data.root={data_root}", f"results_dir={tmp_path / 'results'}",
                                    "trainer=tiny", "data.train_limit=256", "backdoor=badnets",
                                    f"method={method}", *extra]))


def _train_planned(cfg: dict[str, Any], checkpoint: Path, monkeypatch) -> tuple[Any, Any, dict[str, Any]]:
    """Train the cell as its train node runs (run_config: the stage's trainer, the clean subset),
    from `checkpoint`; (the method instance the trainer built, the summary, the run config)."""
    run = run_config(cfg, {"backdoored_checkpoint": str(checkpoint)})
    built: list[Any] = []
    build = trainer.build_method
    monkeypatch.setattr(trainer, "build_method", lambda c: built.append(build(c)) or built[-1])
    summary = trainer.train(run, local_work_dir(run))
    return built[0], summary, run


# ------------------------------------------------------------------------------------------ CLP

def test_clp_bound_is_the_largest_singular_value_times_the_batchnorm_scale(erm_model) -> None:
    from methods.backdoor.clp import channel_lipschitz_bounds

    conv, bn = erm_model.body.layer1[0].conv1, erm_model.body.layer1[0].bn1
    bounds = channel_lipschitz_bounds(conv, bn)
    for k in (0, 3):
        w = conv.weight[k].reshape(conv.weight.shape[1], -1).double()
        expected = torch.linalg.svdvals(w).max() * (bn.weight[k] / bn.running_var[k].sqrt()).abs().double()
        assert float(bounds[k]) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_clp_prunes_the_channel_with_a_planted_lipschitz_bound_and_nothing_without_outliers(erm_model) -> None:
    from methods.backdoor.clp import CLP, channel_lipschitz_bounds, clp_prune_flags

    model = copy.deepcopy(erm_model)
    conv, bn = model.body.layer2[0].conv2, model.body.layer2[0].bn2
    with torch.no_grad():
        conv.weight[5] *= 50.0  # a backdoor-like channel: its output grows 50x faster with its input
    method = CLP()
    module = method.build(model)
    layer = module.layers.index("body.layer2.0.bn2")
    assert bool(module.gates(layer)[0][5] == 0) and bool(module.gates(layer)[1][5] == 0)
    _, flags = clp_prune_flags(model, u=1e9)  # an infinite threshold prunes nothing
    assert not any(bool(f.any()) for f in flags)
    record = method.summary()  # the row's method_summary
    assert record["pruned_per_layer"]["body.layer2.0.bn2"] >= 1 and record["pruned_channels"] == module.pruned_count()
    assert sum(record["pruned_per_layer"].values()) == record["pruned_channels"] and record["channels"] == 1008
    assert record["max_bound"]["body.layer2.0.bn2"] == pytest.approx(float(channel_lipschitz_bounds(conv, bn)[5]))


def test_clp_gates_zero_the_pruned_channels_output(erm_model, digits_dir) -> None:
    """A pruned channel outputs 0 after its BatchNorm (weight and bias zeroed, as CLP_prune does)."""
    from methods.backdoor.masks import GatedBatchNorm

    module = GatedBatchNorm(copy.deepcopy(erm_model)).eval()
    bn = module.batchnorms()[1]
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.update(out=o))
    flags = [torch.zeros(b.num_features, dtype=torch.bool) for b in module.batchnorms()]
    flags[1][2] = True
    module.set_pruned(flags, bias=True)
    x, _ = digits_batch(digits_dir, 8)
    reference = copy.deepcopy(erm_model).eval()
    ref_bn = dict(reference.named_modules())[module.layers[1]]
    with torch.no_grad():
        ref_bn.weight[2] = 0.0
        ref_bn.bias[2] = 0.0
        expected = reference(x)
        got = module(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert float(seen["out"][:, 2].abs().max()) < 1e-6  # (the hook's output is what flows on)


def test_clp_trains_zero_epochs_and_the_pruned_model_is_the_cells_checkpoint(erm_model, data_root, tmp_path,
                                                                               monkeypatch) -> None:
    model = copy.deepcopy(erm_model)
    with torch.no_grad():
        model.body.layer3[0].conv1.weight[7] *= 50.0
    save_checkpoint(tmp_path / "erm.pt", {"model": model.state_dict()})
    cfg = _cell(data_root, tmp_path, "clp")
    assert planned_trainer(cfg)["epochs"] == 0
    method, summary, run = _train_planned(cfg, tmp_path / "erm.pt", monkeypatch)
    assert summary.curve == [] and summary.samples_per_epoch == []
    saved = torch.load(local_work_dir(run) / trainer.CHECKPOINT, weights_only=False)
    layer = method.module.layers.index("body.layer3.0.bn1")
    assert summary.method_summary["pruned_per_layer"]["body.layer3.0.bn1"] >= 1  # recorded for the row
    assert float(saved["model"][f"weight_gate_{layer}"][7]) == 0.0 and bool(saved["model"]["pruned"])
    evaluated = trainer.load_trained_classifier(run, local_work_dir(run))
    x, _ = digits_batch(Path(run["data"]["dir"]), 16)
    with torch.no_grad():
        assert torch.equal(evaluated(x), method.eval_model(method.build(copy.deepcopy(model))).eval()(x))



def test_a_clp_cell_records_what_it_pruned_in_its_result_row(tiny) -> None:
    """Method.summary reaches the row: the pruned channels (in all and per layer), equal to the gates
    of the checkpoint the cell evaluated, and the per-layer bound CLP pruned by."""
    import json

    from harness.run.cell import run_cell
    from harness.run.plan import build_plan
    from harness.store.index import read_results

    cfg = finalize(compose_config([o for o in tiny if not o.startswith("attack.")]
                                  + ["backdoor=badnets", "attack=[fgsm]", "method=clp", "method.u=1.0"]))
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    row = read_results(cfg["results_dir"]).to_pylist()[0]
    record = json.loads(row["method_summary"])
    node = next(n for n in build_plan([cfg]) if n.kind == "train" and n.cfg["method"]["name"] == "clp")
    saved = torch.load(local_work_dir(node.cfg) / trainer.CHECKPOINT, weights_only=False)["model"]
    gated = sum(int((v == 0).sum()) for k, v in saved.items() if k.startswith("weight_gate_"))
    assert record["pruned_channels"] == gated > 0 and sum(record["pruned_per_layer"].values()) == gated
    assert record["channels"] == 1008 and set(record["max_bound"]) == set(record["pruned_per_layer"])


# ----------------------------------------------------------------------------- refusals before work

def test_a_batchnorm_defense_on_a_vit_is_refused_at_plan_time_naming_it_and_the_fix(data_root, tmp_path) -> None:
    from harness.run.grid import validate_cell

    for method in ("clp", "anp", "rnp", "bnp"):
        cfg = _cell(data_root, tmp_path, method, "arch=test_vit")
        with pytest.raises(ConfigError, match=rf"method={method} prunes BatchNorm.*arch=test_vit.*Fix: .*arch=test_resnet"):
            validate_cell(cfg)
        validate_cell(_cell(data_root, tmp_path, method))  # test_resnet has BatchNorm: accepted


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1"])
def test_a_clean_fraction_outside_0_1_is_refused_before_work(data_root, tmp_path, fraction) -> None:
    from harness.run.grid import validate_cell

    for method in ("clp", "ft", "rnp"):
        cfg = _cell(data_root, tmp_path, method, f"method.clean_subset={fraction}")
        with pytest.raises(ConfigError, match=r"method.clean_subset must be in \(0, 1\].*Fix: method.clean_subset=0.05"):
            validate_cell(cfg)  # what `robustgrid grid` and --dry-run check for every cell before Ray starts


# ------------------------------------------------------------------------------------------ ANP

def test_anp_gates_equal_their_noisy_batchnorm(erm_model, digits_dir) -> None:
    """(m + delta) on the weight term and (1 + xi) on the bias: what F.batch_norm computes with
    weight * coeff_w and bias * coeff_b (NoisyBatchNorm2d), in train and eval mode."""
    from methods.backdoor.anp import PerturbedBatchNorm

    module = PerturbedBatchNorm(copy.deepcopy(erm_model))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(len(module.layers)):
            getattr(module, f"mask_{i}").copy_(torch.rand(getattr(module, f"mask_{i}").shape, generator=gen))
        module.reset_noise(0.4)
    module.perturbed = True
    bn = module.batchnorms()[3]
    x = torch.randn(4, bn.num_features, 3, 3, generator=gen)
    for train in (True, False):
        bn.train(train)
        got = bn(x)
        coeff_w, coeff_b = module.mask_3 + module.noise_3, 1 + module.noise_bias_3
        expected = torch.nn.functional.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(),
                                                  bn.weight * coeff_w, bn.bias * coeff_b, train, 0.0, bn.eps)
        assert torch.allclose(got, expected, atol=1e-5)


def test_anp_learns_masks_through_the_trainer_then_prunes_at_the_threshold(erm_model, data_root, tmp_path,
                                                                            monkeypatch) -> None:
    """Weights and running statistics stay; masks move and stay in [0, 1]; after the last epoch the
    channels with mask <= the threshold have their weight term gated off (the bias stays), nothing else."""
    from methods.backdoor.anp import PerturbedBatchNorm

    save_checkpoint(tmp_path / "erm.pt", {"model": erm_model.state_dict()})
    cfg = _cell(data_root, tmp_path, "anp", "method.epochs=3", "method.batch_size=8", "method.lr=0.2",
                "method.clean_subset=0.1", "method.pruning_threshold=0.99")  # (a clean model: few masks fall far)
    assert planned_trainer(cfg)["optimizer"] == {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0,
                                                 "nesterov": False}
    method, summary, run = _train_planned(cfg, tmp_path / "erm.pt", monkeypatch)
    assert len(summary.curve) == 3 and summary.n_train == 26  # ceil(10% of 256): the clean subset
    module: PerturbedBatchNorm = method.module
    masks = [m.detach() for m in module.masks()]
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in masks)
    assert any(float((m - 1).abs().max()) > 0.01 for m in masks)  # the masks learned
    reference = erm_model.state_dict()
    for name, value in module.model.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # (counts batches; unused with a set momentum)
            assert torch.equal(value, reference[name]), name  # weights and BatchNorm statistics untouched
    for i, m in enumerate(masks):
        assert torch.equal(getattr(module, f"weight_gate_{i}") == 0, m <= 0.99)
        assert bool((getattr(module, f"bias_gate_{i}") == 1).all())
    assert module.pruned_count() == sum(int((m <= 0.99).sum()) for m in masks) > 0
    evaluated = trainer.load_trained_classifier(run, local_work_dir(run)).eval()
    x, _ = digits_batch(Path(run["data"]["dir"]), 16)
    pruned = copy.deepcopy(erm_model).eval()
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, m in zip(module.layers, masks):
            modules[name].weight[m <= 0.99] = 0.0  # their `pruning`: the weight of each pruned neuron
        assert torch.allclose(evaluated(x), pruned(x), atol=1e-5)


# ------------------------------------------------------------------------------------ Neural Cleanse

def test_nc_anomaly_index_is_mad_of_the_mask_norms() -> None:
    from methods.backdoor.nc import anomaly

    norms = torch.tensor([20.0, 21.0, 19.0, 22.0, 3.0, 20.5, 18.0, 21.5, 19.5, 20.0])
    median = float(torch.median(norms))
    mad = 1.4826 * float(torch.median((norms - median).abs()))
    index, flagged = anomaly(norms)
    assert index == pytest.approx(abs(3.0 - median) / mad) and flagged == [4]
    assert anomaly(torch.tensor([20.0, 21.0, 19.0, 22.0, 20.5, 19.5, 21.5]))[1] == []  # no outlier: nothing flagged
    assert anomaly(torch.tensor([20.0, 21.0, 19.0, 22.0, 60.0, 20.5, 19.5]))[1] == []  # large norms never flag


@pytest.fixture(scope="module")
def backdoored(erm_model, digits_dir) -> torch.nn.Module:
    """The digits test_resnet fine-tuned with a 2x2 white BadNets patch (bottom right) -> class 0 on
    a third of every batch: a strong backdoor."""
    from harness.data.loader import make_loader

    model = copy.deepcopy(erm_model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(3):
        for x, y in make_loader(digits_dir, "train", 64, shuffle=True, epoch=epoch):
            n = len(y) // 3
            x, y = x.clone(), y.clone()
            x[:n, :, -2:, -2:] = 1.0
            y[:n] = 0
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.slow
def test_nc_flags_the_target_class_of_a_planted_trigger_and_unlearns_it(backdoored, data_root, tmp_path,
                                                                       monkeypatch) -> None:
    """Both train nodes through the trainer: the reversed trigger of class 0 is the smallest and
    the MAD test flags class 0; the unlearning stage stamps it and lowers the attack success."""
    x, y = digits_batch(data_root / "digits", 128)
    triggered = x.clone()
    triggered[:, :, -2:, -2:] = 1.0
    keep = y != 0
    with torch.no_grad():
        asr_before = float((backdoored(triggered[keep]).argmax(1) == 0).float().mean())
    assert asr_before > 0.9
    save_checkpoint(tmp_path / "erm.pt", {"model": backdoored.state_dict()})
    trig_cfg = _cell(data_root, tmp_path, "nc_trigger", "method.nc_epoch=12", "method.batch_size=64",
                     "method.clean_subset=1.0")
    finder, _, trig_run = _train_planned(trig_cfg, tmp_path / "erm.pt", monkeypatch)
    norms = finder.state["mask_best"].flatten(1).sum(1)
    assert int(norms.argmin()) == 0, norms
    monkeypatch.undo()
    cfg = _cell(data_root, tmp_path, "nc", "method.epochs=3", "method.batch_size=64", "method.clean_subset=1.0",
                "method.lr=0.05")
    run = run_config(cfg, {"backdoored_checkpoint": str(tmp_path / "erm.pt"),
                           "trigger_checkpoint": str(local_work_dir(trig_run) / trainer.CHECKPOINT)})
    built: list[Any] = []
    build = trainer.build_method
    monkeypatch.setattr(trainer, "build_method", lambda c: built.append(build(c)) or built[-1])
    summary = trainer.train(run, local_work_dir(run))
    assert built[0].summary()["flagged"] == [0] and built[0].summary()["anomaly_index"] > 2
    assert summary.curve[-1]["nc_flagged"] == 1 and summary.curve[-1]["nc_anomaly_index"] > 2
    model = trainer.load_trained_classifier(run, local_work_dir(run)).eval()
    with torch.no_grad():
        asr_after = float((model(triggered[keep]).argmax(1) == 0).float().mean())
    assert asr_after < asr_before


# ------------------------------------------------------------------------------------------ RNP

def test_rnp_prunes_by_their_final_rule_on_planted_masks() -> None:
    """threshold: every mask <= 0.7 as their 4-decimal mask file reads it (0.70004 -> 0.7000 is
    pruned, 0.7001 is not); number n: the 2 * ceil(n) lowest masks, ties in layer/channel order."""
    from methods.backdoor.rnp import rnp_prune_flags

    masks = [torch.tensor([0.1, 0.70004, 0.7001, 0.9]), torch.tensor([0.69, 1.0, 0.1])]
    flags = rnp_prune_flags(masks, "threshold", 0.7)
    assert flags[0].tolist() == [True, True, False, False] and flags[1].tolist() == [True, False, True]
    flags = rnp_prune_flags(masks, "number", 0.7)  # ceil(0.7) = 1, twice: the two lowest (0.1, 0.1)
    assert flags[0].tolist() == [True, False, False, False] and flags[1].tolist() == [False, False, True]
    flags = rnp_prune_flags(masks, "number", 2)  # four: 0.1, 0.1, 0.69, 0.70004
    assert flags[0].tolist() == [True, True, False, False] and flags[1].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="pruning_by"):
        rnp_prune_flags(masks, "percent", 0.7)


def test_rnp_plans_unlearning_then_recovery_from_one_erm(data_root, tmp_path) -> None:
    """Two upstream nodes: the grid's ERM and rnp_unlearn (itself from the same ERM) with the cell's
    unlearning settings; the recovery stage is SGD(0.2, momentum 0.9), no decay, 20 epochs."""
    from harness.run.plan import build_plan, train_node_id

    cfg = _cell(data_root, tmp_path, "rnp", "method.clean_threshold=0.3")
    plan = build_plan([cfg])
    node = plan.nodes[train_node_id(cfg)]
    ups = {u.arg: u.cfg["method"] for u in node.upstream}
    assert ups["backdoored_checkpoint"]["name"] == "erm"
    assert ups["unlearned_checkpoint"] == {"name": "rnp_unlearn", "clean_subset": 0.01, "unlearning_epochs": 20,
                                           "unlearning_lr": 0.01, "schedule": [10, 20], "clean_threshold": 0.3,
                                           "batch_size": 256}
    unlearn = plan.nodes[train_node_id(node.upstream[1].cfg)]
    assert train_node_id(node.upstream[0].cfg) in unlearn.inputs  # one ERM for both
    assert planned_trainer(cfg)["optimizer"] == {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0,
                                                 "nesterov": False}
    assert planned_trainer(cfg)["epochs"] == 20
    stage = planned_trainer(node.upstream[1].cfg)
    assert stage["optimizer"]["weight_decay"] == 5e-4 and stage["schedule"]["milestones"] == [10, 20]


def test_rnp_unlearning_stops_at_the_threshold_and_holds_still_after(erm_model, data_root, tmp_path,
                                                                      monkeypatch) -> None:
    """Gradient ascent until an epoch's training accuracy is <= clean_threshold; the remaining
    epochs of the node change nothing (weights and BatchNorm statistics put back after each step)."""
    save_checkpoint(tmp_path / "erm.pt", {"model": erm_model.state_dict()})
    cfg = _cell(data_root, tmp_path, "rnp_unlearn", "method.unlearning_epochs=6", "method.batch_size=16",
                "method.clean_subset=0.125", "method.unlearning_lr=0.05", "method.clean_threshold=0.5")
    method, summary, run = _train_planned(cfg, tmp_path / "erm.pt", monkeypatch)
    accs = [c["train_acc"] for c in summary.curve]
    stop = method.stopped_epoch
    assert 0 <= stop < 5, accs  # it stopped before the last epoch
    assert accs[stop] <= 0.5 and all(a > 0.5 for a in accs[:stop])
    assert summary.curve[-1]["unlearn_stopped_epoch"] == stop
    saved = torch.load(local_work_dir(run) / trainer.CHECKPOINT, weights_only=False)["model"]
    for name, value in saved.items():
        assert torch.equal(value, method.snapshot[name].cpu()), name  # the stopped model, unchanged since
    moved = max(float((saved[k].float() - v.float()).abs().max()) for k, v in erm_model.state_dict().items())
    assert moved > 1e-3  # and it did unlearn


def test_rnp_learns_masks_on_the_unlearned_model_then_prunes_the_original(erm_model, data_root, tmp_path,
                                                                          monkeypatch) -> None:
    """Masks learn (in [0, 1]) on the unlearned model with its weights fixed; after the last epoch the
    module holds the ORIGINAL backdoored weights with the weight term of the pruned channels gated off
    (bias kept), which is what evaluation loads."""
    from methods.backdoor.rnp import MaskedBatchNorm, rnp_prune_flags

    unlearned = copy.deepcopy(erm_model)
    with torch.no_grad():
        for p in unlearned.parameters():
            p.mul_(0.7)  # another model than the original: the recovery must not leak into the result
    save_checkpoint(tmp_path / "erm.pt", {"model": erm_model.state_dict()})
    save_checkpoint(tmp_path / "unlearned.pt", {"model": unlearned.state_dict()})
    cfg = _cell(data_root, tmp_path, "rnp", "method.recovering_epochs=3", "method.batch_size=8",
                "method.clean_subset=0.1", "method.pruning_number=0.99")
    run = run_config(cfg, {"backdoored_checkpoint": str(tmp_path / "erm.pt"),
                           "unlearned_checkpoint": str(tmp_path / "unlearned.pt")})
    built: list[Any] = []
    build = trainer.build_method
    monkeypatch.setattr(trainer, "build_method", lambda c: built.append(build(c)) or built[-1])
    summary = trainer.train(run, local_work_dir(run))
    assert len(summary.curve) == 3 and summary.n_train == 26
    module: MaskedBatchNorm = built[0].module
    masks = [m.detach() for m in module.masks()]
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in masks)
    assert any(float((m - 1).abs().max()) > 0.01 for m in masks)
    reference = erm_model.state_dict()
    for name, value in module.model.state_dict().items():
        assert torch.equal(value.cpu(), reference[name]), name  # the original weights and statistics
    flags = rnp_prune_flags(masks, "threshold", 0.99)
    for i, f in enumerate(flags):
        assert torch.equal(getattr(module, f"weight_gate_{i}") == 0, f)
        assert bool((getattr(module, f"bias_gate_{i}") == 1).all())
    assert module.pruned_count() == sum(int(f.sum()) for f in flags) > 0
    evaluated = trainer.load_trained_classifier(run, local_work_dir(run)).eval()
    x, _ = digits_batch(Path(run["data"]["dir"]), 16)
    pruned = copy.deepcopy(erm_model).eval()
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, f in zip(module.layers, flags):
            modules[name].weight[f] = 0.0  # their `pruning` on the original model
        assert torch.allclose(evaluated(x), pruned(x), atol=1e-5)


# ------------------------------------------------------------------------------------------ BNP

def test_bnp_flags_a_channel_whose_batch_statistics_leave_its_running_ones(erm_model, digits_dir) -> None:
    """A planted backdoor neuron: one channel's running mean far from what a batch gives it (KL of
    their formula huge) is flagged in its layer; with an infinite u nothing is; the KL is theirs."""
    from methods.backdoor.bnp import bnp_prune_flags, pre_activation_stats

    model = copy.deepcopy(erm_model).eval()
    bn = model.body.layer2[0].bn2
    x, _ = digits_batch(digits_dir, 64)
    with torch.no_grad():
        bn.running_mean[4] += 30 * bn.running_var[4].sqrt()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    layer = names.index("body.layer2.0.bn2")
    kls, flags = bnp_prune_flags(model, x, u=3.0)
    assert bool(flags[layer][4]) and int(kls[layer].argmax()) == 4
    mean_1, var_1 = pre_activation_stats(model, x)[layer]
    mean_2, var_2 = bn.running_mean, bn.running_var
    expected = torch.log(var_2 / var_1) + (var_1 + (mean_1 - mean_2) ** 2) / (2 * var_2) - 0.5
    assert torch.allclose(kls[layer], expected)
    assert not any(bool(f.any()) for f in bnp_prune_flags(model, x, u=1e9)[1])
    assert model.training is False


def test_bnp_prunes_on_a_poisoned_training_batch_through_the_plan(erm_model, data_root, tmp_path,
                                                                   monkeypatch) -> None:
    """needs_train_data: the planned node gets the grid cell's data and poison, and draws its batch
    from the POISONED split (not its clean subset); 0 epochs; the gates are the checkpoint."""
    from methods.backdoor.bnp import bnp_prune_flags

    save_checkpoint(tmp_path / "erm.pt", {"model": erm_model.state_dict()})
    cfg = _cell(data_root, tmp_path, "bnp", "method.batch_size=64", "method.u=1.0")
    assert planned_trainer(cfg)["epochs"] == 0
    batches: list[torch.Tensor] = []
    from methods.backdoor.bnp import BNP

    draw = BNP.poisoned_batch
    monkeypatch.setattr(BNP, "poisoned_batch", lambda self, s: batches.append(draw(self, s)) or batches[-1])
    method, summary, run = _train_planned(cfg, tmp_path / "erm.pt", monkeypatch)
    assert run["method"]["train_data"]["backdoor"]["name"] == "badnets" and summary.curve == []
    assert run["backdoor"]["clean_train"] and len(batches) == 1 and batches[0].shape[0] == 64
    white = (batches[0][:, :, -2:, -2:] == 1.0).flatten(1).all(1)  # the 2x2 white patch on 8x8 digits
    assert 0 < int(white.sum()) < 64  # a poisoned batch (10% poisoned), not the clean subset
    _, flags = bnp_prune_flags(copy.deepcopy(erm_model), batches[0], 1.0)
    saved = torch.load(local_work_dir(run) / trainer.CHECKPOINT, weights_only=False)["model"]
    for i, f in enumerate(flags):
        assert torch.equal(saved[f"weight_gate_{i}"] == 0, f) and torch.equal(saved[f"bias_gate_{i}"] == 0, f)
    assert sum(int(f.sum()) for f in flags) == summary.method_summary["pruned_channels"] > 0

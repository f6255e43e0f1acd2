"""Models the project did not train, evaluated through `robustgrid eval` (harness/eval/external_model.py).

Each model is built and trained here, saved as a state_dict the way other codebases save them
(DDP `module.` prefixes, normalisation outside the network, .pt or .safetensors), evaluated through
the timm: and py: paths, and compared point by point with the same module attacked directly.
"""
from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from architectures.classifier import Classifier
from harness.attacks.base import build_attack
from harness.cli import main
from harness.core.config import compose_config, finalize
from harness.data.loader import make_loader
from harness.data.shards import load_manifest
from harness.eval.external_model import ExternalModelError, load_external_model, read_state_dict
from harness.run.cell import run_cell
from harness.store.results import read_cell_result, result_path

ATTACKS = ["attack=[apgd_ce,pgd]", "attack.apgd_ce.n_iter=5", "attack.pgd.steps=3"]
PY_MODULE = """
import torch
from torch import nn

def build(width: int = 8, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 64, num_classes))

def probabilities() -> nn.Module:
    return nn.Sequential(build(), nn.Softmax(dim=1))

def five_classes() -> nn.Module:
    return build(num_classes=5)
"""
BROKEN_MODULE = "import a_package_that_is_not_installed\n"


def _train(model: nn.Module, digits_dir: Path, steps: int = 20) -> nn.Module:
    """A few SGD steps: enough for most test points to be classified right (and attackable)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    batches = iter(make_loader(digits_dir, "train", 64, shuffle=True, epoch=0))
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def py_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("py_models")
    (folder / "ext_models.py").write_text(textwrap.dedent(PY_MODULE))
    (folder / "ext_broken.py").write_text(BROKEN_MODULE)
    return folder


@pytest.fixture(autouse=True)
def _importable(py_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(py_models))


def _cfg(data_root: Path, tmp_path: Path, model: list[str]) -> dict:
    return finalize(compose_config([f"data.root={data_root}", f"results_dir={tmp_path / 'results'}",
                                    "eval.limit=64", "eval.integrity_points=16",
                                    "eval.neuron_sensitivity.limit=16", *ATTACKS, *model]))


def _direct(module: nn.Module, cfg: dict, digits_dir: Path) -> dict[str, list[bool]]:
    """Per-point robustness of `module` attacked directly through the attack API (no harness)."""
    torch.manual_seed(int(cfg["seed"]))  # as evaluate(): seeded before the loader draws its base seed
    x, y = next(iter(make_loader(digits_dir, "test", 64, limit=64)))
    module.eval()
    with torch.no_grad():
        correct = module(x).argmax(1) == y
    out = {}
    idx = correct.nonzero().flatten()
    for attack_cfg in cfg["attack"].values():
        attack = build_attack(attack_cfg)
        robust = correct.clone()
        x_adv = attack(module, x[idx], y[idx])
        with torch.no_grad():
            robust[idx] = module(x_adv).argmax(1) == y[idx]
        out[attack.name] = robust.tolist()
    return out


def _per_point(cfg: dict) -> dict[str, list[bool]]:
    table = pq.read_table(Path(cfg["results_dir"]) / "samples" / f"{cfg['key']}.parquet").to_pylist()
    out: dict[str, list[bool]] = {}
    for row in sorted(table, key=lambda r: r["index"]):
        out.setdefault(row["attack"], []).append(row["robust"])
    return out


def test_timm_checkpoint_matches_the_module_attacked_directly(data_root: Path, digits_dir: Path,
                                                               tmp_path: Path) -> None:
    manifest = load_manifest(digits_dir)
    torch.manual_seed(0)
    body = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    reference = _train(Classifier(body, manifest["mean"], manifest["std"]), digits_dir)
    # saved as from a DDP model, normalisation outside the network (its own code did it)
    ckpt = tmp_path / "external.pt"
    torch.save({f"module.{k}": v for k, v in body.state_dict().items()}, ckpt)

    cfg = _cfg(data_root, tmp_path, ["model=timm:test_resnet", f"model.checkpoint={ckpt}",
                                     f"model.mean={manifest['mean']}", f"model.std={manifest['std']}"])
    outcome = run_cell(cfg)
    assert outcome.status == "ok", outcome.error
    ours, direct = _per_point(cfg), _direct(reference, cfg, digits_dir)
    assert ours == direct
    assert sum(direct["pgd"]) < sum(_direct_clean(reference, digits_dir))  # the attack breaks some points
    rows = read_cell_result(result_path(cfg["results_dir"], cfg["key"])).to_pylist()
    assert {r["source"] for r in rows} == {"eval-only"} and {r["method"] for r in rows} == {"eval-only"}
    assert {r["model_id"] for r in rows} == {"timm:test_resnet"} == {r["arch"] for r in rows}
    assert {r["checkpoint_sha256"] for r in rows} == {hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert all(r["train_seconds"] is None and r["epochs"] is None for r in rows)
    by_attack = {r["attack"]: r["robust_acc"] for r in rows}
    assert by_attack["pgd"] == pytest.approx(sum(direct["pgd"]) / 64)


def test_py_function_safetensors_matches_and_resumes_from_survivors(data_root: Path, digits_dir: Path,
                                                                    tmp_path: Path) -> None:
    from ext_models import build

    torch.manual_seed(1)
    reference = _train(build(width=6), digits_dir)
    ckpt = tmp_path / "external.safetensors"
    save_file(reference.state_dict(), str(ckpt))

    model = ["model=py:ext_models:build", "+model.kwargs.width=6", f"model.checkpoint={ckpt}"]
    cfg = _cfg(data_root, tmp_path, model)
    assert run_cell(cfg).status == "ok"
    assert _per_point(cfg) == _direct(reference, cfg, digits_dir)
    clean = read_cell_result(result_path(cfg["results_dir"], cfg["key"])).to_pylist()[0]["clean_acc"]

    # a stronger evaluation of the same model resumes from the survivors of the first
    resumed = _cfg(data_root, tmp_path, model + [f"eval.survivors_from={cfg['key']}", "attack.pgd.steps=10"])
    assert resumed["train_key"] == cfg["train_key"] and resumed["key"] != cfg["key"]
    assert run_cell(resumed).status == "ok"
    before = {r["attack"]: r["robust_acc"] for r in read_cell_result(result_path(cfg["results_dir"], cfg["key"])).to_pylist()}
    after = read_cell_result(result_path(cfg["results_dir"], resumed["key"])).to_pylist()
    assert all(r["robust_acc"] <= min(before.values()) for r in after)
    assert all(r["clean_acc"] == clean for r in after)


def test_the_cli_evaluates_and_bad_models_fail_before_any_attack(data_root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from ext_models import build

    results = tmp_path / "results"
    common = [f"data.root={data_root}", f"results_dir={results}", "eval.limit=32", "eval.integrity_points=8",
              "eval.neuron_sensitivity.enabled=false", "attack=[fgsm]"]
    good = tmp_path / "good.pt"
    torch.save(build().state_dict(), good)
    assert main(["eval", "model=py:ext_models:build", f"model.checkpoint={good}", *common]) == 0
    committed = sorted(p.name for p in results.rglob("*") if p.is_file())

    pickled = tmp_path / "pickled.pt"
    torch.save(build(), pickled)  # the whole module: pickled code, not a state_dict
    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save({"conv.weight": torch.zeros(8, 1, 3, 3), "0.weight": torch.zeros(8, 1, 3, 3)}, wrong_keys)
    cases = {
        "pickled": (["model=py:ext_models:build", f"model.checkpoint={pickled}"], "refused: it holds pickled"),
        "keys": (["model=py:ext_models:build", f"model.checkpoint={wrong_keys}"], "missing keys"),
        "import": (["model=py:ext_broken:build"], "cannot import 'ext_broken'"),
        "no module": (["model=py:not_a_module_anywhere:build"], "cannot import"),
        "classes": (["model=py:ext_models:five_classes"], "the dataset has 10 classes"),
        "probabilities": (["model=py:ext_models:probabilities"], "returns probabilities, not logits"),
        "timm no weights": (["model=timm:test_resnet"], "needs its weights"),
        "bad id": (["model=hub:resnet18"], "is not a model id"),
    }
    for name, (model, message) in cases.items():
        assert main(["eval", *model, *common]) == 2, name
        err = " ".join(capsys.readouterr().err.split())
        assert message in err, (name, err)
        assert sorted(p.name for p in results.rglob("*") if p.is_file()) == committed, name  # store untouched
    with pytest.raises(ExternalModelError, match=r"3 missing keys \(first: \['0.bias', '3.weight', '3.bias'\]\), 1 unexpected keys \(first: \['conv.weight'\]"):
        load_external_model({"id": "py:ext_models:build", "checkpoint": str(wrong_keys)}, 10, in_chans=1, img_size=8)


def test_state_dict_reading_strips_ddp_prefixes_and_unwraps(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module.module.fc.weight": torch.ones(2, 2)}, "epoch": 3}, path)
    assert list(read_state_dict(path)) == ["fc.weight"]
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"")
    with pytest.raises(ExternalModelError, match="use a .pt/.pth/.safetensors"):
        load_external_model({"id": "py:ext_models:build", "checkpoint": str(bad)}, 10, in_chans=1, img_size=8)
    from ext_models import build

    good = tmp_path / "good.pt"
    torch.save(build().state_dict(), good)
    with pytest.raises(ExternalModelError, match="changed after the cell was planned"):
        load_external_model({"id": "py:ext_models:build", "checkpoint": str(good), "checkpoint_sha256": "0" * 64},
                            10, in_chans=1, img_size=8)


def test_eval_grid_has_one_cell_per_model_and_keys_follow_the_weights(data_root: Path, tmp_path: Path) -> None:
    from harness.run.grid import expand_grid, validate_cell
    from ext_models import build

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.manual_seed(0)
    torch.save(build().state_dict(), a)
    torch.save(build().state_dict(), b)
    axis = f"grid.axes.model=[{{id: 'py:ext_models:build', checkpoint: '{a}'}}, {{id: 'py:ext_models:build', checkpoint: '{b}'}}]"
    cells = expand_grid(["grid=eval", f"data.root={data_root}", f"results_dir={tmp_path / 'r'}", axis])
    assert len(cells) == 2 and len({c["key"] for c in cells}) == 2
    assert [c["model"]["checkpoint"] for c in cells] == [str(a), str(b)]
    for cell in cells:
        validate_cell(cell)
    # no model: a trained cell's key is what it was before the model group existed (no `model` key)
    assert "model" not in finalize(compose_config([f"data.root={data_root}"]))


def _direct_clean(module: nn.Module, digits_dir: Path) -> list[bool]:
    x, y = next(iter(make_loader(digits_dir, "test", 64, limit=64)))
    with torch.no_grad():
        return (module(x).argmax(1) == y).tolist()


@pytest.mark.slow
def test_eval_grid_on_ray_puts_two_models_beside_a_trained_cell(tiny, data_root: Path, tmp_path: Path,
                                                                 ray_session) -> None:
    from harness.run.grid import expand_grid, run_grid
    from leaderboard import build_site

    paths = []  # timm models: importable on every Ray worker (a py: module must be too)
    for i in range(2):
        torch.manual_seed(i)
        body = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(_train(body, Path(data_root) / "digits", steps=10).state_dict(), str(paths[-1]))
    axis = "grid.axes.model=[" + ", ".join(f"{{id: 'timm:test_resnet', checkpoint: '{p}'}}" for p in paths) + "]"
    fast = ["attack=[fgsm,pgd]", "eval.integrity_points=8", "eval.neuron_sensitivity.enabled=false"]
    cells = expand_grid(["grid=eval", *tiny, *fast, axis])
    trained = finalize(compose_config([*tiny, *fast]))
    report = run_grid(cells + [trained])
    assert not report.failed and len(report.outcomes) == 3
    index = build_site(tmp_path / "results", tmp_path / "site")
    html = index.read_text()
    assert html.count(">not trained here</span>") == 2 and "test_resnet" in html


def test_a_robustgrid_cell_key_evaluates_its_checkpoint_like_the_cell(tiny, tmp_path: Path) -> None:
    fast = ["attack=[fgsm,pgd]", "eval.integrity_points=8", "eval.neuron_sensitivity.enabled=false"]
    trained = finalize(compose_config([*tiny, *fast]))
    assert run_cell(trained).status == "ok"
    again = finalize(compose_config([*tiny, *fast, f"model=robustgrid:{trained['key']}"]))
    assert run_cell(again).status == "ok"
    assert _per_point(again) == _per_point(trained)
    rows = read_cell_result(result_path(again["results_dir"], again["key"])).to_pylist()
    first = read_cell_result(result_path(trained["results_dir"], trained["key"])).to_pylist()
    assert rows[0]["checkpoint_sha256"] == first[0]["checkpoint_sha256"] and rows[0]["source"] == "eval-only"
    assert first[0]["source"] == "trained"
    with pytest.raises(ExternalModelError, match="no committed 'ok' cell"):
        load_external_model({"id": "robustgrid:nope"}, 10, in_chans=1, img_size=8, results_dir=str(tmp_path))

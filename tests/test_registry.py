"""The plugin mechanism: duplicates rejected, unknown names listed, external plugins of every kind via
entry points (selected, configured from their class defaults and run like built-ins), broken ones named."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness.core.registry import DuplicatePluginError, Registry, UnknownPluginError


def test_duplicate_names_are_an_error() -> None:
    reg: Registry = Registry("widget", "robustgrid.test_widgets")

    @reg.register("a")
    class A:  # noqa: D401
        pass

    with pytest.raises(DuplicatePluginError, match="registered twice"):
        @reg.register("a")
        class B:
            pass

    reg.add("a", A)  # re-registering the same object is harmless (module re-import)


def test_unknown_name_lists_the_known_ones() -> None:
    reg: Registry = Registry("widget", "robustgrid.test_widgets")
    reg.add("beta", object())
    reg.add("alpha", object())
    with pytest.raises(UnknownPluginError, match="unknown widget 'gamma'. Known widgets: alpha, beta"):
        reg.get("gamma")


PLUGIN_SOURCE = '''
"""A throwaway third-party package: one plugin of every kind (an analysis too), none with a config file of robustgrid's."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.attacks.base import Attack
from harness.backdoor.base import Poison
from harness.data.shards import write_dataset
from harness.eval.stage import Analysis
from methods.base import Method


class SmoothERM(Method):
    name = "ext_erm"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def training_step(self, module, x, y, ctx):
        return {"loss": F.cross_entropy(module(x), y, label_smoothing=self.label_smoothing)}


class SignNoise(Attack):
    name = "ext_noise"

    def __init__(self, eps, seed: int = 0) -> None:
        super().__init__(eps)
        self.seed = int(seed)

    def perturb(self, model, x, y):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(self.seed)).to(x.device)
        return (x + self.eps * noise.sign()).clamp(0, 1)


class _Body(nn.Module):
    """timm's interface in miniature: features, head, feature_info."""

    def __init__(self, in_chans: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)
        self.num_classes, self.num_features = num_classes, width
        self.feature_info = [{"module": "conv", "num_chs": width, "reduction": 1}]

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class TinyConv:
    def build(self, *, num_classes, in_chans, img_size, mean, std, width: int = 8):
        return Classifier(_Body(in_chans, num_classes, int(width)), mean=mean, std=std)


class Bars:
    """8x8 images, class k = a bright bar on rows 2k, 2k+1 under noise; 4 classes."""

    name = "ext_bars"
    default_config = {"eps": 0.1, "eps_l2": 0.5}

    def prepare(self, root, source=None):
        rng = np.random.default_rng(0)

        def samples(n):
            for i in range(n):
                label = i % 4
                image = rng.integers(0, 80, size=(8, 8)).astype(np.uint8)
                image[2 * label:2 * label + 2] = 230
                yield image, label

        info = {"num_classes": 4, "class_names": ["a", "b", "c", "d"], "channels": 1, "image_size": [8, 8],
                "source": "synthetic", "split_rule": "first 256 train, next 64 test"}
        return write_dataset(Path(root), "ext_bars", {"train": lambda: samples(256), "test": lambda: samples(64)},
                             info, samples_per_shard=128)


class CornerDot(Poison):
    name = "ext_corner"

    def __init__(self, value: float = 1.0, **common) -> None:
        super().__init__(**common)
        self.value = float(value)

    def _trigger(self, x):
        out = x.clone()
        out[..., :2, :2] = self.value
        return out


class LogitNorm(Analysis):
    """Mean L2 norm of the model's logits on the first `points` test images."""

    default_config = {"points": 16}

    def run(self, ctx):
        from harness.data.loader import make_loader

        x, _ = next(iter(make_loader(ctx.cfg["data"]["dir"], "test", int(self.settings["points"]))))
        with torch.no_grad():
            norm = ctx.model(x.to(ctx.device)).norm(dim=1).mean()
        ctx.summaries[self.label] = {"points": len(x), "mean_logit_norm": float(norm)}


NOT_A_CLASS = 42
'''

ENTRY_POINTS = """\
[robustgrid.methods]
ext_erm = rg_external_plugin:SmoothERM
ext_broken = rg_no_such_module:Nope

[robustgrid.attacks]
ext_noise = rg_external_plugin:SignNoise
ext_number = rg_external_plugin:NOT_A_CLASS

[robustgrid.architectures]
ext_tiny = rg_external_plugin:TinyConv

[robustgrid.datasets]
ext_bars = rg_external_plugin:Bars

[robustgrid.poisons]
ext_corner = rg_external_plugin:CornerDot

[robustgrid.analyses]
ext_logit_norm = rg_external_plugin:LogitNorm
"""


def _throwaway_distribution(root: Path) -> Path:
    """An installed distribution (module + .dist-info, as pip lays them out) whose entry points add
    one method, attack, architecture, dataset, poison and analysis, plus two broken entry points."""
    root.mkdir(parents=True)
    (root / "rg_external_plugin.py").write_text(PLUGIN_SOURCE)
    dist = root / "rg_external_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rg-external-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture()
def plugin_env(tmp_path) -> dict[str, str]:
    site = _throwaway_distribution(tmp_path / "site")
    return dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    proc.stderr = " ".join(proc.stderr.split())  # rich wraps long lines at the terminal's width
    return proc


def test_broken_entry_points_are_named_and_never_stop_a_command(plugin_env) -> None:
    listed = _cli(plugin_env, "list", "methods")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert {"ext_erm", "erm", "trades"} <= set(listed.stdout.split()) and "ext_broken" not in listed.stdout
    assert "ext_broken = rg_no_such_module:Nope" in listed.stderr and "robustgrid.methods" in listed.stderr
    assert "Traceback" not in listed.stderr
    attacks = _cli(plugin_env, "list", "attacks")
    assert "ext_noise" in attacks.stdout.split() and "ext_number" not in attacks.stdout.split()
    assert "ext_number = rg_external_plugin:NOT_A_CLASS" in attacks.stderr and "not a class" in attacks.stderr
    picked = _cli(plugin_env, "run", "method=ext_broken")
    assert picked.returncode == 2 and "Traceback" not in picked.stderr
    assert "ext_broken = rg_no_such_module:Nope" in picked.stderr and "ModuleNotFoundError" in picked.stderr


def test_external_plugins_of_every_kind_run_one_cell(plugin_env, tmp_path) -> None:
    run = _cli(plugin_env, "run", "method=ext_erm", "arch=ext_tiny", "data=ext_bars", "backdoor=ext_corner",
               "attack=[ext_noise]", "attack.ext_noise.seed=3", "method.label_smoothing=0.1",  # class defaults, overridden
               "arch.width=4", "backdoor.rate=0.2", f"data.root={tmp_path / 'data'}",
               f"results_dir={tmp_path / 'results'}", "trainer=tiny", "trainer.epochs=1", "eval.limit=32",
               "eval.neuron_sensitivity.limit=16", "eval.integrity_points=16",
               "analysis=[ext_logit_norm]", "analysis.ext_logit_norm.points=8")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = pq.read_table(run.stdout.strip().splitlines()[-1]).to_pylist()
    assert [r["attack"] for r in rows] == ["ext_noise"] and rows[0]["status"] == "ok"
    assert (rows[0]["dataset"], rows[0]["arch"], rows[0]["method"], rows[0]["backdoor"]) == \
        ("ext_bars", "ext_tiny", "ext_erm", "ext_corner")
    cfg = json.loads(rows[0]["config_json"])
    assert cfg["method"] == {"name": "ext_erm", "label_smoothing": 0.1}
    assert cfg["attack"]["ext_noise"] == {"name": "ext_noise", "eps": 0.1, "seed": 3}  # eps: the dataset's default
    assert cfg["arch"] == {"name": "ext_tiny", "width": 4}
    assert cfg["backdoor"]["value"] == 1.0 and cfg["backdoor"]["rate"] == 0.2  # Poison's own settings, via **common
    assert rows[0]["poison_rate"] == 0.2 and rows[0]["n_poisoned"] > 0
    assert 0.0 <= rows[0]["asr"] <= 1.0 and 0.0 <= rows[0]["robust_acc"] <= rows[0]["clean_acc"] + 1e-9
    assert cfg["analysis"] == {"ext_logit_norm": {"name": "ext_logit_norm", "points": 8}}  # class default, overridden
    summary = json.loads(rows[0]["analysis_json"])["ext_logit_norm"]
    assert summary["points"] == 8 and summary["mean_logit_norm"] > 0

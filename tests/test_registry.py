"""The plugin mechanism: duplicates rejected, unknown names listed, external plugins via entry points."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _throwaway_distribution(root: Path) -> Path:
    """A distribution that adds method 'ext_erm' and attack 'ext_noise' through entry points."""
    pkg = root / "rg_external_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import torch
        import torch.nn.functional as F
        from harness.attacks.base import Attack
        from methods.base import Method

        class ExtERM(Method):
            name = "ext_erm"
            default_config = {}
            def training_step(self, module, x, y, ctx):
                return {"loss": F.cross_entropy(module(x), y)}

        class ExtNoise(Attack):
            name = "ext_noise"
            def perturb(self, model, x, y):
                return (x + self.eps * torch.randn_like(x).sign()).clamp(0, 1)
    '''))
    dist = root / "rg_external_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rg-external-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[robustgrid.methods]\next_erm = rg_external_plugin:ExtERM\n\n"
        "[robustgrid.attacks]\next_noise = rg_external_plugin:ExtNoise\n"
    )
    return root


def test_external_package_adds_plugins_through_entry_points(tmp_path, tiny) -> None:
    site = _throwaway_distribution(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    listed = subprocess.run([sys.executable, "-m", "harness.cli", "list", "methods"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "ext_erm" in listed.stdout.split()
    attacks = subprocess.run([sys.executable, "-m", "harness.cli", "list", "attacks"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert "ext_noise" in attacks.stdout.split()
    # and a cell can use the external method without any config file of ours
    run = subprocess.run([sys.executable, "-m", "harness.cli", "run", "method=ext_erm", "trainer.epochs=1", *tiny],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

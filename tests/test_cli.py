"""The `robustgrid` command as a user meets it (subprocesses: the real entry point)."""
from __future__ import annotations

import subprocess
import sys
import time


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_unknown_method_fails_at_once_naming_known_methods(tmp_path) -> None:
    t0 = time.perf_counter()
    proc = _cli("run", "method=nosuch", f"results_dir={tmp_path}")
    assert proc.returncode == 2
    assert "unknown method 'nosuch'" in proc.stderr
    for known in ("erm", "pgd_at", "trades"):
        assert known in proc.stderr
    assert time.perf_counter() - t0 < 60
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad config"


def test_unknown_arch_and_attack(tmp_path) -> None:
    proc = _cli("run", "arch=nosuchnet", f"results_dir={tmp_path}")
    assert proc.returncode == 2 and "unknown architecture 'nosuchnet'" in proc.stderr and "test_vit" in proc.stderr
    proc = _cli("run", "attack=[pgd,nosuch]", f"results_dir={tmp_path}")
    assert proc.returncode == 2 and "unknown attack 'nosuch'" in proc.stderr


def test_list_prints_registered_names() -> None:
    out = _cli("list", "methods")
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    names = [line[0] for line in lines]
    assert out.returncode == 0 and names == sorted(names)
    defenses = {line[0] for line in lines if line[1:] == ["backdoor defense"]}
    assert {"cbd", "ft", "fp", "nad", "abl"} <= defenses and not defenses & {"erm", "abl_lga", "trades"}
    analyses = [line.split("\t") for line in _cli("list", "analyses").stdout.splitlines()]
    detectors = {line[0] for line in analyses if line[1:] == ["backdoor detector"]}
    assert {"strip", "spectral", "ac", "mmbd"} <= detectors and "integrity" not in detectors
    assert {"erm", "pgd_at", "trades", "mart", "awp", "fgsm_rs", "causaladv_m", "sns", "adml_pgd_at"} <= set(names)
    assert {"cbd", "ft", "fp", "nad", "abl"} <= set(names)
    assert {"none", "badnets", "blended", "sig", "wanet", "bpp", "adaptive_blend", "adaptive_patch",
            "refool"} <= set(_cli("list", "poisons").stdout.split())
    assert {"fgsm", "pgd"} <= set(_cli("list", "attacks").stdout.split())
    assert {"test_resnet", "test_vit", "resnet18", "vit_tiny", "timm"} <= set(_cli("list", "architectures").stdout.split())
    assert {"digits", "cifar10"} <= set(_cli("list", "datasets").stdout.split())


def test_run_one_cell_end_to_end(tiny) -> None:
    proc = _cli("run", "method=trades", "trainer.epochs=1", *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = proc.stdout.strip().splitlines()[-1]
    assert path.endswith(".parquet")
    assert "pgd" in proc.stderr and "fgsm" in proc.stderr
    assert "integrity flags" in proc.stderr  # run shows each row's flags


def test_prepare_cifar10_without_source_is_a_clear_error(tmp_path) -> None:
    proc = _cli("data", "prepare", "cifar10", "--root", str(tmp_path))
    assert proc.returncode == 2 and "--source" in proc.stderr

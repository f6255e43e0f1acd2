"""A catalogue of bad inputs, each run through the CLI: exit code 2, the key named, nothing written.

Every case must fail before any training (no checkpoint, no result row), with a message naming
the setting the user has to fix.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# (override(s), text the error must contain). The issue's own cases run through a real
# `python -m harness.cli run` process; the rest through the same entry point in-process (seconds,
# not the ~30 s a fresh interpreter costs on a busy 2-core machine).
CLI_CASES: list[tuple[list[str], str]] = [
    (["attack.fgsm.eps=nan"], "attack.fgsm.eps"),
    (["trainer.optimizer.lr=-1"], "trainer.optimizer.lr"),
    (["eval.limit=-1"], "eval.limit"),
    (["seed=abc"], "seed"),
    (["trainer.batch_size=5000"], "trainer.batch_size"),
]
CASES: list[tuple[list[str], str]] = [
    (["attack.pgd.eps=inf"], "attack.pgd.eps"),
    (["attack.pgd.step_size=-0.1"], "attack.pgd.step_size"),
    (["attack.pgd.steps=0"], "attack.pgd.steps"),
    (["trainer.optimizer.lr=nan"], "trainer.optimizer.lr"),
    (["trainer.optimizer.weight_decay=-0.5"], "trainer.optimizer.weight_decay"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["trainer.epochs=1.5"], "trainer.epochs"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["seed=-3"], "seed"),
    (["data.eps=-1"], "data.eps"),
    (["data.train_limit=0"], "data.train_limit"),
    (["resources.cpus=nan"], "resources.cpus"),
    (["resources.gpus=-1"], "resources.gpus"),
    (["method=trades", "method.attack.steps=0"], "method.attack.steps"),
    (["method=trades", "method.beta=inf"], "method.beta"),
    # open dictionaries: every key checked against what receives it (issue 24, item 5)
    (["+trainer.schedule.warmup_epoch=2"], "Did you mean trainer.schedule.warmup_epochs?"),
    (["+trainer.optimizer.beta=0.9"], "Did you mean trainer.optimizer.betas?"),
    (["+arch.kwargs.drop_rat=0.1"], "Did you mean +arch.kwargs.drop_rate?"),
    (["+arch.kwargs.num_classes=5"], "arch.kwargs.num_classes cannot be set: the dataset sets it"),
]


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def _nothing_written(results: Path) -> bool:
    return not results.exists() or not any(p.is_file() and "_staging" not in p.parts for p in results.rglob("*"))


def _untrimmed(tiny: list[str]) -> list[str]:
    return [o for o in tiny if not o.startswith("data.train_limit")]  # the batch case checks the whole split


@pytest.mark.parametrize("bad,key", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_input_fails_before_work_naming_the_key(bad: list[str], key: str, tiny: list[str], tmp_path: Path) -> None:
    proc = _run_cli(_untrimmed(tiny) + bad, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert key in " ".join(output.split()), output
    assert "Traceback" not in output
    assert _nothing_written(tmp_path / "results"), sorted(map(str, (tmp_path / "results").rglob("*")))


@pytest.mark.parametrize("bad,key", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_more_bad_inputs_fail_before_work(bad: list[str], key: str, tiny: list[str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    from harness.cli import main

    code = main(["run", *_untrimmed(tiny), *bad])
    captured = capsys.readouterr()
    output = " ".join((captured.out + captured.err).split())
    assert code == 2, output
    assert key in output, output
    assert _nothing_written(tmp_path / "results")


def test_batch_error_names_the_split_size(tiny: list[str], tmp_path: Path) -> None:
    proc = _run_cli(tiny + ["trainer.batch_size=5000"], tmp_path)  # tiny: data.train_limit=256
    message = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "trainer.batch_size=5000" in message and "256 images" in message


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_unwritable_results_dir_fails_before_work(where: str, tiny: list[str], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    location = blocker if where == "a file" else blocker / "results"
    args = [o for o in tiny if not o.startswith("results_dir=")] + [f"results_dir={location}"]
    proc = _run_cli(args, tmp_path)
    message = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, message
    assert "results_dir" in message and str(location) in message and "Traceback" not in message
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("cfg,word", [({"name": "fgsm", "eps": float("nan")}, "eps"),
                                      ({"name": "pgd", "eps": 0.1, "step_size": float("inf")}, "step_size"),
                                      ({"name": "pgd", "eps": "nan"}, "nan")])
def test_attack_constructors_refuse_non_finite_settings(cfg: dict, word: str) -> None:
    """Attacks built outside a cell config (a method's train-time attack, a script) check themselves."""
    from harness.attacks.base import build_attack

    with pytest.raises(ValueError, match=word):
        build_attack(cfg)


@pytest.mark.parametrize("where", ["a fresh folder", "s3"])
def test_data_dependent_checks_run_wherever_the_data_lives(where: str, tmp_path: Path,
                                                            request: pytest.FixtureRequest) -> None:
    """digits not prepared yet (a fresh folder, or an S3 root): `run` prepares it, then refuses a
    batch larger than its training split before any training (issue 24, item 6)."""
    root = str(tmp_path / "fresh") if where == "a fresh folder" else f"s3://bkt/fresh-{os.getpid()}?{request.getfixturevalue('s3')}"
    results = tmp_path / "results"
    proc = _run_cli([f"data.root='{root}'", f"results_dir={results}", "trainer.batch_size=5000", "trainer.epochs=1"],
                    tmp_path)
    message = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "trainer.batch_size=5000" in message and "1408 images" in message, message
    assert "after trainer.validation holds out its share" in message  # 1437 - 29 held out
    assert _nothing_written(results)


@pytest.mark.parametrize("bad,named", [(["grid=demoo", "seed=1"], "unknown grid 'demoo'"),
                                       (["trainer=nosuch", "trainer.epochs=1"], "unknown trainer 'nosuch'")])
def test_an_unknown_group_option_is_named_first(bad: list[str], named: str) -> None:
    """Not "unknown config key 'seed'": the option that made the keys unknown (issue 24, item 10)."""
    from harness.core.config import ConfigError, compose_config

    with pytest.raises(ConfigError, match=named):
        compose_config(bad)


def test_a_killed_prepare_s_temp_folder_is_removed_by_the_next(tmp_path: Path, monkeypatch) -> None:
    """A `.digits.tmp*` folder nothing wrote to for an hour is a killed prepare's; one being written
    now (another prepare) is left alone (issue 24, item 10)."""
    import harness.data.shards as shards
    from harness.data.prepare import prepare_digits

    old = tmp_path / ".digits.tmpdead"
    old.mkdir()
    (old / "train-000000.tar").write_bytes(b"half")
    live = tmp_path / ".digits.tmplive"
    live.mkdir()
    hour_ago = os.stat(old).st_mtime - 2 * shards.LEFTOVER_AFTER_S
    for path in (old, old / "train-000000.tar"):
        os.utime(path, (hour_ago, hour_ago))
    prepare_digits(tmp_path)
    assert not old.exists() and live.exists() and (tmp_path / "digits" / "manifest.json").is_file()


def test_a_py_model_module_that_exits_at_import_is_reported(tmp_path: Path, monkeypatch) -> None:
    from harness.eval.external_model import ExternalModelError, check_model_spec

    (tmp_path / "exits_mod.py").write_text("import sys\nsys.exit(3)\ndef build(num_classes):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ExternalModelError, match=r"importing 'exits_mod' called sys.exit\(3\)"):
        check_model_spec({"id": "py:exits_mod:build"})


@pytest.mark.parametrize("command", [["leaderboard", "--results", "{results}", "--out", "/proc/rg-site"],
                                     ["report", "--results", "{results}", "--out", "/proc/rg/report.md"],
                                     ["data", "prepare", "digits", "--out", "/proc/rg-data"]])
def test_an_unwritable_output_is_named_before_work(command: list[str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from harness.cli import main

    (tmp_path / "results").mkdir()
    args = [a.replace("{results}", str(tmp_path / "results")) for a in command]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--out=/proc/rg" in err and "not writable" in err and "Traceback" not in err


def test_sigint_ends_with_one_line_and_the_rerun_command(tmp_path: Path, monkeypatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import harness.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_commands", lambda: {"status": (cli._status_parser, interrupted)})
    assert cli.main(["status", "grid=demo"]) == 130
    out = " ".join(capsys.readouterr().err.split())
    assert "interrupted: cells committed so far are kept; `robustgrid status grid=demo` continues" in out

"""Keys follow the code: a change to a method's source gives its cells new keys (their old
results are kept and shown as stale), while other methods' cells keep theirs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from harness.core import code_version as cv
from harness.core.config import compose_config, finalize
from harness.core.registry import METHODS

PLUGIN = '''
from methods.erm import ERM


class Tweaked(ERM):
    name = "tweaked_erm"
    # version {version}
'''


@pytest.fixture()
def tweaked(tmp_path: Path):
    """A method plugin whose source file the test can edit (as a user editing their plugin)."""
    path = tmp_path / "tweaked_plugin.py"
    path.write_text(PLUGIN.format(version=1))
    spec = importlib.util.spec_from_file_location("tweaked_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tweaked_plugin"] = module
    spec.loader.exec_module(module)
    METHODS.names()  # built-ins registered first
    METHODS.add("tweaked_erm", module.Tweaked)
    cv.clear_cache()
    yield path
    METHODS._items.pop("tweaked_erm", None)
    sys.modules.pop("tweaked_plugin", None)
    cv.clear_cache()


def _cell(tiny: list[str], method: str) -> dict:
    cfg = compose_config(tiny)
    cfg["method"] = {"name": method}
    return finalize(cfg)


def _edit(path: Path, version: int) -> None:
    path.write_text(PLUGIN.format(version=version))
    cv.clear_cache()


def test_changing_a_methods_source_changes_only_its_cells_keys(tiny, tweaked: Path) -> None:
    before, erm_before = _cell(tiny, "tweaked_erm"), _cell(tiny, "erm")
    _edit(tweaked, 2)
    after, erm_after = _cell(tiny, "tweaked_erm"), _cell(tiny, "erm")
    assert after["key"] != before["key"] and after["train_key"] != before["train_key"]
    assert after["cell_id"] == before["cell_id"], "the cell is the same, only its code changed"
    assert erm_after["key"] == erm_before["key"], "another method's cells are untouched"
    assert after["code_version"].split("-")[0] == before["code_version"].split("-")[0]  # shared part


def test_a_result_of_older_code_is_kept_and_shown_stale(tiny, tweaked: Path) -> None:
    from harness.run.cell import run_cell
    from harness.run.status import grid_status
    from harness.store.results import committed_status

    old = _cell(tiny + ["trainer.epochs=1", "eval.neuron_sensitivity.enabled=false"], "tweaked_erm")
    assert run_cell(old).status == "ok"
    _edit(tweaked, 2)
    new = _cell(tiny + ["trainer.epochs=1", "eval.neuron_sensitivity.enabled=false"], "tweaked_erm")
    location = new["results_dir"]
    status = grid_status(location, [new["key"]], {new["key"]: new["cell_id"]})
    assert status.stale == [new["key"]] and status.pending == []
    assert committed_status(location, old["key"]) == "ok", "the old result is kept"
    assert grid_status(location, [old["key"]]).done == [old["key"]]


def test_provenance_records_robustgrids_own_code_not_the_callers_repo(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from harness.store import provenance

    provenance.git_commit.cache_clear()
    commit = provenance.git_commit()
    here = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(provenance.__file__).parents[2],
                          capture_output=True, text=True).stdout.strip()
    assert commit.startswith(here) if here else commit.startswith("source:")
    # run from inside some other repository: still robustgrid's commit, never that repo's HEAD
    other = tmp_path / "user_repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    monkeypatch.chdir(other)
    provenance.git_commit.cache_clear()
    assert provenance.git_commit() == commit
    assert len(provenance.source_hash()) == 16

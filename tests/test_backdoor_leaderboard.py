"""Leaderboard backdoor tables: CA / ASR / RA mean ± std over seeds, ranked by ASR (numerically),
one table per (dataset, attack, rate, target); Lp tables keep backdoored cells apart."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.store.index import read_results

from harness.store.results import write_cell_result
from leaderboard import build_site
from leaderboard.aggregate import aggregate

CELLS = {  # (method, backdoor, seed) -> (clean, asr, ra)
    ("erm", "badnets", 0): (0.99, 1.0, 0.0), ("erm", "badnets", 1): (0.97, 0.98, 0.02),
    ("cbd", "badnets", 0): (0.96, 0.05, 0.9), ("cbd", "badnets", 1): (0.98, 0.09, 0.88),
    ("ft", "badnets", 0): (0.95, 0.1, 0.85),  # 10.00 sorts before 5.00 / 9.00 as text
    ("erm", "blended", 0): (0.99, 0.97, 0.01),
    ("erm", None, 0): (0.995, None, None),
}


def _rows(method: str, backdoor: str | None, seed: int, clean: float, asr, ra) -> list[dict]:
    key = f"{method}-{backdoor}-{seed}"
    extra = {} if backdoor is None else {
        "backdoor": backdoor, "poison_rate": 0.1, "target_class": 0, "n_poisoned": 144,
        "poison_indices": [1, 2, 3], "asr": asr, "backdoor_robust_acc": ra, "n_triggered": 324,
        "per_class_asr": [float("nan")] + [asr] * 9,
    }
    return [{"key": key, "grid": "t", "status": "ok", "dataset": "digits", "arch": "test_resnet",
             "method": method, "seed": seed, "attack": "fgsm", "norm": "linf", "eps": 0.15,
             "clean_acc": clean, "robust_acc": 0.2, "flags": [], "train_seconds": 100.0 if method == "erm" else 30.0,
             "config_json": json.dumps({"method": {"name": method}, "seed": seed, "data": {"name": "digits"},
                                        "backdoor": {"name": backdoor or "none", "rate": 0.1}}), **extra}]


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    for (method, backdoor, seed), (clean, asr, ra) in CELLS.items():
        rows = _rows(method, backdoor, seed, clean, asr, ra)
        write_cell_result(tmp_path, rows[0]["key"], rows)
    write_cell_result(tmp_path, "broken", [{"key": "broken", "status": "failed", "error": "x",
                                             "dataset": "digits", "method": "nad"}])
    return tmp_path


def test_backdoor_tables_rank_by_asr_with_mean_and_std(results: Path) -> None:
    board = aggregate(read_results(results))
    tables = {t["backdoor"]: t for t in board.backdoor_tables}
    assert set(tables) == {"badnets", "blended"}
    rows = tables["badnets"]["rows"]
    assert [r["method"] for r in rows] == ["cbd", "ft", "erm"]
    cbd = rows[0]
    assert cbd["n_seeds"] == 2 and cbd["asr_mean"] == pytest.approx(0.07)
    assert cbd["asr_std"] == pytest.approx(0.028284, rel=1e-4) and cbd["clean_acc_mean"] == pytest.approx(0.97)
    assert rows[1]["asr_std"] is None  # one seed
    # Lp tables: the backdoored ERM is its own row, never averaged with the clean ERM
    lp_methods = {r["method"] for t in board.tables for r in t["rows"]}
    assert {"erm", "erm @badnets", "cbd @badnets", "erm @blended"} <= lp_methods


def test_site_shows_the_backdoor_table(results: Path, tmp_path: Path) -> None:
    index = build_site(results, tmp_path / "site")
    html = index.read_text()
    assert "Backdoor defenses" in html and "digits — badnets, 10.00% poisoned, target class 0" in html
    section = html.split('id="track-backdoor"')[1]
    assert section.index(">cbd<") < section.index(">ft<") < section.index(">erm<")
    assert "7.00 ± 2.83" in section
    data = json.loads((tmp_path / "site" / "site.json").read_text())
    assert {t["backdoor"] for t in data["backdoor_tables"]} == {"badnets", "blended"}


def test_der_against_the_undefended_cell_of_the_same_attack_and_seed(results: Path) -> None:
    """DER = [max(0, dASR) - max(0, dCA) + 1] / 2 per seed against ERM's cell of that attack and
    seed (d = undefended - defended), averaged over seeds; undefended rows have none."""
    from leaderboard.backdoor import der

    assert der((0.99, 1.0), (0.96, 0.05)) == pytest.approx((0.95 - 0.03 + 1) / 2)
    assert der((0.9, 0.5), (0.95, 0.9)) == pytest.approx(0.5)  # a defense that helps nothing: 0.5, never below for gains
    board = aggregate(read_results(results))
    rows = {r["method"]: r for r in next(t for t in board.backdoor_tables if t["backdoor"] == "badnets")["rows"]}
    cbd_seeds = [der((0.99, 1.0), (0.96, 0.05)), der((0.97, 0.98), (0.98, 0.09))]
    assert rows["cbd"]["der_mean"] == pytest.approx(sum(cbd_seeds) / 2) and rows["cbd"]["n_der"] == 2
    assert rows["cbd"]["der_std"] == pytest.approx(abs(cbd_seeds[0] - cbd_seeds[1]) / 2 ** 0.5)
    assert rows["ft"]["der_mean"] == pytest.approx(der((0.99, 1.0), (0.95, 0.1))) and rows["ft"]["der_std"] is None
    assert rows["erm"]["der_mean"] is None and rows["erm"]["n_der"] == 0
    html = build_site(results, results.parent / "site").read_text().split('id="track-backdoor"')[1]
    assert f"{sum(cbd_seeds) / 2:.3f} ± " in html and ">DER<" in html


def test_der_twin_under_a_defense_recipe_is_the_one_erm_cell_with_another_trainer() -> None:
    """Under recipe=paper CBD trains with its own trainer while the attacked ERM keeps the attack's:
    the twin is then the single ERM cell equal in all but method and trainer (none if ambiguous)."""
    from leaderboard.backdoor import cell_ders, der

    def cell(key, method, trainer, ca, asr):
        cfg = {"method": {"name": method}, "seed": 0, "trainer": {"epochs": trainer}, "backdoor": {"name": "badnets"}}
        return (key, method, json.dumps(cfg), ca, asr)

    cells = [cell("e", "erm", 100, 0.9, 1.0), cell("c", "cbd", 60, 0.8, 0.1), cell("f", "ft", 100, 0.85, 0.5)]
    assert cell_ders(cells) == {"c": pytest.approx(der((0.9, 1.0), (0.8, 0.1))),
                                "f": pytest.approx(der((0.9, 1.0), (0.85, 0.5)))}
    assert "c" not in cell_ders(cells + [cell("e2", "erm", 200, 0.9, 0.9)])  # two candidates: no guess


def test_matrix_page_shows_attacks_by_defenses_the_der_ranking_and_detectors(results: Path, tmp_path: Path) -> None:
    """backdoor.html: a heatmap per metric (poisons x defenses, no defense first), each square linking
    to its cell; defenses ranked by mean DER over (attack, seed) with a t interval; detectors' AUROC
    (det_<name>_auroc columns) per attack on the undefended model."""
    from leaderboard.backdoor_matrix import backdoor_matrices, interval

    board = aggregate(read_results(results))
    (matrix,) = backdoor_matrices(board.backdoor_tables)
    assert matrix["attacks"] == ["badnets", "blended"] and matrix["defenses"] == ["erm", "cbd", "ft"]
    asr = next(h for h in matrix["heatmaps"] if h["metric"] == "asr")["grid"]
    assert asr[0]["squares"][0]["value"] == pytest.approx(0.99) and asr[0]["squares"][1]["value"] == pytest.approx(0.07)
    assert asr[1]["squares"][1]["value"] is None  # cbd was not run under blended
    ranking = {r["method"]: r for r in matrix["ranking"]}
    ders = [(1.0 - 0.05 - 0.03 + 1) / 2, (0.98 - 0.09 - 0.0 + 1) / 2]  # seed 0, seed 1 (CA rose: no CA term)
    assert ranking["cbd"]["der_mean"] == pytest.approx(sum(ders) / 2) and ranking["cbd"]["n"] == 2
    assert ranking["cbd"]["der_ci"] == pytest.approx(interval(ders)) and ranking["ft"]["der_ci"] is None
    assert ranking["cbd"]["der_ci"][0] < ranking["cbd"]["der_mean"] < ranking["cbd"]["der_ci"][1]
    assert interval([0.9, 0.92, 0.94])[0] > 0.5  # a tight, high DER beats no defense
    assert matrix["erm_seconds"] == pytest.approx(100.0) and ranking["cbd"]["cost_ratio"] == pytest.approx(0.3)
    html = build_site(results, tmp_path / "site").read_text()
    assert 'href="backdoor.html"' in html
    page = (tmp_path / "site" / "backdoor.html").read_text()
    assert "attack \\ defense" in page and 'href="cells/cbd-badnets-0.html"' in page and "7.00" in page
    assert "Detectors" not in page  # no detector columns in these results


def test_detector_auroc_columns_reach_the_matrix(tmp_path: Path) -> None:
    for (method, backdoor, seed), (clean, asr, ra) in CELLS.items():
        if backdoor is None:
            continue
        rows = _rows(method, backdoor, seed, clean, asr, ra)
        for row in rows:  # the detectors' values, as harness/eval/analysis/detectors writes them
            row["detectors_json"] = json.dumps({"det_strip_auroc": 0.9 if backdoor == "badnets" else 0.6,
                                                "det_strip_tpr_at_5fpr": 0.5, "det_mmbd_pvalue": 0.01})
        write_cell_result(tmp_path, rows[0]["key"], rows)
    from leaderboard.backdoor_matrix import backdoor_matrices

    (matrix,) = backdoor_matrices(aggregate(read_results(tmp_path)).backdoor_tables)
    (strip,) = matrix["detectors"]
    assert strip["detector"] == "strip" and strip["auroc"] == {"badnets": pytest.approx(0.9), "blended": pytest.approx(0.6)}

"""`robustgrid compare A B`: which cells' numbers changed between two results stores, beyond
what the test-set size explains. Regression testing between commits: run the same grid at two
commits into two stores, then compare them.

Cells are matched by key (the hash of what the cell computes), rows by attack. A number differs
when the Wilson 95% intervals of the two measurements do not overlap. Cells present in only
one store, or failed in one, are counted and named too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.store.index import read_results
from leaderboard.aggregate import overlaps
from leaderboard.format import finite, wilson


@dataclass(frozen=True)
class Difference:
    key: str
    label: str  # arch / method / seed
    attack: str | None
    metric: str  # clean_acc | robust_acc | status
    a: float | str | None
    b: float | str | None
    ci_a: list[float] | None = None
    ci_b: list[float] | None = None


def _rows(results_dir: str | Path) -> dict[tuple[str, str | None], dict]:
    return {(r["key"], r["attack"]): r for r in read_results(results_dir).to_pylist()}


def compare(a: str | Path, b: str | Path) -> tuple[list[Difference], int]:
    """(differences, number of cells in both stores)."""
    rows_a, rows_b = _rows(a), _rows(b)
    keys_a, keys_b = {k for k, _ in rows_a}, {k for k, _ in rows_b}
    out: list[Difference] = []
    for (key, attack), ra in sorted(rows_a.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        rb = rows_b.get((key, attack))
        if rb is None or key not in keys_b:
            continue
        label = f"{ra.get('arch')} / {ra.get('method')} / seed {ra.get('seed')}"
        if ra["status"] != rb["status"]:
            out.append(Difference(key, label, attack, "status", ra["status"], rb["status"]))
            continue
        for metric in ("clean_acc", "robust_acc"):
            va, vb = finite(ra.get(metric)), finite(rb.get(metric))
            if va is None and vb is None:
                continue
            ci_a, ci_b = wilson(va, ra.get("n_eval")), wilson(vb, rb.get("n_eval"))
            if (va is None) != (vb is None) or (ci_a and ci_b and not overlaps(ci_a, ci_b)) or (
                    not (ci_a and ci_b) and va != vb):
                out.append(Difference(key, label, attack, metric, va, vb, ci_a, ci_b))
    for key in sorted(keys_a ^ keys_b):
        out.append(Difference(key, "", None, "only in " + ("A" if key in keys_a else "B"), None, None))
    return out, len(keys_a & keys_b)


def format_differences(differences: list[Difference], n_common: int) -> str:
    lines = [f"{n_common} cells in both stores; {sum(not d.metric.startswith('only') for d in differences)} "
             f"numbers differ beyond their 95% intervals"]
    for d in differences:
        if d.metric.startswith("only"):
            lines.append(f"  {d.key}  {d.metric}")
        elif d.metric == "status":
            lines.append(f"  {d.key}  {d.label}  {d.attack}: status {d.a} -> {d.b}")
        else:
            def show(v: float | None, ci: list[float] | None) -> str:
                return "—" if v is None else f"{100 * v:.2f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

            lines.append(f"  {d.key}  {d.label}  {d.attack} {d.metric}: {show(d.a, d.ci_a)} -> {show(d.b, d.ci_b)}")
    return "\n".join(lines) + "\n"

"""Which plots each page shows: small functions that turn aggregated data into Figures.

This is the extension point for new plots. A setting-page figure is a function
(table, cells) -> Figure | None, a cell-page figure a function (cell) -> Figure | None; returning
None (no data for it) leaves no trace on the page. Neuron-sensitivity profiles or counterfactual
galleries, once the harness records them, are one more function appended to SETTING_FIGURES or
CELL_FIGURES; nothing else changes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from leaderboard.cells import Cell
from leaderboard.format import norm_label
from leaderboard.svg import Point, heatmap, line_chart, scatter


@dataclass
class Figure:
    """A titled figure: one or more inline SVGs and a caption saying how to read them."""

    id: str
    title: str
    caption: str
    svgs: list[Markup] = field(default_factory=list)


SettingFigure = Callable[[dict[str, Any], Mapping[str, Cell]], "Figure | None"]
CellFigure = Callable[[Cell], "Figure | None"]


def row_label(row: dict[str, Any]) -> str:
    return f"{row['arch']} / {row['method']}" + (" ⚠" if row["flagged"] else "")


def robust_vs_clean(table: dict[str, Any], cells: Mapping[str, Cell]) -> Figure | None:
    """One labelled point per (arch, method): clean accuracy against the headline robust accuracy,
    axes from 0 to 100, the robust = clean line and the Pareto front always drawn."""
    points = [
        Point(
            x=100 * r["clean_acc_mean"], y=100 * r["headline_mean"],
            x_err=None if r["clean_acc_std"] is None else 100 * r["clean_acc_std"],
            y_err=None if r["headline_std"] is None else 100 * r["headline_std"],
            color_key=str(r["method"]), shape_key=str(r["arch"]), flagged=r["flagged"],
            label=f"{r['method']}" if len({row["arch"] for row in table["rows"]}) == 1 else f"{r['arch']}/{r['method']}",
            tooltip=(f"{r['arch']} / {r['method']}: clean {100 * r['clean_acc_mean']:.2f}%, "
                     f"{table['headline']['label']} {100 * r['headline_mean']:.2f}%, {r['n_seeds']} seed(s)"
                     + (f"; flags: {', '.join(r['flags'])}" if r["flags"] else "")),
        )
        for r in table["rows"]
        if r["clean_acc_mean"] is not None and r["headline_mean"] is not None
    ]
    if not points:
        return None
    svg = scatter(points, "clean accuracy (%)", f"{table['headline']['label']} accuracy (%)",
                  color_title="method", shape_title="arch")
    return Figure(
        "robust-vs-clean", "Robust vs clean accuracy",
        "One point per architecture × method, mean over seeds; whiskers are ± std over seeds. "
        "Both axes run from 0 to 100%. Up and to the right is better; the dashed diagonal is robust = clean "
        "(no model can sit above it) and the solid line joins the Pareto front (no other model is better "
        "on both axes). With more than 8 points only the Pareto front and flagged points are labelled; "
        "hover a point or read the legend for the others. Hollow red-ringed points carry integrity flags.", [svg])


def robust_vs_compute(table: dict[str, Any], cells: Mapping[str, Cell]) -> Figure | None:
    """Headline robust accuracy against training compute: train FLOPs where recorded, else
    device-hours, else (train + eval) hours x world size; log x when it spans a decade or more."""
    for key, label in (("train_flops_mean", "training FLOPs"), ("device_hours_mean", "device-hours"),
                       ("cost_hours_mean", "compute hours (train + eval) × ranks")):
        rows = [r for r in table["rows"] if r[key] is not None and r[key] > 0 and r["headline_mean"] is not None]
        if rows:
            break
    else:
        return None
    xs = [r[key] for r in rows]
    log_x = max(xs) / min(xs) >= 10
    points = [Point(x=r[key], y=100 * r["headline_mean"], color_key=str(r["method"]), shape_key=str(r["arch"]),
                    y_err=None if r["headline_std"] is None else 100 * r["headline_std"], flagged=r["flagged"],
                    label=str(r["method"]), tooltip=f"{r['arch']} / {r['method']}: {label} {r[key]:.4g}, "
                    f"{table['headline']['label']} {100 * r['headline_mean']:.2f}%") for r in rows]
    svg = scatter(points, label + (" (log scale)" if log_x else ""), f"{table['headline']['label']} accuracy (%)",
                  color_title="method", shape_title="arch", diagonal=False, pareto=False, x_range=None, log_x=log_x)
    return Figure("robust-vs-compute", "Robust accuracy vs compute",
                  f"One point per architecture × method: {label} per seed (mean) against the headline robust "
                  "accuracy. Up and to the left is cheaper robustness.", [svg])


def robust_vs_eps(tables: list[dict[str, Any]]) -> list[Figure]:
    """For each (track, dataset, norm) with several eps: headline robust accuracy per eps, one line
    per (arch, method)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for table in tables:
        if table.get("eps") is not None:
            groups.setdefault((table["track"], table["dataset"], table["norm"]), []).append(table)
    figures = []
    for (track, dataset, norm), group in groups.items():
        if len(group) < 2:
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for table in sorted(group, key=lambda t: t["eps"]):
            for r in table["rows"]:
                if r["headline_mean"] is not None:
                    series.setdefault(row_label(r), []).append((table["eps"], 100 * r["headline_mean"]))
        if not series:
            continue
        figures.append(Figure(
            f"robust-vs-eps-{len(figures) + 1}", f"Robust accuracy vs ε: {dataset}, {norm_label(norm)}",
            "Each setting's headline robust accuracy (%) at each ε of this threat model, one line per "
            "architecture / method (⚠: flagged).",
            [line_chart(series, "ε", "robust accuracy (%)", width=560, height=320, y_range=(0.0, 100.0))]))
    return figures


def _mean_vectors(vectors: list[list[float | None]]) -> list[float | None]:
    out = []
    for column in zip(*vectors):
        vals = [v for v in column if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def per_class_robust(table: dict[str, Any], cells: Mapping[str, Cell]) -> Figure | None:
    """Rows = arch / method (in rank order), columns = classes: per-class robust accuracy under
    each cell's headline attack, averaged over seeds."""
    attack = table["headline"]["attack"]
    names: list[str] | None = None
    labels, values = [], []
    for row in table["rows"]:
        vectors = []
        for key in row["keys"]:
            hr = cells[key].headline_row(attack) if key in cells else None
            if hr is None or not hr.get("per_class_robust_acc"):
                continue
            cls = [str(c) for c in (hr.get("class_names") or range(len(hr["per_class_robust_acc"])))]
            if names is None:
                names = cls
            if cls == names and len(hr["per_class_robust_acc"]) == len(names):
                vectors.append(hr["per_class_robust_acc"])
        if vectors:
            labels.append(row_label(row))
            values.append(_mean_vectors(vectors))
    if not values or not names:
        return None
    which = ("AutoAttack" if attack else
             "each cell's worst-case attack (the eval attack with the lowest overall robust accuracy)")
    return Figure(
        "per-class-robust", "Per-class robust accuracy",
        f"Robust accuracy (%) per class under {which}, mean over seeds; rows in rank order. "
        "Pale cells are the classes a model fails to defend.",
        [heatmap(labels, names, values, "robust accuracy")])


def training_curves(cell: Cell) -> Figure | None:
    """Loss (every 'loss*' key) and learning rate per epoch, plus train accuracy when logged."""
    curve = cell.train_curve
    if not curve:
        return None

    def series(key: str) -> list[tuple[float, float]]:
        return [(float(p.get("epoch", i)), float(p[key])) for i, p in enumerate(curve)
                if isinstance(p.get(key), (int, float))]

    keys = list(dict.fromkeys(k for p in curve for k in p))
    groups = [
        ({k: series(k) for k in keys if k.startswith("loss")}, "loss"),
        ({"lr": series("lr")}, "learning rate"),
        ({k: series(k) for k in keys if k.endswith("acc") and not k.startswith(VALIDATION_PREFIX)},
         "accuracy (fraction)"),
    ]
    svgs = [line_chart({k: v for k, v in group.items() if v}, "epoch", label)
            for group, label in groups if any(group.values())]
    if not svgs:
        return None
    return Figure("training-curves", "Training curves",
                  "Per-epoch values from the cell's train_curve (loss averaged over the epoch).", svgs)


VALIDATION_PREFIX = "val_"
VALIDATION_SERIES = ("val_clean_acc", "val_robust_acc", "val_asr", "train_robust_acc")


def validation_curves(cell: Cell) -> Figure | None:
    """The per-epoch validation probes (clean, PGD-10 or ASR) against epochs, with the train-time
    attack's accuracy beside them, each training flag marked at the epoch it fired and the
    selected epoch marked when trainer.select chose one."""
    curve = cell.train_curve
    series = {name: [(float(p.get("epoch", i)), float(p[name])) for i, p in enumerate(curve)
                     if isinstance(p.get(name), (int, float)) and not isinstance(p.get(name), bool)]
              for name in VALIDATION_SERIES}
    if not any(series[name] for name in VALIDATION_SERIES[:3]):
        return None
    events = [(float(epoch), flag, True) for flag, epoch in sorted(cell.train_flag_epochs.items())]
    selected, rule = cell.first("selected_epoch"), cell.first("selection")
    if selected is not None and rule not in (None, "last"):
        events.append((float(selected), f"selected ({rule})", False))
    svg = line_chart({k: v for k, v in series.items() if v}, "epoch", "accuracy (fraction)", events=events)
    flagged = ", ".join(f"{f} at epoch {e}" for f, e in sorted(cell.train_flag_epochs.items()))
    return Figure("validation-curves", "Validation probes",
                  "Accuracy on the validation split carved from train (never trained on, never the test split) "
                  "after each probed epoch: clean, PGD-10 at the cell's eps (or ASR on a triggered copy), and the "
                  "train-time attack's accuracy on its own batches. "
                  + (f"Training flags (red lines): {flagged}." if flagged else "No training flag fired."), [svg])


def per_class_cell(cell: Cell) -> Figure | None:
    """Rows = clean and each eval attack, columns = classes, for this one cell."""
    rows = [r for r in cell.rows if r.get("per_class_robust_acc")]
    if not rows:
        return None
    n = len(rows[0]["per_class_robust_acc"])
    names = [str(c) for c in (rows[0].get("class_names") or range(n))]
    labels, values = [], []
    clean = rows[0].get("per_class_clean_acc")
    if clean and len(clean) == len(names):
        labels.append("clean")
        values.append(clean)
    for r in rows:
        if len(r["per_class_robust_acc"]) == len(names):
            labels.append(f"{r.get('attack')}")
            values.append(r["per_class_robust_acc"])
    return Figure("per-class", "Per-class accuracy",
                  "Accuracy (%) per class: clean, and robust under each eval attack.",
                  [heatmap(labels, names, values, "accuracy")])


SETTING_FIGURES: list[SettingFigure] = [robust_vs_clean, per_class_robust, robust_vs_compute]
CELL_FIGURES: list[CellFigure] = [validation_curves, training_curves, per_class_cell]


def _safely(make: Callable[..., Figure | None], subject: str, problems: list[dict[str, str]] | None,
            *args: Any) -> Figure | None:
    """Draw one figure; a figure that cannot be drawn is recorded in `problems` (shown on the
    index with its reason) and left out, never stopping the build."""
    try:
        return make(*args)
    except Exception as err:  # any bad value in any row: the site must still build
        if problems is None:
            raise
        problems.append({"subject": subject, "what": f"figure {make.__name__}",
                         "reason": f"{type(err).__name__}: {err}"})
        return None


def setting_figures(table: dict[str, Any], cells: Mapping[str, Cell],
                    problems: list[dict[str, str]] | None = None) -> list[Figure]:
    subject = str(table.get("page"))
    return [f for f in (_safely(make, subject, problems, table, cells) for make in SETTING_FIGURES) if f is not None]


def cell_figures(cell: Cell, problems: list[dict[str, str]] | None = None) -> list[Figure]:
    return [f for f in (_safely(make, cell.key, problems, cell) for make in CELL_FIGURES) if f is not None]
